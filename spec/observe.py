"""Watching a training run from a spec test: the trainer, the weights before training, use_cache per step."""

from __future__ import annotations

import torch

from reference import train

SHORT = ["max_steps=4", "per_device_train_batch_size=4", "gradient_accumulation_steps=1", "warmup_steps=0",
         "save_steps=2", "logging_steps=1", "learning_rate=2e-3", "sft.max_seq_length=48"]
"""The llm2024 recipe cut to 4 steps of 4 short records: seconds on 2 CPU cores."""
QA_COLUMNS = {"instruction": "input", "response": "output"}


class Observed:
    """What a test sees of a run: the trainer, the weights before training, use_cache at each step."""

    def __init__(self):
        self.lines, self.use_cache, self.before = [], [], {}

    def before_train(self, trainer):
        from transformers import TrainerCallback

        self.trainer = trainer
        self.before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        observed = self

        class UseCache(TrainerCallback):
            def on_step_begin(self, args, state, control, model=None, **kwargs):
                observed.use_cache.append(model.config.use_cache)

        trainer.add_callback(UseCache())


def run_recipe(recipe, model_dir, data, output, observed: Observed, **options):
    """train.run on QA-format data, observed; options: adapter=DIR, resume=True."""
    return train.run(recipe, str(model_dir), str(data), str(output), columns=QA_COLUMNS, say=observed.lines.append,
                     before_train=observed.before_train, **options)


def assert_trained(record, observed) -> None:
    """Loss fell; every trainable weight changed; no frozen weight did."""
    losses = [s["loss"] for s in record.steps]
    assert losses[-1] < losses[0]
    for name, param in observed.trainer.model.named_parameters():
        changed = not torch.equal(param.detach(), observed.before[name])
        assert changed == param.requires_grad, f"{name}: requires_grad={param.requires_grad} but changed={changed}"
