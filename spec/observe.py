"""Watching a training run from a spec test: the trainer, its arguments, the weights before training, and per
optimizer step what the model was fed (attention_mask sums of the micro-batches), use_cache and checkpointing.

What is seen here is seen from outside the code under test: the Trainer's own arguments object, forward
hooks on the model, a callback of our own. Nothing is read back from reference.methods.train's manifest.
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from reference.methods import train
from reference.modeling import kernels

SHORT = [
    "max_steps=4",
    "per_device_train_batch_size=4",
    "gradient_accumulation_steps=1",
    "warmup_steps=0",
    "save_steps=2",
    "logging_steps=1",
    "learning_rate=2e-3",
    "sft.max_seq_length=48",
]
"""The llm2024 recipe cut to 4 steps of 4 short records: seconds on 2 CPU cores."""
QA_COLUMNS = {"instruction": "input", "response": "output"}


def weight_values(param) -> torch.Tensor:
    """A weight's values: a 4-bit weight dequantised (its stored bytes depend on the layout bitsandbytes keeps it
    in, reference.modeling.kernels), any other the tensor itself; a copy, safe to keep while training goes on."""
    state = getattr(param, "quant_state", None)
    if state is None:
        return param.detach().clone()
    from bitsandbytes.functional import dequantize_4bit

    return dequantize_4bit(param.data, state).float()


def unwrapped(model):
    """The transformers model under a peft wrapper (the model itself when there is none)."""
    return model.base_model.model if hasattr(model, "peft_config") else model


class Observed(TrainerCallback):
    """What a test sees of a run, as one of the run's TrainerCallbacks (`callbacks=[observed]`): the model, the
    arguments and the optimizer the Trainer was handed, the weights before training, and per step use_cache,
    activation checkpointing and the micro-batches' real-token counts."""

    def __init__(self):
        self.lines, self.use_cache, self.checkpointing, self.before = [], [], [], {}
        self.arguments: dict = {}
        """trainer.args.to_dict() as the Trainer was handed them."""
        self.step_tokens: list[list[int]] = []
        """Per optimizer step, the real tokens of each micro-batch the model was fed in that step: attention_mask.sum()
        of a padded one, every position of a flattened one (padding-free)."""
        self.padded_micro_batches = 0
        """Micro-batches with at least one padding position (attention_mask 0)."""
        self.model = self.args = self.state = self.optimizer = None
        self.counting, self.window = False, []

    def on_init_end(self, args, state, control, model=None, **kwargs):
        """The Trainer is built: its arguments and model, the weights before any step, a hook counting tokens."""
        self.model, self.args = model, args
        self.arguments = args.to_dict()
        self.before = {n: weight_values(p) for n, p in model.named_parameters()}
        model.register_forward_pre_hook(self.count, with_kwargs=True)

    def count(self, module, args, kwargs):
        if not (module.training and self.counting):
            return
        mask = kwargs.get("attention_mask")  # None: a flattened (padding-free) row, every position real
        self.window.append(int(mask.sum()) if mask is not None else kwargs["input_ids"].numel())
        if mask is not None:
            self.padded_micro_batches += int(bool((mask == 0).any()))

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.counting = True  # a retry (auto_find_batch_size) starts the count again
        self.step_tokens.clear()
        self.window.clear()

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.use_cache.append(model.config.use_cache)
        self.checkpointing.append(unwrapped(model).is_activation_checkpointing)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.step_tokens.append(list(self.window))
        self.window.clear()
        self.optimizer = optimizer

    def on_train_end(self, args, state, control, **kwargs):
        self.counting = False
        self.state = state


class WhenBuilt(TrainerCallback):
    """A test's look at a run once its Trainer is built and before its first step: `look(model)` (a hook to
    register, logits to take, a layout to change)."""

    def __init__(self, look):
        self.look = look

    def on_init_end(self, args, state, control, model=None, **kwargs):
        self.look(model)


def run_recipe(recipe, model_dir, data, output, observed: Observed, **options):
    """train.run on QA-format data, observed; options: adapter=DIR, resume=True."""
    return train.run(
        recipe,
        str(model_dir),
        str(data),
        str(output),
        columns=QA_COLUMNS,
        say=observed.lines.append,
        callbacks=[observed],
        **options,
    )


def assert_trained(record, observed) -> None:
    """Loss fell; every trainable weight changed; no frozen weight did (a 4-bit one compared by its values), and
    every 4-bit layer is still in bitsandbytes' standard, differentiable layout."""
    losses = [s["loss"] for s in record.steps]
    assert losses[-1] < losses[0]
    assert kernels.repacked_layers(observed.model) == []
    for name, param in observed.model.named_parameters():
        changed = not torch.equal(weight_values(param), observed.before[name])
        assert changed == param.requires_grad, f"{name}: requires_grad={param.requires_grad} but changed={changed}"
