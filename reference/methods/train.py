"""Supervised fine-tuning as a run (reference.training.runs): a recipe, a local model and a data file in; adapter,
tokenizer
and the run's manifest out. The pieces are the real ones: a `transformers.Trainer`, peft LoRA on a bf16, 8-bit or
NF4 base (bitsandbytes), the recipe's optimizer (`adamw_8bit` runs on the CPU too) and schedule.

What a run does, in order (seed 001 §2.2.2 for the llm2024 recipe):
1. resolve the recipe (overrides applied, arguments mapped onto the installed transformers: P12) into the
   one TrainingArguments the Trainer gets; the manifest records that object's to_dict() (X8);
2. read the records and encode them (reference.methods.sft: the recipe's format, labels, max_seq_length);
3. load the base (quantised as the recipe says), attach a fresh LoRA adapter or load a saved one trainable
   (none: full fine-tuning), say which, and refuse a model with nothing to train (A2); with `[sft] chunked_loss`
   its training loss is computed a chunk of tokens at a time, never the full logits (reference.methods.chunked_loss);
4. train on padded or padding-free batches (`[sft] padding_free`, X11: reference.methods.sft,
reference.methods.padding_free)
   with `use_cache` off (the run's `use_cache=False`, which the Trainer puts on the model's config: a cache is
   useless, and wasteful, while checkpointing a training pass), then turn it back on for generation (C15);
5. save adapter and tokenizer to the output directory, which reloads (C16), and `manifest.json`
   (reference.training.manifest.RunManifest): resolved settings, versions, data and model hashes, the step plan,
   per-step loss and tokens/s (X2).

Progress is one line per optimizer step with tokens/s; the first step (allocation, warm-up) is reported
apart and left out of the steady rate (L2). With `auto_find_batch_size` the Trainer shrinks the batch
after an out-of-memory error and starts again (accelerate 1.x multiplies it by 0.9, rounding down; the
accelerate of the seed's day halved it); the run logs each retry and recomputes the step plan (C13).
"""

from __future__ import annotations

from pathlib import Path

from reference import messages
from reference.errors import InputError
from reference.hashing import sha256_of
from reference.methods import chunked_loss, sft
from reference.modeling import lora, models
from reference.records import data
from reference.settings import sections
from reference.training import recompute, runs
from reference.training.manifest import AdapterMode

CHECKPOINTS = runs.CHECKPOINTS


def parse_columns(text: str | None) -> dict | None:
    """`instruction=input,response=output` -> {"instruction": "input", "response": "output"}."""
    return data.parse_columns(text, ("instruction", "response"))


def encode_data(recipe, tokenizer, data_path: str, columns: dict | None) -> tuple[list[dict], dict]:
    """The records encoded as the recipe says, and what the manifest says about them."""
    settings = sections.resolve("sft", recipe.sft)
    loss_on, max_seq_length = settings.loss_on, settings.max_seq_length
    table = data.load_records(data_path, columns)
    if len(table) == 0:
        raise InputError(f"{data_path}: no records to train on")
    encoded = [
        sft.encode_record(tokenizer, recipe.format, row["instruction"], row["response"], max_seq_length, loss_on)
        for row in table
    ]
    return encoded, {
        "path": str(Path(data_path).resolve()),
        "sha256": sha256_of(data_path),
        "records": len(encoded),
        "tokens": sum(len(e["input_ids"]) for e in encoded),
        "loss_on": loss_on,
        "max_seq_length": max_seq_length,
        "format": recipe.format,
    }


def load_base(recipe, directory: Path, device: str, dtype: str, **model_kwargs):
    """The base as the recipe quantises it, packed where it trains (a 4-bit model cannot move); returns (model,
    identity, weight bytes). `model_kwargs`: a model class and its arguments (the classifier's 3-way head)."""
    quantization, bnb_4bit_settings = models.recipe_quantization(recipe.quantization)
    model, identity = models.load_causal_lm(
        directory,
        dtype=dtype,
        quantization=quantization,
        quantization_section=bnb_4bit_settings,
        device=device,
        **model_kwargs,
    )
    return model, identity, models.weight_bytes(model)


def with_adapter(model, lora_section: dict, checkpointing: bool, adapter: str | None, say):
    """The model with a saved adapter loaded to continue (trainable), a fresh one from `lora_section`, or none
    (full fine-tuning), said and recorded; a model with nothing to train is refused (A2). Returns (model, what the
    adapter is)."""
    if adapter is not None:
        model = lora.load_adapter(lora.prepare_base(model, checkpointing), adapter, trainable=True)
        path, digest = str(Path(adapter).resolve()), sha256_of(adapter)
        adapter_info = {"mode": AdapterMode.LOADED, "path": path, "sha256": digest}
        what = f"adapter loaded from {adapter}, not created"
    elif lora_section:
        model = lora.attach(model, lora_section, gradient_checkpointing=checkpointing)
        r, alpha = lora_section.get("r"), lora_section.get("lora_alpha")
        adapter_info = {"mode": AdapterMode.CREATED, "r": r, "lora_alpha": alpha}
        what = f"adapter created fresh (r={r}, lora_alpha={alpha}), not loaded"
    else:
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
        adapter_info = {"mode": AdapterMode.NONE}
        what = "no adapter: full fine-tuning"
    try:
        trainable = lora.require_trainable(model)
    except InputError as error:  # seed 000's trap: say which adapter it was before refusing
        raise InputError(f"{what}: {error}") from None
    say(f"{what}; {trainable:,} weights trainable")
    return model, adapter_info


def prepare_model(recipe, directory: Path, device: str, checkpointing: bool, dtype: str, adapter: str | None, say):
    """The base as the recipe quantises it, with a fresh adapter, a saved one to continue (trainable),
    or none (full fine-tuning). Returns (model, identity, weight bytes, what the adapter is)."""
    model, identity, weight_bytes = load_base(recipe, directory, device, dtype)
    model, adapter_info = with_adapter(model, recipe.lora, checkpointing, adapter, say)
    return model, identity, weight_bytes, adapter_info


class SupervisedFineTuning(runs.Method):
    """SFT: the records rendered in the recipe's format, the loss on the tokens `[sft] loss_on` says, padded or
    padding-free batches (`[sft] padding_free`), the loss over the full logits or a chunk at a time."""

    name = "sft"

    def read(self, recipe, tokenizer, data_path, columns, say) -> runs.Data:
        return runs.Data(*encode_data(recipe, tokenizer, data_path, columns))

    def prepare(self, recipe, directory, tokenizer, args, data, adapter, say) -> runs.Prepared:
        dtype = "bfloat16" if args.bf16 else "float32"
        model, identity, weight_bytes, adapter_info = prepare_model(
            recipe, directory, str(args.device), args.activation_checkpointing, dtype, adapter, say
        )
        settings = sections.resolve("sft", recipe.sft)
        flattened = settings.padding_free  # X11: records end to end, no padding
        say(f"{'padding-free' if flattened else 'padded'} batches")
        callbacks = []
        if args.activation_checkpointing and settings.recompute == "fit":
            longest = max(len(record["input_ids"]) for record in data.dataset)
            callbacks.append(recompute.FitRecompute((args.per_device_train_batch_size, longest), say))
        return runs.Prepared(
            data=data,
            model=model,
            identity=identity,
            weight_bytes=weight_bytes,
            adapter=adapter_info,
            collator=sft.collator(tokenizer, padding_free=flattened),
            loss=chunked_loss.train_with(model, settings.chunked_loss, args.device),
            callbacks=callbacks,
        )


SFT = SupervisedFineTuning()


def run(recipe, model_dir: str, data_path: str, output_dir: str, columns=None, say=messages.say, **options):
    """An SFT run (reference.training.runs.run), returning its RunManifest: options callbacks, adapter, resume,
    overwrite."""
    return runs.run(SFT, recipe, model_dir, data_path, output_dir, columns, say, **options)


def run_claimed(recipe, model_dir, data_path, output_dir, columns=None, say=messages.say, **options):
    """An SFT run in a directory the caller holds (reference.training.runs.run_claimed)."""
    return runs.run_claimed(SFT, recipe, model_dir, data_path, output_dir, columns, say, **options)
