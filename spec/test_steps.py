"""Step arithmetic (reference/steps.py) against what a real transformers.Trainer does.

Every expected number below is either derived by hand in the docstring or counted from a real Trainer
run by a callback (spec/trainer_probe.py): micro-batches, optimizer steps, epochs, saves, checkpoints
left on disk, loss log lines and learning rates.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from reference.errors import InputError
from reference.steps import StepSettings, micro_batches_per_epoch, plan

from .trainer_probe import OneWeight, one_weight_dataset, run_trainer


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


@pytest.mark.claim("P9", "P10")
def test_the_trainer_itself_plans_15000_steps_for_10000_records_batch_2_3_epochs(tmp_path):
    """The Trainer's own set-up (its dataloader and set_initial_training_values) gives the same total."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, num_train_epochs=3, report_to="none", use_cpu=True
    )
    trainer = Trainer(model=OneWeight(), args=args, train_dataset=one_weight_dataset(10_000))
    values = trainer.set_initial_training_values(args, trainer.get_train_dataloader())
    num_train_epochs, steps_per_epoch, _, _, _, micro_batches_per_epoch_, max_steps = values
    assert (num_train_epochs, steps_per_epoch, micro_batches_per_epoch_, max_steps) == (3, 5_000, 5_000, 15_000)


@pytest.mark.claim("P10")
def test_weights_update_once_per_grad_accum_micro_batches():
    """10,000 records, batch 2, grad-accum 4: 5,000 micro-batches -> 1,250 updates per epoch, 3,750 in all."""
    p = plan(StepSettings(records=10_000, batch_size=2, grad_accum=4, epochs=3))
    assert (p.optimizer_steps_per_epoch, p.total_optimizer_steps, p.effective_batch_size) == (1_250, 3_750, 8)


# Awkward configurations, each run through a real Trainer. The ids say what makes them awkward.
CASES = {
    "partial_last_window": StepSettings(records=11, batch_size=2, grad_accum=4, epochs=2, save_steps=1000),
    "fewer_micro_batches_than_grad_accum": StepSettings(records=5, batch_size=2, grad_accum=8, epochs=3),
    "fractional_epochs": StepSettings(records=10, batch_size=2, grad_accum=2, epochs=1.5),
    "max_steps_crosses_epochs": StepSettings(records=9, batch_size=2, grad_accum=2, max_steps=7),
    "max_steps_inside_first_epoch": StepSettings(records=40, batch_size=2, grad_accum=2, max_steps=3),
    "save_steps_and_total_limit": StepSettings(
        records=16, batch_size=2, grad_accum=1, epochs=1, save_steps=3, save_total_limit=2
    ),
    "fractional_save_and_logging_steps": StepSettings(
        records=20, batch_size=2, grad_accum=1, epochs=1.3, save_steps=0.25, logging_steps=0.2
    ),
    "save_per_epoch_with_fractional_epochs": StepSettings(
        records=12, batch_size=4, grad_accum=1, epochs=2.5, save_strategy="epoch", save_total_limit=2
    ),
    "logging_first_step_and_every_3": StepSettings(
        records=14, batch_size=1, grad_accum=2, epochs=1, logging_steps=3, logging_first_step=True
    ),
    "logging_per_epoch": StepSettings(records=7, batch_size=2, grad_accum=1, epochs=3, logging_strategy="epoch"),
    "drop_last": StepSettings(records=11, batch_size=3, grad_accum=2, epochs=2, drop_last=True, logging_steps=1),
    "no_saving": StepSettings(records=6, batch_size=2, epochs=2, save_strategy="no", logging_steps=2),
}

# The same cases by hand, as (micro-batches in the run, optimizer steps, epochs run, checkpoints written,
# checkpoint steps kept, loss log lines). mb/epoch = ceil(records / batch) (records // batch when dropping
# the last); steps/epoch = ceil(mb / accumulation); total = max_steps or ceil(epochs x steps/epoch); a
# checkpoint every save_steps and at the last step (epoch strategy: at each epoch's end); logging likewise.
EXPECTED = {
    # 11/2 -> 6 mb; 6/4 -> 2 steps/epoch (windows 4 + 2); 2 epochs: 4 steps, 12 mb; saved only at the end (4).
    "partial_last_window": (12, 4, 2, 1, [4], 0),
    # 5/2 -> 3 mb; 3/8 -> 1 step/epoch of 3 mb; 3 epochs: 3 steps, 9 mb; saved at 3.
    "fewer_micro_batches_than_grad_accum": (9, 3, 3, 1, [3], 0),
    # 10/2 -> 5 mb, 3 steps/epoch; 1.5 epochs -> ceil(4.5) = 5 steps: 5 mb + 2 steps x 2 mb = 9 mb; saved at 5.
    "fractional_epochs": (9, 5, 2, 1, [5], 0),
    # 9/2 -> 5 mb, 3 steps/epoch; 7 steps = 2 epochs (10 mb) + 1 step (2 mb) = 12 mb over 3 epochs; saved at 7.
    "max_steps_crosses_epochs": (12, 7, 3, 1, [7], 0),
    # 40/2 -> 20 mb, 10 steps/epoch; 3 steps take 6 mb of the first epoch; saved at 3.
    "max_steps_inside_first_epoch": (6, 3, 1, 1, [3], 0),
    # 16/2 -> 8 steps; saved at 3, 6 and the last step 8; keep 2 -> 6, 8.
    "save_steps_and_total_limit": (8, 8, 1, 3, [6, 8], 0),
    # 20/2 -> 10 steps/epoch; 1.3 epochs -> 13 steps, 10 + 3 mb; save every ceil(13 x 0.25) = 4 -> 4, 8, 12, 13;
    # log every ceil(13 x 0.2) = 3 -> 3, 6, 9, 12.
    "fractional_save_and_logging_steps": (13, 13, 2, 4, [4, 8, 12, 13], 4),
    # 12/4 -> 3 steps/epoch; 2.5 epochs -> ceil(7.5) = 8 steps over 3 epochs; saved at 3, 6, 8; keep 2 -> 6, 8.
    "save_per_epoch_with_fractional_epochs": (8, 8, 3, 3, [6, 8], 0),
    # 14 mb, 7 steps; saved at 7; logged at 1 (first step), 3 and 6.
    "logging_first_step_and_every_3": (14, 7, 1, 1, [7], 3),
    # 7/2 -> 4 mb = 4 steps/epoch; 3 epochs: 12 steps; saved at 12; one loss line per epoch.
    "logging_per_epoch": (12, 12, 3, 1, [12], 3),
    # 11 // 3 = 3 full batches; 3/2 -> 2 steps/epoch; 2 epochs: 4 steps, 6 mb; saved at 4; logged every step.
    "drop_last": (6, 4, 2, 1, [4], 4),
    # 6/2 -> 3 steps/epoch, 6 steps; no checkpoints; logged at 2, 4, 6.
    "no_saving": (6, 6, 2, 0, [], 3),
}


def counted(p) -> tuple:
    return (
        p.micro_batches,
        p.total_optimizer_steps,
        p.epochs_run,
        p.checkpoints_written,
        p.checkpoint_steps_kept,
        p.log_lines,
    )


@pytest.mark.claim("P10")
@pytest.mark.parametrize("name", list(CASES))
def test_step_plan_by_hand(name):
    assert counted(plan(CASES[name])) == EXPECTED[name]


@pytest.mark.claim("P10")
@pytest.mark.parametrize("name", list(CASES))
def test_step_plan_equals_a_real_trainer_run(name, tmp_path):
    s = CASES[name]
    p = plan(s)
    seen = run_trainer(tmp_path, s.records, **trainer_arguments(s))
    assert seen.micro_batches == p.micro_batches
    assert seen.optimizer_steps == p.total_optimizer_steps == seen.max_steps
    assert seen.epochs_begun == p.epochs_run
    assert len(seen.save_steps) == p.checkpoints_written
    assert seen.checkpoints_on_disk == p.checkpoint_steps_kept
    assert len(seen.checkpoints_on_disk) == p.checkpoints_kept
    assert len(seen.loss_log_steps) == p.log_lines


@pytest.mark.claim("P10")
def test_partial_last_window_by_hand():
    """11 records, batch 2 -> 6 micro-batches; grad-accum 4 -> windows of 4 and 2 -> 2 updates per epoch."""
    p = plan(CASES["partial_last_window"])
    assert (p.micro_batches_per_epoch, p.last_window_micro_batches, p.optimizer_steps_per_epoch) == (6, 2, 2)
    assert (p.total_optimizer_steps, p.micro_batches) == (4, 12)


@pytest.mark.claim("P10")
def test_fractional_epochs_by_hand():
    """10 records, batch 2 -> 5 micro-batches, windows 2+2+1 -> 3 updates/epoch; 1.5 epochs -> ceil(4.5) = 5
    updates: all of epoch 1 (5 micro-batches) + 2 updates of epoch 2 (4 micro-batches) = 9 micro-batches."""
    p = plan(CASES["fractional_epochs"])
    assert (p.total_optimizer_steps, p.micro_batches, p.epochs_run) == (5, 9, 2)


@pytest.mark.claim("P10")
def test_save_total_limit_keeps_the_newest_checkpoints_by_hand():
    """16 records, batch 2 -> 8 steps; save every 3 -> saves at 3, 6 and the final step 8; keep 2 -> 6, 8."""
    p = plan(CASES["save_steps_and_total_limit"])
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


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reference", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.claim("P9", "L4")
def test_steps_cli_prints_json_with_the_contract_keys():
    """15,000 steps (P9); warmup 0.125 of them = 1,875; STEPS_PER_EPOCH = 10,000 // 2 = 5,000."""
    result = run_cli("steps", "--records", "10000", "--batch-size", "2", "--epochs", "3", "--warmup", "0.125", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    for key in (
        "micro_batches",
        "micro_batches_per_epoch",
        "optimizer_steps_per_epoch",
        "total_optimizer_steps",
        "effective_batch_size",
        "warmup_steps",
        "checkpoints_written",
        "checkpoints_kept",
        "log_lines",
        "custom_loop_steps_per_epoch",
    ):
        assert key in data
    assert (data["total_optimizer_steps"], data["warmup_steps"]) == (15_000, 1_875)
    assert data["custom_loop_steps_per_epoch"] == 5_000
    assert data["checkpoints_written"] == 30  # every 500 steps (the Trainer's default) up to 15,000


@pytest.mark.claim("L4")
def test_steps_cli_table_shows_trainer_and_custom_loop_side_by_side():
    result = run_cli("steps", "--records", "1001", "--batch-size", "2", "--world-size", "2", "--epochs", "1")
    assert result.returncode == 0, result.stderr
    assert "total optimizer steps" in result.stdout and "251" in result.stdout
    assert "STEPS_PER_EPOCH" in result.stdout and "250 (drops 1 records)" in result.stdout


@pytest.mark.parametrize(
    "args,named",
    [
        (["--records", "0", "--batch-size", "2"], "--records"),
        (["--records", "10", "--batch-size", "0"], "--batch-size"),
        (["--records", "10", "--batch-size", "2", "--warmup", "2.5"], "--warmup"),
        (["--records", "10", "--batch-size", "2", "--warmup", "abc"], "--warmup"),
        (["--records", "10", "--batch-size", "2", "--save-strategy", "sometimes"], "--save-strategy"),
        (["--records", "ten", "--batch-size", "2"], "--records"),
    ],
)
def test_steps_cli_rejects_bad_arguments_with_exit_2_naming_the_argument(args, named):
    result = run_cli("steps", *args)
    assert result.returncode == 2
    assert named in result.stderr
    assert "Traceback" not in result.stderr


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
    import random

    s = random_settings(random.Random(seed))
    p = plan(s)
    seen = run_trainer(tmp_path, s.records, **trainer_arguments(s))
    observed = (
        seen.micro_batches,
        seen.optimizer_steps,
        seen.epochs_begun,
        len(seen.save_steps),
        seen.checkpoints_on_disk,
        len(seen.loss_log_steps),
    )
    expected = (
        p.micro_batches,
        p.total_optimizer_steps,
        p.epochs_run,
        p.checkpoints_written,
        p.checkpoint_steps_kept,
        p.log_lines,
    )
    assert observed == expected, s


@pytest.mark.claim("P10")
@pytest.mark.parametrize("warmup,max_steps,warned", [(300, 4, True), (4, 4, True), (3, 4, False), (0, 4, False)])
def test_warmup_that_lasts_the_whole_run_is_warned_about(capsys, warmup, max_steps, warned):
    """The README's old example: warmup 300 and max_steps 4 train at 0, 1/300, 2/300, 3/300 of the rate.
    Warmup 4 of 4 steps never reaches the peak either (the last step runs at 3/4); warmup 3 of 4 does."""
    from reference import cli

    assert (
        cli.main(
            ["steps", "--records", "100", "--batch-size", "4", "--max-steps", str(max_steps), "--warmup", str(warmup)]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert ("warning: warmup of" in err and "never reaches its peak" in err) is warned
