"""Tokens/s and MFU of the LLM2024 training step, QLoRA (NF4 base) against LoRA on a bf16 base, side by side.

    python benchmarks/bench_train.py --shape gemma-2-9b --seq 2048 --batch 4 [--steps 6] [--json FILE]   # on a GPU
    python benchmarks/bench_train.py --shape tiny-gemma2 --seq 64 --batch 2                              # CPU-sized
    pytest benchmarks/bench_train.py --benchmark-only                                                    # CI smoke

The step is the real one: a random-weight model of the named shape is written to disk and loaded through
reference.models (bitsandbytes NF4 with double quantisation and bf16 compute, as seed 001), the recipe's
LoRA (r=64, alpha 64, the seven projections) is attached through reference.lora with gradient
checkpointing, and each step is forward + backward + bitsandbytes 8-bit AdamW under bf16 autocast.
The first step is timed apart (allocation, kernel selection); the rest are reported as a median.
MFU = model FLOPs per token (reference/flops.py) x tokens/s / peak, where the peak is the datasheet's
for a known GPU, else a measured large matrix product in bf16 on the same device.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.record import report  # noqa: E402

LORA = {
    "r": 64,
    "lora_alpha": 64,
    "lora_dropout": 0.0,
    "bias": "none",
    "random_state": 3407,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def shape_config(shape: str) -> dict:
    """A published shape by name (reference/shapes.py), a fixture config by name, or a config directory."""
    from reference.shapes import REAL_SHAPES, load_config

    fixture = ROOT / "fixtures" / "configs" / shape
    return load_config(fixture if shape not in REAL_SHAPES and fixture.is_dir() else shape)


def random_model_dir(shape: str, directory: Path, device: str) -> Path:
    """A model of the shape with random weights, saved as safetensors (throughput does not depend on values)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = dict(shape_config(shape))
    model_type = config.pop("model_type")
    hf_config = AutoConfig.for_model(model_type, **{k: v for k, v in config.items() if k != "architectures"})
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16)
    model.save_pretrained(directory, safe_serialization=True)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return directory


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_steps(model_dir: Path, quantization: str, device: str, batch: int, seq: int, steps: int, r: int) -> dict:
    import bitsandbytes as bnb
    import torch

    from reference import lora, models

    model, _ = models.load_causal_lm(model_dir, dtype="bfloat16", quantization=quantization, device=device)
    weight_bytes = models.weight_bytes(model)
    model = lora.attach(model, {**LORA, "r": r, "lora_alpha": r}, gradient_checkpointing=True)
    model.config.use_cache = False
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = bnb.optim.AdamW(trainable, lr=2e-4, weight_decay=0.01, optim_bits=8)  # what optim="adamw_8bit" builds
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (batch, seq), generator=generator).to(device)
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - start)
    peak_memory = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    del model, optimizer
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return {
        "quantization": quantization,
        "first_step_s": times[0],
        "step_s": times[1:],
        "median_step_s": statistics.median(times[1:]),
        "tokens_per_s": batch * seq / statistics.median(times[1:]),
        "lora_parameters": sum(p.numel() for p in trainable),
        "weight_bytes": weight_bytes,
        "peak_memory_bytes": peak_memory,
        "final_loss": float(loss.detach()),
    }


def device_info(device: str) -> dict:
    from importlib import metadata

    import torch

    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or platform.machine()
    versions = {p: metadata.version(p) for p in ("torch", "transformers", "peft", "bitsandbytes", "accelerate")}
    return {
        "device": name,
        "cuda": torch.version.cuda if device.startswith("cuda") else None,
        **versions,
        "date": time.strftime("%Y-%m-%d"),
    }


def compare(shape: str, seq: int, batch: int, steps: int, device: str, r: int = 64) -> dict:
    from reference import flops, lora, shapes

    config = shape_config(shape)
    info = device_info(device)
    peak = flops.peak_flops(info["device"])
    peak_source = "datasheet bf16 dense"
    if peak is None and device == "cpu":  # CPUs without bf16 matrix units run a large bf16 matmul slower than fp32
        peak, peak_source = flops.measured_matmul_flops(device, "float32", 1024), "measured fp32 matmul 1024^3 (CPU)"
    elif peak is None:
        peak, peak_source = flops.measured_matmul_flops(device, "bfloat16", 8192), "measured bf16 matmul 8192^3"
    lora_parameters = lora.trainable_parameters(config, r, shapes.PROJECTIONS)
    per_token = flops.lora_training_flops_per_token(config, seq, lora_parameters)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = random_model_dir(shape, Path(tmp) / "model", device)
        runs = [train_steps(model_dir, q, device, batch, seq, steps, r) for q in ("nf4", "none")]
    for run in runs:
        run["model_flops_per_s"] = run["tokens_per_s"] * per_token
        run["mfu"] = flops.model_flops_utilisation(run["tokens_per_s"], per_token, peak)
    nf4, bf16 = runs
    return {
        "benchmark": "train_step",
        "shape": shape,
        "seq_len": seq,
        "batch": batch,
        "lora_r": r,
        "gradient_checkpointing": True,
        "optimizer": "bitsandbytes AdamW 8-bit",
        "compute_dtype": "bfloat16",
        "flops_per_token": per_token,
        "peak_flops": peak,
        "peak_source": peak_source,
        "runs": runs,
        "nf4_over_bf16_tokens_per_s": nf4["tokens_per_s"] / bf16["tokens_per_s"],
        **info,
    }


def test_train_step_cpu_smoke(benchmark):
    """CI-sized: the tiny Gemma-2 shape, sequences of 32, batch 2, r 8, on the CPU."""
    result = benchmark.pedantic(compare, args=("tiny-gemma2", 32, 2, 3, "cpu", 8), rounds=1, iterations=1)
    benchmark.extra_info.update({k: v for k, v in result.items() if k != "runs"})
    assert all(run["tokens_per_s"] > 0 and 0 < run["mfu"] for run in result["runs"])


def main() -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="gemma-2-9b", help="a config under fixtures/configs (default gemma-2-9b)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6, help="steps per variant, the first timed apart (default 6)")
    parser.add_argument("--r", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="append the result to this JSON file (a list)")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first is warm-up)")
    result = compare(args.shape, args.seq, args.batch, args.steps, args.device, args.r)
    report(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
