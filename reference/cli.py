"""The command line: `python -m reference <command>` (also installed as `ftref`).

Each command lives in `reference/commands/<command>.py`: its arguments beside its handler. Here the parser
is assembled, every path argument is checked before any work (no output over an input, every output
writable: X6), and bad input becomes exit code 2 with one message on stderr naming the file, row or
argument; no traceback. So does a write that fails for lack of space or permission (naming the path), and a
standard output that cannot be written (`> /dev/full`). A reader that closes standard output early (`| head`)
ends nothing: the rest of the output is dropped and the command keeps its exit code (verify's 0 or 1).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

from reference import quiet
from reference.commands import COMMANDS
from reference.errors import InputError


def build_parser() -> argparse.ArgumentParser:
    from reference import __version__

    parser = argparse.ArgumentParser(prog="ftref", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"ftref {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        p = sub.add_parser(command.NAME, help=command.HELP, description=command.__doc__)
        command.add_arguments(p)
        p.set_defaults(func=command.run)
    return parser


WRITE_FAILURES = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
}


class StandardOutput:
    """sys.stdout that outlives its reader: once the reader has gone (EPIPE), what is left is dropped (the file
    descriptor then points at /dev/null, so the interpreter's last flush cannot fail either); any other failure to
    write it (ENOSPC on /dev/full) is an error naming standard output."""

    def __init__(self, stream):
        self.stream, self.reader_gone = stream, False

    def _guarded(self, action, *args):
        if self.reader_gone:
            return None
        try:
            return action(*args)
        except BrokenPipeError:
            self._drop_the_rest()
        except OSError as error:
            self._drop_the_rest()
            raise InputError(f"standard output: cannot be written ({error.strerror})") from None
        return None

    def _drop_the_rest(self) -> None:
        self.reader_gone = True
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())
        except (OSError, ValueError, AttributeError):  # a stream with no descriptor (a test's capture)
            pass

    def write(self, text: str):
        self._guarded(self.stream.write, text)
        return len(text)

    def flush(self) -> None:
        self._guarded(self.stream.flush)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def write_failure(error: OSError) -> str | None:
    """A message for a write that failed for lack of room (or on a read-only device), naming the path; None else."""
    reason = WRITE_FAILURES.get(error.errno)
    if reason is None:
        return None
    where = error.filename or "an output file"
    return f"{where}: {reason}; nothing half-written is left under an output's name"


def no_space_for(args: argparse.Namespace, error: BaseException) -> str | None:
    from reference import paths

    outputs = [Path(getattr(args, name)) for name in getattr(args, "writes", ()) if getattr(args, name, None)]
    return paths.no_space(error, outputs)


def interrupted(args: argparse.Namespace) -> str:
    """What was interrupted and, for a run that can be carried on, what to run next."""
    if hasattr(args, "resume"):
        from reference.training import rundir

        if not rundir.holds_a_run(Path(args.output)):
            return "interrupted before the run was recorded; run the same command again"
        return (
            "interrupted; to carry the run on, run the same command with --resume (from its newest complete "
            "checkpoint, or from step 0 if none was written yet)"
        )
    return "interrupted; outputs are whole or absent, run the command again"


def main(argv: list[str] | None = None) -> int:
    quiet.install()  # before any model loads: third-party noise off (reference/quiet.py)
    given, sys.stdout = sys.stdout, StandardOutput(sys.stdout)
    try:
        return run_command(argv)
    finally:
        sys.stdout = given


def run_command(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_paths(args)
        code = args.func(args)
        end_process_group()
        sys.stdout.flush()
        return code
    except InputError as error:
        print(f"ftref {args.command}: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 - only a failure to write is answered here; the rest is raised
        message = write_failure(error) if isinstance(error, OSError) else None
        message = message or no_space_for(args, error)
        if message is None:
            raise
        print(f"ftref {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ftref {args.command}: {interrupted(args)}", file=sys.stderr)
        return 130


def check_paths(args: argparse.Namespace) -> None:
    """Before any work: no output over an input, every output writable and of its kind (X6; reference/paths.py), the
    paths being those each command declares (reference.commands.arguments.declare_paths)."""
    from reference import paths

    def given(names, existing):
        values = {f"--{name}": getattr(args, name, None) for name in names}
        return {flag: v for flag, v in values.items() if v is not None and (not existing or Path(v).exists())}

    # A recipe or messages argument may be a name or "-", not a path: only paths that exist are inputs.
    outputs = given(getattr(args, "writes", ()), existing=False)
    paths.check_outputs(outputs, given(getattr(args, "reads", ()), existing=True))
    for flag, value in outputs.items():
        paths.require_kind(flag, Path(value), directory=not args.writes_files)


def end_process_group() -> None:
    """Under torchrun the Trainer opens a process group and nothing closes it; its gloo threads then live
    into interpreter shutdown, where torch can abort one rank (SIGABRT) after a successful run. Close it
    here, once every rank has finished its command. Imports nothing when torch was never loaded (filter,
    render, steps)."""
    if "torch.distributed" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
