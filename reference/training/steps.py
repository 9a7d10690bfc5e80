"""Step arithmetic: how many micro-batches, optimizer steps, checkpoints and log lines a run makes.

Follows the installed `transformers.Trainer` (checked against a real Trainer in `spec/test_steps.py`):

* The training dataloader has ``ceil(records / batch)`` batches (``records // batch`` with
  ``dataloader_drop_last``). With several processes, accelerate deals those batches out round-robin and
  pads so every process gets the same count: ``ceil(batches / world_size)`` micro-batches per process
  per epoch (``batches // world_size`` when dropping the last).
* Optimizer steps per epoch = ``ceil(micro_batches / grad_accum)`` (at least 1): a last, partial
  accumulation window still ends in an optimizer step.
* Total optimizer steps = ``max_steps`` when it is positive, else ``ceil(epochs * steps_per_epoch)``;
  a fractional epoch count stops the last epoch part-way.
* Warmup steps = ``warmup`` when it is >= 1 (truncated to int), else ``ceil(total * warmup)``.
* ``save_steps``/``logging_steps`` below 1 are fractions of the total, rounded up. With the ``steps``
  strategy a checkpoint is written every ``save_steps`` optimizer steps and once more at the very
  last step; with ``epoch`` one per epoch run (a partial last epoch included). ``save_total_limit``
  keeps only the newest checkpoints.
* A loss log line is written every ``logging_steps`` steps (``steps`` strategy), at the end of each
  epoch (``epoch`` strategy), and at step 1 when ``logging_first_step`` is set. The summary line the
  Trainer prints at the very end (``train_runtime`` ...) is not a loss line and is not counted.

A custom loop in the style of the LMSYS thread (seed 002) computes
``STEPS_PER_EPOCH = records // (batch * devices)``, dropping the tail; it is reported beside the
Trainer's numbers (claim L4).

Not handled: IterableDatasets without a length, sequence/tensor parallelism, group_by_length samplers,
evaluation steps.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from reference.errors import InputError

SAVE_STRATEGIES = ("steps", "epoch", "no")
LOGGING_STRATEGIES = ("steps", "epoch", "no")


@dataclass(frozen=True)
class StepSettings:
    """The TrainingArguments that decide the step plan. Defaults are the Trainer's own.

    Each field is a flag of the `steps` command, its metadata's help the flag's help (reference/commands/steps.py),
    as transformers' HfArgumentParser reads TrainingArguments."""

    records: int = field(metadata={"help": "Rows in the training set."})
    batch_size: int = field(
        metadata={"help": "per_device_train_batch_size: records in one micro-batch on one process."}
    )
    grad_accum: int = field(
        default=1, metadata={"help": "gradient_accumulation_steps: micro-batches per optimizer step."}
    )
    epochs: float = field(
        default=3.0, metadata={"help": "num_train_epochs; may be fractional. Ignored when max_steps > 0."}
    )
    max_steps: int = field(default=-1, metadata={"help": "Total optimizer steps; overrides epochs when positive."})
    world_size: int = field(default=1, metadata={"help": "Data-parallel processes (torchrun --nproc_per_node)."})
    warmup: float = field(
        default=0, metadata={"help": "warmup_steps: an int (steps) or a fraction < 1 of the total steps."}
    )
    save_strategy: str = field(default="steps", metadata={"help": "When checkpoints are written: steps, epoch or no."})
    save_steps: float = field(
        default=500,
        metadata={"help": "Optimizer steps between checkpoints (steps strategy); a fraction < 1 of the total."},
    )
    save_total_limit: int | None = field(
        default=None, metadata={"help": "Checkpoints kept on disk, the newest; None (unset) or <= 0 keeps them all."}
    )
    logging_strategy: str = field(default="steps", metadata={"help": "When loss lines are logged: steps, epoch or no."})
    logging_steps: float = field(
        default=500, metadata={"help": "Optimizer steps between loss log lines; a fraction < 1 of the total."}
    )
    logging_first_step: bool = field(default=False, metadata={"help": "Also log after the first optimizer step."})
    drop_last: bool = field(default=False, metadata={"help": "dataloader_drop_last: drop the last incomplete batch."})

    def __post_init__(self) -> None:
        _require(self.records >= 1, "--records must be at least 1")
        _require(self.batch_size >= 1, "--batch-size must be at least 1")
        _require(self.grad_accum >= 1, "--grad-accum must be at least 1")
        _require(self.world_size >= 1, "--world-size must be at least 1")
        _require(self.max_steps > 0 or self.epochs > 0, "--epochs must be > 0 unless --max-steps is set")
        _require(self.warmup >= 0, "--warmup must be >= 0 (steps, or a fraction < 1)")
        _require(self.save_strategy in SAVE_STRATEGIES, f"--save-strategy must be one of {SAVE_STRATEGIES}")
        _require(self.logging_strategy in LOGGING_STRATEGIES, f"--logging-strategy must be one of {LOGGING_STRATEGIES}")
        _require(self.save_steps > 0, "--save-steps must be > 0")
        _require(self.logging_steps > 0, "--logging-steps must be > 0")
        _require(
            self.save_steps < 1 or self.save_steps == int(self.save_steps), "--save-steps >= 1 must be a whole number"
        )
        _require(
            self.logging_steps < 1 or self.logging_steps == int(self.logging_steps),
            "--logging-steps >= 1 must be a whole number",
        )
        batches = self.records // self.batch_size if self.drop_last else self.records
        _require(
            batches // self.world_size >= 1 or not self.drop_last,
            "with --drop-last there are fewer full batches than processes: no process gets a micro-batch",
        )


@dataclass(frozen=True)
class StepPlan:
    """What a Trainer run with those settings does, counted per process."""

    micro_batches: int
    micro_batches_per_epoch: int
    optimizer_steps_per_epoch: int
    total_optimizer_steps: int
    epochs_run: int
    last_window_micro_batches: int
    effective_batch_size: int
    warmup_steps: int
    save_every: int | None
    checkpoints_written: int
    checkpoints_kept: int
    checkpoint_steps_kept: list[int]
    logging_every: int | None
    log_lines: int
    custom_loop_steps_per_epoch: int
    custom_loop_dropped_records: int
    world_size: int

    def to_dict(self) -> dict:
        return asdict(self)

    def warmup_warning(self) -> str | None:
        """Said when warmup lasts the whole run: every step then trains below the peak learning rate (the
        first at 0), e.g. warmup 300 with max_steps=4 trains at about 1% of it."""
        if self.warmup_steps >= self.total_optimizer_steps > 0:
            return (
                f"warning: warmup of {self.warmup_steps} steps is not shorter than the run's "
                f"{self.total_optimizer_steps} steps: the learning rate never reaches its peak"
            )
        return None


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise InputError(message)


def micro_batches_per_epoch(records: int, batch_size: int, world_size: int = 1, drop_last: bool = False) -> int:
    """Batches one process sees per epoch: accelerate pads so every process gets the same count."""
    batches = records // batch_size if drop_last else math.ceil(records / batch_size)
    return batches // world_size if drop_last else math.ceil(batches / world_size)


def resolve_fraction(value: float, total_steps: int) -> int:
    """The Trainer's rule for *_steps arguments: below 1 is a fraction of the total, rounded up."""
    return math.ceil(total_steps * value) if value < 1 else int(value)


def warmup_steps(warmup: float, total_steps: int) -> int:
    """TrainingArguments.get_warmup_steps: int(w) steps when w >= 1, else ceil(total * w)."""
    return int(warmup) if warmup >= 1 else math.ceil(total_steps * warmup)


def plan(s: StepSettings) -> StepPlan:
    per_epoch = micro_batches_per_epoch(s.records, s.batch_size, s.world_size, s.drop_last)
    steps_per_epoch = max(math.ceil(per_epoch / s.grad_accum), 1)
    last_window = per_epoch % s.grad_accum or s.grad_accum
    total = s.max_steps if s.max_steps > 0 else math.ceil(s.epochs * steps_per_epoch)

    # Within an epoch every optimizer step takes grad_accum micro-batches except the epoch's last one.
    full_epochs, steps_into_last = divmod(total, steps_per_epoch)
    micro_batches = full_epochs * per_epoch + steps_into_last * s.grad_accum
    epochs_run = full_epochs + (steps_into_last > 0)

    save_every = resolve_fraction(s.save_steps, total) if s.save_strategy == "steps" else None
    if s.save_strategy == "steps":
        saved_at = list(range(save_every, total + 1, save_every))
        if total % save_every:
            saved_at.append(total)  # the Trainer always saves at the last step
    elif s.save_strategy == "epoch":
        saved_at = [min((e + 1) * steps_per_epoch, total) for e in range(epochs_run)]
    else:
        saved_at = []
    limit = s.save_total_limit if s.save_total_limit and s.save_total_limit > 0 else None
    kept = saved_at[-limit:] if limit else saved_at

    logging_every = resolve_fraction(s.logging_steps, total) if s.logging_strategy == "steps" else None
    if s.logging_strategy == "steps":
        logged_at = set(range(logging_every, total + 1, logging_every))
    elif s.logging_strategy == "epoch":
        logged_at = {min((e + 1) * steps_per_epoch, total) for e in range(epochs_run)}
    else:
        logged_at = set()
    if s.logging_first_step:
        logged_at.add(1)

    return StepPlan(
        micro_batches=micro_batches,
        micro_batches_per_epoch=per_epoch,
        optimizer_steps_per_epoch=steps_per_epoch,
        total_optimizer_steps=total,
        epochs_run=epochs_run,
        last_window_micro_batches=last_window,
        effective_batch_size=s.batch_size * s.grad_accum * s.world_size,
        warmup_steps=warmup_steps(s.warmup, total),
        save_every=save_every,
        checkpoints_written=len(saved_at),
        checkpoints_kept=len(kept),
        checkpoint_steps_kept=kept,
        logging_every=logging_every,
        log_lines=len(logged_at),
        custom_loop_steps_per_epoch=s.records // (s.batch_size * s.world_size),
        custom_loop_dropped_records=s.records % (s.batch_size * s.world_size),
        world_size=s.world_size,
    )


def format_table(s: StepSettings, p: StepPlan) -> str:
    """A readable two-column table of the plan, with the settings that produced it."""
    rows = [
        ("records", s.records),
        ("per-device batch x grad-accum x processes", f"{s.batch_size} x {s.grad_accum} x {s.world_size}"),
        ("effective batch size", p.effective_batch_size),
        ("epochs (requested)", s.epochs if s.max_steps <= 0 else f"max_steps={s.max_steps}"),
        ("micro-batches per epoch (per process)", p.micro_batches_per_epoch),
        ("micro-batches in last accumulation window", p.last_window_micro_batches),
        ("optimizer steps per epoch", p.optimizer_steps_per_epoch),
        ("total optimizer steps", p.total_optimizer_steps),
        ("epochs run", p.epochs_run),
        ("micro-batches in the whole run", p.micro_batches),
        ("warmup steps", p.warmup_steps),
        (
            "checkpoints written / kept",
            f"{p.checkpoints_written} / {p.checkpoints_kept} ({s.save_strategy}"
            + (f", every {p.save_every}" if p.save_every else "")
            + ")",
        ),
        (
            "loss log lines",
            f"{p.log_lines} ({s.logging_strategy}" + (f", every {p.logging_every}" if p.logging_every else "") + ")",
        ),
        (
            "custom loop STEPS_PER_EPOCH = records // (batch x devices)",
            f"{p.custom_loop_steps_per_epoch} (drops {p.custom_loop_dropped_records} records)",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def settings_from_training_arguments(args, records: int, batch_size: int | None = None) -> StepSettings:
    """The StepSettings a real TrainingArguments implies (batch_size: the one actually used, e.g. after
    auto_find_batch_size halved it)."""
    strategy = lambda value: getattr(value, "value", value)  # noqa: E731 - IntervalStrategy or str
    return StepSettings(
        records=records,
        batch_size=batch_size or args.per_device_train_batch_size,
        grad_accum=args.gradient_accumulation_steps,
        epochs=args.num_train_epochs,
        max_steps=args.max_steps,
        world_size=args.world_size,
        warmup=args.warmup_steps,
        save_strategy=strategy(args.save_strategy),
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        logging_strategy=strategy(args.logging_strategy),
        logging_steps=args.logging_steps,
        logging_first_step=args.logging_first_step,
        drop_last=args.dataloader_drop_last,
    )
