"""One supervised fine-tuning run: a recipe, a local model and a data file in; adapter, tokenizer and a
run record out. The pieces are the real ones: a `transformers.Trainer`, peft LoRA on a bf16, 8-bit or
NF4 base (bitsandbytes), the recipe's optimizer (`adamw_8bit` runs on the CPU too) and schedule.

What a run does, in order (seed 001 §2.2.2 for the llm2024 recipe):
1. resolve the recipe (overrides applied, arguments mapped onto the installed transformers: P12) into the
   one TrainingArguments the Trainer gets; the manifest records that object's to_dict() (X8);
2. read the records and encode them (reference.sft: the recipe's format, labels, max_seq_length);
3. load the base (quantised as the recipe says), attach a fresh LoRA adapter or load a saved one trainable
   (none: full fine-tuning), say which, and refuse a model with nothing to train (A2);
4. train with `use_cache` off (the run's `use_cache=False`, which the Trainer puts on the model's config: a
   cache is useless, and wasteful, while checkpointing a training pass), then turn it back on for generation
   (C15);
5. save adapter and tokenizer to the output directory, which reloads (C16), and `manifest.json`:
   resolved settings, versions, data and model hashes, the step plan, per-step loss and tokens/s (X2).

Progress is one line per optimizer step with tokens/s; the first step (allocation, warm-up) is reported
apart and left out of the steady rate (L2). With `auto_find_batch_size` the Trainer shrinks the batch
after an out-of-memory error and starts again (accelerate 1.x multiplies it by 0.9, rounding down; the
accelerate of the seed's day halved it); the run logs each retry and recomputes the step plan (C13).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from reference.errors import InputError
from reference.paths import complete_directory, write_text_atomic

MANIFEST = "manifest.json"
CHECKPOINTS = "checkpoints"


def sha256_of(path: str | Path) -> str:
    """SHA-256 of a file, or of a folder's files (names and contents, in name order)."""
    source = Path(path)
    files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
    total = hashlib.sha256()
    for file in files:
        with open(file, "rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
        total.update(f"{file.relative_to(source) if source.is_dir() else file.name}\0{digest}\n".encode())
    return total.hexdigest()


def quantization_of(recipe) -> str:
    q = recipe.quantization
    return "nf4" if q.get("load_in_4bit") else "8bit" if q.get("load_in_8bit") else "none"


def parse_columns(text: str | None) -> dict | None:
    """`instruction=input,response=output` -> {"instruction": "input", "response": "output"}."""
    if not text:
        return None
    pairs = [item.partition("=") for item in text.split(",")]
    columns = {k.strip(): v.strip() for k, sep, v in pairs if sep}
    if set(columns) != {"instruction", "response"} or len(pairs) != 2:
        raise InputError(f"--columns {text!r}: expected instruction=COLUMN,response=COLUMN")
    return columns


@dataclass
class StepRecord:
    step: int
    epoch: float
    loss: float
    learning_rate: float
    tokens: int
    seconds: float
    tokens_per_second: float


@dataclass
class RunRecord:
    """What `manifest.json` holds (see the module docstring)."""

    settings: dict
    data: dict
    model: dict
    trainable_parameters: int
    all_parameters: int
    weight_bytes: int
    step_plan: dict
    batch_size_attempts: list = field(default_factory=list)
    steps: list = field(default_factory=list)
    warmup_step_seconds: float | None = None
    steady_tokens_per_second: float | None = None
    train_seconds: float | None = None
    use_cache: dict = field(default_factory=dict)
    adapter: dict = field(default_factory=dict)
    """created (fresh), loaded (continued from a saved adapter) or none (full fine-tuning)."""
    resumed_from: str | None = None
    """The checkpoint the run carried on from, if any."""
    trainable_sha256_per_process: list = field(default_factory=list)
    """Digest of the trained weights on each process (torchrun): all equal when data parallelism kept them in step."""
    output: str = ""


def _trainer_classes():
    """A Trainer that keeps each optimizer step's loss and token count, and the callback that reports them."""
    from transformers import Trainer, TrainerCallback

    class RecordingTrainer(Trainer):
        window_loss = 0.0
        window_tokens = 0

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            self.window_loss += float(loss)  # already scaled by the accumulation window: the sum is the step's loss
            self.window_tokens += int(inputs["attention_mask"].sum())
            return loss

    class Reporter(TrainerCallback):
        def __init__(self, run: RunRecord, records: int, say):
            self.run, self.records, self.say = run, records, say
            self.trainer = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            from reference import steps

            batch = state.train_batch_size or args.per_device_train_batch_size
            attempts = self.run.batch_size_attempts
            if attempts and attempts[-1] != batch:
                self.say(f"out of memory at batch size {attempts[-1]}: auto_find_batch_size retries with {batch}")
            attempts.append(batch)
            plan = steps.plan(steps.settings_from_training_arguments(args, self.records, batch))
            self.run.step_plan = plan.to_dict()
            self.run.steps.clear()
            self.say(
                f"step plan: batch {batch} x accumulation {args.gradient_accumulation_steps} x {args.world_size} "
                f"process(es) = {plan.effective_batch_size} records per step; {plan.total_optimizer_steps} steps "
                f"over {plan.epochs_run} epoch(s), warmup {plan.warmup_steps}"
            )
            if plan.warmup_warning():
                self.say(plan.warmup_warning())
            self.run.use_cache["during_training"] = (
                getattr(model.config, "use_cache", None) if model is not None else None
            )
            self.started = self.last = time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            self.learning_rate = self.trainer.lr_scheduler.get_last_lr()[0]  # the rate this step's update uses

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            trainer = self.trainer
            seconds, tokens = now - self.last, trainer.window_tokens
            record = StepRecord(
                step=state.global_step,
                epoch=round(state.epoch or 0.0, 4),
                loss=trainer.window_loss,
                learning_rate=self.learning_rate,
                tokens=tokens,
                seconds=seconds,
                tokens_per_second=tokens / seconds if seconds > 0 else 0.0,
            )
            trainer.window_loss, trainer.window_tokens, self.last = 0.0, 0, now
            self.run.steps.append(asdict(record))
            total = self.run.step_plan["total_optimizer_steps"]
            epochs = self.run.step_plan["epochs_run"]
            where = f"epoch {min(int(state.epoch - 1e-9) + 1, epochs)}/{epochs} step {state.global_step}/{total}"
            if state.global_step == 1:
                self.run.warmup_step_seconds = seconds
                self.say(
                    f"{where} loss {record.loss:.4f} - first step {seconds:.2f} s (warm-up, not in the steady rate)"
                )
            else:
                steady = self.run.steps[1:]
                rate = sum(s["tokens"] for s in steady) / max(sum(s["seconds"] for s in steady), 1e-9)
                self.run.steady_tokens_per_second = rate
                self.say(
                    f"{where} loss {record.loss:.4f} lr {record.learning_rate:.3g} "
                    f"{record.tokens_per_second:,.0f} tok/s (steady {rate:,.0f} tok/s)"
                )

    return RecordingTrainer, Reporter


def stderr_line(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def encode_data(recipe, tokenizer, data_path: str, columns: dict | None) -> tuple[list[dict], dict]:
    """The records encoded as the recipe says, and what the run record says about them."""
    from reference import data, sft

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
    from reference import lora, models

    quantization = quantization_of(recipe)
    model, identity = models.load_causal_lm(
        directory,
        dtype=dtype,
        quantization=quantization,
        quantization_section={k: v for k, v in recipe.quantization.items() if k.startswith("bnb_4bit")},
        device=device,
    )  # packed where it trains (a 4-bit model cannot move)
    weight_bytes = models.weight_bytes(model)
    if adapter is not None:
        model = lora.load_adapter(lora.prepare_base(model, checkpointing), adapter, trainable=True)
        adapter_info = {"mode": "loaded", "path": str(Path(adapter).resolve()), "sha256": sha256_of(adapter)}
        what = f"adapter loaded from {adapter}, not created"
    elif recipe.lora:
        model = lora.attach(model, recipe.lora, gradient_checkpointing=checkpointing)
        adapter_info = {"mode": "created", "r": recipe.lora.get("r"), "lora_alpha": recipe.lora.get("lora_alpha")}
        what = f"adapter created fresh (r={adapter_info['r']}, lora_alpha={adapter_info['lora_alpha']}), not loaded"
    else:
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
        adapter_info = {"mode": "none (full fine-tuning)"}
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
) -> RunRecord:
    """Train as the recipe says and save; returns the run record also written to output/manifest.json.

    `adapter`: continue training that saved adapter (a new schedule from step 0). `resume`: carry on
    from the newest complete checkpoint in output/checkpoints (optimizer, scheduler, RNG state and
    step restored), refused when the model, data or settings differ from the run's. `overwrite`: start
    again in a directory that holds a run. The directory is held by this run alone (reference.rundir).
    `before_train(trainer)` is called once the Trainer is built (tests observe the run)."""
    from reference import models, rundir

    models.require_model_dir(model_dir)  # first: a wrong model fails before any work
    with rundir.claimed(output_dir, resume, overwrite, say):
        return _train(recipe, model_dir, data_path, output_dir, columns, say, callbacks, before_train, adapter, resume)


def _train(recipe, model_dir, data_path, output_dir, columns, say, callbacks, before_train, adapter, resume):
    from transformers import AutoTokenizer, PrinterCallback

    from reference import checkpoints, lora, models, recipes, rundir, sft

    directory = models.require_model_dir(model_dir)
    checkpoint_dir = Path(output_dir) / CHECKPOINTS
    resume_from = checkpoints.last_complete(checkpoint_dir, say) if resume else None
    args = recipes.run_arguments(recipe, str(checkpoint_dir))  # the one object the Trainer gets (X8)
    settings = recipes.resolved_settings(recipe, str(checkpoint_dir), args=args)
    tokenizer = AutoTokenizer.from_pretrained(
        str(Path(adapter) if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else directory),
        local_files_only=True,
    )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    encoded, data_info = encode_data(recipe, tokenizer, data_path, columns)

    checkpointing = args.activation_checkpointing
    if args.process_index != 0:  # under torchrun the main process reports for all
        say = lambda text: None  # noqa: E731
    model, identity, weight_bytes, adapter_info = prepare_model(
        recipe, directory, str(args.device), checkpointing, "bfloat16" if args.bf16 else "float32", adapter, say
    )
    trainable, total = lora.count_trainable(model)

    record = RunRecord(
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
    )
    if args.process_index == 0:  # X5: what this run trains, recorded (or, on --resume, checked) before it trains
        rundir.record_or_check(output_dir, {"model": record.model, "data": data_info, "settings": settings}, resume)
    RecordingTrainer, Reporter = _trainer_classes()
    reporter = Reporter(record, len(encoded), say)
    trainer = RecordingTrainer(
        model=model,
        args=args,
        train_dataset=encoded,
        data_collator=sft.Collator(tokenizer.pad_token_id),
        callbacks=[reporter, checkpoints.marker_callback(), *callbacks],
    )
    reporter.trainer = trainer
    trainer.remove_callback(PrinterCallback)  # our per-step lines replace its dict dumps
    if before_train is not None:
        before_train(trainer)
    say(
        f"training {recipe.name}: {len(encoded)} records, {trainable:,} of {total:,} parameters trainable, "
        f"weights {weight_bytes:,} bytes, base {identity.quantization} ({identity.path})"
        + (f", resuming from {resume_from.name}" if resume_from else "")
    )
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    record.train_seconds = time.perf_counter() - started
    if checkpointing:
        model.activation_checkpointing_disable()  # generation cannot use a cache while checkpointing
    model.eval()
    model.config.use_cache = True  # C15: on again for generation
    record.use_cache["after_training"] = model.config.use_cache
    record.trainable_sha256_per_process = per_process(trainable_digest(model))
    save(trainer, tokenizer, record, Path(output_dir), say)
    return record


def summary(record: RunRecord) -> dict:
    """A run in a few numbers: where it is, its steps and first/last loss, speed, the adapter, a resume."""
    return {
        "output": record.output,
        "manifest": str(Path(record.output) / MANIFEST),
        "steps": len(record.steps),
        "first_loss": record.steps[0]["loss"] if record.steps else None,
        "last_loss": record.steps[-1]["loss"] if record.steps else None,
        "steady_tokens_per_second": record.steady_tokens_per_second,
        "trainable_parameters": record.trainable_parameters,
        "step_plan": record.step_plan,
        "adapter": record.adapter,
        "resumed_from": record.resumed_from,
    }


def trainable_digest(model) -> str:
    """SHA-256 over the trainable weights' names and bytes: equal digests mean equal weights."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def per_process(value) -> list:
    """The value from every process of a torchrun job, in rank order ([value] when there is one)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def save(trainer, tokenizer, record: RunRecord, out: Path, say) -> None:
    """Adapter (or model) and tokenizer, reloadable (C16), and the run record; on the main process only."""
    if not trainer.args.should_save:
        return
    with complete_directory(out) as partial:
        trainer.model.save_pretrained(partial, safe_serialization=True)
        tokenizer.save_pretrained(partial)
    write_text_atomic(out / MANIFEST, json.dumps(asdict(record), ensure_ascii=False, indent=2, default=str) + "\n")
    saved = "model" if record.adapter.get("mode") == "none (full fine-tuning)" else "adapter"
    say(f"saved {saved}, tokenizer and {MANIFEST} to {out}")
