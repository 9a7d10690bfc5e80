"""Several files written under new hidden names beside their targets and renamed into place together once all
are whole (claim X6): a failed or interrupted command (a full disk, SIGTERM, Ctrl-C) removes them and leaves every
target as it was. The filter writes its output, rejects and character table this way (reference.records.filter_workers,
reference.commands.filter); `paths.write_text_atomic` does the same for one file written at once.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import tempfile
from pathlib import Path

from reference.errors import InputError
from reference.paths import as_if_created, require_kind


def write_at(path: str, offset: int, data: bytes) -> None:
    """Write `data` into the existing file `path` from byte `offset` on (other processes write elsewhere).
    An OSError names `path` (os.pwrite's own does not), so that the caller can say which file failed."""
    try:
        fd = os.open(path, os.O_WRONLY)
        try:
            view = memoryview(data)
            while view:
                written = os.pwrite(fd, view, offset)
                view, offset = view[written:], offset + written
        finally:
            os.close(fd)
    except OSError as error:
        raise OSError(error.errno, error.strerror, path) from None


class StagedFiles:
    """Files written under new hidden names beside their targets (`.NAME.XXXXXXXX.partial`, made by mkstemp:
    never a file that exists, so never an input) and renamed into place together once all are whole (X6).

    As a context manager: on leaving without an error every target gets its file; on any error, a signal
    included, every temporary file is removed and the targets are left as they were. An OSError while
    writing one of them (ENOSPC, EROFS, EACCES, ...) becomes an InputError naming the target by the name
    the user knows it by (`targets`' keys: "--output", "the character table"), its path and the errno."""

    def __init__(self, targets: dict[str, str | Path]):
        self.names = {str(path): name for name, path in targets.items()}
        self.temporary: dict[str, str] = {}

    def __enter__(self) -> StagedFiles:
        for target, name in self.names.items():  # a folder where a file goes fails only at the rename: check first
            require_kind(name, Path(target), directory=False)
        try:
            for target in self.names:
                folder, name = os.path.split(os.path.abspath(target))
                try:
                    handle, path = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".partial")
                except OSError as error:
                    raise self._named(OSError(error.errno, error.strerror, target)) from None
                os.close(handle)
                self.temporary[target] = path
        except BaseException:
            self.discard()
            raise
        return self

    def path(self, target: str | Path) -> str:
        """Where `target`'s bytes go until the files are renamed into place."""
        return self.temporary[str(target)]

    def write(self, target: str | Path, data: bytes) -> None:
        """The whole of `target`'s file, written at once."""
        write_at(self.path(target), 0, data)

    def commit(self) -> None:
        """Rename every file into place, Ctrl-C and SIGTERM held back until all are renamed."""
        with held_signals():
            try:
                for target, path in list(self.temporary.items()):
                    as_if_created(path)  # the mode open() would have given: mkstemp's files are private (0600)
                    os.replace(path, target)
                    del self.temporary[target]
            except OSError as error:
                named = self._named(error, renamed=len(self.names) - len(self.temporary))
                self.discard()
                raise named from None

    def discard(self) -> None:
        for path in self.temporary.values():
            try:
                os.unlink(path)
            except OSError:
                pass
        self.temporary.clear()

    def _named(self, error: OSError, renamed: int = 0) -> Exception:
        """The error as an InputError naming the target, when it is about one of these files."""
        by_path = {path: target for target, path in self.temporary.items()}
        target = by_path.get(error.filename, error.filename if error.filename in self.names else None)
        if target is None:
            return error
        code = errno.errorcode.get(error.errno, str(error.errno))
        outcome = f"{renamed} of the outputs were replaced" if renamed else "no output was changed"
        return InputError(f"{self.names[target]} {target}: cannot write ({error.strerror}, {code}); {outcome}")

    def __exit__(self, kind, error, trace) -> None:
        if kind is None:
            self.commit()
            return
        named = self._named(error) if isinstance(error, OSError) else error
        self.discard()
        if named is not error:
            raise named from None


HELD = {signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def held_signals():
    """Ctrl-C and SIGTERM held back (blocked, delivered on leaving) where an interruption would do harm: in
    the middle of the renames, or in a worker just forked, before it has set its own handlers (Python's
    handler, inherited, would raise KeyboardInterrupt there and print a traceback)."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, HELD)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
