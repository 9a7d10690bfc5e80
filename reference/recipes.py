"""Recipes: named training setups kept as TOML, mapped onto the installed transformers, fully resolved.

A recipe keeps its source's arguments as the source wrote them (``[training_arguments]``), lists every
place it departs from the source with the reason (``[departures]``), and carries the method's other
settings (``[lora]``, ``[quantization]``, ``[sft]``) and the results its source reported (``[[trials]]``,
``[targets]``).

Mapping onto the installed transformers is explicit:
* an argument renamed or removed upstream is migrated only by a rule written here (``warmup_ratio``
  becomes a fractional ``warmup_steps`` in transformers 5, which reads values below 1 as a fraction;
  ``gradient_checkpointing`` becomes ``activation_checkpointing``), and every migration is reported;
* any other argument the installed ``TrainingArguments`` lacks is an error naming it and the version;
* arguments this machine cannot honour (``tf32`` without an Ampere GPU, ``bf16`` without CUDA needs
  ``use_cpu``) are adapted and reported, never dropped silently;
* an access token (``hub_token=...``) is withheld from the Trainer's arguments, and that is reported: this
  project never pushes to a hub, and the Trainer pickles its arguments whole into every checkpoint
  (``training_args.bin``), so a token there would be written to disk (claim X7).

Secrets never persist (X7): a key that names a token (the word "token" in its name: ``hub_token``,
``HF_TOKEN``, ``token``, ``use_auth_token``) holding a string is an access token, and its value is written
as ``<redacted>`` wherever a setting is recorded or shown (resolved settings, the recipe summary, the
message about a bad override). ``include_num_input_tokens_seen`` counts tokens (the word is "tokens") and a
``use_auth_token = true`` is a flag: neither is a secret.

``run_arguments`` builds the one ``TrainingArguments`` a ``train`` run hands its Trainer: the recipe mapped,
plus ``RUN_SETTINGS`` (how every run feeds and reports) and activation checkpointing as the recipe asks.
``resolved_settings`` writes out every field of that object, defaults included (claims P12, X8): what the
manifest records is what the Trainer ran with, never a second object built alongside.

This module imports no torch when it loads: the fast `filter` command reads a recipe's [filter] section.
transformers, torch and peft are imported by the functions that map a recipe onto them.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from reference.errors import InputError

SECTIONS = ("training_arguments", "lora", "quantization", "sft")

# Upstream renames: applied (and reported) only when the installed TrainingArguments has the new name.
RENAMES = {
    "gradient_checkpointing": "activation_checkpointing",
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
    "evaluation_strategy": "eval_strategy",
}
# Upstream removals without a rule: an error with this hint.
REMOVED_HINTS = {
    "logging_dir": "removed in transformers 5: TensorBoard files go under output_dir; drop the key "
    "(or record it under [departures])",
    "overwrite_output_dir": "removed in transformers 5",
}


@dataclass
class Recipe:
    """A named training setup; see the module docstring for the sections."""

    name: str
    source: str
    description: str = ""
    format: str = "alpaca-ja"
    """Prompt format of the training text: gemma2, llama3.1 or alpaca-ja."""
    base_model: str | None = None
    training_arguments: dict = field(default_factory=dict)
    """TrainingArguments keyword arguments, as the source wrote them."""
    departures: dict = field(default_factory=dict)
    """Source arguments changed or not passed on: {name: {source_value, reason}}."""
    lora: dict = field(default_factory=dict)
    quantization: dict = field(default_factory=dict)
    sft: dict = field(default_factory=dict)
    filter: dict = field(default_factory=dict)
    """The LLM2024 data filter's constants (see reference/filters.py)."""
    trials: list = field(default_factory=list)
    targets: dict = field(default_factory=dict)
    path: str = ""
    sha256: str = ""


@dataclass
class Mapping:
    """A recipe mapped onto the installed TrainingArguments, with every change that took."""

    kwargs: dict
    migrations: list[str]
    adaptations: list[str]
    withheld: list[str] = field(default_factory=list)
    """Access tokens taken out of the Trainer's arguments (X7), one note each, the value redacted."""


REDACTED = "<redacted>"


def names_a_token(key) -> bool:
    """`hub_token`, `HF_TOKEN`, `token`, `use_auth_token`: the word "token" in the name (not "tokens")."""
    return "token" in re.split(r"[^a-z0-9]+", str(key).lower())


def is_secret(key, value) -> bool:
    """An access token: a non-empty string under a key that names a token."""
    return names_a_token(key) and isinstance(value, str) and value != ""


def redacted(value, key=None):
    """`value` with every access token in it written as REDACTED, at any depth of dicts and lists; under a
    key that names a token everything is one (a departure's `source_value` of `hub_token`)."""
    if isinstance(value, dict):
        return {k: redacted(v, key if names_a_token(key) else k) for k, v in value.items()}
    if isinstance(value, list):
        return [redacted(v, key) for v in value]
    return REDACTED if is_secret(key, value) else value


def shown(override: str) -> str:
    """A `key=value` override as a message may quote it: a token's value redacted."""
    key, sep, value = override.partition("=")
    return f"{key}={REDACTED}" if sep and is_secret(key.rpartition(".")[2], value) else override


def builtin_names() -> list[str]:
    return sorted(
        p.name.removesuffix(".toml")
        for p in resources.files("reference").joinpath("recipes").iterdir()
        if p.name.endswith(".toml")
    )


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A built-in recipe by name (primer, llm2024) or a TOML file."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise InputError(f"recipe {name_or_path!s}: no such file")
        raw = path.read_bytes()
    elif str(name_or_path) in builtin_names():
        resource = resources.files("reference").joinpath(f"recipes/{name_or_path}.toml")
        raw, path = resource.read_bytes(), Path(str(resource))
    else:
        raise InputError(f"recipe {name_or_path!s}: not a file and not one of {', '.join(builtin_names())}")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"recipe {path}: not valid TOML: {error}") from None
    known = {f.name for f in dataclasses.fields(Recipe)} - {"path", "sha256"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InputError(f"recipe {path}: unknown key(s) {unknown}; known: {sorted(known)}")
    for key in ("name", "source"):
        if key not in data:
            raise InputError(f"recipe {path}: missing required key {key!r}")
    return Recipe(**data, path=str(path), sha256=hashlib.sha256(raw).hexdigest())


def _parse_value(text: str):
    """A TOML value (1e-4, true, [1, 2], "x"); anything that is not TOML is taken as a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(recipe: Recipe, overrides: list[str]) -> Recipe:
    """`key=value` settings: `section.key=value`, or a bare key meaning training_arguments.key."""
    result = copy.deepcopy(recipe)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"override {shown(item)!r}: expected key=value")
        section, dot, name = key.rpartition(".")
        section = section if dot else "training_arguments"
        if section not in SECTIONS:
            raise InputError(f"override {shown(item)!r}: unknown section {section!r}; use one of {', '.join(SECTIONS)}")
        if section != "training_arguments" and name not in getattr(result, section):
            raise InputError(
                f"override {shown(item)!r}: recipe {recipe.name!r} has no key {name!r} in [{section}] "
                f"(known: {', '.join(sorted(getattr(result, section)))})"
            )
        getattr(result, section)[name] = _parse_value(value)
    return result


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
        if not 0 <= ratio < 1:
            raise InputError(f"warmup_ratio={ratio}: must be in [0, 1)")
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
    import torch

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
    import transformers

    fields = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    kwargs = dict(recipe.training_arguments)
    if output_dir is not None:
        kwargs["output_dir"] = output_dir
    migrations = _migrate(kwargs, fields, transformers.__version__)
    missing = sorted(set(kwargs) - fields)
    if missing:
        hints = "; ".join(f"{k}: {REMOVED_HINTS.get(k, 'not an argument of this version')}" for k in missing)
        raise InputError(
            f"recipe {recipe.name!r}: TrainingArguments of transformers {transformers.__version__} "
            f"has no argument(s) {missing} ({hints})"
        )
    withheld = _withhold_tokens(kwargs)
    adaptations = _adapt_to_device(kwargs) if adapt else []
    return Mapping(kwargs=kwargs, migrations=migrations, adaptations=adaptations, withheld=withheld)


def to_training_arguments(recipe: Recipe, output_dir: str | None = None, **extra):
    """A real `transformers.TrainingArguments` from the recipe (extra kwargs win over the recipe's)."""
    import transformers

    mapping = map_training_arguments(recipe, output_dir)
    try:
        return transformers.TrainingArguments(**{**mapping.kwargs, **extra})
    except (ValueError, TypeError) as error:
        raise InputError(f"recipe {recipe.name!r}: TrainingArguments rejected the settings: {error}") from None


RUN_SETTINGS = {
    "remove_unused_columns": False,  # the records arrive encoded (input_ids, labels): keep every column
    "disable_tqdm": True,  # one progress line per optimizer step instead of a bar (reference.train)
    "use_cache": False,  # C15: the Trainer sets model.config.use_cache from this; generation turns it back on
}


def gradient_checkpointing(recipe: Recipe, kwargs: dict) -> bool:
    """On when the recipe's [sft] asks for it (seed 001) or its TrainingArguments do (the primer's)."""
    return bool(recipe.sft.get("gradient_checkpointing") or kwargs.get("activation_checkpointing"))


def run_arguments(recipe: Recipe, output_dir: str | None = None):
    """The TrainingArguments a `train` run uses: the recipe's, RUN_SETTINGS, and activation checkpointing."""
    kwargs = map_training_arguments(recipe, output_dir).kwargs
    return to_training_arguments(
        recipe, output_dir, **RUN_SETTINGS, activation_checkpointing=gradient_checkpointing(recipe, kwargs)
    )


def package_versions() -> dict[str, str]:
    from importlib import metadata

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


def resolved_settings(recipe: Recipe, output_dir: str = "runs/recipe", args=None) -> dict:
    """Every setting a run with this recipe uses, defaults included, and how each was arrived at.

    `args`: the TrainingArguments the run hands its Trainer (by default the ones `run_arguments` builds);
    their `to_dict()` is recorded as it is (X8: the tokens were withheld from them, and transformers writes any
    `*_token` field as a placeholder). Every other part is recorded with its access tokens redacted (X7)."""
    mapping = map_training_arguments(recipe, output_dir)
    args = run_arguments(recipe, output_dir) if args is None else args
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
            "sft": recipe.sft,
        }
    )
    recipe_identity = given.pop("recipe")
    return {"recipe": recipe_identity, "training_arguments": args.to_dict(), **given, "versions": package_versions()}


def _lora_resolved(lora: dict) -> dict:
    """Every LoraConfig field, defaults included, for the recipe's LoRA settings."""
    import peft

    names = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    config = peft.LoraConfig(**{k: v for k, v in lora.items() if k in names})
    resolved = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.to_dict().items()}
    resolved.update({k: v for k, v in lora.items() if k not in names})  # e.g. random_state
    return resolved


def trial_report(recipe: Recipe, shape: str = "gemma-2-27b") -> list[dict]:
    """C17: each trial with alpha/r and the LoRA trainable-parameter count for the given model shape."""
    from reference import lora, shapes

    config = shapes.load_config(shape)
    targets = recipe.lora.get("target_modules", list(shapes.PROJECTIONS))
    by_name = {t["trial"]: t for t in recipe.trials}
    rows = []
    for trial in recipe.trials:
        model = by_name.get(trial.get("same_model_as"), trial)
        r, alpha = model.get("r"), model.get("lora_alpha")
        rows.append(
            {
                **trial,
                "r": r,
                "lora_alpha": alpha,
                "alpha_over_r": alpha / r,
                "trainable_parameters": lora.trainable_parameters(config, r, targets),
            }
        )
    return rows


def describe(recipe: Recipe) -> str:
    """A readable summary: the arguments, the departures and (when present) the trial table."""
    lines = [f"recipe {recipe.name}: {recipe.description}", f"source: {recipe.source}", f"format: {recipe.format}", ""]
    lines += ["[training_arguments]"] + [f"  {k} = {v!r}" for k, v in redacted(recipe.training_arguments).items()]
    for section in ("quantization", "lora", "sft", "targets"):
        if getattr(recipe, section):
            lines += ["", f"[{section}]"] + [f"  {k} = {v!r}" for k, v in redacted(getattr(recipe, section)).items()]
    if recipe.departures:
        lines += ["", "departures from the source:"]
        departures = redacted(recipe.departures)
        lines += [f"  {k}: source {v['source_value']!r} - {v['reason']}" for k, v in departures.items()]
    if recipe.trials:
        lines += [
            "",
            "trials (gemma-2-27b shape, LoRA on the recipe's target modules):",
            f"  {'trial':<20} {'r':>4} {'alpha':>5} {'alpha/r':>7} {'trainable':>13}  result",
        ]
        for row in trial_report(recipe):
            lines.append(
                f"  {row['trial']:<20} {row['r']:>4} {row['lora_alpha']:>5} {row['alpha_over_r']:>7.2f} "
                f"{row['trainable_parameters']:>13,}  {row['result']}"
            )
    return "\n".join(lines)


def _whole(value, minimum: int | None = None) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and (minimum is None or value >= minimum)


def check_numbers(recipe) -> None:
    """The recipe's counts and rates once the key=value overrides are in, checked before anything loads.
    Counts are whole numbers >= 1; learning_rate, and num_train_epochs unless max_steps > 0, are finite and > 0.
    The message names the setting: `per_device_train_batch_size=0: must be a whole number >= 1`."""
    arguments = recipe.training_arguments
    counts = {
        "per_device_train_batch_size": arguments.get("per_device_train_batch_size"),
        "gradient_accumulation_steps": arguments.get("gradient_accumulation_steps"),
        "lora.r": recipe.lora.get("r"),
        "sft.max_seq_length": recipe.sft.get("max_seq_length"),
    }
    for name, value in counts.items():
        if value is not None and not _whole(value, 1):
            raise InputError(f"{name}={value!r}: must be a whole number >= 1")
    max_steps = arguments.get("max_steps", -1)
    if not _whole(max_steps):
        raise InputError(f"max_steps={max_steps!r}: must be a whole number (<= 0: train num_train_epochs)")
    rates = {"learning_rate": arguments.get("learning_rate")}
    if max_steps <= 0:
        rates["num_train_epochs"] = arguments.get("num_train_epochs")
    for name, value in rates.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
            raise InputError(f"{name}={value!r}: must be a finite number > 0")
