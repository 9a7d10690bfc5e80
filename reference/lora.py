"""LoRA: a frozen weight W0 plus a trained low-rank update, h = W0 x + (alpha / r) B A x.

A is r x in, B is out x r (B starts at zero, so the adapter starts as the identity change). Each adapted
linear layer therefore trains r * (in + out) parameters; rsLoRA scales by alpha / sqrt(r) instead of
alpha / r so the update's size does not shrink as r grows.

Issue 4 extends this module with attaching adapters to real models and checking the count against peft.
"""

from __future__ import annotations

import math

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
