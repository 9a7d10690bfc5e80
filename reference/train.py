"""One supervised fine-tuning run: a recipe, a local model and a data file in; adapter, tokenizer and the
run's manifest out. The pieces are the real ones: a `transformers.Trainer`, peft LoRA on a bf16, 8-bit or
NF4 base (bitsandbytes), the recipe's optimizer (`adamw_8bit` runs on the CPU too) and schedule.

What a run does, in order (seed 001 §2.2.2 for the llm2024 recipe):
1. resolve the recipe (overrides applied, arguments mapped onto the installed transformers: P12) into the
   one TrainingArguments the Trainer gets; the manifest records that object's to_dict() (X8);
2. read the records and encode them (reference.sft: the recipe's format, labels, max_seq_length);
3. load the base (quantised as the recipe says), attach a fresh LoRA adapter or load a saved one trainable
   (none: full fine-tuning), say which, and refuse a model with nothing to train (A2); with `[sft] chunked_loss`
   its training loss is computed a chunk of tokens at a time, never the full logits (reference.chunked_loss);
4. train on padded or padding-free batches (`[sft] padding_free`, X11: reference.sft, reference.padding_free)
   with `use_cache` off (the run's `use_cache=False`, which the Trainer puts on the model's config: a cache is
   useless, and wasteful, while checkpointing a training pass), then turn it back on for generation (C15);
5. save adapter and tokenizer to the output directory, which reloads (C16), and `manifest.json`
   (reference.manifest.RunManifest): resolved settings, versions, data and model hashes, the step plan,
   per-step loss and tokens/s (X2).

Progress is one line per optimizer step with tokens/s; the first step (allocation, warm-up) is reported
apart and left out of the steady rate (L2). With `auto_find_batch_size` the Trainer shrinks the batch
after an out-of-memory error and starts again (accelerate 1.x multiplies it by 0.9, rounding down; the
accelerate of the seed's day halved it); the run logs each retry and recomputes the step plan (C13).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict
from pathlib import Path

from accelerate.utils import gather_object
from transformers import PrinterCallback, Trainer

from reference import (
    checkpoints,
    chunked_loss,
    data,
    distributed,
    kernels,
    lora,
    models,
    padding_free,
    progress,
    rundir,
    sft,
    training_arguments,
    vocab,
)
from reference.errors import InputError
from reference.hashing import sha256_of, trainable_weights_sha256
from reference.manifest import AdapterMode, RunManifest
from reference.paths import complete_directory

CHECKPOINTS = rundir.CHECKPOINTS


def parse_columns(text: str | None) -> dict | None:
    """`instruction=input,response=output` -> {"instruction": "input", "response": "output"}."""
    if not text:
        return None
    pairs = [item.partition("=") for item in text.split(",")]
    columns = {k.strip(): v.strip() for k, sep, v in pairs if sep}
    if set(columns) != {"instruction", "response"} or len(pairs) != 2:
        raise InputError(f"--columns {text!r}: expected instruction=COLUMN,response=COLUMN")
    return columns


class StepTrainer(Trainer):
    """A Trainer that sums each optimizer step's loss and counts its real tokens, for ProgressReporter, and runs a
    flattened (padding-free) batch's step through reference.padding_free."""

    window_loss = 0.0
    window_tokens = 0

    def train(self, *args, **kwargs):
        # Whatever ran before (an eval-mode forward without grad repacks 4-bit weights on CPUs with avx512_bf16,
        # and that layout has no backward pass), the steps run bitsandbytes' differentiable kernel.
        kernels.standard_layout(self.model)
        return super().train(*args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if "attention_mask" in inputs:  # padded
            loss = super().training_step(model, inputs, num_items_in_batch)
        else:  # flattened (padding-free)
            with padding_free.flattened_step(self, self.accelerator.unwrap_model(model), inputs["position_ids"]):
                loss = super().training_step(model, inputs, num_items_in_batch)
        self.window_loss += float(loss)  # already scaled by the accumulation window: the sum is the step's loss
        self.window_tokens += sft.real_tokens(inputs)
        return loss

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        distributed.shard_on_the_cpu(self)  # accelerate turns FSDP on for accelerators only (reference.distributed)

    def take_window(self) -> tuple[float, int]:
        """The finished step's loss and tokens, over every process; the next step counts from zero."""
        window = distributed.step_totals(self.accelerator, self.window_loss, self.window_tokens)
        self.window_loss, self.window_tokens = 0.0, 0
        return window


def stderr_line(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def encode_data(recipe, tokenizer, data_path: str, columns: dict | None) -> tuple[list[dict], dict]:
    """The records encoded as the recipe says, and what the manifest says about them."""
    loss_on = recipe.sft.get("loss_on", "response")
    max_seq_length = int(recipe.sft.get("max_seq_length", 2048))
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


def prepare_model(recipe, directory: Path, device: str, checkpointing: bool, dtype: str, adapter: str | None, say):
    """The base as the recipe quantises it, with a fresh adapter, a saved one to continue (trainable),
    or none (full fine-tuning). Returns (model, identity, weight bytes, what the adapter is)."""
    quantization, bnb_4bit_settings = models.recipe_quantization(recipe.quantization)
    model, identity = models.load_causal_lm(
        directory,
        dtype=dtype,
        quantization=quantization,
        quantization_section=bnb_4bit_settings,
        device=device,  # packed where it trains (a 4-bit model cannot move)
    )
    weight_bytes = models.weight_bytes(model)
    if adapter is not None:
        model = lora.load_adapter(lora.prepare_base(model, checkpointing), adapter, trainable=True)
        path, digest = str(Path(adapter).resolve()), sha256_of(adapter)
        adapter_info = {"mode": AdapterMode.LOADED, "path": path, "sha256": digest}
        what = f"adapter loaded from {adapter}, not created"
    elif recipe.lora:
        model = lora.attach(model, recipe.lora, gradient_checkpointing=checkpointing)
        r, alpha = recipe.lora.get("r"), recipe.lora.get("lora_alpha")
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
    return model, identity, weight_bytes, adapter_info


def run(
    recipe,
    model_dir: str,
    data_path: str,
    output_dir: str,
    columns: dict | None = None,
    say=stderr_line,
    callbacks=(),
    before_train=None,
    adapter: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> RunManifest:
    """Train as the recipe says and save; returns the run's manifest, also written to output/manifest.json.

    `adapter`: continue training that saved adapter (a new schedule from step 0). `resume`: carry on
    from the newest complete checkpoint in output/checkpoints (optimizer, scheduler, RNG state and
    step restored), refused when the model, data or settings differ from the run's. `overwrite`: start
    again in a directory that holds a run. The directory is held by this run alone (reference.rundir).
    `before_train(trainer)` is called once the Trainer is built (tests observe the run).

    A finished run (its manifest written) is complete: --resume says so and changes nothing. A run that ended
    after its last checkpoint but before its manifest is completed from that checkpoint, nothing trained again."""
    models.require_model_dir(model_dir)  # first: a wrong model fails before any work
    lora.check_adapter_files(adapter)  # a missing, cut or damaged adapter file, before the output is claimed
    with rundir.claimed(output_dir, resume, overwrite, say):
        return run_claimed(
            recipe, model_dir, data_path, output_dir, columns, say, callbacks, before_train, adapter, resume
        )


def run_claimed(
    recipe,
    model_dir,
    data_path,
    output_dir,
    columns=None,
    say=stderr_line,
    callbacks=(),
    before_train=None,
    adapter=None,
    resume=False,
) -> RunManifest:
    """`run` in a directory the caller already holds (rundir.claimed), for a run made of several steps that no
    other run may come between (continuation.continue_merged: merge, then train)."""
    directory = models.require_model_dir(model_dir)
    checkpoint_dir = Path(output_dir) / CHECKPOINTS
    finished = resume and rundir.is_finished(output_dir)  # said once the command is known to be that run's
    resume_from = checkpoints.last_complete(checkpoint_dir, say) if resume and not finished else None
    args = training_arguments.run_arguments(recipe, str(checkpoint_dir))  # the one object the Trainer gets (X8)
    distributed.check_arguments(args, adapter=adapter is not None or bool(recipe.lora))
    settings = training_arguments.resolved_settings(recipe, str(checkpoint_dir), args=args)
    tokenizer = vocab.pad_with_eos(lora.load_tokenizer(directory, adapter))  # a continued adapter's own, if saved
    encoded, data_info = encode_data(recipe, tokenizer, data_path, columns)

    checkpointing = args.activation_checkpointing
    if args.process_index != 0:  # under torchrun the main process reports for all
        say = lambda text: None  # noqa: E731
    dtype = "bfloat16" if args.bf16 else "float32"
    model, identity, weight_bytes, adapter_info = prepare_model(
        recipe, directory, str(args.device), checkpointing, dtype, adapter, say
    )
    trainable, total = lora.count_trainable(model)
    loss = chunked_loss.train_with(model, bool(recipe.sft.get("chunked_loss", False)), args.device)

    manifest = RunManifest(
        settings=settings,
        model=asdict(identity),
        trainable_parameters=trainable,
        all_parameters=total,
        weight_bytes=weight_bytes,
        step_plan={},
        data=data_info,
        adapter=adapter_info,
        resumed_from=str(resume_from) if resume_from else None,
        output=str(Path(output_dir).resolve()),
        loss=loss,
    )
    if args.process_index == 0:  # X5: what this run trains, recorded (or, on --resume, checked) before it trains
        what_runs = {"model": manifest.model, "data": data_info, "settings": settings}
        rundir.write_or_check(output_dir, what_runs, resume)
    if finished:  # the same run, and it has ended: nothing to carry on
        record = RunManifest.read(output_dir)
        say(
            f"--resume: the run in {output_dir} is complete ({len(record.steps)} steps, "
            f"{rundir.FINISHED} written); nothing to do (--overwrite trains it again)"
        )
        return record
    reporter = progress.ProgressReporter(manifest, len(encoded), say)
    flattened = bool(recipe.sft.get("padding_free", False))  # X11: records end to end, no padding
    trainer = StepTrainer(
        model=model,
        args=args,
        train_dataset=encoded,
        data_collator=sft.collator(tokenizer, padding_free=flattened),
        callbacks=[reporter, checkpoints.CompletionMarker(manifest.steps), *callbacks],
    )
    reporter.trainer = trainer
    trainer.remove_callback(PrinterCallback)  # our per-step lines replace its dict dumps
    if before_train is not None:
        before_train(trainer)
    resuming = f", resuming from {resume_from.name}" if resume_from else ""
    say(
        f"training {recipe.name}: {len(encoded)} records, {trainable:,} of {total:,} parameters trainable, "
        f"weights {weight_bytes:,} bytes, base {identity.quantization} ({identity.path}), "
        f"{'padding-free' if flattened else 'padded'} batches, loss {loss}{resuming}"
    )
    started = time.perf_counter()
    if resume_from and checkpoints.finished_training(resume_from):  # ended after its last checkpoint: complete it
        checkpoints.complete_from(trainer, resume_from, manifest, len(encoded), say)
    else:
        checkpoints.train_keeping_whole_checkpoints(trainer, resume_from, checkpoint_dir)
    manifest.train_seconds = time.perf_counter() - started
    if checkpointing:
        model.activation_checkpointing_disable()  # generation cannot use a cache while checkpointing
    model.eval()
    model.config.use_cache = True  # C15: on again for generation
    manifest.use_cache["after_training"] = model.config.use_cache
    manifest.trainable_sha256_per_process = gather_object([trainable_weights_sha256(model)])  # in rank order
    save(trainer, tokenizer, manifest, say)
    return manifest


def summary(manifest: RunManifest) -> dict:
    """A run in a few numbers: where it is, its steps and first/last loss, speed, the adapter, a resume."""
    return {
        "output": manifest.output,
        "manifest": str(manifest.path),
        "steps": len(manifest.steps),
        "first_loss": manifest.steps[0]["loss"] if manifest.steps else None,
        "last_loss": manifest.steps[-1]["loss"] if manifest.steps else None,
        "steady_tokens_per_second": manifest.steady_tokens_per_second,
        "trainable_parameters": manifest.trainable_parameters,
        "step_plan": manifest.step_plan,
        "adapter": manifest.adapter,
        "resumed_from": manifest.resumed_from,
    }


def save(trainer, tokenizer, manifest: RunManifest, say) -> None:
    """Adapter (or model) and tokenizer, reloadable (C16), and the manifest; on the main process only."""
    weights = distributed.full_state_dict(trainer)  # under FSDP every process gives its shards (a collective)
    if not trainer.args.should_save:
        return
    with complete_directory(manifest.output) as partial:
        trainer.model.save_pretrained(partial, safe_serialization=True, state_dict=weights)
        tokenizer.save_pretrained(partial)
        manifest.files = sorted(entry.name for entry in partial.iterdir())
    manifest.write()
    saved = "model" if manifest.adapter["mode"] is AdapterMode.NONE else "adapter"
    say(f"saved {saved}, tokenizer and {manifest.path.name} to {manifest.output}")
