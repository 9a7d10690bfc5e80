"""The training paths `bench_train.py` times side by side, their model and data, and one path run in this process.

    python -m benchmarks.train_paths VARIANT --model DIR --data FILE --out DIR [--steps 5] [--batch 4] [--threads 1]

VARIANT (PATH with its compute dtype and base) is one of VARIANTS:
  trl            trl's SFTTrainer set up as seed 001 §2.2.2 sets it up: the seed's `text` field (the alpaca-ja prompt
                 and response, EOS after a non-empty response), max_length 2048, no packing, its padded batches; the
                 llm2024 recipe's TrainingArguments exactly as the project maps them (one object, both sides); LoRA
                 r=64 alpha 64 dropout 0 on the seven projections from peft with seed 3407;
  padded         the project's `train.run` on the same recipe and records, `sft.padding_free=false` (the recipe's
                 chunked LM-head loss, reference/methods/chunked_loss.py, as on every project path);
  padding-free   the same with `sft.padding_free=true` (reference.methods.sft, reference.methods.padding_free);
  padded-bf16    padded with the recipe's bf16 (bf16 base weights and bf16 autocast) where the others compute fp32;
  nf4-bf16, nf4-fp32  padded on the recipe's NF4 base, bnb_4bit_compute_dtype and autocast bf16, or fp32.
Common to all: the recipe's batch of 4 at accumulation 1 (8 would make each step 8 times longer, the same for
every path), gradient checkpointing, adamw_8bit, NEFTune alpha 5, seed 3407, so the same records in every step.

What is measured, from outside the trainers (a callback and a forward pre-hook of our own, alike on every path):
  seconds        per optimizer step, from the end of one step to the end of the next (the first from the start of
                 training: the warm-up), so data loading, the forward, backward and optimizer step all count;
  cpu_seconds    the process's CPU time over the same span (all its threads): what a step costs whatever else
                 runs on the machine;
  tokens         per step, the real tokens the model was fed (attention-mask ones, or every position of a flattened
                 row), and positions: the tokens it computed, padding included;
  peak_rss_bytes the process's peak resident memory while training (VmHWM, reset through /proc/self/clear_refs when
                 training begins) less its resident memory then: activations, gradients, optimizer states.
The result is one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.record import SMALL_GEMMA2  # noqa: E402  (with the fixture tokenizer's vocabulary here)

VARIANTS = {  # name: (path, bf16, nf4)
    "trl": ("trl", False, False),
    "padded": ("padded", False, False),
    "padding-free": ("padding-free", False, False),
    "padded-bf16": ("padded", True, False),
    "nf4-bf16": ("padded", True, True),
    "nf4-fp32": ("padded", False, True),
}
SEVEN_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOKENIZER = ROOT / "fixtures" / "models" / "tiny-gemma2"


def small_model(directory: Path) -> Path:
    """SMALL_GEMMA2 with random weights (seeded, bf16) and the fixture tokenizer, built by the `bench --shape` builder
    (reference.benchmarking.random_weights) where train.run loads it."""
    from transformers import AutoTokenizer

    from reference.benchmarking import random_weights
    from reference.modeling.shapes import GEMMA2_COMMON

    vocabulary = len(AutoTokenizer.from_pretrained(TOKENIZER))
    return random_weights.build({**GEMMA2_COMMON, **SMALL_GEMMA2, "vocab_size": vocabulary}, directory)


def length_mix(synthetic_records: int = 60, seed: int = 1) -> list[dict]:
    """Records of the lengths the seed trains on: the QA111 sample (101-299 tokens), the magpie sample's answered
    conversations (58-427) and magpie-style records of 1 to 40 corpus lines per response (reference.records.synthetic:
    up
    to about 800 tokens), every one with a response (an empty one is encoded apart by trl, spec/test_trl.py)."""
    from reference.records import data, synthetic

    fixtures = ROOT / "fixtures" / "data"
    rows = [json.loads(line) for line in (fixtures / "qa111_sample.jsonl").read_text(encoding="utf-8").splitlines()]
    records = [{"instruction": row["input"], "response": row["output"]} for row in rows]
    magpie = [json.loads(line) for line in (fixtures / "magpie_sample.jsonl").read_text(encoding="utf-8").splitlines()]
    magpie += synthetic.magpie_records(synthetic_records, seed=seed, response_lines=(1, 40))
    for row in magpie:
        instruction, response = data.magpie_pair(row["conversations"])
        records.append({"instruction": instruction, "response": response})
    return [r for r in records if r["instruction"] and r["response"]]


def record_tokens(records: list[dict]) -> list[int]:
    """Each record's length in tokens as the llm2024 recipe encodes it (reference.methods.sft, alpaca-ja, loss on
    all)."""
    from transformers import AutoTokenizer

    from reference.methods import sft

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    return [
        len(sft.encode_record(tokenizer, "alpaca-ja", r["instruction"], r["response"], 2048, "all")["input_ids"])
        for r in records
    ]


def memory_kib() -> dict[str, int]:
    status = Path("/proc/self/status").read_text()
    return {key: int(re.search(rf"{key}:\s+(\d+)", status).group(1)) for key in ("VmRSS", "VmHWM")}


def reset_peak_memory() -> int:
    """Resident memory now, in bytes, with the peak (VmHWM) reset to it."""
    Path("/proc/self/clear_refs").write_text("5")
    return memory_kib()["VmRSS"] * 1024


def step_clock():
    """A callback timing each optimizer step; once the Trainer is built (or `attach`ed by hand) a forward pre-hook on
    its model counts what each step was fed."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.steps, self.window = [], []

        def attach(self, model):
            def count(module, args, kwargs):
                if module.training:
                    mask, ids = kwargs.get("attention_mask"), kwargs["input_ids"]
                    self.window.append((int(mask.sum()) if mask is not None else ids.numel(), ids.numel()))

            model.register_forward_pre_hook(count, with_kwargs=True)

        def on_init_end(self, args, state, control, model=None, **kwargs):
            self.attach(model)

        def on_train_begin(self, args, state, control, **kwargs):
            self.resident = reset_peak_memory()
            self.last, self.last_cpu, self.window = time.perf_counter(), time.process_time(), []

        def on_step_end(self, args, state, control, **kwargs):
            now, cpu = time.perf_counter(), time.process_time()
            tokens, positions = sum(w[0] for w in self.window), sum(w[1] for w in self.window)
            seconds = {"seconds": now - self.last, "cpu_seconds": cpu - self.last_cpu}
            self.steps.append({**seconds, "tokens": tokens, "positions": positions})
            self.last, self.last_cpu, self.window = now, cpu, []

        def on_train_end(self, args, state, control, **kwargs):
            self.peak_rss_bytes = memory_kib()["VmHWM"] * 1024 - self.resident

    return StepClock()


def recipe_for(variant: str, steps: int, batch: int):
    """llm2024 cut to `steps` steps of `batch` records, with the variant's batches, dtype and base."""
    from reference.settings.recipes import apply_overrides, load_recipe

    path, bf16, nf4 = VARIANTS[variant]
    overrides = [
        f"max_steps={steps}",
        f"per_device_train_batch_size={batch}",
        "gradient_accumulation_steps=1",
        f"bf16={str(bf16).lower()}",
        f"quantization.load_in_4bit={str(nf4).lower()}",
        f"quantization.bnb_4bit_compute_dtype={'bfloat16' if bf16 else 'float32'}",
        f"sft.padding_free={str(path == 'padding-free').lower()}",
    ]
    return apply_overrides(load_recipe("llm2024"), overrides)


def run_project(model_dir: str, data: str, out: str, recipe):
    from reference.methods import train

    clock = step_clock()
    train.run(recipe, model_dir, data, out, say=lambda line: None, callbacks=[clock])
    return clock


def run_trl(model_dir: str, data: str, out: str, recipe):
    """trl's SFTTrainer as the seed sets it up (padded), built by the project's one owner of that setup."""
    from reference.benchmarking import peer

    trainer = peer.sft_trainer(recipe, model_dir, Path(data), Path(out))
    clock = step_clock()
    clock.attach(trainer.model)  # the Trainer is built already: its on_init_end has passed
    trainer.add_callback(clock)
    trainer.train()
    return clock


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variant", choices=VARIANTS)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="JSONL of instruction/response records")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch's intra-op threads (default: torch's)")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    run = run_trl if VARIANTS[args.variant][0] == "trl" else run_project
    clock = run(args.model, args.data, args.out, recipe_for(args.variant, args.steps, args.batch))
    result = {"variant": args.variant, "threads": torch.get_num_threads(), "steps": clock.steps}
    print(json.dumps({**result, "peak_rss_bytes": clock.peak_rss_bytes}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
