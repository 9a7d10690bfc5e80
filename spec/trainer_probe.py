"""Run a real `transformers.Trainer` on a one-weight model and count what it does, with a callback.

The model is deliberately trivial (y = w x, squared error) so each run takes well under a second; the
Trainer, accelerate dataloader, scheduler, optimizer, checkpointing and logging are all the real ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments


class OneWeight(nn.Module):
    """y = w * x with a squared-error loss; w starts at 0 and the data says w = 2."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x, labels=None):
        prediction = self.w * x
        loss = ((prediction - labels) ** 2).mean() if labels is not None else None
        return {"loss": loss, "logits": prediction}


def one_weight_dataset(records: int) -> list[dict]:
    return [
        {"x": torch.tensor([float(i % 7 + 1)]), "labels": torch.tensor([2.0 * (i % 7 + 1)])} for i in range(records)
    ]


@dataclass
class Counts:
    micro_batches: int = 0
    optimizer_steps: int = 0
    epochs_begun: int = 0
    save_steps: list[int] = field(default_factory=list)
    loss_log_steps: list[int] = field(default_factory=list)
    learning_rates: list[float] = field(default_factory=list)
    max_steps: int = 0
    checkpoints_on_disk: list[int] = field(default_factory=list)


class CountingCallback(TrainerCallback):
    def __init__(self):
        self.counts = Counts()

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.counts.epochs_begun += 1

    def on_substep_end(self, args, state, control, **kwargs):
        self.counts.micro_batches += 1  # a micro-batch that did not end an accumulation window

    def on_step_end(self, args, state, control, **kwargs):
        self.counts.micro_batches += 1  # the micro-batch that ended the window
        self.counts.max_steps = state.max_steps

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.counts.optimizer_steps += 1

    def on_save(self, args, state, control, **kwargs):
        self.counts.save_steps.append(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.counts.loss_log_steps.append(state.global_step)
            self.counts.learning_rates.append(logs["learning_rate"])


def run_trainer(output_dir: Path, records: int, model: nn.Module | None = None, **training_arguments) -> Counts:
    """Train `model` (a fresh OneWeight by default) on `records` rows and count what happened."""
    args = TrainingArguments(
        output_dir=str(output_dir),
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        save_only_model=True,
        **{"learning_rate": 1e-3, **training_arguments},
    )
    callback = CountingCallback()
    trainer = Trainer(
        model=model if model is not None else OneWeight(),
        args=args,
        train_dataset=one_weight_dataset(records),
        callbacks=[callback],
    )
    trainer.train()
    counts = callback.counts
    counts.checkpoints_on_disk = sorted(int(p.name.split("-")[1]) for p in Path(output_dir).glob("checkpoint-*"))
    return counts
