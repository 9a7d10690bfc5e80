"""Recipe sections written as dataclasses: each field's type, range, default and meaning in one place (claim X12).

`[sft]` (reference.methods.train), `[dpo]` (reference.methods.dpo) and `[classifier]` (reference.methods.preference)
are read into these
classes; `[lora]` and `[quantization]` are the libraries' own (peft's LoraConfig, transformers' BitsAndBytesConfig),
checked by the tables of reference.settings.settings_types. a field's rule
(reference.settings.settings_types.Rule) travels in its metadata, so a recipe file and a `key=value` override are
checked
against the same class the run reads, and a key the class does not have is refused with the nearest one it has.
`resolve` fills in the defaults: the manifest records every field, given or not.

This module imports no torch: recipes are checked before anything loads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from reference.settings.settings_types import FLAG, SEED, Rule, number, one_of, whole


def setting(default, rule: Rule):
    """A field with its default and the rule a recipe's value must meet."""
    return field(default=default, metadata={"rule": rule})


@dataclass(frozen=True)
class SFTSection:
    """[sft]: how records become batches and what the loss counts (for llm2024: the seed's SFTTrainer, seed 001)."""

    max_seq_length: int = setting(2048, whole(1))
    """Tokens kept per record, its end cut (trl's max_seq_length)."""
    loss_on: str = setting("response", one_of("all", "response"))
    """The tokens the loss counts: response (the prompt's labels -100, instruction tuning) or all (every token, as
    trl's SFTTrainer trains on a dataset_text_field without a completion-only collator)."""
    padding_free: bool = setting(False, FLAG)
    """True: a batch's records laid end to end, position ids restarting at each, no padding computed (X11,
    reference/methods/padding_free.py); False: each record padded to the batch's longest, as the seed's SFTTrainer
    does."""
    chunked_loss: bool = setting(False, FLAG)
    """True: the loss scored a chunk of tokens at a time, never the full logits (reference/methods/chunked_loss.py);
    False:
    the model's own loss on the full logits."""
    gradient_checkpointing: bool = setting(False, FLAG)
    """Recompute activations in the backward pass (the seed's use_gradient_checkpointing); also turned on by
    [training_arguments] activation_checkpointing."""
    recompute: str = setting("all", one_of("all", "fit"))
    """With checkpointing on, which layers are recomputed: all (the seed's, trl's), or fit: only those whose
    activations do not fit in half the memory free when training begins, the others kept
    (reference/training/recompute.py). The losses are the same either way."""
    packing: bool = setting(False, Rule(("bool",), choices=("false",), note="records are never packed here"))
    """The seed's SFTTrainer argument, recorded; only false is taken: padding_free lays records end to end without
    attention across them, which packing would add."""
    dataset_text_field: str = setting("text", Rule(("str",)))
    """The seed's SFTTrainer argument, recorded: the records are rendered by the recipe's format here."""
    dataset_num_proc: int | None = setting(None, whole(1))
    """The seed's SFTTrainer argument, recorded: encoding runs in this process."""
    shuffle_seed: int | None = setting(None, SEED)
    """The seed's dataset shuffle, recorded: the Trainer's sampler shuffles with [training_arguments] seed."""
    use_cache_during_training: bool = setting(False, FLAG)
    """The seed's setting, recorded: every run trains with use_cache off and turns it on for generation (C15)."""
    token: str | None = setting(None, Rule(("str",)))
    """A hub access token (trl's), never used (no hub here) and written <redacted> wherever recorded (X7)."""
    use_auth_token: bool | str | None = setting(None, Rule(("bool", "str")))
    """The older name of token, treated as it is."""


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


SECTIONS = {"sft": SFTSection, "dpo": DPOSection, "classifier": PreferenceConfig}
"""The recipe sections read into a dataclass, by name."""


def rules(section: str) -> dict[str, Rule]:
    return {f.name: f.metadata["rule"] for f in dataclasses.fields(SECTIONS[section])}


def resolve(section: str, values: dict):
    """The section's dataclass with the recipe's values, the defaults for the rest (values already checked)."""
    return SECTIONS[section](**values)
