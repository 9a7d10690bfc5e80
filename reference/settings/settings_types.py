"""The type and range of every recipe setting, checked where a setting enters (claim X12).

Settings enter from a recipe file (``recipes.load_recipe``) and as ``key=value`` overrides
(``recipes.apply_overrides``); the whole recipe is checked again once its overrides are in (``recipes.check_numbers``)
and when it is mapped onto the Trainer's arguments (``training_arguments.map_training_arguments``). Each rule is
written once: ``[lora]`` and ``[quantization]`` below, ``[sft]``, ``[dpo]`` and ``[classifier]`` as the fields of their
dataclasses (``reference/settings/sections.py``);
``[training_arguments]`` takes each type from the installed ``transformers.TrainingArguments`` (its dataclass
fields; an enum's values are the only strings it takes), with the ranges of ``TRAINING_RANGES``, and knows the
names ``training_arguments.py`` migrates (``RENAMES``, ``warmup_ratio``).

Booleans are ``true``/``false`` in any case, also ``yes``/``no`` and ``1``/``0``, stored as a bool (the string
"False" is truthy). Numbers are finite. An unknown key is refused with the nearest known one. Every refusal is
an ``InputError`` naming the setting, its value and what is allowed: ``override lora.lora_dropout=1.5: must be
in [0, 1)``. Nothing here imports transformers until a ``[training_arguments]`` key is checked (`filter` reads a
recipe and imports neither torch nor transformers).
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import math
import types
import typing
from dataclasses import dataclass

from reference.errors import InputError

WORDS = {"true": True, "false": False, "yes": True, "no": False, "1": True, "0": False}
"""What a boolean setting takes (case-insensitive), and the bool stored for it."""

# Upstream renames: applied (and reported) by training_arguments.py only when the installed TrainingArguments has
# the new name; the old name takes the new one's rule.
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


@dataclass(frozen=True)
class Rule:
    """A setting's type (a value of any of `kinds` passes) and range. Kinds: bool, int, float (an int passes
    too), str, dict, list, list[str]. `low`/`high` bound numbers (`*_open`: the bound is excluded);
    `choices` are the only strings taken (for a boolean, "true" or "false" alone); `note` is added to the message."""

    kinds: tuple[str, ...]
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = True
    choices: tuple[str, ...] = ()
    note: str = ""

    def allowed(self) -> str:
        """What the rule takes, in words: `a whole number >= 1`, `in [0, 1)`, `one of: all, response`."""
        if not self.kinds:
            return "left unset (a recipe cannot write this argument's type)"
        text = " or ".join(dict.fromkeys(self._noun(kind) for kind in self.kinds))
        return f"{text} ({self.note})" if self.note else text

    def _noun(self, kind: str) -> str:
        if kind in ("int", "float"):
            noun = "a whole number" if kind == "int" else "a finite number"
            if self.low is None:
                return noun
            if self.high is None:
                return f"{noun} {'>' if self.low_open else '>='} {_number(self.low)}"
            low, high = "(["[not self.low_open], ")]"[not self.high_open]
            interval = f"in {low}{_number(self.low)}, {_number(self.high)}{high}"
            return interval if kind == "float" else f"{noun} {interval}"
        if kind == "bool" and self.choices:
            return " or ".join(self.choices)
        return f"one of: {', '.join(self.choices)}" if kind == "str" and self.choices else NOUNS[kind]

    def accepts(self, value) -> bool:
        return any(IS[kind](value) for kind in self.kinds) and self._in_range(value)

    def _in_range(self, value) -> bool:
        if isinstance(value, str):
            return not self.choices or value in self.choices
        if isinstance(value, bool):  # `choices` ("false",) takes one of the two
            return not self.choices or str(value).lower() in self.choices
        if not isinstance(value, int | float):
            return True
        if not math.isfinite(value):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        return above and (self.high is None or (value < self.high if self.high_open else value <= self.high))

    def coerce(self, value, text: str | None = None):
        """`value` as this setting stores it, or None when it is refused. `text`: the override as typed, for a
        value TOML reads otherwise than the setting wants (`output_dir=123` is the string "123", `lr=.5` 0.5)."""
        numeric = {"int", "float"} & set(self.kinds)
        if "bool" in self.kinds:
            if isinstance(value, str) and value.lower() in WORDS:
                if "str" not in self.kinds or value.lower() in ("true", "false"):
                    value = WORDS[value.lower()]
            elif isinstance(value, int) and not isinstance(value, bool) and value in (0, 1) and not numeric:
                value = bool(value)
        if self.accepts(value):
            return value
        if text is not None and numeric and isinstance(value, str):
            try:
                number = int(text) if "int" in numeric else float(text)
            except ValueError:
                number = None
            if number is not None and self.accepts(number):
                return number
        if text is not None and "str" in self.kinds and isinstance(value, int | float) and self.accepts(text):
            return text
        return None


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


NOUNS = {
    "bool": "true or false (also yes/no, 1/0)",
    "str": "a string",
    "dict": "a table",
    "list": "a list",
    "list[str]": "a list of strings",
}
IS = {
    "bool": lambda v: isinstance(v, bool),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "dict": lambda v: isinstance(v, dict),
    "list": lambda v: isinstance(v, list),
    "list[str]": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
}
FLAG = Rule(("bool",))


def whole(low: int | None = None, high: int | None = None, note: str = "") -> Rule:
    return Rule(("int",), low=low, high=high, high_open=False, note=note)


def number(low: float | None = None, high: float | None = None, low_open=False, high_open=True) -> Rule:
    return Rule(("float",), low=low, high=high, low_open=low_open, high_open=high_open)


def one_of(*choices: str) -> Rule:
    return Rule(("str",), choices=choices)


SEED = whole(0, 2**32 - 1)  # numpy's seeds, which transformers.set_seed seeds too
FLOAT_DTYPES = ("bfloat16", "float16", "float32")

LORA = {
    "r": whole(1),
    "lora_alpha": number(0, low_open=True),
    "lora_dropout": number(0, 1),
    "bias": one_of("none", "all", "lora_only"),
    "target_modules": Rule(("str", "list[str]")),
    "use_rslora": FLAG,
    "use_dora": FLAG,
    "random_state": SEED,
    "task_type": one_of("CAUSAL_LM", "SEQ_CLS"),  # a causal LM, or its classifier (reference/methods/preference.py)
    "modules_to_save": Rule(("list[str]",)),
}
QUANTIZATION = {
    "load_in_4bit": FLAG,
    "load_in_8bit": FLAG,
    "bnb_4bit_quant_type": one_of("nf4", "fp4"),
    "bnb_4bit_use_double_quant": FLAG,
    "bnb_4bit_compute_dtype": one_of(*FLOAT_DTYPES),
    "bnb_4bit_quant_storage": one_of(*FLOAT_DTYPES, "float64", "int8", "uint8"),  # BitsAndBytesConfig's list
}
PROJECT_SECTIONS = {"lora": LORA, "quantization": QUANTIZATION}
"""The library sections' rules; [sft], [dpo] and [classifier] are dataclasses (reference.settings.sections)."""

TRAINING_RANGES = {
    "per_device_train_batch_size": whole(1),
    "per_device_eval_batch_size": whole(1),
    "gradient_accumulation_steps": whole(1),
    "eval_accumulation_steps": whole(1),
    "max_steps": whole(note="<= 0: train num_train_epochs"),
    "num_train_epochs": number(0),  # and > 0 unless max_steps > 0: recipes.check_numbers
    "learning_rate": number(0, low_open=True),
    "warmup_steps": number(0),  # below 1: a fraction of the total steps
    "warmup_ratio": number(0, 1),
    "weight_decay": number(0),
    "adam_beta1": number(0, 1),
    "adam_beta2": number(0, 1),
    "adam_epsilon": number(0, low_open=True),
    "max_grad_norm": number(0),
    "label_smoothing_factor": number(0, 1),
    "neftune_noise_alpha": number(0),
    "logging_steps": number(0, low_open=True),
    "save_steps": number(0, low_open=True),
    "eval_steps": number(0, low_open=True),
    "eval_delay": number(0),
    "save_total_limit": whole(0),
    "seed": SEED,
    "data_seed": SEED,
    "dataloader_num_workers": whole(0),
    "dataloader_prefetch_factor": whole(1),
    "torch_empty_cache_steps": whole(1),
    "ddp_timeout": whole(1),
    "ddp_bucket_cap_mb": whole(1),
}
# Where TrainingArguments takes more than its annotation says: `fsdp: str | None`, but True turns FSDP on.
TRAINING_TYPES = {"fsdp": Rule(("bool", "str", "list[str]"))}


def _kinds(annotation) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The kinds and the allowed strings (an enum's values) of a dataclass field's annotation."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        parts = [_kinds(arg) for arg in args]
        return tuple(dict.fromkeys(k for kinds, _ in parts for k in kinds)), tuple(c for _, cs in parts for c in cs)
    simple = {bool: "bool", int: "int", float: "float", str: "str", dict: "dict"}
    if annotation in simple:
        return (simple[annotation],), ()
    if origin is dict:
        return ("dict",), ()
    if annotation is list or origin is list:
        return ("list[str]" if args == (str,) else "list",), ()
    if origin is typing.Literal:
        return tuple(dict.fromkeys("bool" if isinstance(a, bool) else "str" for a in args)), ()
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return ("str",), tuple(str(member.value) for member in annotation)
    return (), ()  # None, or a class a TOML value cannot be (accelerate's ParallelismConfig)


@functools.cache
def training_rules() -> dict[str, Rule]:
    """A rule for each argument of the installed TrainingArguments, and for the names migrated onto them."""
    import transformers

    rules = {}
    for f in dataclasses.fields(transformers.TrainingArguments):
        if f.init:
            kinds, choices = _kinds(f.type)
            rules[f.name] = TRAINING_TYPES.get(f.name) or Rule(kinds, choices=choices)
    for name, bounds in TRAINING_RANGES.items():
        if name in rules:
            rules[name] = dataclasses.replace(bounds, kinds=rules[name].kinds)
    rules.update({old: rules[new] for old, new in RENAMES.items() if new in rules and old not in rules})
    rules.setdefault("warmup_ratio", TRAINING_RANGES["warmup_ratio"])  # becomes a fractional warmup_steps
    return rules


def rules_of(section: str) -> dict[str, Rule]:
    """The rules of a section: the installed TrainingArguments', the tables above, or a section dataclass's
    fields (reference.settings.sections)."""
    if section == "training_arguments":
        return training_rules()
    if section in PROJECT_SECTIONS:
        return PROJECT_SECTIONS[section]
    from reference.settings import sections

    return sections.rules(section)


def label(section: str, key: str) -> str:
    """The setting as an override names it: `learning_rate`, `lora.r`."""
    return key if section == "training_arguments" else f"{section}.{key}"


def unknown_key(section: str, key: str) -> str:
    """Why `key` is refused, with the nearest known key: `... has no argument 'learning_rat'; did you mean
    'learning_rate'?`."""
    known = rules_of(section)
    if section == "training_arguments":
        import transformers

        from reference.settings import sections

        owners = [name for name, cls in sections.SECTIONS.items() if key in {f.name for f in dataclasses.fields(cls)}]
        if key in REMOVED_HINTS:
            hint = f" ({REMOVED_HINTS[key]})"
        elif owners:  # `beta=0.2` as trl's DPOConfig takes it: here the method's own section holds it
            hint = f"; did you mean {' or '.join(repr(f'{owner}.{key}') for owner in owners)}?"
        else:
            hint = _nearest(key, known)
        return f"TrainingArguments of transformers {transformers.__version__} has no argument {key!r}{hint}"
    return f"[{section}] has no key {key!r}{_nearest(key, known)} (known: {', '.join(sorted(known))})"


def _nearest(word: str, known) -> str:
    close = difflib.get_close_matches(word, list(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def check_setting(section: str, key: str, value, where: str = "", text: str | None = None):
    """`value` as the setting stores it (a bool for a boolean), or an InputError naming it and what is allowed.
    `where` begins the message (`recipe FILE: `, `override `); `text` is the override as typed."""
    rule = rules_of(section).get(key)
    if rule is None:
        raise InputError(f"{where}{unknown_key(section, key)}")
    stored = rule.coerce(value, text)
    if stored is None:
        from reference.settings.recipes import redacted

        shown = text if isinstance(value, bool) and text is not None else redacted(value, key)  # as typed
        nearest = _nearest(value, rule.choices) if isinstance(value, str) and rule.choices else ""
        raise InputError(f"{where}{label(section, key)}={shown!r}: must be {rule.allowed()}{nearest}")
    return stored


def check_section(section: str, values, where: str = "") -> dict:
    """Every setting of one section checked; the section with each value as stored."""
    if not isinstance(values, dict):
        raise InputError(f"{where}[{section}] must be a table of settings, got {values!r}")
    return {key: check_setting(section, key, value, where) for key, value in values.items()}
