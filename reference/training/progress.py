"""What a training run says while it trains: the step plan when training starts (again, after an out-of-memory retry:
C13), and one line per optimizer step with its loss, learning rate and tokens/s (L2); each step's StepLog goes into
the run's manifest. The first step (allocation, warm-up) is reported apart and left out of the steady rate.
"""

from __future__ import annotations

import time
from dataclasses import asdict

from transformers import TrainerCallback

from reference.training import steps
from reference.training.manifest import StepLog


class ProgressReporter(TrainerCallback):
    """Says the step plan when training starts (again, after an out-of-memory retry) and one line per
    optimizer step, and keeps what it measured for the run's manifest (`measured`)."""

    def __init__(self, records: int, say):
        self.records, self.say = records, say
        self.take_window = None
        """The StepTrainer's take_window: each finished step's loss, tokens and metrics (`read_windows_of`)."""
        self.steps: list[dict] = []
        """One StepLog (as a dict) per optimizer step; the list object stays the same (CompletionMarker holds it)."""
        self.step_plan: dict = {}
        self.batch_size_attempts: list[int] = []
        self.warmup_step_seconds: float | None = None
        self.steady_tokens_per_second: float | None = None
        self.use_cache: dict = {}

    def read_windows_of(self, trainer) -> None:
        self.take_window = trainer.take_window

    def measured(self) -> dict:
        """The manifest's fields this reporter measured (reference.training.manifest.RunManifest)."""
        return {
            "step_plan": self.step_plan,
            "batch_size_attempts": self.batch_size_attempts,
            "steps": self.steps,
            "warmup_step_seconds": self.warmup_step_seconds,
            "steady_tokens_per_second": self.steady_tokens_per_second,
        }

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        batch = state.train_batch_size or args.per_device_train_batch_size
        attempts = self.batch_size_attempts
        if attempts and attempts[-1] != batch:
            self.say(f"out of memory at batch size {attempts[-1]}: auto_find_batch_size retries with {batch}")
        attempts.append(batch)
        plan = steps.plan(steps.settings_from_training_arguments(args, self.records, batch))
        self.step_plan = plan.to_dict()
        self.steps.clear()
        self.say(
            f"step plan: batch {batch} x accumulation {args.gradient_accumulation_steps} x {args.world_size} "
            f"process(es) = {plan.effective_batch_size} records per step; {plan.total_optimizer_steps} steps "
            f"over {plan.epochs_run} epoch(s), warmup {plan.warmup_steps}"
        )
        if plan.warmup_warning():
            self.say(plan.warmup_warning())
        self.use_cache["during_training"] = getattr(model.config, "use_cache", None) if model is not None else None
        self.last = time.perf_counter()

    def on_step_begin(self, args, state, control, lr_scheduler=None, **kwargs):
        self.learning_rate = lr_scheduler.get_last_lr()[0]  # the rate this step's update uses

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        loss, tokens, metrics = self.take_window()
        log = StepLog(
            step=state.global_step,
            epoch=round(state.epoch or 0.0, 4),
            loss=loss,
            learning_rate=self.learning_rate,
            tokens=tokens,
            seconds=seconds,
            tokens_per_second=tokens / seconds if seconds > 0 else 0.0,
            metrics=metrics,
        )
        self.steps.append(asdict(log))
        if len(self.steps) == 1:  # the first step this process ran, also after a resume
            self.warmup_step_seconds = seconds  # allocation and warm-up: not in the steady rate
        else:
            steady = self.steps[1:]
            steady_seconds = max(sum(s["seconds"] for s in steady), 1e-9)
            self.steady_tokens_per_second = sum(s["tokens"] for s in steady) / steady_seconds
        self.say(self.progress_line(log, state.epoch))

    def progress_line(self, log: StepLog, epoch: float) -> str:
        """`epoch 1/1 step 2/4 loss 5.1234 lr 0.0015 900 tok/s (steady 900 tok/s)`; the first step run says
        warm-up; a method's first metric follows the loss (`reward_margin +0.0123`), the others are in the manifest."""
        total, epochs = self.step_plan["total_optimizer_steps"], self.step_plan["epochs_run"]
        epoch_number = min(int(epoch - 1e-9) + 1, epochs)  # state.epoch 1.0 is the end of the first epoch
        where = f"epoch {epoch_number}/{epochs} step {log.step}/{total} loss {log.loss:.4f}"
        extra = "".join(f" {name} {value:+.4f}" for name, value in list(log.metrics.items())[:1])
        if len(self.steps) == 1:
            return f"{where}{extra} - first step {log.seconds:.2f} s (warm-up, not in the steady rate)"
        rate = self.steady_tokens_per_second
        return (
            f"{where}{extra} lr {log.learning_rate:.3g} {log.tokens_per_second:,.0f} tok/s (steady {rate:,.0f} tok/s)"
        )
