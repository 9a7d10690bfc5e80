"""Recipes: named training setups kept as TOML, with the key=value overrides a command adds.

A recipe keeps its source's arguments as the source wrote them (``[training_arguments]``), lists every
place it departs from the source with the reason (``[departures]``), and carries the method's other
settings (``[lora]``, ``[quantization]``, ``[sft]``) and the results its source reported (``[[trials]]``,
``[targets]``). How the arguments become the installed transformers' ``TrainingArguments`` is
``reference/settings/training_arguments.py``.

Secrets never persist (X7): a key that names a token (the word "token" in its name: ``hub_token``,
``HF_TOKEN``, ``token``, ``use_auth_token``) holding a string is an access token, and its value is written
as ``<redacted>`` wherever a setting is recorded or shown (resolved settings, the recipe summary, the
message about a bad override). ``include_num_input_tokens_seen`` counts tokens (the word is "tokens") and a
``use_auth_token = true`` is a flag: neither is a secret.

Every setting has a type and a range (claim X12, ``reference/settings/settings_types.py``), checked where it enters: a
recipe file when it loads (its [training_arguments] against the installed transformers), each ``key=value``
override as it is applied, and the whole recipe once the overrides are in (``check_numbers``, which adds the
rules that tie settings together), before anything loads. A boolean given as a word is stored as a bool.

This module imports no torch when it loads: the fast `filter` command reads a recipe's [filter] section.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from reference.errors import InputError
from reference.settings import settings_types

SECTIONS = ("training_arguments", "lora", "quantization", "sft", "dpo", "classifier")


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
    dpo: dict = field(default_factory=dict)
    """reference.settings.sections.DPOSection: beta and max_length of a `dpo` run."""
    classifier: dict = field(default_factory=dict)
    """reference.settings.sections.PreferenceConfig: the LMSYS classifier's inputs and held-out split."""
    filter: dict = field(default_factory=dict)
    """The LLM2024 data filter's constants (see reference/records/filters.py)."""
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
    """A built-in recipe by name (builtin_names(): reference/recipes/*.toml) or a TOML file."""
    path, builtin = Path(name_or_path), None
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise InputError(f"recipe {name_or_path!s}: no such file")
        raw = path.read_bytes()
    elif str(name_or_path) in builtin_names():
        resource = resources.files("reference").joinpath(f"recipes/{name_or_path}.toml")
        raw, path, builtin = resource.read_bytes(), Path(str(resource)), name_or_path
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
    # A built-in recipe's [training_arguments] are checked when a command uses them (check_numbers,
    # map_training_arguments): `filter --recipe llm2024` imports no transformers. Spec tests pin them valid.
    checked = SECTIONS if builtin is None else SECTIONS[1:]
    for section in checked:
        if section in data:
            data[section] = settings_types.check_section(section, data[section], f"recipe {path}: ")
    return Recipe(**data, path=str(path), sha256=hashlib.sha256(raw).hexdigest())


def _parse_value(text: str):
    """A TOML value (1e-4, true, [1, 2], "x"); anything that is not TOML is taken as a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(recipe: Recipe, overrides: list[str]) -> Recipe:
    """`key=value` settings: `section.key=value`, or a bare key meaning training_arguments.key. Each is checked
    against its setting's type and range (settings_types) and stored as the setting takes it: a TOML value
    (1e-4, true, [1, 2], "x"), a boolean word as a bool, text as a string where the setting is a string."""
    result = copy.deepcopy(recipe)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"override {shown(item)!r}: expected key=value")
        section, dot, name = key.rpartition(".")
        section = section if dot else "training_arguments"
        if section not in SECTIONS:
            raise InputError(f"override {shown(item)!r}: unknown section {section!r}; use one of {', '.join(SECTIONS)}")
        if name not in settings_types.rules_of(section):
            raise InputError(f"override {shown(item)!r}: {settings_types.unknown_key(section, name)}")
        parsed = _parse_value(value)
        getattr(result, section)[name] = settings_types.check_setting(section, name, parsed, "override ", value)
    return result


def trial_report(recipe: Recipe, shape: str = "gemma-2-27b") -> list[dict]:
    """C17: each trial with alpha/r and the LoRA trainable-parameter count for the given model shape."""
    from reference.modeling import lora, shapes

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
    for section in ("quantization", "lora", "sft", "dpo", "classifier", "targets"):
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


def check_numbers(recipe) -> None:
    """The whole recipe once the key=value overrides are in, checked before anything loads: every setting's type
    and range (settings_types; a boolean word is stored as a bool), then the rules that tie settings together:
    num_train_epochs > 0 unless max_steps > 0, and not both load_in_4bit and load_in_8bit. The message names the
    setting: `per_device_train_batch_size=0: must be a whole number >= 1`."""
    for section in SECTIONS:
        setattr(recipe, section, settings_types.check_section(section, getattr(recipe, section)))
    arguments = recipe.training_arguments
    epochs = arguments.get("num_train_epochs")
    if arguments.get("max_steps", -1) <= 0 and epochs is not None and epochs <= 0:
        raise InputError(f"num_train_epochs={epochs!r}: must be a finite number > 0 (or max_steps > 0)")
    if recipe.quantization.get("load_in_4bit") and recipe.quantization.get("load_in_8bit"):
        raise InputError("quantization.load_in_4bit and quantization.load_in_8bit are both true; choose one")
