"""Checkpoints that are known to be whole: a run killed while writing one never resumes from it.

The Trainer writes a checkpoint file by file (adapter, optimizer, scheduler, RNG states, trainer
state) and nothing marks the end. So after the Trainer has written checkpoint-N, `CompletionMarker`
writes `complete.json` into it: the SHA-256 of every file and the run's step records up to N, put in place with
an atomic rename. A
checkpoint is complete when that marker exists and every file still has its hash; resuming takes the
newest complete checkpoint and says which incomplete ones it skipped and why.

Not handled: with `save_total_limit`, the Trainer deletes old checkpoints before this marker is written,
so a kill in that instant can leave no complete checkpoint (keep at least two).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch.distributed as dist
from transformers import TrainerCallback

from reference.errors import InputError
from reference.hashing import digests
from reference.paths import no_space
from reference.training import steps

MARKER = "complete.json"
PREFIX = "checkpoint-"


def file_hashes(directory: Path) -> dict[str, str]:
    """Path inside the checkpoint -> SHA-256 for every file the Trainer wrote (not the marker, not a .tmp)."""
    written = (p for p in directory.rglob("*") if p.is_file() and p.name != MARKER and not p.name.endswith(".tmp"))
    return digests(directory, written)


def mark_complete(directory: str | Path, steps: list | None = None) -> None:
    """Write the marker (hashes of every file, and the step records the manifest would hold now) with an atomic
    rename, after the checkpoint is written."""
    directory = Path(directory)
    temporary = directory / (MARKER + ".tmp")
    temporary.write_text(json.dumps({"files": file_hashes(directory), "steps": steps or []}, indent=1))
    with open(temporary, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, directory / MARKER)


def why_incomplete(directory: str | Path) -> str | None:
    """None when the checkpoint is whole; otherwise what is wrong with it."""
    directory = Path(directory)
    marker = directory / MARKER
    if not marker.is_file():
        return f"no {MARKER} (the run stopped while writing it)"
    try:
        expected = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError):
        return f"{MARKER} is unreadable"
    actual = file_hashes(directory)
    missing = sorted(set(expected) - set(actual))
    if missing:
        return f"missing {', '.join(missing)}"
    changed = sorted(name for name in expected if actual[name] != expected[name])
    return f"changed since written: {', '.join(changed)}" if changed else None


def step_of(directory: Path) -> int:
    try:
        return int(directory.name[len(PREFIX) :])
    except ValueError:
        return -1


def last_complete(checkpoints: str | Path, say=print) -> Path | None:
    """The newest complete checkpoint under `checkpoints`; incomplete newer ones are reported and skipped. None
    when there is none (the run stopped before its first checkpoint was whole): it starts again from step 0."""
    folder = Path(checkpoints)
    candidates = sorted(
        (p for p in folder.glob(PREFIX + "*") if p.is_dir() and step_of(p) >= 0), key=step_of, reverse=True
    )
    for candidate in candidates:
        problem = why_incomplete(candidate)
        if problem is None:
            return candidate
        say(f"skipping {candidate.name}: {problem}")
    say(f"--resume: {folder} holds no complete checkpoint yet; the run starts again from step 0")
    return None


def remove_incomplete(checkpoints: str | Path) -> list[str]:
    """Remove the checkpoints a failed run left half-written (no marker); returns their names."""
    removed = []
    for candidate in Path(checkpoints).glob(PREFIX + "*"):
        if candidate.is_dir() and not (candidate / MARKER).is_file():
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate.name)
    return sorted(removed)


def recorded_steps(checkpoint: Path) -> list:
    """The run's step records (reference.training.manifest.StepLog dicts) up to this complete checkpoint."""
    return json.loads((checkpoint / MARKER).read_text()).get("steps", [])


def finished_training(checkpoint: Path) -> tuple[int, int] | None:
    """(step, steps planned) when the checkpoint holds the run's last optimizer step; None otherwise."""
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        step, planned = int(state["global_step"]), int(state["max_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (step, planned) if 0 < planned <= step else None


class CompletionMarker(TrainerCallback):
    """Marks each checkpoint complete once every process has written its part of it, with the step records this
    process has kept (since the run started, or since it last resumed: what its manifest would hold), so that a
    run that ends after its last checkpoint and before its manifest is completed from them."""

    def __init__(self, steps: list | None = None):
        self.steps = steps if steps is not None else []
        """The run's StepLog dicts as they grow (reference.training.manifest.RunManifest.steps)."""

    def on_save(self, args, state, control, **kwargs):
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every process has written its part (each saves its own RNG state)
        if state.is_world_process_zero:
            mark_complete(Path(args.output_dir) / f"{PREFIX}{state.global_step}", self.steps)


def train_keeping_whole_checkpoints(trainer, resume_from: Path | None, checkpoint_dir: Path) -> None:
    """trainer.train; when it fails (a full disk, an interrupt), the checkpoint it was writing is removed, so only
    whole ones are left to --resume from and a full device gets its space back. A full device is named."""
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except BaseException as error:
        full = no_space(error, [checkpoint_dir]) if isinstance(error, Exception) else None
        remove_incomplete(checkpoint_dir)
        if full:
            raise InputError(f"--output {full}") from error
        raise


def complete_from(trainer, checkpoint: Path, reporter, say) -> None:
    """The trained weights of a run whose last checkpoint holds its last step, and its step records, into the run's
    reference.training.progress.ProgressReporter (as if it had watched those steps)."""
    step, planned = finished_training(checkpoint)
    say(
        f"--resume: {checkpoint.name} holds the run's last step ({step} of {planned}): training had finished "
        "before the run was recorded; its record is completed from that checkpoint, nothing is trained again"
    )
    trainer._load_from_checkpoint(str(checkpoint))  # the Trainer's own loading of a checkpoint's weights
    plan = steps.plan(steps.settings_from_training_arguments(trainer.args, reporter.records))
    reporter.step_plan = plan.to_dict()
    reporter.steps[:] = recorded_steps(checkpoint)
