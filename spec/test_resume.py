"""Resuming a run (A4) and surviving a kill (X1): Trainer.train(resume_from_checkpoint=...) and complete checkpoints.

The library call this file is about, shown first on a one-weight model, then under the project's `train --resume`:

    Trainer.train(resume_from_checkpoint=checkpoint_dir)             resuming a run (A4)     = train.run(resume=True)

A real `train` process of the uninterrupted six-step run's settings (the `uninterrupted` fixture of
spec/conftest.py: the llm2024 recipe cut to SIX_STEPS on the QA fixture, checkpoints at steps 3 and 6) is
killed past checkpoint-3 and resumed; it must end with the uninterrupted run's adapter bit for bit. A
checkpoint counts only when complete (reference.training.checkpoints: a marker listing every file as written).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments

from reference.training import checkpoints, manifest
from spec.adapters import SCHEDULE, SIX_STEPS, adapter_tensors, assert_same_tensors, trained_b
from spec.cli_runner import QA, killed_after_step, run_cli
from spec.trainer_probe import OneWeight, one_weight_dataset

# --- A4: the library call, on a one-weight model ---


class StepsRun(TrainerCallback):
    """The optimizer steps a Trainer takes in this process."""

    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def one_weight_trainer(output_dir: Path, model: OneWeight | None = None) -> Trainer:
    """Six steps of y = w x (spec/trainer_probe.py) with Adam: warmup 2, linear decay, a checkpoint every 3."""
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=2,
        max_steps=6,
        warmup_steps=2,
        save_steps=3,
        logging_steps=1,
        learning_rate=0.1,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    return Trainer(model=model or OneWeight(), args=args, train_dataset=one_weight_dataset(12), callbacks=[StepsRun()])


def steps_run(trainer: Trainer) -> list[int]:
    return next(c.steps for c in trainer.callback_handler.callbacks if isinstance(c, StepsRun))


def rates_logged(trainer: Trainer) -> list[tuple[int, float, float]]:
    return [(e["step"], e["learning_rate"], e["loss"]) for e in trainer.state.log_history if "loss" in e]


@pytest.mark.claim("A4")
@pytest.mark.library("transformers")
def test_trainer_train_resume_from_checkpoint_goes_on_at_its_step_with_its_schedule(tmp_path):
    """The library call under `train --resume`: Trainer.train(resume_from_checkpoint=DIR), on a one-weight
    model. A new Trainer resumed from checkpoint-3 of a six-step run takes steps 4-6 only, at the same
    rates and losses, and ends at the same weight bit for bit. Trained from checkpoint-3's weight alone
    (no resume), it starts a new schedule: steps 1-6 again, the first at lr 0 (warmup)."""
    whole = one_weight_trainer(tmp_path / "whole")
    whole.train()
    resumed = one_weight_trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-3"))
    assert steps_run(resumed) == [4, 5, 6]
    assert rates_logged(resumed) == rates_logged(whole)  # 1-3 read back from the checkpoint, 4-6 trained again
    assert torch.equal(resumed.model.w, whole.model.w)

    weight_only = OneWeight()
    weight_only.load_state_dict(load_file(str(tmp_path / "whole" / "checkpoint-3" / "model.safetensors")))
    restarted = one_weight_trainer(tmp_path / "restarted", weight_only)
    restarted.train()
    assert steps_run(restarted) == [1, 2, 3, 4, 5, 6] and rates_logged(restarted)[0][1] == 0.0


# --- A4 and X1: a run killed mid-way carries on from its last complete checkpoint ---


def train_command(model, data, output) -> list:
    """`train` with the uninterrupted run's settings: the llm2024 recipe cut to six steps, in its bf16 (the
    uninterrupted run takes the recipe as given; the command would compute the tiny model in fp32 on the CPU)."""
    return [
        *("train", "--recipe", "llm2024", "--model", model, "--data", data, *QA, "--output", output),
        *("--cpu-dtype", "recipe", *SIX_STEPS),
    ]


@pytest.fixture(scope="module")
def killed_and_resumed(tiny_gemma2_dir, qa_data, tmp_path_factory):
    """A real `train` process of the uninterrupted run's settings is sent SIGKILL after a random step past
    checkpoint-3 (4 or 5); a half-written newer checkpoint is left beside it, as a kill during a save
    leaves one (some bytes of a file, no marker); then `train --resume` runs to the end."""
    output = tmp_path_factory.mktemp("killed")
    command = train_command(tiny_gemma2_dir, qa_data, output)
    kill_after = random.Random(1234).randint(4, 5)
    killed_after_step(command, kill_after, 6)
    saved = output / "checkpoints"
    half = saved / "checkpoint-99"
    half.mkdir()
    written = (saved / "checkpoint-3" / "adapter_model.safetensors").read_bytes()
    (half / "adapter_model.safetensors").write_bytes(written[:100])
    resumed = run_cli(*command, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    return SimpleNamespace(
        output=output,
        stderr=resumed.stderr,
        manifest=json.loads((output / "manifest.json").read_text(encoding="utf-8")),
    )


@pytest.mark.slow
@pytest.mark.claim("A4")
def test_resuming_a_checkpoint_goes_on_at_its_step_with_its_optimizer_scheduler_and_rng(
    killed_and_resumed, uninterrupted
):
    """`train --resume` hands the newest complete checkpoint to Trainer.train(resume_from_checkpoint=...).
    Resumed from checkpoint-3 the run goes on at step 4 (the global step restored) with lr 1.5e-3 (the
    scheduler), and ends with the uninterrupted run's adapter bit for bit, which needs Adam's moments (the
    optimizer) and NEFTune's noise and the data order (the RNG states) restored as well."""
    resumed = killed_and_resumed.manifest
    assert resumed["resumed_from"].endswith("checkpoint-3")
    assert [s["step"] for s in resumed["steps"]] == [4, 5, 6]
    assert [s["learning_rate"] for s in resumed["steps"]] == pytest.approx(SCHEDULE[3:])
    assert_same_tensors(adapter_tensors(killed_and_resumed.output), adapter_tensors(uninterrupted.output))


@pytest.mark.slow
@pytest.mark.claim("X1")
def test_a_run_killed_at_a_random_step_resumes_to_bit_identical_adapter_weights(killed_and_resumed, uninterrupted):
    """`train --resume` skips the half-written checkpoint-99 (no marker), says so, carries on from the
    newest complete checkpoint and ends with the uninterrupted run's exact weights."""
    assert "skipping checkpoint-99: no complete.json" in killed_and_resumed.stderr
    assert "resuming from checkpoint-3" in killed_and_resumed.stderr
    assert_same_tensors(adapter_tensors(killed_and_resumed.output), adapter_tensors(uninterrupted.output))
    assert trained_b(adapter_tensors(killed_and_resumed.output))  # the weights compared are trained ones


@pytest.mark.slow
@pytest.mark.claim("X8", "X1")
def test_verify_says_the_resumed_run_reproduces_the_uninterrupted_one_it_continues(killed_and_resumed, uninterrupted):
    """The resumed run recorded steps 4-6 only; verify matches steps by number, so it compares losses at 4-6
    (equal bit for bit on the CPU: rtol 0) and notes that steps 1-3 belong to the run before the resume."""
    verdict = manifest.compare(manifest.load(uninterrupted.output), manifest.load(killed_and_resumed.output), rtol=0)
    assert verdict.reproduces, verdict.differences
    assert verdict.steps_compared == [4, 5, 6] and verdict.max_loss_difference == 0
    assert any(note.startswith("3 steps, 1 to 3 only in A: B resumed from") for note in verdict.notes)


# --- X1: which checkpoint is complete, and which is taken ---


def whole_checkpoint(directory: Path, files: dict[str, bytes]) -> Path:
    directory.mkdir(parents=True)
    for name, content in files.items():
        (directory / name).write_bytes(content)
    checkpoints.mark_complete(directory)
    return directory


@pytest.mark.claim("X1")
def test_a_checkpoint_is_complete_only_with_its_marker_and_every_file_as_written(tmp_path):
    checkpoint = whole_checkpoint(tmp_path / "checkpoint-2", {"a.bin": b"12345", "optimizer.pt": b"x"})
    assert checkpoints.why_incomplete(checkpoint) is None
    (checkpoint / "a.bin").write_bytes(b"1234")
    assert checkpoints.why_incomplete(checkpoint) == "changed since written: a.bin"
    (checkpoint / "a.bin").unlink()
    assert checkpoints.why_incomplete(checkpoint) == "missing a.bin"
    (checkpoint / "complete.json").write_text("{")
    assert checkpoints.why_incomplete(checkpoint) == "complete.json is unreadable"
    (checkpoint / "complete.json").unlink()
    assert checkpoints.why_incomplete(checkpoint).startswith("no complete.json")


@pytest.mark.claim("X1")
def test_resuming_takes_the_newest_complete_checkpoint_by_step_and_names_the_ones_it_skips(tmp_path):
    """Steps 9 and 10 are whole; 11 changed after its marker; 12 has no marker (killed while writing);
    'checkpoint-final' is not a step. Newest by step number (10 > 9, though "10" < "9" as text)."""
    for step in (9, 10, 11):
        whole_checkpoint(tmp_path / f"checkpoint-{step}", {"adapter_model.safetensors": bytes([step])})
    (tmp_path / "checkpoint-11" / "adapter_model.safetensors").write_bytes(b"")
    (tmp_path / "checkpoint-12").mkdir()
    (tmp_path / "checkpoint-12" / "adapter_model.safetensors").write_bytes(b"half")
    whole_checkpoint(tmp_path / "checkpoint-final", {"adapter_model.safetensors": b"?"})
    said = []
    assert checkpoints.last_complete(tmp_path, say=said.append) == tmp_path / "checkpoint-10"
    assert said == [
        "skipping checkpoint-12: no complete.json (the run stopped while writing it)",
        "skipping checkpoint-11: changed since written: adapter_model.safetensors",
    ]


@pytest.mark.claim("X1")
def test_resuming_with_no_complete_checkpoint_starts_the_run_again_from_step_0(tmp_path):
    """A run interrupted before its first checkpoint was whole has nothing to carry on: --resume says so and starts
    it again (it used to refuse, while a plain rerun was refused too: 'add --resume or --overwrite')."""
    (tmp_path / "checkpoint-1").mkdir()
    said = []
    assert checkpoints.last_complete(tmp_path, say=said.append) is None
    assert said[-1] == f"--resume: {tmp_path} holds no complete checkpoint yet; the run starts again from step 0"
