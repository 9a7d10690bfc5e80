"""Generation with the seed's settings: the tasks batched against one at a time, and prefill and decode
tokens/s, bf16 against NF4.

    python benchmarks/bench_generate.py --compare tasks [--batch 8] [--tasks 16] [--new 16] [--json FILE]  # CPU
    python benchmarks/bench_generate.py --shape gemma-2-9b [--prompt 1024] [--new 128] [--batch 8] [--json FILE]  # GPU
    python benchmarks/bench_generate.py --shape tiny-gemma2 --prompt 64 --new 16 --batch 4  # CPU
    pytest benchmarks/bench_generate.py --benchmark-only  # CI smoke

Tasks (`--compare tasks`): the seed answers one task at a time; reference.inference.generation.generate with
`batch_size` sorts the prompts by length and answers them in left-padded batches (outputs equal, pinned
by spec/test_generation.py). Both answer the same tasks in one run, in alternation, on a random-weight
model with Gemma-2's layout and its 256,000-token vocabulary at a CPU-sized width and depth (CPU_SHAPE),
loaded through reference.inference.generation.load_for_inference with the fixture tokenizer. The prompts are the
seed's, retrieved from the fixture QA pool (reference/inference/retrieval.py), so their lengths vary as real ones
do; every task writes exactly `new` tokens (min_new_tokens), so both sides do the same work. Reported:
tasks/s and new tokens/s of each side and their ratio, medians of the repeats after a warm-up.

A random-weight model of the shape is loaded through reference.modeling.models (bf16, or NF4 with double
quantisation), and generation runs through reference.inference.generation with the seed's processors on:
repetition penalty 1.1, eight banned token sequences, greedy, KV cache. Prefill is one forward pass
over the prompts; decode is the rest of generate(), per new token. Decoding at batch 1 reads every
weight once per token, so tokens/s <= memory bandwidth / weight bytes; the bandwidth is measured on
the same device with a large copy. Medians of the repeats after a warm-up run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_train import device_info, random_model_dir, shape_config, sync  # noqa: E402
from benchmarks.record import SMALL_GEMMA2, report  # noqa: E402
from reference.benchmarking import machine  # noqa: E402
from reference.modeling.shapes import GEMMA2_COMMON  # noqa: E402


def measured_bandwidth(device: str, megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes/s of a large copy on the device (each byte read once and written once)."""
    import torch

    source = torch.empty(megabytes << 20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        target.copy_(source)
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * source.numel() / statistics.median(times)


def time_generation(model, batch: int, prompt: int, new: int, repeats: int, device: str) -> dict:
    import torch
    from transformers import AutoTokenizer

    from reference.inference.generation import seed_generation_config

    tokenizer = AutoTokenizer.from_pretrained(str(ROOT / "fixtures" / "models" / "tiny-gemma2"))
    config = seed_generation_config(tokenizer, max_new_tokens=new)  # the seed's eight banned strings' ids
    config.min_new_tokens = new
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, len(tokenizer), (batch, prompt), generator=generator).to(device)
    prefill, total = [], []
    for run in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            model(input_ids=ids, use_cache=True)
        sync(device)
        middle = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        sync(device)
        end = time.perf_counter()
        if run:  # the first is the warm-up
            prefill.append(middle - start)
            total.append(end - middle)
    prefill_s, generate_s = statistics.median(prefill), statistics.median(total)
    decode_s = max(generate_s - prefill_s, 1e-9) / new
    return {
        "batch": batch,
        "prompt_tokens": prompt,
        "new_tokens": new,
        "prefill_s": prefill_s,
        "prefill_tokens_per_s": batch * prompt / prefill_s,
        "decode_s_per_token": decode_s,
        "decode_tokens_per_s": batch / decode_s,
    }


def compare(shape: str, prompt: int, new: int, batch: int, repeats: int, device: str) -> dict:
    from reference.modeling import flops, models

    info = device_info(device)
    bandwidth = measured_bandwidth(device, 256 if device == "cpu" else 4096)
    variants = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = random_model_dir(shape, Path(tmp) / "model")
        for quantization in ("none", "nf4"):
            model, _ = models.load_causal_lm(model_dir, dtype="bfloat16", quantization=quantization, device=device)
            model.eval()
            weight_bytes = models.weight_bytes(model)
            runs = [time_generation(model, b, prompt, new, repeats, device) for b in sorted({1, batch})]
            for run in runs:
                run["bandwidth_bound_tokens_per_s"] = flops.decode_bandwidth_bound(
                    bandwidth, weight_bytes, run["batch"]
                )
                run["fraction_of_bound"] = flops.fraction_of_bandwidth_bound(
                    run["decode_tokens_per_s"], bandwidth, weight_bytes, run["batch"]
                )
            variants.append(
                {
                    "quantization": "bf16" if quantization == "none" else "nf4",
                    "weight_bytes": weight_bytes,
                    "runs": runs,
                }
            )
            del model
    return {
        "benchmark": "generate",
        "shape": shape,
        "config_layers": shape_config(shape)["num_hidden_layers"],
        "processors": "repetition_penalty 1.1, the seed's 8 banned strings, greedy, KV cache",
        "bandwidth_bytes_per_s": bandwidth,
        "variants": variants,
        **info,
    }


CPU_SHAPE = {**GEMMA2_COMMON, **SMALL_GEMMA2}
"""Gemma-2's layout (GQA, soft-capping, tied embeddings) and its 256,000-token vocabulary at a width and depth
a shared 2-core CPU runs in minutes: 69.5M parameters, 65.5M of them the embedding that is also the LM head."""


def task_prompts(tokenizer, count: int, k: int) -> list[str]:
    """`count` prompts the seed's way: the first QA fixture inputs as tasks, k shots each retrieved from the rest."""
    from reference.inference import retrieval

    pairs = retrieval.read_shots(ROOT / "fixtures" / "data" / "qa111_sample.jsonl")
    tasks, rest = [question for question, _ in pairs[:count]], pairs[count:]
    pool = retrieval.ShotPool(rest, retrieval.load_embedder(ROOT / "fixtures" / "models" / "tiny-embedder"))
    return [fitted.prompt for fitted in retrieval.fitted_prompts(tasks, pool, tokenizer, k, say=lambda text: None)]


def random_model_with_tokenizer(config: dict, directory: Path) -> Path:
    """A model of the config with random weights (fp32, safetensors) and the fixture tokenizer beside it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    settings = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config["model_type"], **settings))
    model.save_pretrained(directory, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(ROOT / "fixtures" / "models" / "tiny-gemma2")).save_pretrained(directory)
    return directory


def compare_tasks(config: dict, tasks: int, k: int, new: int, batch: int, repeats: int) -> dict:
    """Batched against one at a time, the same tasks in one run, alternating so both see the same load."""
    import os

    from reference.inference import generation

    load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer = generation.load_for_inference(random_model_with_tokenizer(config, Path(tmp) / "model"))
    prompts = task_prompts(tokenizer, tasks, k)
    settings = generation.seed_generation_config(tokenizer, max_new_tokens=new)
    settings.min_new_tokens = new  # random weights may end early; each task writes exactly `new` tokens
    lengths = sorted(len(tokenizer(prompt)["input_ids"]) for prompt in prompts)

    def timed(batch_size: int, some: list[str]) -> tuple[float, list[str]]:
        start = time.perf_counter()
        outputs = generation.generate(model, tokenizer, some, settings, batch_size=batch_size)
        return time.perf_counter() - start, outputs

    timed(1, prompts[:1])  # warm-up: allocations, kernels
    timed(batch, prompts[:batch])
    seconds, outputs = {1: [], batch: []}, {}
    for _ in range(repeats):  # the two sides alternate, so both see the same load
        for size in (1, batch):
            elapsed, outputs[size] = timed(size, prompts)
            seconds[size].append(elapsed)
    sides = {}
    for name, size in (("one_at_a_time", 1), ("batched", batch)):
        median = statistics.median(seconds[size])
        sides[name] = {
            "batch_size": size,
            "seconds": seconds[size],
            "median_s": median,
            "tasks_per_s": tasks / median,
            "new_tokens_per_s": tasks * new / median,
        }
    return {
        "benchmark": "generate-tasks",
        "shape": {k: v for k, v in config.items() if k != "architectures"},
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": "float32",
        "tasks": tasks,
        "shots_per_task": k,
        "prompt_tokens": {"min": lengths[0], "median": statistics.median(lengths), "max": lengths[-1]},
        "new_tokens_per_task": new,
        "processors": "repetition_penalty 1.1, the seed's 8 banned strings, greedy, KV cache",
        "repeats": repeats,
        "outputs_equal": outputs[1] == outputs[batch],
        **sides,
        "ratio_tasks_per_s": sides["batched"]["tasks_per_s"] / sides["one_at_a_time"]["tasks_per_s"],
        **machine.describe(),
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        **device_info("cpu"),
    }


def test_generate_tasks_cpu_smoke(benchmark):
    """CI-sized: the tiny Gemma-2's shape, four tasks of one shot, two new tokens, batch 2, one repeat."""
    config = json.loads((ROOT / "fixtures" / "models" / "tiny-gemma2" / "config.json").read_text())
    result = benchmark.pedantic(compare_tasks, args=(config, 4, 1, 2, 2, 1), rounds=1, iterations=1)
    benchmark.extra_info.update(ratio_tasks_per_s=result["ratio_tasks_per_s"])
    assert result["outputs_equal"] and result["batched"]["tasks_per_s"] > 0


def test_generate_cpu_smoke(benchmark):
    """CI-sized: the tiny Gemma-2 shape, prompts of 32, 8 new tokens, batch 1 and 4, on the CPU."""
    result = benchmark.pedantic(compare, args=("tiny-gemma2", 32, 8, 4, 2, "cpu"), rounds=1, iterations=1)
    benchmark.extra_info.update({k: v for k, v in result.items() if k != "variants"})
    assert all(run["decode_tokens_per_s"] > 0 for v in result["variants"] for run in v["runs"])


def main() -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--compare",
        choices=["decode", "tasks"],
        default="decode",
        help="decode: prefill and decode tokens/s, bf16 and NF4 (default); tasks: batched against one at a time",
    )
    parser.add_argument("--shape", default="gemma-2-9b", help="decode: the model's shape (tasks: CPU_SHAPE)")
    parser.add_argument("--tasks", type=int, default=16, help="tasks: how many (default 16)")
    parser.add_argument("--shots", type=int, default=1, help="tasks: shots per prompt (default 1)")
    parser.add_argument("--prompt", type=int, default=1024, help="prompt tokens per sequence (default 1024)")
    parser.add_argument("--new", type=int, default=None, help="new tokens per sequence (default 128; tasks: 16)")
    parser.add_argument("--batch", type=int, default=8, help="the batched run's size, besides batch 1 (default 8)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="append the result to this JSON file (a list)")
    parser.add_argument("--note", default=None, help="tasks: a remark kept with the result (e.g. the machine's load)")
    args = parser.parse_args()
    if args.compare == "tasks":
        result = compare_tasks(CPU_SHAPE, args.tasks, args.shots, args.new or 16, args.batch, args.repeats)
        result["note"] = args.note
    else:
        result = compare(args.shape, args.prompt, args.new or 128, args.batch, args.repeats, args.device)
    report(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
