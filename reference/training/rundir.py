"""A run directory belongs to one run (claim X5).

* While a run writes its directory it holds `.lock` (created exclusively, holding its process id); a second
  run into the directory is refused at once, naming the holder. A lock whose process is gone is stale: it is
  named and taken over.
* A directory that holds a run (its `run.json`, written when training starts, or a finished run's
  `manifest.json`) is used again only with `--resume` (carry on from its newest complete checkpoint) or
  `--overwrite` (start again: the old run's own files are removed first, and nothing else: its record, its
  checkpoints, a merged base, and the files its save wrote, as its manifest lists them, or by the names
  `save_pretrained` gives them when the run ended before its manifest). Other files in it are kept and named.
* A directory that exists, holds no run and is not empty is refused, with or without `--overwrite`: a run
  never mixes its files with a user's, and `--overwrite` never removes what no run wrote.
* `--resume` compares what the checkpoint's run recorded in `run.json` (model weights, data and settings)
  with what the new command would train, and refuses on any difference, naming each.

Under torchrun only the main process (RANK 0) takes the lock and writes `run.json`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
from pathlib import Path

from reference.errors import InputError
from reference.paths import write_text_atomic
from reference.training import manifest

LOCK = ".lock"
RUN = "run.json"
FINISHED = manifest.FILE
CHECKPOINTS = "checkpoints"
MERGED_BASE = "merged-base"
"""The base `continue --mode merge` merges into the run directory before it trains on it."""
RECORDS = (RUN, FINISHED, CHECKPOINTS, MERGED_BASE)
"""What every run writes besides the files it saves."""
SAVED_NAMES = (
    "adapter_model.safetensors",
    "adapter_config.json",
    "README.md",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
)
"""What peft's and transformers' save_pretrained write for a run with no manifest to list its files."""
PARTIAL = ".*.partial"
"""What the project's write-then-rename leaves when killed mid-write (reference.paths, reference.staged)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _take_lock(directory: Path, say) -> Path:
    lock = directory / LOCK
    for _ in range(2):
        try:
            handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            text = lock.read_text(errors="replace").strip()
            holder = int(text) if text.isdigit() else None
            if holder is not None and _alive(holder):
                raise InputError(
                    f"--output {directory}: another run (process {holder}) is writing this directory; "
                    f"wait for it, or choose another directory"
                ) from None
            say(f"--output {directory}: removing a stale lock of process {text or '?'}, which is gone")
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(handle, "w") as file:
            file.write(str(os.getpid()))
        return lock
    raise InputError(f"--output {directory}: could not take the run lock {lock}")


def holds_a_run(directory: Path) -> bool:
    return (directory / RUN).is_file() or (directory / FINISHED).is_file()


def is_finished(directory: str | Path) -> bool:
    """A run whose manifest was written: it trained every step and saved."""
    return (Path(directory) / FINISHED).is_file()


def others(directory: Path) -> list[str]:
    """Names in a directory that holds no run which a run did not leave there: everything but the lock, a temporary
    file of the project's (killed mid-write) and the merged base `continue --mode merge` writes before its run.json."""
    return sorted(
        entry.name
        for entry in directory.iterdir()
        if entry.name not in (LOCK, MERGED_BASE) and not fnmatch.fnmatchcase(entry.name, PARTIAL)
    )


def runs_own(directory: Path) -> list[Path]:
    """The entries of the run in `directory` that --overwrite removes: its records and what its save wrote."""
    saved: tuple = SAVED_NAMES
    try:
        listed = json.loads((directory / FINISHED).read_text(encoding="utf-8")).get("files")
        if isinstance(listed, list) and all(isinstance(name, str) for name in listed):
            saved = tuple(listed)
    except (OSError, ValueError, AttributeError):
        pass  # no manifest (the run ended before it), or an unreadable one: the names save_pretrained gives
    names, patterns = set(RECORDS), (*saved, PARTIAL)
    return [
        entry
        for entry in sorted(directory.iterdir())
        if entry.name in names or any(fnmatch.fnmatchcase(entry.name, pattern) for pattern in patterns)
    ]


def remove_run(directory: Path, say) -> None:
    """--overwrite: the old run's own files go; anything else in the directory stays, and is named."""
    for entry in runs_own(directory):
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    kept = sorted(entry.name for entry in directory.iterdir() if entry.name != LOCK)
    if kept:
        say(f"--overwrite: removed the old run's files from {directory}; kept what no run wrote: {', '.join(kept)}")


def check_reuse(directory: Path, resume: bool, overwrite: bool) -> None:
    """A directory holding a run is used again only with --resume or --overwrite; --resume needs a run; a
    directory with files of no run's is never written into."""
    if not holds_a_run(directory) and others(directory):
        listed = others(directory)
        shown = ", ".join(listed[:5]) + (f" and {len(listed) - 5} more" if len(listed) > 5 else "")
        raise InputError(
            f"--output {directory} is not empty and holds no run ({shown}): a run writes into a new or empty "
            "directory, or one holding a run; --overwrite removes a run's own files only. Choose another directory"
        )
    if holds_a_run(directory) and not (resume or overwrite):
        raise InputError(
            f"--output {directory} holds a run already: add --resume to carry it on, or "
            "--overwrite to start again (the old run's files are removed first)"
        )
    if resume and not holds_a_run(directory):
        raise InputError(f"--resume: {directory} holds no run to carry on ({RUN} missing)")


@contextlib.contextmanager
def claimed(directory: str | Path, resume: bool = False, overwrite: bool = False, say=print):
    """Hold `directory` for one run: the lock while the body runs, the reuse rules checked first."""
    if resume and overwrite:
        raise InputError("--resume and --overwrite: choose one (carry the run on, or start it again)")
    directory = Path(directory)
    if os.environ.get("RANK", "0") != "0":  # torchrun: the main process holds the directory for all
        yield directory
        return
    directory.mkdir(parents=True, exist_ok=True)
    lock = _take_lock(directory, say)
    try:
        check_reuse(directory, resume, overwrite)
        if overwrite and holds_a_run(directory):
            remove_run(directory, say)
        yield directory
    finally:
        lock.unlink(missing_ok=True)


JOB = ".ftref-job"
"""Marks a folder the main job (`reproduce`) writes its stages, report and runs into."""


def job_folder(directory: str | Path) -> Path:
    """A folder for a job of several runs and files (`reproduce`): new, empty, or one such a job wrote before (its
    JOB marker, or, from before the marker, its summary.json and report.md). A folder of a user's is refused, naming
    what is in it: the job would replace files of the names it writes (report.md, summary.json, ...)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    earlier = (directory / JOB).is_file() or all((directory / name).is_file() for name in ("summary.json", "report.md"))
    found = others(directory)
    if found and not earlier:
        shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        raise InputError(
            f"--output {directory} is not empty and was not written by this job ({shown}); choose a new or empty "
            "folder (the job writes report.md, summary.json and more there)"
        )
    write_text_atomic(directory / JOB, "written by `ftref reproduce`; it may write here again\n")
    return directory


def recorded_device(directory: str | Path) -> dict:
    """The `device` part of a run's run.json (threads it began with); {} where there is none to read. A damaged
    run.json is refused by write_or_check."""
    try:
        device = json.loads((Path(directory) / RUN).read_text(encoding="utf-8")).get("device", {})
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        return {}
    return device if isinstance(device, dict) else {}


def write_or_check(directory: str | Path, what_runs: dict, resume: bool) -> None:
    """Write run.json (model, data, settings) for a new run; on --resume, refuse a different one."""
    path = Path(directory) / RUN
    what_runs = json.loads(json.dumps(what_runs, default=str))  # compared as run.json holds it
    if not resume:
        write_text_atomic(path, json.dumps(what_runs, ensure_ascii=False, indent=1, default=str) + "\n")
        return
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
        manifest.what_ran_differences(recorded, recorded)  # the parts a record must have, of the right kinds
    except (OSError, ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as error:
        raise InputError(
            f"--resume: {path} is damaged ({type(error).__name__}: {error}); what the run trains cannot be "
            "checked against it, so it is not carried on: use --overwrite to start the run again"
        ) from None
    differences = [
        f"{part}: {line}"
        for part, lines in manifest.what_ran_differences(recorded, what_runs).items()
        for line in lines
    ]
    if differences:
        raise InputError(
            "--resume: this command differs from the run it would carry on; "
            + "; ".join(differences)
            + " (use --overwrite to start a new run instead)"
        )
