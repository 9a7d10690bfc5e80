"""The training step side by side: trl's SFTTrainer as the seed sets it up against the project's path, padded and
padding-free, in one run; and the LLM2024 step on an NF4 base against a bf16 one, with MFU.

    python benchmarks/bench_train.py [--rounds 3] [--steps 5] [--threads 1] [--json results/train-cpu.json]
    python benchmarks/bench_train.py --compare bases --shape gemma-2-9b --seq 2048 --batch 4 [--json FILE]   # a GPU
    pytest benchmarks/bench_train.py --benchmark-only                                                        # CI smoke

`--compare paths` (the default): the variants of benchmarks/train_paths.py (trl, padded, padding-free, and padded
with the recipe's bf16 for the CPU's compute dtype) train the same random-weight small Gemma-2 on the same length
mix, the llm2024 recipe's settings on both sides, each run in a process of its own (its peak memory its own).
A round runs every variant once, in an order rotated each round so that a change in the machine's load falls on
each alike; each run is a warm-up step and `--steps - 1` timed ones. Per variant: real tokens/s (wall clock, the
median over rounds of a run's real tokens over its timed seconds), the same per CPU-second (what a step costs
whatever else runs on a shared machine), peak memory, the fraction of the positions computed that were padding;
the ratios to trl's; the padding fraction of the padded batches; the load average, before and after. Every
variant must have fed the model the same real tokens step for step.

`--compare bases`: a random-weight model of a real shape loaded through reference.modeling.models (bitsandbytes NF4 with
double quantisation and bf16 compute, as seed 001) against a bf16 base, the recipe's LoRA (r=64, alpha 64, the
seven projections) attached through reference.modeling.lora with gradient checkpointing, each step forward + backward +
bitsandbytes 8-bit AdamW under bf16 autocast; the first step timed apart, the rest as a median.
MFU = model FLOPs per token (reference/modeling/flops.py) x tokens/s / peak, where the peak is the datasheet's
for a known GPU, else a measured large matrix product in bf16 on the same device.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.record import report  # noqa: E402
from reference.benchmarking import machine  # noqa: E402

LORA = {
    "r": 64,
    "lora_alpha": 64,
    "lora_dropout": 0.0,
    "bias": "none",
    "random_state": 3407,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def shape_config(shape: str) -> dict:
    """A published shape by name (reference/modeling/shapes.py), a fixture config by name, or a config directory."""
    from reference.modeling.shapes import REAL_SHAPES, load_config

    fixture = ROOT / "fixtures" / "configs" / shape
    return load_config(fixture if shape not in REAL_SHAPES and fixture.is_dir() else shape)


def random_model_dir(shape: str, directory: Path) -> Path:
    """A model of the shape with random weights, as `bench --shape` builds it (reference.benchmarking.random_weights):
    throughput does not depend on the values."""
    from reference.benchmarking import random_weights

    return random_weights.build(shape_config(shape), directory)


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_steps(model_dir: Path, quantization: str, device: str, batch: int, seq: int, steps: int, r: int) -> dict:
    import bitsandbytes as bnb
    import torch

    from reference.modeling import lora, models

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
    from reference.modeling import flops, lora, shapes

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
        model_dir = random_model_dir(shape, Path(tmp) / "model")
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


PATHS = ("trl", "padded", "padding-free", "padded-bf16")
GOALS = {"padded": 0.95, "padding-free": 1.3}
"""Real tokens/s over trl's padded step, at least, on this project's CPU (the goals its benchmark was held to)."""
DTYPE_PAIRS = (("padded", "padded-bf16"), ("nf4-fp32", "nf4-bf16"))
"""fp32 against the recipe's bf16 compute, on a full-precision base and on NF4."""
CHILD_ENVIRONMENT = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20), "TOKENIZERS_PARALLELISM": "false"}
"""glibc maps each block of 1 MiB or more on its own and unmaps it when freed, so the resident memory a run
leaves behind is not lent to the next allocation unseen (as bench_loss.py does)."""


def run_variant(variant: str, model_dir: Path, data: Path, out: Path, steps: int, threads: int | None) -> dict:
    """One variant in a fresh process (benchmarks/train_paths.py): its steps and peak memory."""
    command = [sys.executable, "-m", "benchmarks.train_paths", variant, "--model", str(model_dir)]
    command += ["--data", str(data), "--out", str(out), "--steps", str(steps)]
    command += ["--threads", str(threads)] if threads else []
    load = os.getloadavg()[0]
    done = subprocess.run(command, cwd=ROOT, env=CHILD_ENVIRONMENT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{done.stderr[-3000:]}")
    run = json.loads(done.stdout.strip().splitlines()[-1])
    timed = run["steps"][1:]  # the first step is the warm-up
    tokens, seconds = sum(s["tokens"] for s in timed), sum(s["seconds"] for s in timed)
    run.update(
        load_average_before=load,
        tokens_per_s=tokens / seconds,
        tokens_per_cpu_s=tokens / sum(s["cpu_seconds"] for s in timed),
        padding_computed=1 - tokens / sum(s["positions"] for s in timed),
    )
    return run


def summarise(runs: list[dict], variants: list[str]) -> dict:
    """Per variant the medians over rounds, and the ratios to trl's medians."""
    by_variant = {v: [r for r in runs if r["variant"] == v] for v in variants}
    summary = {
        v: {
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
            "tokens_per_cpu_s": statistics.median(r["tokens_per_cpu_s"] for r in rs),
            "peak_rss_bytes": statistics.median(r["peak_rss_bytes"] for r in rs),
            "padding_computed": rs[0]["padding_computed"],
        }
        for v, rs in by_variant.items()
    }
    if "trl" in summary:
        for row in summary.values():
            for key in ("tokens_per_s", "tokens_per_cpu_s", "peak_rss_bytes"):
                row[f"{key}_over_trl"] = row[key] / summary["trl"][key]
    return summary


def compare_paths(rounds: int, steps: int, threads: int | None, variants=PATHS, synthetic_records: int = 60) -> dict:
    from benchmarks import train_paths

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = train_paths.small_model(Path(tmp) / "model")
        records = train_paths.length_mix(synthetic_records)
        data = Path(tmp) / "records.jsonl"
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        load_before, runs = os.getloadavg(), []
        for round_ in range(rounds):
            order = list(variants[round_ % len(variants) :]) + list(variants[: round_ % len(variants)])
            for variant in order:
                out = Path(tmp) / f"{variant}-{round_}"
                runs.append({"round": round_, **run_variant(variant, model_dir, data, out, steps, threads)})
        config = json.loads((model_dir / "config.json").read_text())
    fed = {tuple(s["tokens"] for s in run["steps"]) for run in runs}
    if len(fed) != 1:
        raise AssertionError(f"the variants were fed different real tokens per step: {sorted(fed)}")
    summary = summarise(runs, list(variants))
    padded = next(r for r in runs if r["variant"] != "padding-free")  # the padded batches of the timed steps
    lengths = sorted(train_paths.record_tokens(records))
    return {
        "benchmark": "train_paths",
        "model": {k: config[k] for k in ("model_type", "vocab_size", *train_paths.SMALL_GEMMA2)},
        "lora": {"r": 64, "lora_alpha": 64, "target_modules": train_paths.SEVEN_PROJECTIONS},
        "settings": "llm2024 recipe: batch 4, accumulation 1, max_seq_length 2048, gradient checkpointing, "
        "adamw_8bit, lr 2e-4 linear, NEFTune alpha 5, seed 3407; fp32 and no NF4 unless the variant says so; "
        "the project's paths with the recipe's chunked LM-head loss (sft.chunked_loss), trl with its own",
        "records": len(records),
        "record_tokens": {"min": lengths[0], "median": statistics.median(lengths), "max": lengths[-1]},
        "tokens_per_step": [s["tokens"] for s in runs[0]["steps"]],
        "positions_per_step_padded": [s["positions"] for s in padded["steps"]],
        "padding_fraction": padded["padding_computed"],
        "rounds": rounds,
        "steps_per_run": steps,
        "timed_steps_per_run": steps - 1,
        "torch_threads": runs[0]["threads"],
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "summary": summary,
        "goals": {
            v: {
                "over_trl_at_least": g,
                "met": summary[v]["tokens_per_s_over_trl"] >= g,
                "met_per_cpu_second": summary[v]["tokens_per_cpu_s_over_trl"] >= g,
            }
            for v, g in GOALS.items()
            if "trl" in summary and v in summary
        },
        "fp32_over_bf16": {
            fp32: {key: summary[fp32][key] / summary[bf16][key] for key in ("tokens_per_s", "tokens_per_cpu_s")}
            for fp32, bf16 in DTYPE_PAIRS
            if fp32 in summary and bf16 in summary
        },
        "runs": runs,
    }


def test_train_paths_cpu_smoke(benchmark):
    """CI-sized: trl, padded and padding-free, one round of a warm-up and one timed step, the fixture records."""
    result = benchmark.pedantic(
        compare_paths, args=(1, 2, 1, ("trl", "padded", "padding-free"), 0), rounds=1, iterations=1
    )
    benchmark.extra_info.update(result["summary"])
    assert all(row["tokens_per_s"] > 0 for row in result["summary"].values())


def test_train_step_cpu_smoke(benchmark):
    """CI-sized: the tiny Gemma-2 shape, sequences of 32, batch 2, r 8, on the CPU."""
    result = benchmark.pedantic(compare, args=("tiny-gemma2", 32, 2, 3, "cpu", 8), rounds=1, iterations=1)
    benchmark.extra_info.update({k: v for k, v in result.items() if k != "runs"})
    assert all(run["tokens_per_s"] > 0 and 0 < run["mfu"] for run in result["runs"])


def main() -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", choices=("paths", "bases"), default="paths")
    parser.add_argument("--rounds", type=int, default=3, help="paths: runs of each variant (default 3)")
    parser.add_argument("--steps", type=int, default=None, help="steps per run, the first timed apart (5; bases 6)")
    parser.add_argument("--threads", type=int, default=1, help="paths: torch threads per run (default 1; 0: torch's)")
    parser.add_argument("--variants", nargs="+", default=list(PATHS), help="paths: of benchmarks/train_paths.py")
    parser.add_argument("--shape", default="gemma-2-9b", help="bases: a config under fixtures/configs")
    parser.add_argument("--seq", type=int, default=2048, help="bases")
    parser.add_argument("--batch", type=int, default=4, help="bases")
    parser.add_argument("--r", type=int, default=64, help="bases")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="bases")
    parser.add_argument("--note", default=None, help="a remark kept with the result (e.g. the machine's load)")
    parser.add_argument("--json", default=None, help="append the result to this JSON file (a list)")
    args = parser.parse_args()
    steps = args.steps or (5 if args.compare == "paths" else 6)
    if steps < 2:
        parser.error("--steps must be at least 2 (the first is warm-up)")
    if args.compare == "paths":
        result = {**compare_paths(args.rounds, steps, args.threads or None, tuple(args.variants)), **machine.describe()}
    else:
        result = compare(args.shape, args.seq, args.batch, steps, args.device, args.r)
    report({**result, "note": args.note}, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
