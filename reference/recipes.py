"""Recipes: named training setups kept as TOML, with the key=value overrides a command adds.

A recipe keeps its source's arguments as the source wrote them (``[training_arguments]``), lists every
place it departs from the source with the reason (``[departures]``), and carries the method's other
settings (``[lora]``, ``[quantization]``, ``[sft]``) and the results its source reported (``[[trials]]``,
``[targets]``). How the arguments become the installed transformers' ``TrainingArguments`` is
``reference/training_arguments.py``.

Secrets never persist (X7): a key that names a token (the word "token" in its name: ``hub_token``,
``HF_TOKEN``, ``token``, ``use_auth_token``) holding a string is an access token, and its value is written
as ``<redacted>`` wherever a setting is recorded or shown (resolved settings, the recipe summary, the
message about a bad override). ``include_num_input_tokens_seen`` counts tokens (the word is "tokens") and a
``use_auth_token = true`` is a flag: neither is a secret.

``check_numbers`` checks the counts and rates once the overrides are in, before anything loads.

This module imports no torch when it loads: the fast `filter` command reads a recipe's [filter] section.
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
