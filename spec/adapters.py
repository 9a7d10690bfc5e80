"""What the tests of saved adapters share: the six-step run they continue, logits and tensor comparisons.

spec/test_continuation.py, spec/test_resume.py and spec/test_merge.py continue, resume or merge one run:
the llm2024 recipe cut to SIX_STEPS on the QA fixture (the `uninterrupted` fixture of spec/conftest.py). The
command tests (spec/test_cli.py) and spec/test_merge.py's merge route train THREE_STEPS from the
`saved_adapter` fixture. Logits are compared within bf16 resolution (TOLERANCE); adapter weights bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file

from reference.modeling import models

TOLERANCE = 2**-7
"""bf16 resolution near 1: fp32 norms in training vs bf16 ones in a plain reload."""
IDS = torch.tensor([[2, 120, 340, 560, 780, 1000, 1200]])
"""A few token ids to compare logits on."""
ON_THE_CPU = "use_cpu=true"
"""Bit-identical resumption is claimed on the CPU; a GPU machine runs these there too."""
SIX_STEPS = [
    "max_steps=6",
    "per_device_train_batch_size=4",
    "gradient_accumulation_steps=1",
    "warmup_steps=2",
    "save_steps=3",
    "logging_steps=1",
    "learning_rate=2e-3",
    "sft.max_seq_length=40",
    ON_THE_CPU,
]
"""Six optimizer steps of 4 records, checkpoints at steps 3 and 6."""
SCHEDULE = [0.0, 1e-3, 2e-3, 1.5e-3, 1e-3, 5e-4]
"""The learning rate of steps 1..6 of SIX_STEPS, by hand (lr 2e-3, warmup 2, then linear decay to 0 at step 6;
step s updates with the rate at scheduler count t = s - 1):
  t < 2:  lr = 2e-3 x t / 2            -> steps 1, 2: 0, 1e-3
  t >= 2: lr = 2e-3 x (6 - t) / (6 - 2) -> steps 3, 4, 5, 6: 2e-3, 1.5e-3, 1e-3, 5e-4"""
THREE_STEPS = [
    "max_steps=3",
    "per_device_train_batch_size=4",
    "gradient_accumulation_steps=1",
    "warmup_steps=0",
    "save_steps=100",
    "logging_steps=1",
    "learning_rate=2e-3",
    "sft.max_seq_length=40",
    ON_THE_CPU,
]
"""Three steps at the full rate from the first, on the `saved_adapter` fixture's adapter: enough for the loss to
fall, few enough to repeat per test."""


def logits_of(model, device: str = "cpu") -> torch.Tensor:
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        return model(input_ids=IDS.to(device)).logits.float().cpu()


def base_logits(model_dir, device: str = "cpu", quantization: str = "nf4") -> torch.Tensor:
    base, _ = models.load_causal_lm(model_dir, dtype="bfloat16", quantization=quantization, device=device)
    return logits_of(base.eval(), device)


def base_plus_adapter_logits(model_dir, adapter, device: str = "cpu", quantization: str = "nf4") -> torch.Tensor:
    """The reference: peft's own frozen load of the adapter on the base, nothing of ours in between."""
    base, _ = models.load_causal_lm(model_dir, dtype="bfloat16", quantization=quantization, device=device)
    return logits_of(PeftModel.from_pretrained(base, str(adapter)).eval(), device)


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def adapter_tensors(directory) -> dict:
    return load_file(str(Path(directory) / "adapter_model.safetensors"))


def trainable_weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def assert_same_tensors(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), [k for k in ours if not torch.equal(ours[k], theirs[k])]


def trained_b(tensors: dict) -> bool:
    """Whether some lora_B is no longer zero (B starts at zero, so only updates move it)."""
    return any(bool(t.any()) for name, t in tensors.items() if "lora_B" in name)
