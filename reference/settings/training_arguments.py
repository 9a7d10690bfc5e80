"""A recipe's arguments as the installed transformers' ``TrainingArguments``, every change reported.

Mapping onto the installed transformers is explicit:
* an argument renamed or removed upstream is migrated only by a rule written here (``warmup_ratio``
  becomes a fractional ``warmup_steps`` in transformers 5, which reads values below 1 as a fraction;
  ``gradient_checkpointing`` becomes ``activation_checkpointing``), and every migration is reported;
* any other argument the installed ``TrainingArguments`` lacks is an error naming it and the version, and
  each argument is of its field's type and in its range (``reference/settings/settings_types.py``, which also holds
  the renames, ``RENAMES``, and the removals' hints);
* arguments this machine cannot honour (``tf32`` without an Ampere GPU, ``bf16`` without CUDA needs
  ``use_cpu``) are adapted and reported, never dropped silently;
* an access token (``hub_token=...``) is withheld from the Trainer's arguments, and that is reported: this
  project never pushes to a hub, and the Trainer pickles its arguments whole into every checkpoint
  (``training_args.bin``), so a token there would be written to disk (claim X7).

``run_arguments`` builds the one ``TrainingArguments`` a ``train`` run hands its Trainer: the recipe mapped,
plus ``RUN_SETTINGS`` (how every run feeds and reports) and activation checkpointing as the recipe asks.
``resolved_settings`` writes out every field of that object, defaults included (claims P12, X8): what the
manifest records is what the Trainer ran with, never a second object built alongside.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from importlib import metadata

import peft
import torch
import transformers

from reference.errors import InputError
from reference.settings import sections
from reference.settings.recipes import REDACTED, Recipe, is_secret, redacted
from reference.settings.settings_types import RENAMES, check_section


@dataclass
class Mapping:
    """A recipe mapped onto the installed TrainingArguments, with every change that took."""

    kwargs: dict
    migrations: list[str]
    adaptations: list[str]
    withheld: list[str] = field(default_factory=list)
    """Access tokens taken out of the Trainer's arguments (X7), one note each, the value redacted."""


def _migrate(kwargs: dict, fields: set[str], version: str) -> list[str]:
    notes = []
    for old, new in RENAMES.items():
        if old in kwargs and new in fields:
            if new in kwargs:
                raise InputError(f"recipe sets both {old} and its new name {new}; keep {new}")
            kwargs[new] = kwargs.pop(old)
            notes.append(f"{old} -> {new} (renamed in transformers {version})")
    if "warmup_ratio" in kwargs and "warmup_ratio" not in fields:
        ratio = kwargs.pop("warmup_ratio")
        if kwargs.get("warmup_steps", 0):
            raise InputError(
                f"recipe sets both warmup_ratio={ratio} and warmup_steps={kwargs['warmup_steps']}; keep one"
            )
        kwargs["warmup_steps"] = ratio
        notes.append(
            f"warmup_ratio={ratio} -> warmup_steps={ratio} (transformers {version} reads warmup_steps < 1 "
            "as a fraction of the total steps)"
        )
    return notes


def _withhold_tokens(kwargs: dict) -> list[str]:
    """Take every access token out of the Trainer's arguments (X7): this project never pushes to a hub, and
    the Trainer pickles its arguments whole into every checkpoint (training_args.bin)."""
    secrets = sorted(key for key, value in kwargs.items() if is_secret(key, value))
    for key in secrets:
        del kwargs[key]
    return [
        f"{key}={REDACTED} withheld from the Trainer: nothing is pushed to a hub, and the Trainer saves its "
        "arguments into every checkpoint (training_args.bin)"
        for key in secrets
    ]


def _adapt_to_device(kwargs: dict) -> list[str]:
    notes = []
    if not torch.cuda.is_available():
        if kwargs.get("tf32"):
            kwargs["tf32"] = None
            notes.append("tf32=True -> tf32=None: TF32 needs an Ampere or newer NVIDIA GPU; none here")
        if (kwargs.get("bf16") or kwargs.get("fp16")) and not kwargs.get("use_cpu"):
            kwargs["use_cpu"] = True
            notes.append("use_cpu=True: no CUDA device, so mixed precision runs on the CPU")
        if kwargs.get("fp16"):
            kwargs["fp16"] = False
            kwargs["bf16"] = True
            notes.append("fp16=True -> bf16=True: fp16 mixed precision needs CUDA; bf16 runs on the CPU")
    return notes


def map_training_arguments(recipe: Recipe, output_dir: str | None = None, adapt: bool = True) -> Mapping:
    """The recipe's TrainingArguments kwargs for the installed transformers, with the changes made."""
    fields = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    # Each argument known to the installed version (or migrated onto it), of its type and range (settings_types).
    kwargs = check_section("training_arguments", copy.deepcopy(recipe.training_arguments), f"recipe {recipe.name!r}: ")
    if output_dir is not None:  # TrainingArguments fills fsdp_config in place: the copy above keeps the recipe's
        kwargs["output_dir"] = output_dir
    migrations = _migrate(kwargs, fields, transformers.__version__)
    withheld = _withhold_tokens(kwargs)
    adaptations = _adapt_to_device(kwargs) if adapt else []
    return Mapping(kwargs=kwargs, migrations=migrations, adaptations=adaptations, withheld=withheld)


def _build(recipe: Recipe, mapping: Mapping, **extra):
    try:
        return transformers.TrainingArguments(**{**mapping.kwargs, **extra})
    except (ValueError, TypeError) as error:
        raise InputError(f"recipe {recipe.name!r}: TrainingArguments rejected the settings: {error}") from None


def to_training_arguments(recipe: Recipe, output_dir: str | None = None, **extra):
    """A real `transformers.TrainingArguments` from the recipe (extra kwargs win over the recipe's)."""
    return _build(recipe, map_training_arguments(recipe, output_dir), **extra)


RUN_SETTINGS = {
    "remove_unused_columns": False,  # the records arrive encoded (input_ids, labels): keep every column
    "disable_tqdm": True,  # one progress line per optimizer step instead of a bar (reference.methods.train)
    "use_cache": False,  # C15: the Trainer sets model.config.use_cache from this; generation turns it back on
}


def gradient_checkpointing(recipe: Recipe, kwargs: dict) -> bool:
    """On when the recipe's [sft] asks for it (seed 001) or its TrainingArguments do (the primer's)."""
    return sections.resolve("sft", recipe.sft).gradient_checkpointing or bool(kwargs.get("activation_checkpointing"))


@dataclass
class Resolved:
    """A recipe resolved once for a run: the TrainingArguments its Trainer gets, and how they were arrived at."""

    arguments: transformers.TrainingArguments
    mapping: Mapping
    """The recipe's arguments as mapped onto the installed transformers, with the changes made (and why)."""


def resolve(recipe: Recipe, output_dir: str | None = None) -> Resolved:
    """The recipe mapped once, then the TrainingArguments a run uses: the recipe's, RUN_SETTINGS, and activation
    checkpointing."""
    mapping = map_training_arguments(recipe, output_dir)
    checkpointing = gradient_checkpointing(recipe, mapping.kwargs)
    return Resolved(_build(recipe, mapping, **RUN_SETTINGS, activation_checkpointing=checkpointing), mapping)


def run_arguments(recipe: Recipe, output_dir: str | None = None):
    """The TrainingArguments a `train` run uses (resolve(...).arguments)."""
    return resolve(recipe, output_dir).arguments


def package_versions() -> dict[str, str]:
    names = (
        "torch",
        "transformers",
        "peft",
        "bitsandbytes",
        "accelerate",
        "datasets",
        "tokenizers",
        "safetensors",
        "sentence-transformers",
        "pycld2",
    )
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def resolved_settings(recipe: Recipe, output_dir: str = "runs/recipe", resolved: Resolved | None = None) -> dict:
    """Every setting a run with this recipe uses, defaults included, and how each was arrived at.

    `resolved`: the recipe as the run resolved it (by default, resolved here); the `to_dict()` of the
    TrainingArguments the run hands its Trainer is recorded as it is (X8: the tokens were withheld from them, and
    transformers writes any `*_token` field as a placeholder). Every other part is recorded with its access tokens
    redacted (X7)."""
    resolved = resolved or resolve(recipe, output_dir)
    mapping, args = resolved.mapping, resolved.arguments
    given = redacted(
        {
            "recipe": {
                "name": recipe.name,
                "source": recipe.source,
                "path": recipe.path,
                "sha256": recipe.sha256,
                "format": recipe.format,
                "base_model": recipe.base_model,
            },
            "training_arguments_given": recipe.training_arguments,
            "migrations": mapping.migrations,
            "adaptations": mapping.adaptations,
            "withheld": mapping.withheld,
            "run_settings": {**RUN_SETTINGS, "activation_checkpointing": args.activation_checkpointing},
            "departures": recipe.departures,
            "lora": _lora_resolved(recipe.lora) if recipe.lora else {},
            "quantization": recipe.quantization,
            # the method sections, every field with its defaults written out (a run keeps its method's own)
            **{name: dataclasses.asdict(sections.resolve(name, getattr(recipe, name))) for name in sections.SECTIONS},
        }
    )
    recipe_identity = given.pop("recipe")
    return {"recipe": recipe_identity, "training_arguments": args.to_dict(), **given, "versions": package_versions()}


def _lora_resolved(lora: dict) -> dict:
    """Every LoraConfig field, defaults included, for the recipe's LoRA settings."""
    names = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    config = peft.LoraConfig(**{k: v for k, v in lora.items() if k in names})
    resolved = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.to_dict().items()}
    resolved.update({k: v for k, v in lora.items() if k not in names})  # e.g. random_state
    return resolved
