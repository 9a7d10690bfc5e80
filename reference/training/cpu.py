"""Defaults chosen for the CPU at hand (issue 21 item 3): how many threads torch runs, and whether a recipe's bf16
compute is kept. A GPU run is left as the recipe says.

Threads. torch starts one thread per core it sees, which goes wrong in a container whose CPU quota is smaller than
the cores it sees: `choose_threads` counts the CPUs the process may use (its affinity, capped by a cgroup quota)
and takes that many when torch would start more. OMP_NUM_THREADS, when set, is the user's choice and kept.

It does not lower the count for other work on the machine, though that costs most: with more threads than free
cores, each parallel operation waits for a thread the scheduler has set aside, and on this project's 2-core machine
with two other busy processes a training step ran 3.7x slower on two threads than on one (801 against 2,947 real
tokens/s, `python -m reference bench --skip generation --steps 3`). The thread count changes a step's losses in
their last digits (how a matrix product splits its sums), and two runs of one command on one machine must give the
same numbers (X1, `verify --rtol 0`), so the count depends only on the machine. Instead the CPUs idle over a
quarter of a second (/proc/stat) are measured, and when more than half a CPU is busy with other work the run says
so and how to run on fewer threads (OMP_NUM_THREADS). A run records its count, and `--resume` goes on with the
count the run began with (reference.training.runs).

Compute dtype. bf16 pays on a CPU only where it multiplies bf16 matrices in hardware (Intel AMX tiles) and the
matrices are big enough for that to outweigh converting activations to and from bf16. Measured here with the
llm2024 recipe's step (NF4 base, `bench --skip generation`), fp32 against bf16 real tokens/s: hidden size 128
(the fixture model) 1.66x, 256 1.0x, 1,024 0.68x, 2,304 (Gemma-2 2b's) 0.53x on a CPU with AMX; with AMX held
off (ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16, the avx512_bf16 instructions alone) 1.50x at 2,304, and 3.7x with no
bf16 instructions (AVX512_CORE). So `compute_dtype` keeps a recipe's bf16 on the CPU only with AMX and a hidden
size of at least BF16_MIN_HIDDEN, and otherwise computes in fp32 (the model and the 4-bit layers' compute dtype),
recorded as a departure from the recipe with its reason. Nothing is lost: fp32 only leaves out bf16's rounding.
`--cpu-dtype recipe` keeps the recipe's dtype.

Not handled: NUMA placement, and the interop thread pool (left at torch's default).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

BF16_MIN_HIDDEN = 512
"""The smallest hidden size at which bf16 is kept on a CPU with AMX (measured: 256 even, 1,024 bf16 1.47x faster)."""
IDLE_SAMPLE_SECONDS = 0.25


@dataclass(frozen=True)
class Threads:
    """The torch thread count chosen for a run, and how."""

    threads: int
    usable: int
    """CPUs the process may run on: its affinity, capped by a cgroup quota."""
    idle: float | None
    """CPUs idle while they were sampled (None: OMP_NUM_THREADS was set, or /proc/stat is unreadable)."""
    reason: str
    warning: str | None = None
    """What to do when other work holds CPUs the run's threads need."""


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs a cgroup quota allows (v2 cpu.max or v1 cfs_quota_us / cfs_period_us); None without a quota."""
    try:
        quota, period = (root / "cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def usable_cpus(limit: float | None = None) -> int:
    """The CPUs this process may run on: its affinity, capped by a cgroup quota (`limit`, read here when not
    given) rounded up, at least 1."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = cgroup_cpu_limit() if limit is None else limit
    return max(1, min(cpus, math.ceil(limit)) if limit else cpus)


def _cpu_times(cpus: set[int]) -> tuple[int, int]:
    """(idle, total) jiffies of `cpus` from /proc/stat (idle includes iowait)."""
    idle = total = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            values = [int(v) for v in fields[:8]]
            idle += values[3] + values[4]
            total += sum(values)
    return idle, total


def idle_cpus(seconds: float = IDLE_SAMPLE_SECONDS) -> float | None:
    """How many of the process's CPUs were idle over `seconds`; None where /proc/stat cannot tell."""
    try:
        cpus = set(os.sched_getaffinity(0))
        idle0, total0 = _cpu_times(cpus)
        time.sleep(seconds)
        idle1, total1 = _cpu_times(cpus)
    except (OSError, ValueError, AttributeError):
        return None
    if total1 <= total0:
        return None
    return len(cpus) * (idle1 - idle0) / (total1 - total0)


def choose_threads() -> Threads:
    """The threads a CPU run uses (the module docstring): OMP_NUM_THREADS when set, else torch's count lowered to
    the usable CPUs; with a warning when other work holds some of them."""
    import torch

    usable, default = usable_cpus(), torch.get_num_threads()
    if os.environ.get("OMP_NUM_THREADS"):
        return Threads(default, usable, None, f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, as set")
    threads = min(default, usable)
    reason = f"{usable} usable CPUs" + (f", not torch's {default}" if threads < default else "")
    idle = idle_cpus()
    return Threads(threads, usable, None if idle is None else round(idle, 2), reason, busy_warning(threads, idle))


def busy_warning(threads: int, idle: float | None) -> str | None:
    """A warning when more than half a CPU of the run's threads is held by other work: a step can run several
    times slower (the module docstring), and fewer threads (the idle CPUs rounded half up, at least 1) are the
    cure."""
    fewer = threads if idle is None else max(1, math.floor(idle + 0.5))
    if fewer >= threads:
        return None
    return (
        f"only {idle:.1f} of {threads} CPUs are idle: other work holds the rest, and {threads} threads may run "
        f"several times slower than {fewer}; OMP_NUM_THREADS={fewer} runs on {fewer}"
    )


CHOSEN: Threads | None = None
"""This process's choice, once a command has made it (a run records it in its manifest)."""


def use_threads(choice: Threads) -> Threads:
    """Set torch's intra-op threads to the choice, for the rest of the process; returns it."""
    import torch

    global CHOSEN
    torch.set_num_threads(choice.threads)
    CHOSEN = choice
    return choice


def resume_threads(recorded, device: str, say) -> None:
    """On --resume of a CPU run: torch's threads as the run began with them (`recorded`, from its run.json), since
    the count changes the losses in their last digits; OMP_NUM_THREADS, when set, wins. A count that is missing or
    not a positive whole number (a run.json from before it was recorded) leaves torch's own."""
    import torch

    if (
        not isinstance(recorded, int)
        or recorded < 1
        or not device.startswith("cpu")
        or os.environ.get("OMP_NUM_THREADS")
    ):
        return
    if recorded != torch.get_num_threads():
        say(f"--resume: {recorded} torch threads, as the run began with (not {torch.get_num_threads()})")
    use_threads(Threads(recorded, usable_cpus(), None, "as the run began with (--resume)"))


def threads_record() -> dict:
    """What a run records of its threads: the count torch runs on, and how it was chosen."""
    import torch

    how = CHOSEN.reason if CHOSEN and CHOSEN.threads == torch.get_num_threads() else "torch's default or the caller's"
    return {"threads": torch.get_num_threads(), "how": how}


def has_bf16_matrix_units() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AMX tiles with bf16)."""
    import torch

    check = getattr(getattr(torch, "cpu", None), "_is_amx_tile_supported", None)
    return bool(check and check())


def compute_dtype(hidden_size: int | None, bf16_matrix_units: bool) -> str:
    """The compute dtype a bf16 recipe gets on this CPU (the module docstring): bfloat16 or float32."""
    keep = bf16_matrix_units and hidden_size is not None and hidden_size >= BF16_MIN_HIDDEN
    return "bfloat16" if keep else "float32"


def adapt_dtype(recipe, hidden_size: int | None, bf16_matrix_units: bool | None = None):
    """(recipe, why): the recipe with its bf16 (or fp16) compute turned to fp32 where this CPU computes fp32 faster,
    each change a departure with `why`; (recipe, None) unchanged on a GPU, for an fp32 recipe, or where bf16 pays."""
    import torch

    from reference.settings.recipes import apply_overrides

    arguments = recipe.training_arguments
    half = [k for k in ("bf16", "fp16") if arguments.get(k)]
    if torch.cuda.is_available() or not half:
        return recipe, None
    units = has_bf16_matrix_units() if bf16_matrix_units is None else bf16_matrix_units
    if compute_dtype(hidden_size, units) == "bfloat16":
        return recipe, None
    have = "AMX bf16 tiles, but" if units else "no AMX bf16 tiles,"
    why = (
        f"on this CPU fp32 trains faster ({have} hidden size {hidden_size} < {BF16_MIN_HIDDEN} needed: "
        "reference/training/cpu.py); --cpu-dtype recipe keeps the recipe's"
    )
    overrides = [f"{k}=false" for k in half]
    if recipe.quantization.get("bnb_4bit_compute_dtype", "float32") != "float32":
        overrides.append("quantization.bnb_4bit_compute_dtype=float32")
    adapted = apply_overrides(recipe, overrides)
    for override in overrides:
        key = override.partition("=")[0]
        section, _, name = key.rpartition(".")
        given = getattr(recipe, section or "training_arguments")[name]
        adapted.departures[key] = {"source_value": given, "reason": why}
    return adapted, why
