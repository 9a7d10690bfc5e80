"""What an adapter records about the base it was trained on, and the checks made against that record before it
loads: the kind of model (architecture and shapes, kept in adapter_config.json) and how the base was loaded (none,
8bit or nf4, from the run's own record beside the adapter). reference.modeling.lora attaches, loads and merges adapters
with
these checks.
"""

from __future__ import annotations

import json
from pathlib import Path

from reference import messages
from reference.errors import InputError
from reference.modeling import models

SHAPE_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
)
"""What makes a base the same kind of model as another, for an adapter: its architecture and its shapes."""

RECORD = "ftref_base"
"""The key, inside adapter_config.json's `auto_mapping`, of the record of the base an adapter was trained on.

peft 0.21 writes base_model_name_or_path (a path, useless once that folder is gone) and nothing else about the
base: two architectures of the same sizes (tiny-gemma2, tiny-llama) take each other's adapters without a word.
So every adapter this project makes or trains (`attach`, `load_adapter`: the Trainer's checkpoints, train's,
continue's and dpo's outputs) records its base's kind in peft's own `auto_mapping` field, which peft saves and
loads back as it is (peft reads only base_model_class and parent_library, and only for adapters without a
task_type, to find the base class):

    "auto_mapping": {"base_model_class": "Gemma2ForCausalLM", "parent_library": "transformers.models.gemma2...",
                     "ftref_base": {"model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"],
                                    "hidden_size": 64, "intermediate_size": 128, ...}}

How the base was loaded (none, 8bit, nf4) is the run's record, not the adapter's: `recorded_quantization`."""


def base_record(model) -> dict:
    """peft's auto_mapping for an adapter on `model`, with the record of that base's kind under RECORD."""
    config = model.config.to_dict()
    kind = {key: config.get(key) for key in SHAPE_KEYS}
    kind["architectures"] = config.get("architectures")
    cls = type(model)
    return {"base_model_class": cls.__name__, "parent_library": cls.__module__, RECORD: kind}


CONFIG = "adapter_config.json"
SAFE_WEIGHTS = "adapter_model.safetensors"
"""Adapters load from safetensors only: a pickled adapter_model.bin could run code when loaded."""
AGAIN = "copy or save the adapter again (an interrupted copy or save leaves a file cut short)"


def adapter_settings(adapter_dir: Path) -> dict:
    """adapter_config.json as a dict; unreadable is an error naming the file."""
    path = Path(adapter_dir) / CONFIG
    try:
        settings = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as error:
        raise InputError(f"adapter {adapter_dir}: {path} cannot be read: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        reason = f"not UTF-8 text ({error.reason} at byte {error.start})"
        raise InputError(f"adapter {adapter_dir}: {path} is damaged: {reason}; {AGAIN}") from None
    except json.JSONDecodeError as error:
        raise InputError(
            f"adapter {adapter_dir}: {path} is damaged or truncated: not valid JSON (line {error.lineno}, column "
            f"{error.colno}: {error.msg}); {AGAIN}"
        ) from None
    if not isinstance(settings, dict):
        raise InputError(f"adapter {adapter_dir}: {path} is not a JSON object but a JSON {type(settings).__name__}")
    return settings


def check_adapter_files(adapter_dir: str | Path | None) -> dict:
    """Before anything loads: the adapter directory holds a readable adapter_config.json and a whole
    adapter_model.safetensors (never a pickle), or an error names the file and what is wrong with it (missing,
    not JSON, cut short, damaged). Returns the adapter's settings ({} for no adapter, None)."""
    if adapter_dir is None:
        return {}
    directory = Path(adapter_dir)
    if not (directory / CONFIG).is_file():
        raise InputError(f"adapter {adapter_dir}: no {CONFIG} (not a saved peft adapter)")
    settings = adapter_settings(directory)
    weights = directory / SAFE_WEIGHTS
    if not weights.is_file():
        pickled = (
            " only a pickled adapter_model.bin, which is never unpickled here"
            if (directory / "adapter_model.bin").is_file()
            else ""
        )
        raise InputError(
            f"adapter {adapter_dir}: no {SAFE_WEIGHTS};{pickled} (convert a trusted one with "
            "peft: PeftModel.from_pretrained(base, DIR).save_pretrained(DIR, safe_serialization=True))"
        )
    fault = models.safetensors_fault(weights)
    if fault:
        raise InputError(f"adapter {adapter_dir}: {weights} cannot be read whole: {fault}; {AGAIN}")
    return settings


def recorded_kind(adapter_dir: Path) -> dict | None:
    """The record of the base the adapter was trained on (RECORD), or None for an adapter saved without one
    (by an older version of this project, or by another tool)."""
    mapping = adapter_settings(adapter_dir).get("auto_mapping")
    record = mapping.get(RECORD) if isinstance(mapping, dict) else None
    return record if isinstance(record, dict) else None


def _kind(config: dict) -> str:
    architectures = config.get("architectures") or []
    return ", ".join([repr(config.get("model_type")), *architectures])


def check_recorded_base(adapter_dir: Path, config: dict, say=messages.say) -> None:
    """The adapter's base must be the same kind of model (model_type and shapes, SHAPE_KEYS) as the one it is
    loaded onto (`config`, a model config as a dict): peft can only see shapes. The adapter's own record
    (RECORD) is read first, so the check holds when the base folder it names is gone. An adapter without a
    record is checked, as before records, against the config.json of the folder it names
    (base_model_name_or_path) when that folder is at hand; when it is not, there is nothing to check against,
    and a note says so (only peft's shape check is left)."""
    recorded = adapter_settings(adapter_dir).get("base_model_name_or_path")
    at_hand = bool(recorded) and (Path(recorded) / "config.json").is_file()
    here = config.get("_name_or_path") or "the base given"
    theirs = recorded_kind(adapter_dir)
    if theirs is not None:
        made_for = f"{recorded or 'a base'} ({_kind(theirs)}{'' if at_hand else '; that folder is gone'})"
    elif at_hand:
        theirs = json.loads((Path(recorded) / "config.json").read_text(encoding="utf-8"))
        made_for = f"{recorded} ({_kind(theirs)})"
    else:
        say(
            f"note: adapter {adapter_dir} records no kind of base (saved before adapters recorded one, or by "
            f"another tool) and the base it names ({recorded or 'none'}) is not at hand: whether it was made "
            f"for a model like {here} ({_kind(config)}) cannot be checked, only its shapes (an adapter of "
            "another architecture with the same shapes loads without an error): make sure it is the adapter's base"
        )
        return
    differ = [f"{k} {theirs.get(k)!r} vs {config.get(k)!r}" for k in SHAPE_KEYS if theirs.get(k) != config.get(k)]
    if differ:
        raise InputError(
            f"adapter {adapter_dir} does not fit this base: it was made for {made_for}, not for {here} "
            f"({_kind(config)}): {'; '.join(differ)}"
        )


def check_fits(base_dir: str | Path, adapter_dir: str | Path, say=messages.say) -> None:
    """The adapter's files (check_adapter_files), then check_recorded_base from the base's config alone, before
    its weights load."""
    from transformers import AutoConfig

    directory = models.require_model_dir(base_dir)
    check_adapter_files(adapter_dir)
    try:
        config = AutoConfig.from_pretrained(str(directory), local_files_only=True).to_dict()
    except (OSError, ValueError) as error:
        raise InputError(f"model {base_dir}: config.json cannot be read: {error}") from None
    config["_name_or_path"] = str(base_dir)
    check_recorded_base(Path(adapter_dir), config, say)


QUANTIZATION_RECORDS = ("manifest.json",)
"""Run records beside an adapter that name, under model.quantization, how its base was loaded (every
training run writes manifest.json: train, continue, dpo, preference train; reference.modeling.models.ModelIdentity)."""


def recorded_quantization(adapter_dir: str | Path) -> tuple[str, str] | None:
    """(quantization, the file that records it) for the base the adapter was trained on, or None when no run
    record is at hand: the manifest.json beside the adapter, or for a Trainer checkpoint
    (RUN/checkpoints/checkpoint-N) its run's run.json (written when training starts) or manifest.json."""
    directory = Path(adapter_dir)
    places = [directory / name for name in QUANTIZATION_RECORDS]
    if directory.parent.name == "checkpoints":
        places += [directory.parent.parent / name for name in ("run.json", "manifest.json")]
    for place in places:
        try:
            quantization = json.loads(place.read_text(encoding="utf-8"))["model"]["quantization"]
        except (OSError, ValueError, UnicodeDecodeError, KeyError, TypeError):
            continue
        if quantization in models.QUANTIZATIONS:
            return quantization, str(place)
    return None


def recorded_bnb_4bit(adapter_dir: str | Path) -> dict:
    """The bnb_4bit_* settings the adapter's run loaded its base with (its run.json or manifest.json: the recipe's
    [quantization] as it ran), or {} when no run record says (bitsandbytes' and the project's defaults then)."""
    directory = Path(adapter_dir)
    run = directory.parent.parent if directory.parent.name == "checkpoints" else directory
    for place in (run / "run.json", run / "manifest.json"):
        try:
            section = json.loads(place.read_text(encoding="utf-8"))["settings"]["quantization"]
        except (OSError, ValueError, UnicodeDecodeError, KeyError, TypeError):
            continue
        if isinstance(section, dict):
            return {k: v for k, v in section.items() if k.startswith("bnb_4bit")}
    return {}


def merge_quantization(
    adapter_dir: str | Path, choice: str | None = None, override_record: bool = False, say=messages.say
):
    """How `merge` loads the base: as the adapter's run records it was loaded while the adapter trained
    (`choice` None, the command's default), else as chosen. A choice that contradicts the record is refused,
    naming both, unless `override_record` (to fold a QLoRA adapter into the full-precision base on purpose:
    noted). With no record: the choice, or none with a note."""
    record = recorded_quantization(adapter_dir)
    if record is None:
        if choice is None:
            say(
                f"note: adapter {adapter_dir} has no run record beside it (manifest.json, or a "
                "checkpoint's run.json) saying how its base was loaded while it trained; merging onto the base "
                "as saved (--quantization none). If it was trained on a 4-bit base, merge with --quantization nf4."
            )
        return choice or "none"
    recorded, source = record
    if choice is None or choice == recorded:
        return recorded
    if not override_record:
        raise InputError(
            f"--quantization {choice}: adapter {adapter_dir} was trained on its base loaded {recorded} ({source}); "
            f"merged into the base loaded {choice} it is folded into weights it was not trained on. Leave "
            f"--quantization out (or give {recorded}) to follow the record, or add --override-record to merge "
            f"{choice} on purpose"
        )
    say(
        f"note: merging onto the base loaded {choice}, as asked; adapter {adapter_dir} trained on it loaded "
        f"{recorded} ({source})"
    )
    return choice
