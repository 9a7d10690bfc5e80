"""Inputs are never overwritten, outputs never half-written (claim X6).

Every command that writes names its inputs and outputs once, before any work starts:

* an output equal to an input, inside an input directory, or holding an input inside it is refused, naming
  both arguments (`--output` over `--model` would overwrite the base weights; over `--tasks`, the tasks);
* an output whose nearest existing folder cannot be written is refused before the expensive work;
* files are written under a temporary name beside their final one and renamed when complete
  (`write_text_atomic`), so a reader never sees half a file under the final name. A temporary name is unique
  (made by mkstemp/mkdtemp), so it is never another run's or an input; what is renamed into place gets the
  permissions the user's umask gives a new file (mkstemp's are private), as its neighbours have.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path

from reference.errors import InputError


def _overlap(output: Path, source: Path) -> str | None:
    if output == source:
        return "is"
    if source in output.parents:
        return "is inside"
    if output in source.parents:
        return "holds"
    return None


def check_outputs(outputs: dict[str, str | Path | None], inputs: dict[str, str | Path | None]) -> None:
    """Refuse outputs that would overwrite an input or cannot be written; names are the arguments' flags."""
    given_inputs = {name: Path(p).resolve() for name, p in inputs.items() if p is not None}
    given_outputs = {name: Path(p).resolve() for name, p in outputs.items() if p is not None}
    for out_name, output in given_outputs.items():
        for in_name, source in given_inputs.items():
            relation = _overlap(output, source)
            if relation:
                raise InputError(
                    f"{out_name} {outputs[out_name]} {relation} {in_name} {inputs[in_name]}: an output "
                    "never overwrites an input; choose another path"
                )
        require_writable(out_name, output)


def require_writable(name: str, path: Path) -> None:
    """The nearest folder of `path` that exists must be a directory this process can write into."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    if existing == path and not path.is_dir():
        existing = path.parent
    if not existing.is_dir():
        raise InputError(f"{name} {path}: {existing} is a file, not a folder")
    try:  # a file made and removed there: os.access says yes to root even where the file system says no
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise InputError(f"{name} {path}: {existing} is not writable ({error.strerror})") from None


def require_kind(name: str, path: Path, directory: bool) -> None:
    """An output that exists already must be what the command writes there: a folder, or a file."""
    if path.is_symlink() and not path.exists():
        target = os.readlink(path)
        raise InputError(f"{name} {path}: a broken symbolic link is there (to {target}); choose another path")
    if directory and path.exists() and not path.is_dir():
        raise InputError(f"{name} {path}: a file is there; this command writes a directory. Choose another path")
    if not directory and path.is_dir():
        raise InputError(f"{name} {path}: a directory is there; this command writes a file. Choose another path")


NEARLY_FULL = 1 << 20
"""Bytes free below which a device that a failed write was writing to is taken to be full."""


WRITE_ERRORS = ("OSError", "RuntimeError", "SafetensorError")
"""What a failed write is raised as: Python's own, torch's serialisation (RuntimeError, at times with no errno), and
safetensors'."""
NOT_A_WRITE = ("out of memory", "allocate memory")


def no_space(error: BaseException, outputs: list[Path]) -> str | None:
    """Whether `error` came from running out of space while writing one of `outputs`: ENOSPC anywhere in its chain
    (safetensors and torch re-raise it under their own types, torch sometimes with no errno at all, so a write error
    while a device holding an output has under a MiB free counts too; an out-of-memory error never does). The
    message names the output and the space left."""
    chain, seen = [], error
    while seen is not None and len(chain) < 8:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    said = any(getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e) for e in chain)
    a_write = any(type(e).__name__ in WRITE_ERRORS for e in chain)
    if not said and (not a_write or any(words in str(error).lower() for words in NOT_A_WRITE)):
        return None
    for output in outputs:
        existing = next((p for p in (output, *output.parents) if p.exists()), None)
        if existing is None:
            continue
        free = shutil.disk_usage(existing).free
        if said or free < NEARLY_FULL:
            return f"{output}: no space left on the device ({free:,} bytes free); free some space and run it again"
    return None


def umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def as_if_created(path: str | Path) -> None:
    """Give `path` (and what a folder holds) the mode open() or mkdir() would have given it under the umask."""
    path, mask = Path(path), umask()
    entries = [path, *path.rglob("*")] if path.is_dir() and not path.is_symlink() else [path]
    for entry in entries:
        if not entry.is_symlink():
            os.chmod(entry, (0o777 if entry.is_dir() else 0o666) & ~mask)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to a temporary file beside `path`, then rename it into place."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        as_if_created(temporary)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def complete_directory(target: str | Path):
    """A folder to save into (`save_pretrained`) whose files are moved into `target` only once all are
    written: a crash mid-save leaves `target` as it was, never a model with half its weights."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial"))
    try:
        yield partial
        target.mkdir(exist_ok=True)
        for entry in sorted(partial.iterdir()):
            as_if_created(entry)
            destination = target / entry.name
            if destination.is_dir() and not destination.is_symlink():
                shutil.rmtree(destination)
            os.replace(entry, destination)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
