"""Peak memory and time of the LM-head loss in chunks against the full logits, at Gemma-2's vocabulary, side by side.

    python benchmarks/bench_loss.py [--tokens 2048] [--hidden 256] [--vocab 256000] [--chunk 256] [--repeats 3]
                                    [--variants full chunked trl] [--json FILE]
    pytest benchmarks/bench_loss.py --benchmark-only      # a CI-sized run of the same comparison

Each variant is the loss alone, forward + backward, from the decoder's last hidden states (N tokens × H, with a
gradient, as in training) and a frozen LM head (V × H; LoRA trains neither the head nor the tied embedding),
with Gemma-2's final-logit soft cap of 30 and next-token labels, a tenth of them -100:
  full     the logits, cap · tanh(logits / cap), transformers' ForCausalLMLoss: Gemma-2's forward as it runs now
  chunked  reference.methods.chunked_loss.chunked_cross_entropy, --chunk tokens at a time
  trl      trl's ChunkedLogProbFunction, the fused LM head SFTTrainer uses (its torch fallback off CUDA), for
           reference: a maintained implementation already installed
  liger    liger-kernel's fused linear cross-entropy (CUDA with liger-kernel only)

Each variant runs in a process of its own (this script with --variant), one after the other, so that its peak
memory is its own. Peak memory, measured two ways:
  peak_rss_bytes     on the CPU, the process's peak resident memory (VmHWM, reset through /proc/self/clear_refs
                     after the warm-up) over the timed runs, less its resident memory before them: everything
                     the loss allocates, the allocator's own use included, and nothing of the imports (glibc's
                     malloc maps blocks of 1 MiB and more on their own, for every variant alike: MMAP_THRESHOLD);
                     on CUDA (peak_allocated_bytes), torch.cuda.max_memory_allocated less what was allocated;
  peak_tensor_bytes  the peak bytes of live tensors in one more, untimed, forward + backward, counted by torch's
                     MemTracker (a dispatch mode that sees every tensor the forward and backward create).
Time: the median of --repeats forward + backward after one warm-up. The loss and the norm of the hidden states'
gradient are recorded for each variant and must agree with the full computation's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_train import device_info, sync  # noqa: E402
from benchmarks.record import report  # noqa: E402
from reference.benchmarking import machine  # noqa: E402

CAP = 30.0  # Gemma-2's final_logit_softcapping
VARIANTS = ("full", "chunked", "trl")
MMAP_THRESHOLD = 1 << 20
CHILD_ENVIRONMENT = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
"""glibc's malloc maps every block of 1 MiB or more on its own and unmaps it when freed (a fixed threshold, where
its default one grows up to 32 MiB and keeps freed blocks below it), so resident memory follows the memory in use."""


def loss_function(variant: str, chunk: int):
    """loss(hidden, weight, labels) for the variant; labels are already shifted (next-token) and flat."""
    import torch
    import torch.nn.functional as F

    if variant == "full":
        from transformers.loss.loss_utils import ForCausalLMLoss

        def full(hidden, weight, labels):
            logits = torch.tanh(F.linear(hidden, weight) / CAP) * CAP
            return ForCausalLMLoss(logits, labels, weight.shape[0], shift_labels=labels)

        return full
    if variant == "chunked":
        from reference.methods.chunked_loss import chunked_cross_entropy

        return lambda hidden, weight, labels: chunked_cross_entropy(hidden, weight, labels, CAP, chunk_size=chunk)
    if variant == "trl":
        from trl.kernels import ChunkedLogProbFunction

        def trl_fused(hidden, weight, labels):
            counted = labels != -100
            vocab_tile = 32_768  # what trl's add_fused_lm_head passes
            log_probs = ChunkedLogProbFunction.apply(
                hidden, weight, None, labels.clamp(min=0), 1.0, vocab_tile, CAP, 1.0, ("log_probs",)
            )[0]
            return -(log_probs * counted).sum() / counted.sum()

        return trl_fused
    if variant == "liger":
        from reference.methods.chunked_loss import liger_cross_entropy

        return lambda hidden, weight, labels: liger_cross_entropy(hidden, weight, labels, CAP)
    raise ValueError(f"unknown variant {variant!r}")


def inputs(tokens: int, hidden: int, vocab: int, device: str):
    import torch

    generator = torch.Generator().manual_seed(0)
    states = torch.randn(tokens, hidden, generator=generator).to(device).requires_grad_()
    weight = torch.randn(vocab, hidden, generator=generator).mul_(4 / hidden**0.5).to(device)  # logits ~ N(0, 16)
    labels = torch.randint(0, vocab, (tokens,), generator=generator)
    labels[torch.rand(tokens, generator=generator) < 0.1] = -100
    return states, weight, labels.to(device)


def resident_bytes() -> int:
    """The process's resident memory now (Linux /proc)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_high_water() -> None:
    """Set the process's peak resident memory (VmHWM) to its resident memory now (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def high_water_bytes() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024  # kB


def run_variant(variant: str, tokens: int, hidden: int, vocab: int, chunk: int, repeats: int, device: str) -> dict:
    """One variant in this process: warm-up, timed repeats, peak memory (see the module docstring)."""
    import torch
    from torch.distributed._tools.mem_tracker import MemTracker

    loss_of = loss_function(variant, chunk)
    states, weight, labels = inputs(tokens, hidden, vocab, device)

    def step():
        states.grad = None
        loss = loss_of(states, weight, labels)
        loss.backward()
        return loss

    sync(device)
    start = time.perf_counter()
    step()  # warm-up: lazy imports and first allocations, before the baseline
    sync(device)
    warmup = time.perf_counter() - start
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resident_bytes()
        reset_high_water()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        loss = step()
        sync(device)
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if device.startswith("cuda") else high_water_bytes()) - before
    tracker = MemTracker()
    with tracker:
        step()
    tensor_peak = tracker.get_tracker_snapshot("peak")[states.device]["Total"]
    return {
        "variant": variant,
        "warmup_s": warmup,
        "seconds": times,
        "median_s": statistics.median(times),
        "peak_rss_bytes" if not device.startswith("cuda") else "peak_allocated_bytes": peak,
        "peak_tensor_bytes": tensor_peak,
        "loss": float(loss),
        "grad_norm": float(states.grad.norm()),
    }


def compare(tokens, hidden, vocab, chunk, repeats, variants=VARIANTS, device="cpu") -> dict:
    """Every variant in its own process, one after the other; memory and time ratios against the full logits."""
    runs = []
    for variant in variants:
        command = [sys.executable, __file__, "--variant", variant, "--tokens", str(tokens), "--hidden", str(hidden)]
        command += ["--vocab", str(vocab), "--chunk", str(chunk), "--repeats", str(repeats), "--device", device]
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=CHILD_ENVIRONMENT)
        if done.returncode != 0:
            raise SystemExit(f"variant {variant} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    full = next(run for run in runs if run["variant"] == "full")
    memory_key = "peak_allocated_bytes" if device.startswith("cuda") else "peak_rss_bytes"
    ratios = {}
    for run in runs:
        if run is full:
            continue
        measured = run[memory_key]
        ratios[run["variant"]] = {
            "peak_memory_full_over_this": round(full[memory_key] / measured, 2) if measured else None,
            "peak_tensor_full_over_this": round(full["peak_tensor_bytes"] / run["peak_tensor_bytes"], 2),
            "time_this_over_full": round(run["median_s"] / full["median_s"], 2),
            "loss_relative_difference": abs(run["loss"] - full["loss"]) / abs(full["loss"]),
            "grad_norm_relative_difference": abs(run["grad_norm"] - full["grad_norm"]) / full["grad_norm"],
        }
    return {
        "benchmark": "lm_head_loss",
        "tokens": tokens,
        "hidden": hidden,
        "vocab": vocab,
        "chunk_tokens": chunk,
        "dtype": "float32",
        "final_logit_softcapping": CAP,
        "lm_head": "frozen (LoRA); the hidden states take the gradient",
        "full_logits_bytes": tokens * vocab * 4,
        "repeats": repeats,
        "warmup": 1,
        "memory": f"{memory_key}: see benchmarks/bench_loss.py; peak_tensor_bytes: torch MemTracker",
        "malloc_mmap_threshold": MMAP_THRESHOLD,
        "runs": runs,
        "ratios": ratios,
    }


def test_the_chunked_loss_peaks_lower_than_the_full_logits_for_the_same_loss(benchmark):
    """CI-sized: 512 tokens, hidden 64, vocabulary 32,000, chunks of 64; one timed repeat."""
    result = benchmark.pedantic(
        compare, args=(512, 64, 32_000, 64, 1), kwargs={"variants": ("full", "chunked")}, rounds=1, iterations=1
    )
    benchmark.extra_info.update(result)
    chunked = result["ratios"]["chunked"]
    assert chunked["loss_relative_difference"] < 1e-5 and chunked["grad_norm_relative_difference"] < 1e-5
    assert chunked["peak_tensor_full_over_this"] > 2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="N: batch x sequence length")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=256_000)
    parser.add_argument("--chunk", type=int, default=256, help="tokens per chunk")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=[*VARIANTS, "liger"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # the child process: run one variant, print JSON
    parser.add_argument("--note", default=None, help="recorded with the result")
    parser.add_argument("--json", default=None, help="append the result to this JSON file (a list)")
    args = parser.parse_args()
    if args.variant:
        run = run_variant(args.variant, args.tokens, args.hidden, args.vocab, args.chunk, args.repeats, args.device)
        print(json.dumps(run))
        return 0
    if "full" not in args.variants:
        parser.error("--variants must include full, the baseline")
    result = compare(args.tokens, args.hidden, args.vocab, args.chunk, args.repeats, args.variants, args.device)
    result = {**result, "note": args.note, **device_info(args.device), **machine.describe()}
    report(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
