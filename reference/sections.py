"""Recipe sections written as dataclasses: each field's type, range, default and meaning in one place (claim X12).

`[dpo]` (reference.dpo) and `[classifier]` (reference.preference) are read into these classes; a field's rule
(reference.settings_types.Rule) travels in its metadata, so a recipe file and a `key=value` override are checked
against the same class the run reads, and a key the class does not have is refused with the nearest one it has.
`resolve` fills in the defaults: the manifest records every field, given or not.

This module imports no torch: recipes are checked before anything loads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from reference.settings_types import FLAG, Rule, number, whole


def setting(default, rule: Rule):
    """A field with its default and the rule a recipe's value must meet."""
    return field(default=default, metadata={"rule": rule})


@dataclass(frozen=True)
class DPOSection:
    """[dpo]: Direct Preference Optimisation (Rafailov et al., 2023; trl's DPOTrainer, loss "sigmoid")."""

    beta: float = setting(0.1, number(0, low_open=True))
    """Strength of the pull towards the reference, the weight of the KL penalty (trl's default, 0.1)."""
    max_length: int = setting(256, whole(2))
    """Prompt + answer + EOS tokens kept per sequence; the end is cut (trl's max_length)."""


@dataclass(frozen=True)
class PreferenceConfig:
    """[classifier]: the LMSYS thread's Config (seed 000), the fields that shape inputs and predictions, and the
    held-out split the run measures its log-loss on."""

    max_length: int = setting(2048, whole(3, note="each of the 3 parts gets one token when spread"))
    """Tokens per input at most."""
    batch_size: int = setting(4, whole(1))
    """Rows per forward pass when predicting (training batches: per_device_train_batch_size)."""
    spread_max_length: bool = setting(False, FLAG)
    """False: cut the joined input to max_length; True: cut each part to max_length // 3."""
    tta: bool = setting(False, FLAG)
    """Also score with a and b swapped and average (test-time augmentation)."""
    eval_fraction: float = setting(0.25, number(0, 1, low_open=True, high_open=True))
    """Rows held out to measure log-loss on: the last max(1, int(rows x eval_fraction)) after a shuffle seeded
    with the run's seed."""


SECTIONS = {"dpo": DPOSection, "classifier": PreferenceConfig}
"""The recipe sections read into a dataclass, by name."""


def rules(section: str) -> dict[str, Rule]:
    return {f.name: f.metadata["rule"] for f in dataclasses.fields(SECTIONS[section])}


def resolve(section: str, values: dict):
    """The section's dataclass with the recipe's values, the defaults for the rest (values already checked)."""
    return SECTIONS[section](**values)
