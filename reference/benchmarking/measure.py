"""`bench`: training and generation tokens/s of a local model on the device at hand, measured through the project's
own paths, with what bounds them.

Training runs the recipe's SFT step (reference.methods.train: the same run as `train`, checkpoints off) on the
fixtures' QA and magpie records; its manifest gives each step's real tokens (padding left out) and seconds. The first
step (allocation, warm-up) is reported apart; tokens/s is the steady rate over the others. MFU is the model FLOPs per
token (reference.modeling.flops, with the records' mean length as the attention's T) times tokens/s over the peak:
the datasheet's for a known GPU, else a large matrix product measured here in the run's compute dtype.

Generation decodes a fixed number of new tokens for a batch of the fixtures' tasks with the seed's settings (greedy,
repetition penalty, KV cache; reference.inference.generation), min_new_tokens = max_new_tokens so every row makes
them all; the first call is a warm-up. Decoding reads every weight once a step, so its bound is bandwidth / weight
bytes x batch; the fraction of it is reported against a copy bandwidth measured here.

Peak memory: on CUDA the allocator's peak; on the CPU the process's peak resident size (loading included).
"""

from __future__ import annotations

import json
import resource
import statistics
import time
from pathlib import Path

from reference.modeling import flops

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
TRAINING_DATA = (FIXTURES / "data" / "qa111_sample.jsonl", FIXTURES / "data" / "magpie_sample.jsonl")
TASKS = FIXTURES / "data" / "tasks_sample.jsonl"


def training_records(path: Path) -> Path:
    """The fixtures' QA and magpie records as one instruction/response JSONL file at `path`."""
    from reference.records import data

    rows = list(data.load_records(TRAINING_DATA[0], data.QA111_COLUMNS)) + list(data.load_records(TRAINING_DATA[1]))
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def peak_memory_bytes(device: str) -> int:
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def peak_flops(device: str, dtype: str) -> tuple[float, str]:
    """(FLOP/s, where it comes from): a known GPU's datasheet peak, else a measured matrix product."""
    import torch

    if device.startswith("cuda"):
        known = flops.peak_flops(torch.cuda.get_device_name())
        if known:
            return known, f"datasheet ({torch.cuda.get_device_name()})"
    return flops.measured_matmul_flops(device, dtype), f"measured {dtype} matrix product on {device}"


def copy_bandwidth(device: str, megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes/s read plus written by copying a large tensor: the practical memory bandwidth."""
    import torch

    source = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        target.copy_(source)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * source.numel() / statistics.median(times)


def training(recipe, model_dir: str, output: Path, steps: int, say) -> dict:
    """The recipe's SFT step on `model_dir`, `steps` optimizer steps (the first apart); see the module docstring."""
    from reference.methods import train
    from reference.modeling import shapes
    from reference.settings.recipes import apply_overrides

    recipe = apply_overrides(recipe, [f"max_steps={steps}", "save_strategy=no", "report_to=none"])
    records = str(training_records(output / "records.jsonl"))
    # OUTPUT/run is the benchmark's own: a second bench into OUTPUT times it again (a user's folder is still refused)
    record = train.run(recipe, model_dir, records, str(output / "run"), say=say, overwrite=True)
    args = record.settings["training_arguments"]
    device = "cuda" if not args.get("use_cpu") and cuda_available() else "cpu"
    dtype = "bfloat16" if args.get("bf16") else "float32"
    steady = record.steps[1:]
    mean_length = record.data["tokens"] / record.data["records"]
    per_token = flops.lora_training_flops_per_token(
        shapes.load_config(model_dir), round(mean_length), record.trainable_parameters
    )
    peak, peak_source = peak_flops(device, dtype)
    rate = record.steady_tokens_per_second or 0.0
    return {
        "device": device,
        "compute_dtype": dtype,
        "steps": len(record.steps),
        "tokens_per_step": statistics.median(s["tokens"] for s in record.steps),
        "first_step_seconds": record.warmup_step_seconds,
        "step_seconds": statistics.median(s["seconds"] for s in steady) if steady else None,
        "tokens_per_second": rate,
        "losses": [s["loss"] for s in record.steps],
        "peak_memory_bytes": peak_memory_bytes(device),
        "flops_per_token": per_token,
        "peak_flops": peak,
        "peak_flops_source": peak_source,
        "mfu": flops.model_flops_utilisation(rate, per_token, peak),
        "trainable_parameters": record.trainable_parameters,
        "base": record.model.get("quantization"),
        "threads": record.device.get("threads"),
        "checkpointing": bool(args.get("activation_checkpointing")),
        "recompute": record.device.get("recompute"),
        "manifest": str(record.path),
    }


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def generation(model_dir: str, new_tokens: int, batch: int, dtype: str) -> dict:
    """`batch` of the fixtures' tasks, each decoding exactly `new_tokens` with the seed's settings; a warm-up call
    first, then one timed call."""
    import torch

    from reference.inference import generation as inference
    from reference.modeling import models

    model, tokenizer = inference.load_for_inference(model_dir, dtype=dtype)
    device = str(next(model.parameters()).device)
    tasks = [row["input"] for row in inference.read_tasks(TASKS)]
    prompts = (tasks * batch)[:batch]
    config = inference.seed_generation_config(tokenizer, max_new_tokens=new_tokens)
    config.min_new_tokens = new_tokens  # every row decodes them all: the count is exact
    encoded = tokenizer.pad(
        {"input_ids": [tokenizer(p)["input_ids"] for p in prompts]}, padding_side="left", return_tensors="pt"
    ).to(device)
    with torch.no_grad():
        model.generate(**encoded, generation_config=config)  # warm-up
        start = time.perf_counter()
        model.generate(**encoded, generation_config=config)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    rate = batch * new_tokens / seconds
    weights = models.weight_bytes(model)
    bandwidth = copy_bandwidth(device)
    return {
        "device": device,
        "dtype": dtype,
        "batch": batch,
        "new_tokens": new_tokens,
        "prompt_tokens": int(encoded["input_ids"].shape[1]),
        "seconds": seconds,
        "tokens_per_second": rate,
        "weight_bytes": weights,
        "copy_bandwidth": bandwidth,
        "bandwidth_fraction": flops.fraction_of_bandwidth_bound(rate, bandwidth, weights, batch),
        "peak_memory_bytes": peak_memory_bytes(device),
    }


def recomputed(checkpointing: bool, plan: dict | None) -> str:
    """How many layers checkpointing recomputed (reference.training.recompute's plan)."""
    if not checkpointing:
        return "none (no checkpointing)"
    if plan is None:
        return "all"
    return f"{plan['layers'] - plan['kept']} of {plan['layers']} (the others' activations fit and were kept)"


def table(results: dict) -> str:
    """The measured results as a person reads them."""
    rows = []
    if "training" in results:
        t = results["training"]
        step = f"{t['step_seconds']:.3f} s" if t["step_seconds"] is not None else "one step only"
        rows += [
            (
                "training",
                f"{t['tokens_per_second']:,.0f} real tokens/s ({t['device']}, {t['compute_dtype']}, base {t['base']})",
            ),
            ("  step (median) / first step", f"{step} / {t['first_step_seconds']:.3f} s (warm-up, apart)"),
            ("  real tokens per step", f"{t['tokens_per_step']:,.0f}"),
            ("  MFU", f"{t['mfu']:.1%} of {t['peak_flops']:.3g} FLOP/s ({t['peak_flops_source']})"),
            ("  peak memory", f"{t['peak_memory_bytes'] / 2**30:.2f} GiB"),
            ("  threads, layers recomputed", f"{t['threads']}, {recomputed(t['checkpointing'], t['recompute'])}"),
            ("  loss, first -> last", f"{t['losses'][0]:.4f} -> {t['losses'][-1]:.4f}"),
        ]
    if "trl" in results:
        t = results["trl"]
        rows += [
            (
                f"trl SFTTrainer ({t['setting']})",
                f"{t['tokens_per_second']:,.0f} real tokens/s; the project: {t['ratio']:.2f}x",
            )
        ]
    if "generation" in results:
        g = results["generation"]
        rows += [
            (
                "generation",
                f"{g['tokens_per_second']:,.1f} new tokens/s (batch {g['batch']} x {g['new_tokens']} "
                f"tokens, {g['device']}, {g['dtype']})",
            ),
            (
                "  of the bandwidth bound",
                f"{g['bandwidth_fraction']:.1%} ({g['weight_bytes'] / 2**20:,.1f} MiB of "
                f"weights read a step at {g['copy_bandwidth'] / 1e9:.1f} GB/s copy bandwidth)",
            ),
        ]
    if results.get("errors"):
        rows += [("not measured", "; ".join(results["errors"]))]
    width = max(len(k) for k, _ in rows) if rows else 0
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
