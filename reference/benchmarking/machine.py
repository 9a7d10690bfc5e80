"""What a benchmark result records about the machine it was measured on, so that two results can be told apart: the
CPU and the flags that pick its kernels (AMX and AVX512-BF16 tiles, which bitsandbytes and oneDNN use), the CPUs
the process may use and torch's threads, memory, the GPU, and the versions of the packages that ran."""

from __future__ import annotations

import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

KERNEL_FLAGS = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets")


def version(name: str) -> str | None:
    """The package's version, None when it is not installed (trl is an extra)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def describe(packages: tuple[str, ...] = PACKAGES) -> dict:
    """The machine and versions (the module docstring); torch's threads and the GPU only where torch is loaded."""
    from reference.training import cpu

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    meminfo = Path("/proc/meminfo").read_text().splitlines() if Path("/proc/meminfo").exists() else []
    total = next((int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemTotal")), None)
    described = {
        "cpu": names[0] if names else platform.processor() or platform.machine(),
        "kernel_flags": [f for f in KERNEL_FLAGS if f in flags],
        "usable_cpus": cpu.usable_cpus(),
        "memory_bytes": total,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }
    if "torch" in sys.modules:
        import torch

        described["torch_threads"] = torch.get_num_threads()
        described["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    described["versions"] = {name: version(name) for name in packages}
    described["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS")
    return described
