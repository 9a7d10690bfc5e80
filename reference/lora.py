"""LoRA: a frozen weight W0 plus a trained low-rank update, h = W0 x + (alpha / r) B A x.

A is r x in, B is out x r (B starts at zero, so the adapter starts as the identity change). Each adapted
linear layer therefore trains r * (in + out) parameters; rsLoRA scales by alpha / sqrt(r) instead of
alpha / r so the update's size does not shrink as r grows.

`lora_config` and `attach` build the recipe's adapter with peft; the spec checks the count formula against peft.
"""

from __future__ import annotations

import math
import warnings

from reference.shapes import projection_shapes


def scale(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """The factor on B A x: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def trainable_parameters(config: dict, r: int, target_modules: list[str] | tuple[str, ...]) -> int:
    """Sum of r * (in + out) over every targeted projection in every decoder layer."""
    shapes = projection_shapes(config)
    unknown = sorted(set(target_modules) - set(shapes))
    if unknown:
        raise ValueError(f"target modules {unknown} are not projections of this architecture ({sorted(shapes)})")
    per_layer = sum(r * (shapes[m][0] + shapes[m][1]) for m in target_modules)
    return per_layer * config["num_hidden_layers"]


PEFT_ONLY = ("random_state",)  # recipe keys from unsloth's get_peft_model that LoraConfig does not take


def lora_config(section: dict):
    """peft.LoraConfig from a recipe's [lora] section (unsloth-only keys set aside, others must be known)."""
    import dataclasses

    import peft

    from reference.errors import InputError

    fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    settings = {k: v for k, v in section.items() if k not in PEFT_ONLY}
    unknown = sorted(set(settings) - fields)
    if unknown:
        raise InputError(f"[lora] has keys LoraConfig of peft {peft.__version__} does not take: {unknown}")
    settings.setdefault("task_type", "CAUSAL_LM")
    return peft.LoraConfig(**settings)


def attach(model, section: dict, gradient_checkpointing: bool = False):
    """A fresh, trainable LoRA adapter on `model` (prepared for k-bit training when the base is quantised).

    Seeded with the recipe's random_state (unsloth's argument) so A is initialised the same each run."""
    import peft
    import torch

    with warnings.catch_warnings():  # peft still calls transformers' deprecated *gradient_checkpointing* names
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*gradient_checkpointing.*")
        if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                         gradient_checkpointing_kwargs={"use_reentrant": False})
        elif gradient_checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
            model.enable_input_require_grads()
        if "random_state" in section:
            torch.manual_seed(section["random_state"])
        return peft.get_peft_model(model, lora_config(section))


def count_trainable(model) -> tuple[int, int]:
    """(trainable, all) parameters as the model holds them (packed 4-bit weights count as stored)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
