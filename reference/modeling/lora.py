"""LoRA: a frozen weight W0 plus a trained low-rank update, h = W0 x + (alpha / r) B A x.

A is r x in, B is out x r (B starts at zero, so the adapter starts as the identity change). Each adapted
linear layer therefore trains r * (in + out) parameters; rsLoRA scales by alpha / sqrt(r) instead of
alpha / r so the update's size does not shrink as r grows.

`lora_config` and `attach` build the recipe's adapter with peft; the spec checks the count formula against peft.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path

import peft
import torch

from reference import messages
from reference.errors import InputError
from reference.modeling import models, vocab
from reference.modeling.adapter_records import (
    base_record,
    check_adapter_files,
    check_fits,
    check_recorded_base,
    merge_quantization,
    recorded_bnb_4bit,
    recorded_quantization,
)
from reference.modeling.shapes import projection_shapes
from reference.paths import complete_directory


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
    model = prepare_base(model, gradient_checkpointing)
    if "random_state" in section:
        torch.manual_seed(section["random_state"])
    config = lora_config(section)
    config.auto_mapping = base_record(model)
    with warnings.catch_warnings():  # peft still calls transformers' deprecated *gradient_checkpointing* names
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*gradient_checkpointing.*")
        return peft.get_peft_model(model, config)


def prepare_base(model, gradient_checkpointing: bool):
    """Ready a frozen base for adapter training: a k-bit base gets peft's preparation (norms and
    embeddings in fp32, input gradients on); any base gets non-reentrant gradient checkpointing if asked."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*gradient_checkpointing.*")
        if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
            return peft.prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
        if gradient_checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
            model.enable_input_require_grads()
    return model


def require_trainable(model) -> int:
    """The number of trainable weights, or an error when there are none: a saved adapter loaded with
    peft's default is_trainable=False is frozen, and "training" it changes nothing (seed 000's trap)."""
    trainable, _ = count_trainable(model)
    if trainable == 0:
        raise InputError(
            "no weight is trainable: an adapter loaded with peft's default is_trainable=False is frozen, "
            "and training it changes nothing (load it with is_trainable=True)"
        )
    return trainable


def count_trainable(model) -> tuple[int, int]:
    """(trainable, all) parameters as the model holds them (packed 4-bit weights count as stored)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def load_adapter(model, adapter_dir: str | Path, trainable: bool = True, say=messages.say, checked: bool = False):
    """A saved adapter on `model`, its weights trainable (peft's default, is_trainable=False, freezes them:
    the mistake behind "it only learned the new data", seed 000). Its files are checked first
    (check_adapter_files: a missing, cut or damaged one is named). A mismatch is an error naming both: first
    the kind of base the adapter records (check_recorded_base; `checked` when the caller did that already),
    then peft's shapes. The loaded adapter records `model` as its base from now on (base_record): saved
    again after more training, it says what it was last trained on."""
    directory = Path(adapter_dir)
    check_adapter_files(directory)
    if not checked:
        check_recorded_base(directory, model.config.to_dict(), say)
    record = base_record(model)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*gradient_checkpointing.*")
            warnings.filterwarnings("error", message=".*missing adapter keys.*")
            loaded = peft.PeftModel.from_pretrained(model, str(directory), is_trainable=trainable)
    except (RuntimeError, ValueError, KeyError, UserWarning) as error:
        base = getattr(model.config, "_name_or_path", "the base model")
        raise InputError(f"adapter {adapter_dir} does not fit {base}: {str(error).splitlines()[0]}") from None
    loaded.peft_config[loaded.active_adapter].auto_mapping = record
    return loaded


def tokenizer_dir(base_dir: str | Path, adapter_dir: str | Path | None = None) -> Path:
    """Where the tokenizer for a base with an adapter lives: the adapter's own when it saved one (training
    saves it beside the adapter, added tokens included), else the base's."""
    if adapter_dir is not None and (Path(adapter_dir) / "tokenizer_config.json").is_file():
        return Path(adapter_dir)
    return Path(base_dir)


def load_tokenizer(base_dir: str | Path, adapter_dir: str | Path | None = None):
    """The tokenizer `tokenizer_dir` chooses, read from the local directory. A directory with no tokenizer files
    is an error: transformers 5 would otherwise build an almost empty tokenizer from config.json alone; so is a
    tokenizer with more tokens than the base has embedding rows (models.check_vocabulary), before any model
    loads."""
    directory = Path(tokenizer_dir(base_dir, adapter_dir))
    if not any((directory / name).is_file() for name in ("tokenizer_config.json", "tokenizer.json")):
        where = f"model {base_dir}" + (f" nor adapter {adapter_dir}" if adapter_dir else "")
        raise InputError(
            f"{where}: no tokenizer (tokenizer_config.json or tokenizer.json); save one beside the weights"
        )
    tokenizer = vocab.load_tokenizer(directory)
    models.check_vocabulary(tokenizer, directory, base_dir)
    return tokenizer


def merge(
    base_dir: str | Path,
    adapter_dir: str | Path,
    output_dir: str | Path,
    quantization: str | None = None,
    override_record: bool = True,
    say=messages.say,
    quantization_section: dict | None = None,
) -> dict:
    """Fold a trained adapter into its base and save the result: W = W0 + s B A, in bf16.

    The base is loaded as the adapter was trained on it: `quantization` None follows the adapter's run record
    (merge_quantization: none, with a note, when there is none); a name is used as given, a different record
    noted, or refused without `override_record` (the `merge` command's --override-record; the `continue`
    route passes its recipe's choice and keeps the default). An NF4 or 8-bit base (or a base saved 4-bit) is
    dequantised to bf16 before the merge: the merged weights are then the very weights the adapter saw, plus
    its update. Its bnb_4bit settings (double quantisation changes the dequantised values) are
    `quantization_section`'s, by default those the adapter's run recorded (recorded_bnb_4bit). An adapter made for
    another kind of model is refused before the base loads (check_fits). Returns what was merged, for the run's
    manifest."""
    check_fits(base_dir, adapter_dir, say)
    tokenizer = load_tokenizer(base_dir, adapter_dir)  # saved with the merged model: checked before the merge
    record = recorded_quantization(adapter_dir)
    quantization = merge_quantization(adapter_dir, quantization, override_record, say)
    section = recorded_bnb_4bit(adapter_dir) if quantization_section is None else quantization_section
    model, identity = models.load_causal_lm(
        base_dir, dtype="bfloat16", quantization=quantization, quantization_section=section
    )
    if identity.quantization != quantization:
        say(f"note: base {base_dir} is saved {identity.quantization}, so it is merged as saved, not {quantization}")
    if identity.quantization != "none":
        model = model.dequantize()
    merged = load_adapter(model, adapter_dir, trainable=False, say=say, checked=True).merge_and_unload()
    target = Path(output_dir)
    with complete_directory(target) as partial:
        merged.save_pretrained(partial, safe_serialization=True)
        tokenizer.save_pretrained(partial)
    return {
        "base": identity.path,
        "base_quantization": identity.quantization,
        "recorded_quantization": None if record is None else record[0],
        "quantization_record": None if record is None else record[1],
        "adapter": str(Path(adapter_dir).resolve()),
        "merged": str(target.resolve()),
    }
