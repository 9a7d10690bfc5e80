"""The SFT runs that spec/test_train.py, spec/test_manifest.py and spec/test_train_refusals.py read.

The llm2024 recipe is cut to 4 optimizer steps of 2 micro-batches of 2 short records (RUN) and trained on
the tiny Gemma-2 on four bases: LoRA on an NF4 base (the recipe's QLoRA), on an int8 and on a bf16 base, and
full fine-tuning (the recipe without its [lora] section). `Runs` trains each base once per session and
device (the `sft_runs` fixture of spec/conftest.py), so every test that reads a run reads the same one;
every such test runs on the CPU and, when CUDA is present, again on the GPU with the same assertions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from reference.methods import train
from reference.settings.recipes import apply_overrides, load_recipe
from reference.training.manifest import RunManifest
from spec.conftest import FIXTURES
from spec.observe import QA_COLUMNS, Observed, WhenBuilt

TINY_GEMMA2 = FIXTURES / "models" / "tiny-gemma2"
RUN = [
    "max_steps=4",
    "per_device_train_batch_size=2",
    "gradient_accumulation_steps=2",
    "warmup_steps=0",
    "save_steps=2",
    "logging_steps=1",
    "learning_rate=2e-3",
    "sft.max_seq_length=64",
    "sft.padding_free=false",
]
"""Padded batches, so the runs show padding masked out (the padding-free layout: spec/test_padding_free.py).
By hand: 24 records / batch 2 = 12 micro-batches an epoch, 6 optimizer steps at accumulation 2; max_steps 4
stops inside the first epoch after 8 micro-batches (16 records). Checkpoints at steps 2 and 4."""
QUANTIZATION = {"nf4": load_recipe("llm2024").quantization, "int8": {"load_in_8bit": True}, "bf16": {}, "full": {}}
IDS = torch.tensor([[2, 100, 200, 300, 400, 500, 600, 700]])
"""A few token ids to compare logits on."""


@dataclass
class Run:
    manifest: RunManifest
    """What train.run returned (and wrote to output/manifest.json)."""
    observed: Observed
    output: Path
    device: str
    data: Path
    logits_before: dict = field(default_factory=dict)
    """Logits of IDS before the first update: "model" with the adapter, "base" with it disabled (LoRA)."""


def mixed_length_records(directory: Path) -> Path:
    """The QA fixture with each question cut to 12 characters and each answer to 4, 11, 18 or 25: records of
    about 58 to 92 tokens, so with max_seq_length 64 some micro-batches are padded and some are not."""
    lines = (FIXTURES / "data" / "qa111_sample.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    path = directory / "qa_mixed.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for i, row in enumerate(rows):
            cut = {"input": row["input"][:12], "output": row["output"][: 4 + 7 * (i % 4)]}
            handle.write(json.dumps(cut, ensure_ascii=False) + "\n")
    return path


def recipe_for(base: str, device: str):
    """llm2024 cut to RUN, on `base`; on the CPU even where CUDA is present (use_cpu) for the cpu parameter."""
    on_cpu = ["use_cpu=true"] if device == "cpu" else []
    recipe = apply_overrides(load_recipe("llm2024"), RUN + on_cpu)
    recipe.quantization = dict(QUANTIZATION[base])
    if base == "full":
        recipe.lora = {}
    return recipe


def autocast(device: str):
    return torch.autocast(device, dtype=torch.bfloat16)  # bf16=True: how the Trainer runs the forward pass


def watch_logits(device: str, seen: dict) -> WhenBuilt:
    """The logits before the first update, with the adapter and (LoRA) without it."""

    def look(model):
        ids = IDS.to(device)
        with torch.no_grad(), autocast(device):
            seen["model"] = model(input_ids=ids).logits.float()
            if hasattr(model, "disable_adapter"):
                with model.disable_adapter():
                    seen["base"] = model(input_ids=ids).logits.float()

    return WhenBuilt(look)


def train_on(base: str, device: str, data: Path, output: Path) -> Run:
    observed, seen = Observed(), {}
    manifest = train.run(
        recipe_for(base, device),
        str(TINY_GEMMA2),
        str(data),
        str(output),
        columns=QA_COLUMNS,
        say=observed.lines.append,
        callbacks=[observed, watch_logits(device, seen)],
    )
    return Run(manifest, observed, output, device, data, logits_before=seen)


class Runs:
    """runs(base) -> the Run on that base, trained the first time it is asked for."""

    def __init__(self, device: str, tmp_path_factory):
        self.device, self.tmp_path_factory = device, tmp_path_factory
        self.data = mixed_length_records(tmp_path_factory.mktemp("data"))
        self.done: dict[str, Run] = {}

    def __call__(self, base: str) -> Run:
        if base not in self.done:
            output = self.tmp_path_factory.mktemp(f"{base}-{self.device}")
            self.done[base] = train_on(base, self.device, self.data, output)
        return self.done[base]
