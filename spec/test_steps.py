"""Step arithmetic (reference/training/steps.py) against what a real transformers.Trainer does.

The Trainer's rules, for R records, per-device batch B, W processes and gradient accumulation G, as
transformers computes them (`Trainer.get_train_dataloader`, which accelerate shards over the processes; then
`Trainer.set_initial_training_values`, `TrainingArguments.get_warmup_steps` and `DefaultFlowCallback`):

    micro-batches per epoch, per process   mb = ceil(ceil(R / B) / W)     drop_last: (R // B) // W
    optimizer steps per epoch              s  = max(ceil(mb / G), 1)      a last, partial window still steps
    optimizer steps in the run             T  = max_steps if max_steps > 0, else ceil(epochs x s)
    epochs run                                = ceil(T / s)
    micro-batches in the run                  = mb per whole epoch + G per step of a partial last epoch
    warmup steps                              = int(warmup) if warmup >= 1, else ceil(T x warmup)
    save_steps, logging_steps n               = n if n >= 1, else ceil(T x n)
    checkpoints written                       steps strategy: at n, 2n, ... and at T; epoch strategy: at
                                              each epoch's end (a partial last epoch included)
    checkpoints kept                          the newest save_total_limit of them
    loss log lines                            steps strategy: at n, 2n, ...; epoch strategy: at each epoch's
                                              end; and at step 1 with logging_first_step
    custom loop (seed 002)                    STEPS_PER_EPOCH = R // (B x W), the tail dropped

Every expected number below is worked out by hand from these rules (each case's `by_hand` line) or counted
from a real Trainer run by a callback (spec/trainer_probe.py): micro-batches, optimizer steps, epochs, saves,
checkpoints left on disk, loss log lines and learning rates. The command line (`steps`) is in test_cli.py.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import NamedTuple

import pytest

from reference.errors import InputError
from reference.training.steps import StepSettings, micro_batches_per_epoch, plan

from .trainer_probe import OneWeight, one_weight_dataset, run_trainer


@dataclass(frozen=True)
class Case:
    """A configuration and what a Trainer run of it does, counted by hand (mb: micro-batches)."""

    settings: StepSettings
    by_hand: str
    micro_batches_per_epoch: int
    optimizer_steps_per_epoch: int
    total_optimizer_steps: int
    epochs_run: int
    micro_batches: int
    checkpoints_written: int
    checkpoint_steps_kept: list[int]
    log_lines: int


# Awkward configurations, each also run through a real Trainer. The names say what makes them awkward.
CASES = {
    "partial_last_window": Case(
        StepSettings(records=11, batch_size=2, grad_accum=4, epochs=2, save_steps=1000),
        "ceil(11/2) = 6 mb, windows 4 + 2 -> 2 steps/epoch; 2 epochs: 4 steps, 12 mb; saved only at the end, 4",
        micro_batches_per_epoch=6,
        optimizer_steps_per_epoch=2,
        total_optimizer_steps=4,
        epochs_run=2,
        micro_batches=12,
        checkpoints_written=1,
        checkpoint_steps_kept=[4],
        log_lines=0,
    ),
    "fewer_micro_batches_than_grad_accum": Case(
        StepSettings(records=5, batch_size=2, grad_accum=8, epochs=3),
        "ceil(5/2) = 3 mb, one window of 3 < 8 -> 1 step/epoch; 3 epochs: 3 steps, 9 mb; saved at 3",
        micro_batches_per_epoch=3,
        optimizer_steps_per_epoch=1,
        total_optimizer_steps=3,
        epochs_run=3,
        micro_batches=9,
        checkpoints_written=1,
        checkpoint_steps_kept=[3],
        log_lines=0,
    ),
    "fractional_epochs": Case(
        StepSettings(records=10, batch_size=2, grad_accum=2, epochs=1.5),
        "5 mb, windows 2+2+1 -> 3 steps/epoch; ceil(1.5 x 3) = 5 steps: epoch 1 (5 mb) + 2 steps x 2 mb = 9 mb",
        micro_batches_per_epoch=5,
        optimizer_steps_per_epoch=3,
        total_optimizer_steps=5,
        epochs_run=2,
        micro_batches=9,
        checkpoints_written=1,
        checkpoint_steps_kept=[5],
        log_lines=0,
    ),
    "max_steps_crosses_epochs": Case(
        StepSettings(records=9, batch_size=2, grad_accum=2, max_steps=7),
        "ceil(9/2) = 5 mb, 3 steps/epoch; 7 steps = 2 epochs (10 mb) + 1 step (2 mb) = 12 mb over 3 epochs",
        micro_batches_per_epoch=5,
        optimizer_steps_per_epoch=3,
        total_optimizer_steps=7,
        epochs_run=3,
        micro_batches=12,
        checkpoints_written=1,
        checkpoint_steps_kept=[7],
        log_lines=0,
    ),
    "max_steps_inside_first_epoch": Case(
        StepSettings(records=40, batch_size=2, grad_accum=2, max_steps=3),
        "20 mb, 10 steps/epoch; 3 steps take 3 x 2 = 6 mb of the first epoch; saved at 3",
        micro_batches_per_epoch=20,
        optimizer_steps_per_epoch=10,
        total_optimizer_steps=3,
        epochs_run=1,
        micro_batches=6,
        checkpoints_written=1,
        checkpoint_steps_kept=[3],
        log_lines=0,
    ),
    "save_steps_and_total_limit": Case(
        StepSettings(records=16, batch_size=2, grad_accum=1, epochs=1, save_steps=3, save_total_limit=2),
        "8 mb = 8 steps; saved at 3, 6 and the last step 8; the newest 2 kept: 6, 8",
        micro_batches_per_epoch=8,
        optimizer_steps_per_epoch=8,
        total_optimizer_steps=8,
        epochs_run=1,
        micro_batches=8,
        checkpoints_written=3,
        checkpoint_steps_kept=[6, 8],
        log_lines=0,
    ),
    "fractional_save_and_logging_steps": Case(
        StepSettings(records=20, batch_size=2, grad_accum=1, epochs=1.3, save_steps=0.25, logging_steps=0.2),
        "10 steps/epoch; ceil(1.3 x 10) = 13 steps, 10 + 3 mb; save every ceil(13 x 0.25) = 4: 4, 8, 12, 13; "
        "log every ceil(13 x 0.2) = 3: 3, 6, 9, 12",
        micro_batches_per_epoch=10,
        optimizer_steps_per_epoch=10,
        total_optimizer_steps=13,
        epochs_run=2,
        micro_batches=13,
        checkpoints_written=4,
        checkpoint_steps_kept=[4, 8, 12, 13],
        log_lines=4,
    ),
    "save_per_epoch_with_fractional_epochs": Case(
        StepSettings(records=12, batch_size=4, grad_accum=1, epochs=2.5, save_strategy="epoch", save_total_limit=2),
        "3 steps/epoch; ceil(2.5 x 3) = 8 steps over 3 epochs; saved at each epoch's end 3, 6, 8; kept 6, 8",
        micro_batches_per_epoch=3,
        optimizer_steps_per_epoch=3,
        total_optimizer_steps=8,
        epochs_run=3,
        micro_batches=8,
        checkpoints_written=3,
        checkpoint_steps_kept=[6, 8],
        log_lines=0,
    ),
    "logging_first_step_and_every_3": Case(
        StepSettings(records=14, batch_size=1, grad_accum=2, epochs=1, logging_steps=3, logging_first_step=True),
        "14 mb, 7 steps; saved at 7; logged at 1 (the first step), 3 and 6",
        micro_batches_per_epoch=14,
        optimizer_steps_per_epoch=7,
        total_optimizer_steps=7,
        epochs_run=1,
        micro_batches=14,
        checkpoints_written=1,
        checkpoint_steps_kept=[7],
        log_lines=3,
    ),
    "logging_per_epoch": Case(
        StepSettings(records=7, batch_size=2, grad_accum=1, epochs=3, logging_strategy="epoch"),
        "ceil(7/2) = 4 mb = 4 steps/epoch; 3 epochs: 12 steps; saved at 12; one loss line per epoch",
        micro_batches_per_epoch=4,
        optimizer_steps_per_epoch=4,
        total_optimizer_steps=12,
        epochs_run=3,
        micro_batches=12,
        checkpoints_written=1,
        checkpoint_steps_kept=[12],
        log_lines=3,
    ),
    "drop_last": Case(
        StepSettings(records=11, batch_size=3, grad_accum=2, epochs=2, drop_last=True, logging_steps=1),
        "11 // 3 = 3 full mb, windows 2 + 1 -> 2 steps/epoch; 2 epochs: 4 steps, 6 mb; saved at 4; logged at each",
        micro_batches_per_epoch=3,
        optimizer_steps_per_epoch=2,
        total_optimizer_steps=4,
        epochs_run=2,
        micro_batches=6,
        checkpoints_written=1,
        checkpoint_steps_kept=[4],
        log_lines=4,
    ),
    "no_saving": Case(
        StepSettings(records=6, batch_size=2, epochs=2, save_strategy="no", logging_steps=2),
        "3 mb = 3 steps/epoch, 6 steps; no checkpoints; logged at 2, 4, 6",
        micro_batches_per_epoch=3,
        optimizer_steps_per_epoch=3,
        total_optimizer_steps=6,
        epochs_run=2,
        micro_batches=6,
        checkpoints_written=0,
        checkpoint_steps_kept=[],
        log_lines=3,
    ),
}

SEEN_IN_A_RUN = (
    "micro_batches",
    "total_optimizer_steps",
    "epochs_run",
    "checkpoints_written",
    "checkpoint_steps_kept",
    "log_lines",
)
"""What a Trainer run shows of a plan: names of both StepPlan and Case."""
PER_EPOCH = ("micro_batches_per_epoch", "optimizer_steps_per_epoch")


def counts(plan_or_case, names=SEEN_IN_A_RUN) -> dict:
    return {name: getattr(plan_or_case, name) for name in names}


def trainer_counts(seen) -> dict:
    """The same numbers counted in a real Trainer run by spec/trainer_probe.py's callback."""
    return {
        "micro_batches": seen.micro_batches,
        "total_optimizer_steps": seen.optimizer_steps,
        "epochs_run": seen.epochs_begun,
        "checkpoints_written": len(seen.save_steps),
        "checkpoint_steps_kept": seen.checkpoints_on_disk,
        "log_lines": len(seen.loss_log_steps),
    }


def trainer_arguments(s: StepSettings) -> dict:
    """The TrainingArguments that correspond to StepSettings."""
    return dict(
        per_device_train_batch_size=s.batch_size,
        gradient_accumulation_steps=s.grad_accum,
        num_train_epochs=s.epochs,
        max_steps=s.max_steps,
        warmup_steps=s.warmup,
        save_strategy=s.save_strategy,
        save_steps=s.save_steps,
        save_total_limit=s.save_total_limit,
        logging_strategy=s.logging_strategy,
        logging_steps=s.logging_steps,
        logging_first_step=s.logging_first_step,
        dataloader_drop_last=s.drop_last,
    )


@pytest.mark.claim("P9")
def test_10000_records_batch_2_for_3_epochs_is_15000_steps():
    """10,000 records / batch 2 = 5,000 micro-batches per epoch; x 3 epochs = 15,000 (grad-accum 1)."""
    p = plan(StepSettings(records=10_000, batch_size=2, epochs=3))
    assert p.micro_batches_per_epoch == 5_000
    assert p.total_optimizer_steps == 15_000
    assert p.micro_batches == 15_000


class InitialValues(NamedTuple):
    """What Trainer.set_initial_training_values returns, in its docstring's order."""

    num_train_epochs: int
    num_update_steps_per_epoch: int
    num_examples: int
    num_train_samples: int
    total_train_batch_size: int
    steps_in_epoch: int
    max_steps: int


@pytest.mark.claim("P9", "P10")
def test_the_trainer_itself_plans_15000_steps_for_10000_records_batch_2_3_epochs(tmp_path):
    """The Trainer's own set-up (its dataloader and set_initial_training_values) gives the same total:
    ceil(10,000 / 2) = 5,000 batches an epoch, 5,000 updates an epoch (G = 1), 3 x 5,000 = 15,000."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, num_train_epochs=3, report_to="none", use_cpu=True
    )
    trainer = Trainer(model=OneWeight(), args=args, train_dataset=one_weight_dataset(10_000))
    values = InitialValues(*trainer.set_initial_training_values(args, trainer.get_train_dataloader()))
    assert values.num_train_epochs == 3
    assert values.steps_in_epoch == 5_000  # micro-batches per epoch
    assert values.num_update_steps_per_epoch == 5_000
    assert values.max_steps == 15_000


@pytest.mark.claim("P10")
def test_weights_update_once_per_grad_accum_micro_batches():
    """10,000 records, batch 2, grad-accum 4: 5,000 micro-batches -> 1,250 updates per epoch, 3,750 in all."""
    p = plan(StepSettings(records=10_000, batch_size=2, grad_accum=4, epochs=3))
    assert (p.optimizer_steps_per_epoch, p.total_optimizer_steps, p.effective_batch_size) == (1_250, 3_750, 8)


@pytest.mark.claim("P10")
@pytest.mark.parametrize("name", list(CASES))
def test_step_plan_by_hand(name):
    case = CASES[name]
    p = plan(case.settings)
    assert counts(p, PER_EPOCH + SEEN_IN_A_RUN) == counts(case, PER_EPOCH + SEEN_IN_A_RUN), case.by_hand
    assert p.checkpoints_kept == len(case.checkpoint_steps_kept)


@pytest.mark.claim("P10")
@pytest.mark.parametrize("name", list(CASES))
def test_step_plan_equals_a_real_trainer_run(name, tmp_path):
    """What the Trainer does is what was worked out by hand, and what the plan says."""
    case = CASES[name]
    p = plan(case.settings)
    seen = run_trainer(tmp_path, case.settings.records, **trainer_arguments(case.settings))
    assert trainer_counts(seen) == counts(case) == counts(p)
    assert seen.max_steps == case.total_optimizer_steps
    assert len(seen.checkpoints_on_disk) == p.checkpoints_kept


@pytest.mark.claim("P10")
def test_partial_last_window_by_hand():
    """11 records, batch 2 -> 6 micro-batches; grad-accum 4 -> windows of 4 and 2 -> 2 updates per epoch."""
    p = plan(CASES["partial_last_window"].settings)
    assert (p.micro_batches_per_epoch, p.last_window_micro_batches, p.optimizer_steps_per_epoch) == (6, 2, 2)
    assert (p.total_optimizer_steps, p.micro_batches) == (4, 12)


@pytest.mark.claim("P10")
def test_fractional_epochs_by_hand():
    """10 records, batch 2 -> 5 micro-batches, windows 2+2+1 -> 3 updates/epoch; 1.5 epochs -> ceil(4.5) = 5
    updates: all of epoch 1 (5 micro-batches) + 2 updates of epoch 2 (4 micro-batches) = 9 micro-batches."""
    p = plan(CASES["fractional_epochs"].settings)
    assert (p.total_optimizer_steps, p.micro_batches, p.epochs_run) == (5, 9, 2)


@pytest.mark.claim("P10")
def test_save_total_limit_keeps_the_newest_checkpoints_by_hand():
    """16 records, batch 2 -> 8 steps; save every 3 -> saves at 3, 6 and the final step 8; keep 2 -> 6, 8."""
    p = plan(CASES["save_steps_and_total_limit"].settings)
    assert (p.checkpoints_written, p.checkpoint_steps_kept) == (3, [6, 8])


@pytest.mark.claim("P10")
def test_fractional_warmup_rounds_up_and_the_trainer_warms_up_that_long(tmp_path):
    """30 records, batch 2 -> 15 steps; warmup 0.1 -> ceil(1.5) = 2 steps. With a linear schedule the rate
    logged at step k is lr * (k-1)/2 during warmup, so exactly the first 2 logged rates are below the peak."""
    s = StepSettings(records=30, batch_size=2, epochs=1, warmup=0.1, logging_steps=1)
    assert plan(s).warmup_steps == 2
    seen = run_trainer(tmp_path, s.records, lr_scheduler_type="linear", **trainer_arguments(s))
    peak = max(seen.learning_rates)
    assert seen.learning_rates.index(peak) == 2
    assert seen.learning_rates[:2] == [0.0, peak / 2]


@pytest.mark.claim("P10")
@pytest.mark.parametrize("warmup, steps", [(7, 7), (1, 1), (0.125, 13), (0, 0)])
def test_whole_warmup_steps_are_taken_as_given_and_fractions_round_up(warmup, steps):
    """100 records, batch 1 -> 100 steps. 7 -> 7 steps; 1 -> 1 step (a whole number, not the whole run);
    0.125 -> 100 x 0.125 = 12.5, rounded up to 13; 0 -> none."""
    assert plan(StepSettings(records=100, batch_size=1, epochs=1, warmup=warmup)).warmup_steps == steps


@pytest.mark.claim("P10", "X3")
@pytest.mark.parametrize(
    "records,batch,world,drop_last",
    [(11, 2, 2, False), (10, 3, 3, False), (9, 1, 4, False), (13, 2, 2, True), (3, 4, 2, False)],
)
def test_micro_batches_per_process_equal_accelerates_sharded_dataloader(records, batch, world, drop_last):
    """Several processes: accelerate deals the batches out round-robin and evens them up; count them."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler, SequentialSampler

    sampler = BatchSampler(SequentialSampler(range(records)), batch_size=batch, drop_last=drop_last)
    per_process = [len(list(BatchSamplerShard(sampler, world, rank))) for rank in range(world)]
    assert per_process == [micro_batches_per_epoch(records, batch, world, drop_last)] * world


@pytest.mark.claim("X3")
def test_world_size_divides_the_steps_and_multiplies_the_effective_batch():
    """10,000 records, batch 2, 2 processes: 2,500 micro-batches each per epoch; effective batch 4."""
    p = plan(StepSettings(records=10_000, batch_size=2, epochs=3, world_size=2))
    assert (p.micro_batches_per_epoch, p.total_optimizer_steps, p.effective_batch_size) == (2_500, 7_500, 4)


@pytest.mark.claim("L4")
def test_custom_loop_steps_per_epoch_drop_the_tail_while_the_trainer_rounds_up():
    """STEPS_PER_EPOCH = 1001 // (2 x 2) = 250 (1 record dropped); the Trainer: ceil(ceil(1001/2)/2) = 251."""
    p = plan(StepSettings(records=1001, batch_size=2, epochs=1, world_size=2))
    assert (p.custom_loop_steps_per_epoch, p.custom_loop_dropped_records) == (250, 1)
    assert p.optimizer_steps_per_epoch == 251


def test_step_settings_refuse_nonsense_directly():
    with pytest.raises(InputError, match="--grad-accum"):
        StepSettings(records=10, batch_size=2, grad_accum=0)


def random_settings(rng) -> StepSettings:
    """A configuration drawn from the ranges where the Trainer's rounding rules interact."""
    strategy = rng.choice(["steps", "steps", "epoch", "no"])
    records, batch_size = rng.randint(1, 40), rng.randint(1, 5)
    return StepSettings(
        records=records,
        batch_size=batch_size,
        grad_accum=rng.randint(1, 6),
        epochs=rng.choice([1, 2, 3, 0.5, 1.3, 2.7]),
        max_steps=rng.choice([-1, -1, -1, rng.randint(1, 12)]),
        warmup=rng.choice([0, 2, 0.1, 0.35]),
        save_strategy=strategy,
        save_steps=rng.choice([1, 2, 3, 5, 0.3, 500]),
        save_total_limit=rng.choice([None, 1, 2, 3]),
        logging_strategy=rng.choice(["steps", "steps", "epoch", "no"]),
        logging_steps=rng.choice([1, 2, 4, 0.25, 500]),
        logging_first_step=rng.random() < 0.3,
        drop_last=rng.random() < 0.2 and records >= batch_size,  # else there is not one full batch
    )


@pytest.mark.claim("P10")
@pytest.mark.parametrize("seed", range(16))
def test_step_plan_equals_a_real_trainer_on_random_configurations(seed, tmp_path):
    s = random_settings(random.Random(seed))
    seen = run_trainer(tmp_path, s.records, **trainer_arguments(s))
    assert trainer_counts(seen) == counts(plan(s)), s
