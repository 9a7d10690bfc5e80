"""Learning rates: the step size at every optimizer step, as the Trainer's schedulers set it.

The learning rate is the size of the step in parameter space (seed 004 §5): plain SGD moves each weight
by exactly ``-lr * gradient``. Schedules multiply the base rate by a factor that depends on how many
optimizer steps came before. With ``s`` = steps already taken (0 for the first update), ``W`` warmup
steps and ``T`` total steps:

* warmup (every schedule except ``constant``): factor = s / W while s < W — so the very first
  update uses a rate of 0;
* ``linear`` after warmup: factor = (T - s) / (T - W), reaching 0 at the end;
* ``cosine`` after warmup: factor = 0.5 * (1 + cos(pi * (s - W) / (T - W)));
* ``constant_with_warmup`` after warmup: factor = 1;
* ``constant``: factor = 1 always — transformers ignores warmup for it, so the primer's
  ``warmup_ratio=0.03`` with ``lr_scheduler_type="constant"`` gives no warmup at all.

The rate the Trainer logs at step k is the rate that step used (s = k - 1).
"""

from __future__ import annotations

import math

SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup")


def factor(schedule: str, steps_taken: int, warmup_steps: int, total_steps: int) -> float:
    """The multiplier on the base learning rate for the update after `steps_taken` updates."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
    s, w, t = steps_taken, warmup_steps, total_steps
    if schedule == "constant":
        return 1.0
    if s < w:
        return s / max(1, w)
    if schedule == "constant_with_warmup":
        return 1.0
    if schedule == "linear":
        return max(0.0, (t - s) / max(1, t - w))
    progress = (s - w) / max(1, t - w)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def learning_rates(base_lr: float, schedule: str, warmup_steps: int, total_steps: int) -> list[float]:
    """The rate used by each optimizer step 1..total_steps."""
    return [base_lr * factor(schedule, k - 1, warmup_steps, total_steps) for k in range(1, total_steps + 1)]
