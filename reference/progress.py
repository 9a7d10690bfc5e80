"""What a training run says while it trains: the step plan when training starts (again, after an out-of-memory retry:
C13), and one line per optimizer step with its loss, learning rate and tokens/s (L2); each step's StepLog goes into
the run's manifest. The first step (allocation, warm-up) is reported apart and left out of the steady rate.
"""

from __future__ import annotations

import time
from dataclasses import asdict

from transformers import TrainerCallback

from reference import steps
from reference.manifest import RunManifest, StepLog


class ProgressReporter(TrainerCallback):
    """Says the step plan when training starts (again, after an out-of-memory retry) and one line per
    optimizer step, and keeps each step's StepLog in the manifest."""

    def __init__(self, manifest: RunManifest, records: int, say):
        self.manifest, self.records, self.say = manifest, records, say
        self.trainer = None
        """The reference.train.StepTrainer whose step windows are read."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        batch = state.train_batch_size or args.per_device_train_batch_size
        attempts = self.manifest.batch_size_attempts
        if attempts and attempts[-1] != batch:
            self.say(f"out of memory at batch size {attempts[-1]}: auto_find_batch_size retries with {batch}")
        attempts.append(batch)
        plan = steps.plan(steps.settings_from_training_arguments(args, self.records, batch))
        self.manifest.step_plan = plan.to_dict()
        self.manifest.steps.clear()
        self.say(
            f"step plan: batch {batch} x accumulation {args.gradient_accumulation_steps} x {args.world_size} "
            f"process(es) = {plan.effective_batch_size} records per step; {plan.total_optimizer_steps} steps "
            f"over {plan.epochs_run} epoch(s), warmup {plan.warmup_steps}"
        )
        if plan.warmup_warning():
            self.say(plan.warmup_warning())
        use_cache = getattr(model.config, "use_cache", None) if model is not None else None
        self.manifest.use_cache["during_training"] = use_cache
        self.last = time.perf_counter()

    def on_step_begin(self, args, state, control, lr_scheduler=None, **kwargs):
        self.learning_rate = lr_scheduler.get_last_lr()[0]  # the rate this step's update uses

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        loss, tokens = self.trainer.take_window()
        log = StepLog(
            step=state.global_step,
            epoch=round(state.epoch or 0.0, 4),
            loss=loss,
            learning_rate=self.learning_rate,
            tokens=tokens,
            seconds=seconds,
            tokens_per_second=tokens / seconds if seconds > 0 else 0.0,
        )
        self.manifest.steps.append(asdict(log))
        if log.step == 1:
            self.manifest.warmup_step_seconds = seconds  # allocation and warm-up: not in the steady rate
        else:
            steady = self.manifest.steps[1:]
            steady_seconds = max(sum(s["seconds"] for s in steady), 1e-9)
            self.manifest.steady_tokens_per_second = sum(s["tokens"] for s in steady) / steady_seconds
        self.say(self.progress_line(log, state.epoch))

    def progress_line(self, log: StepLog, epoch: float) -> str:
        """`epoch 1/1 step 2/4 loss 5.1234 lr 0.0015 900 tok/s (steady 900 tok/s)`; step 1 says warm-up."""
        total, epochs = self.manifest.step_plan["total_optimizer_steps"], self.manifest.step_plan["epochs_run"]
        epoch_number = min(int(epoch - 1e-9) + 1, epochs)  # state.epoch 1.0 is the end of the first epoch
        where = f"epoch {epoch_number}/{epochs} step {log.step}/{total} loss {log.loss:.4f}"
        if log.step == 1:
            return f"{where} - first step {log.seconds:.2f} s (warm-up, not in the steady rate)"
        rate = self.manifest.steady_tokens_per_second
        return f"{where} lr {log.learning_rate:.3g} {log.tokens_per_second:,.0f} tok/s (steady {rate:,.0f} tok/s)"
