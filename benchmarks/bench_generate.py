"""Prefill and decode tokens/s with the seed's generation settings, bf16 against NF4, batch 1 and batched.

    python benchmarks/bench_generate.py --shape gemma-2-9b [--prompt 1024] [--new 128] [--batch 8] [--json FILE]  # GPU
    python benchmarks/bench_generate.py --shape tiny-gemma2 --prompt 64 --new 16 --batch 4  # CPU
    pytest benchmarks/bench_generate.py --benchmark-only  # CI smoke

A random-weight model of the shape is loaded through reference.models (bf16, or NF4 with double
quantisation), and generation runs through reference.generation with the seed's processors on:
repetition penalty 1.1, eight banned token sequences, greedy, KV cache. Prefill is one forward pass
over the prompts; decode is the rest of generate(), per new token. Decoding at batch 1 reads every
weight once per token, so tokens/s <= memory bandwidth / weight bytes; the bandwidth is measured on
the same device with a large copy. Medians of the repeats after a warm-up run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_train import device_info, random_model_dir, shape_config, sync  # noqa: E402
from benchmarks.record import report  # noqa: E402


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

    from reference.generation import GenerationSettings

    settings = GenerationSettings(max_new_tokens=new)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch, prompt), generator=generator).to(device)
    banned = [
        [int(t)] for t in torch.randint(3, vocab, (8,), generator=generator)
    ]  # eight banned sequences, as the seed
    prefill, total = [], []
    for run in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            model(input_ids=ids, use_cache=True)
        sync(device)
        middle = time.perf_counter()
        with torch.no_grad():
            model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                min_new_tokens=new,
                repetition_penalty=settings.repetition_penalty,
                use_cache=settings.use_cache,
                do_sample=settings.do_sample,
                bad_words_ids=banned,
                pad_token_id=0,
            )
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
    from reference import flops, models

    info = device_info(device)
    bandwidth = measured_bandwidth(device, 256 if device == "cpu" else 4096)
    variants = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = random_model_dir(shape, Path(tmp) / "model", device)
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
        "processors": "repetition_penalty 1.1, 8 banned sequences, greedy, KV cache",
        "bandwidth_bytes_per_s": bandwidth,
        "variants": variants,
        **info,
    }


def test_generate_cpu_smoke(benchmark):
    """CI-sized: the tiny Gemma-2 shape, prompts of 32, 8 new tokens, batch 1 and 4, on the CPU."""
    result = benchmark.pedantic(compare, args=("tiny-gemma2", 32, 8, 4, 2, "cpu"), rounds=1, iterations=1)
    benchmark.extra_info.update({k: v for k, v in result.items() if k != "variants"})
    assert all(run["decode_tokens_per_s"] > 0 for v in result["variants"] for run in v["runs"])


def main() -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="gemma-2-9b")
    parser.add_argument("--prompt", type=int, default=1024, help="prompt tokens per sequence (default 1024)")
    parser.add_argument("--new", type=int, default=128, help="new tokens per sequence (default 128)")
    parser.add_argument("--batch", type=int, default=8, help="the batched run's size, besides batch 1 (default 8)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="append the result to this JSON file (a list)")
    args = parser.parse_args()
    result = compare(args.shape, args.prompt, args.new, args.batch, args.repeats, args.device)
    report(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
