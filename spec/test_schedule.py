"""Learning rates (reference/training/schedule.py) by hand, against transformers' schedulers and a real Trainer."""

from __future__ import annotations

import pytest
import torch

from reference.training.schedule import SCHEDULES, learning_rates

from .trainer_probe import OneWeight, run_trainer


@pytest.mark.claim("P8")
def test_one_sgd_step_moves_the_weight_by_exactly_lr_times_gradient(tmp_path):
    """y = w x, w = 0, batch x = 1, 2, 3, 4 with targets 2x. loss = mean((w x - 2x)^2), so
    dloss/dw = mean(2 (w x - 2x) x) = -4 mean(x^2) = -4 * 30/4 = -30. With lr 0.01 the update is
    w = 0 - 0.01 * (-30) = 0.3 (plain SGD: no momentum, no weight decay, no clipping, no warmup)."""
    model = OneWeight()
    run_trainer(
        tmp_path,
        4,
        model=model,
        optim="sgd",
        learning_rate=0.01,
        weight_decay=0.0,
        max_grad_norm=0.0,
        per_device_train_batch_size=4,
        max_steps=1,
        lr_scheduler_type="constant",
        save_strategy="no",
    )
    assert model.w.item() == pytest.approx(0.3, rel=1e-6)


@pytest.mark.claim("P8")
def test_linear_schedule_with_warmup_by_hand():
    """base 1.0, warmup 2 of 6 steps: steps use 0/2, 1/2, then (6-2)/4, (6-3)/4, (6-4)/4, (6-5)/4."""
    assert learning_rates(1.0, "linear", 2, 6) == [0.0, 0.5, 1.0, 0.75, 0.5, 0.25]


@pytest.mark.claim("P8")
def test_constant_ignores_warmup_so_the_primers_warmup_ratio_does_nothing():
    """The primer sets lr_scheduler_type="constant" with warmup_ratio=0.03: transformers' constant
    schedule takes no warmup, so every step runs at 2e-4. constant_with_warmup is the one that warms up."""
    assert learning_rates(2e-4, "constant", 3, 5) == [2e-4] * 5
    assert learning_rates(1.0, "constant_with_warmup", 2, 4) == [0.0, 0.5, 1.0, 1.0]


@pytest.mark.claim("P8")
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("warmup,total", [(0, 7), (3, 10), (10, 10), (1, 1), (4, 25)])
def test_rates_equal_transformers_schedulers_at_every_step(schedule, warmup, total):
    from transformers import get_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-4)
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=warmup, num_training_steps=total)
    theirs = []
    for _ in range(total):
        theirs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert learning_rates(2e-4, schedule, warmup, total) == pytest.approx(theirs, rel=1e-12, abs=1e-18)


@pytest.mark.claim("P8")
@pytest.mark.parametrize("schedule,warmup", [("linear", 3), ("constant", 0.25), ("cosine", 2)])
def test_rates_logged_by_a_real_trainer_equal_the_schedule(tmp_path, schedule, warmup):
    """12 records, batch 1, grad-accum 1 -> 12 steps, one loss line (with its rate) per step."""
    seen = run_trainer(
        tmp_path,
        12,
        per_device_train_batch_size=1,
        num_train_epochs=1,
        learning_rate=2e-4,
        lr_scheduler_type=schedule,
        warmup_steps=warmup,
        logging_steps=1,
        save_strategy="no",
    )
    warmup_steps = warmup if warmup >= 1 else int(-(-12 * warmup // 1))
    assert seen.learning_rates == pytest.approx(learning_rates(2e-4, schedule, warmup_steps, 12), rel=1e-9, abs=1e-15)


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="choose one of"):
        learning_rates(1.0, "polynomial-ish", 0, 3)
