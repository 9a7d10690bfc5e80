"""The run every training method follows (claim X12): SFT and continuation (reference.methods.train), DPO
(reference.methods.dpo) and the LMSYS preference classifier (reference.methods.preference) differ only in the
`Method` they hand to `run`.

A run, whatever its method:
1. holds its output directory alone (reference.training.rundir: a second run is refused; `--resume`, `--overwrite`);
2. resolves the recipe once into the TrainingArguments its Trainer gets (reference.settings.training_arguments); the
   manifest records that object's to_dict() (X8) with the method's own section, its defaults written out;
3. seeds every generator with the recipe's `seed`, then lets the method read its data and load its model
   (`Method.prepare`): the records encoded, the base as the recipe quantises it with the adapter it trains (or
   none), how batches are collated, and what the method measures before training;
4. records what it trains (run.json) before training, or on `--resume` checks that it is the same run;
5. trains with the method's Trainer, a `StepTrainer`: one progress line and one manifest record per optimizer step
   (loss, tokens/s, the method's metrics), checkpoints marked complete, `--resume` from the newest complete one;
6. lets the method measure what it promises (`Method.evaluate`: the classifier's held-out log-loss);
7. saves what the method saves, then the manifest: assembled here, in one place, from what the steps returned.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from accelerate.utils import gather_object
from transformers import PrinterCallback, Trainer, set_seed

from reference import messages
from reference.errors import InputError
from reference.hashing import trainable_weights_sha256
from reference.methods import padding_free, sft
from reference.modeling import adapter_records, kernels, lora, models, vocab
from reference.paths import complete_directory
from reference.settings import training_arguments
from reference.training import checkpoints, cpu, distributed, progress, rundir
from reference.training.manifest import AdapterMode, RunManifest

CHECKPOINTS = rundir.CHECKPOINTS


class StepTrainer(Trainer):
    """A Trainer that sums each optimizer step's loss, counts its real tokens and averages the metrics its
    method reports (`add_metrics`), for the progress lines and the manifest; a flattened (padding-free) batch's
    step runs through reference.methods.padding_free."""

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

    def add_metrics(self, **values: float) -> None:
        """A micro-batch's metrics (a DPO reward margin); a step records the mean over its micro-batches."""
        self.window_metrics = getattr(self, "window_metrics", {})
        for name, value in values.items():
            self.window_metrics.setdefault(name, []).append(
                float(value.detach() if hasattr(value, "detach") else value)
            )

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        distributed.shard_on_the_cpu(
            self
        )  # accelerate turns FSDP on for accelerators only (reference.training.distributed)

    def take_window(self) -> tuple[float, int, dict]:
        """The finished step's loss and tokens over every process, and this process's metrics; the next step
        counts from zero."""
        loss, tokens = distributed.step_totals(self.accelerator, self.window_loss, self.window_tokens)
        metrics = {name: sum(v) / len(v) for name, v in getattr(self, "window_metrics", {}).items()}
        self.window_loss, self.window_tokens, self.window_metrics = 0.0, 0, {}
        return loss, tokens, metrics


@dataclass
class Data:
    """What a method read and encoded, before any model loads or the output directory is claimed (`Method.read`)."""

    dataset: list
    """The encoded records, one dict each, as the collator takes them."""
    info: dict
    """What the manifest says about the data: path, SHA-256, records, tokens, how they were encoded."""
    held_out: object = None
    """What the method measures on besides training (the classifier's held-out rows), for `evaluate`."""


@dataclass
class Prepared:
    """What a method hands the run once it has loaded its model."""

    data: Data
    model: object
    identity: models.ModelIdentity
    """The base's identity (path, weights SHA-256, quantisation)."""
    weight_bytes: int
    adapter: dict
    """{"mode": AdapterMode, ...}: what the run did about an adapter."""
    collator: object
    loss: str | None = None
    """What computes the training loss, in words."""
    results: dict = field(default_factory=dict)
    """What the method measured before training (the classifier's held-out log-loss), completed by `evaluate`."""
    callbacks: list = field(default_factory=list)
    """The method's own TrainerCallbacks; what each `record()`s goes into the manifest's `device`."""


METHOD_SECTIONS = ("sft", "dpo", "classifier")
"""The recipe sections that belong to one method each."""


class Method:
    """One training method: what the run asks of it. Subclasses: reference.methods.train.SupervisedFineTuning,
    reference.methods.dpo.DirectPreference, reference.methods.preference.Classifier."""

    name = "method"
    """What the manifest and run.json call the method: sft, dpo, classifier."""
    section = "sft"
    """The recipe section the method reads (METHOD_SECTIONS); a recipe that sets another's is refused."""
    adapter_task = "CAUSAL_LM"
    """The peft task_type a saved adapter must have to be trained on by this method."""
    trainer_class = StepTrainer

    def check(self, recipe, adapter: str | None) -> None:
        """Refuse what cannot run, before anything loads: settings of another method's section (they would be
        ignored), and an adapter made for another task (a classifier's for a causal LM, or the other way)."""
        foreign = [s for s in METHOD_SECTIONS if s != self.section and getattr(recipe, s)]
        if foreign:
            given = ", ".join(f"{s}.{k}" for s in foreign for k in getattr(recipe, s))
            raise InputError(
                f"recipe {recipe.name!r} (with its overrides) sets {given}, which {self.name} does not read (it "
                f"reads [{self.section}]): leave them out, or use a recipe made for this command"
            )
        if adapter is not None:
            task = adapter_records.adapter_settings(adapter).get("task_type")
            if task != self.adapter_task and not (task is None and self.adapter_task == "CAUSAL_LM"):
                raise InputError(
                    f"--adapter {adapter}: an adapter for task {task!r}; {self.name} trains a {self.adapter_task} "
                    "adapter (an SFT or DPO adapter is CAUSAL_LM, a preference classifier's SEQ_CLS)"
                )

    def read(self, recipe, tokenizer, data_path: str, columns: dict | None, say) -> Data:
        """The data read and encoded, before any model loads or the output directory is claimed."""
        raise NotImplementedError

    def tokenizer(self, directory: Path, adapter: str | None):
        """The base's tokenizer, or the adapter's own when it saved one; EOS pads when it has no pad token."""
        return vocab.pad_with_eos(lora.load_tokenizer(directory, adapter))

    def prepare(self, recipe, directory: Path, tokenizer, args, data: Data, adapter, say) -> Prepared:
        """The model as the recipe loads it, with what it trains; `data` as `read` gave it."""
        raise NotImplementedError

    def trainer_settings(self, recipe) -> dict:
        """Keyword arguments of the method's Trainer besides the model, arguments, data and callbacks."""
        return {}

    def evaluate(self, model, tokenizer, prepared: Prepared, say) -> dict:
        """What the method measures once trained; added to the manifest's results."""
        return {}

    def save_model(self, model, directory: Path, weights) -> None:
        """The trained adapter (or model) into `directory`: peft's or transformers' save_pretrained, safetensors."""
        model.save_pretrained(directory, safe_serialization=True, state_dict=weights)


def run(
    method: Method,
    recipe,
    model_dir: str,
    data_path: str,
    output_dir: str,
    columns: dict | None = None,
    say=messages.say,
    callbacks=(),
    adapter: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> RunManifest:
    """Train with `method` as the recipe says and save; returns the run's manifest, also written to
    output/manifest.json.

    `adapter`: start from that saved adapter, loaded trainable (a new schedule from step 0). `resume`: carry on
    from the newest complete checkpoint in output/checkpoints (optimizer, scheduler, RNG state and step restored),
    refused when the model, data or settings differ from the run's. `overwrite`: start again in a directory that
    holds a run. `callbacks`: more TrainerCallbacks (a test watching the run: on_init_end
    sees the model and the arguments the Trainer was handed). A finished run (its manifest written) is complete:
    --resume says so and changes nothing. A run that ended after its last checkpoint but before its manifest is
    completed from that checkpoint."""
    directory = models.require_model_dir(model_dir)  # first: a wrong model fails before any work
    lora.check_adapter_files(adapter)  # a missing, cut or damaged adapter file, before the output is claimed
    method.check(recipe, adapter)
    tokenizer = method.tokenizer(directory, adapter)
    data = method.read(recipe, tokenizer, data_path, columns, say)  # a bad file fails before the output is claimed
    with rundir.claimed(output_dir, resume, overwrite, say):
        return run_claimed(
            method,
            recipe,
            model_dir,
            data_path,
            output_dir,
            columns,
            say,
            callbacks,
            adapter,
            resume,
            (tokenizer, data),
        )


def run_claimed(
    method,
    recipe,
    model_dir,
    data_path,
    output_dir,
    columns=None,
    say=messages.say,
    callbacks=(),
    adapter=None,
    resume=False,
    read=None,
) -> RunManifest:
    """`run` in a directory the caller already holds (rundir.claimed), for a run made of several steps that no
    other run may come between (continuation.continue_merged: merge, then train). `read`: (tokenizer, Data) as
    `run` read them before claiming the directory; read here when not given."""
    directory = models.require_model_dir(model_dir)
    if read is None:
        method.check(recipe, adapter)
        tokenizer = method.tokenizer(directory, adapter)
        read = tokenizer, method.read(recipe, tokenizer, data_path, columns, say)
    tokenizer, data = read
    checkpoint_dir = Path(output_dir) / CHECKPOINTS
    finished = resume and rundir.is_finished(output_dir)  # said once the command is known to be that run's
    resume_from = checkpoints.last_complete(checkpoint_dir, say) if resume and not finished else None
    resolved = training_arguments.resolve(recipe, str(checkpoint_dir))  # the recipe, resolved once for the run
    args = resolved.arguments  # the one object the Trainer gets (X8)
    distributed.check_arguments(args, adapter=adapter is not None or bool(recipe.lora))
    recorded = training_arguments.resolved_settings(recipe, str(checkpoint_dir), resolved)
    recorded = {k: v for k, v in recorded.items() if k not in METHOD_SECTIONS or k == method.section}  # its own
    settings = {"method": method.name, **recorded}
    if args.process_index != 0:  # under torchrun the main process reports for all
        say = lambda text: None  # noqa: E731
    set_seed(args.seed)  # a fresh adapter's or head's first weights are the same in every run of the recipe
    prepared = method.prepare(recipe, directory, tokenizer, args, data, adapter, say)
    trainable, total = lora.count_trainable(prepared.model)
    model_record = asdict(prepared.identity)
    if resume and not finished:  # the thread count the run began with (run.json), as reference.training.cpu says
        cpu.resume_threads(rundir.recorded_device(output_dir).get("threads"), str(args.device), say)
    device = {"device": str(args.device), **cpu.threads_record()}
    if args.process_index == 0:  # X5: what this run trains, recorded (or, on --resume, checked) before it trains
        what_runs = {"model": model_record, "data": prepared.data.info, "settings": settings, "device": device}
        rundir.write_or_check(output_dir, what_runs, resume)
    if finished:  # the same run, and it has ended: nothing to carry on
        record = RunManifest.read(output_dir)
        say(
            f"--resume: the run in {output_dir} is complete ({len(record.steps)} steps, "
            f"{rundir.FINISHED} written); nothing to do (--overwrite trains it again)"
        )
        return record
    records = len(prepared.data.dataset)
    reporter = progress.ProgressReporter(records, say)
    trainer = method.trainer_class(
        model=prepared.model,
        args=args,
        train_dataset=prepared.data.dataset,
        data_collator=prepared.collator,
        callbacks=[reporter, checkpoints.CompletionMarker(reporter.steps), *prepared.callbacks, *callbacks],
        **method.trainer_settings(recipe),
    )
    reporter.read_windows_of(trainer)
    trainer.remove_callback(PrinterCallback)  # our per-step lines replace its dict dumps
    resuming = f", resuming from {resume_from.name}" if resume_from else ""
    say(
        f"training {recipe.name} ({method.name}): {records} records, {trainable:,} of {total:,} parameters trainable, "
        f"weights {prepared.weight_bytes:,} bytes, base {prepared.identity.quantization} ({prepared.identity.path}), "
        f"loss {prepared.loss}{resuming}"
    )
    started = time.perf_counter()
    if resume_from and checkpoints.finished_training(resume_from):  # ended after its last checkpoint: complete it
        checkpoints.complete_from(trainer, resume_from, reporter, say)
    else:
        checkpoints.train_keeping_whole_checkpoints(trainer, resume_from, checkpoint_dir)
    train_seconds = time.perf_counter() - started
    for callback in prepared.callbacks:
        device.update(callback.record() if hasattr(callback, "record") else {})
    model = prepared.model
    if args.activation_checkpointing:
        model.activation_checkpointing_disable()  # generation cannot use a cache while checkpointing
    model.eval()
    model.config.use_cache = True  # C15: on again for generation
    results = {**prepared.results, **method.evaluate(model, tokenizer, prepared, say)}
    manifest = RunManifest(
        method=method.name,
        settings=settings,
        model=model_record,
        data=prepared.data.info,
        trainable_parameters=trainable,
        all_parameters=total,
        weight_bytes=prepared.weight_bytes,
        adapter=prepared.adapter,
        loss=prepared.loss,
        resumed_from=str(resume_from) if resume_from else None,
        output=str(Path(output_dir).resolve()),
        train_seconds=train_seconds,
        **reporter.measured(),
        use_cache={**reporter.use_cache, "after_training": model.config.use_cache},
        results=results,
        device=device,
        trainable_sha256_per_process=gather_object([trainable_weights_sha256(model)]),  # in rank order
    )
    save(method, trainer, tokenizer, manifest, say)
    return manifest


def save(method: Method, trainer, tokenizer, manifest: RunManifest, say) -> None:
    """Adapter (or model) and tokenizer, reloadable (C16), and the manifest; on the main process only."""
    weights = distributed.full_state_dict(trainer)  # under FSDP every process gives its shards (a collective)
    if not trainer.args.should_save:
        return
    with complete_directory(manifest.output) as partial:
        method.save_model(trainer.model, partial, weights)
        tokenizer.save_pretrained(partial)
        manifest.files = sorted(entry.name for entry in partial.iterdir())
    manifest.write()
    saved = "model" if manifest.adapter["mode"] is AdapterMode.NONE else "adapter"
    say(f"saved {saved}, tokenizer and {manifest.path.name} to {manifest.output}")


def summary(manifest: RunManifest) -> dict:
    """A run in a few numbers: where it is, its steps and first/last loss, speed, the adapter, a resume, and
    what the method measured."""
    return {
        "method": manifest.method,
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
        "results": manifest.results,
    }
