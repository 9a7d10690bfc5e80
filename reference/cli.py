"""The command line: `python -m reference <command>` (also installed as `ftref`).

Each command lives in `reference/commands/<command>.py`: its arguments beside its handler. Here the parser
is assembled, every path argument is checked before any work (no output over an input, every output
writable: X6), and bad input becomes exit code 2 with one message on stderr naming the file, row or
argument; no traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reference import quiet
from reference.commands import COMMANDS
from reference.errors import InputError

INPUT_ARGUMENTS = (
    "input",
    "model",
    "adapter",
    "data",
    "tasks",
    "shots",
    "embedder",
    "magpie",
    "qa",
    "new_data",
    "recipe",
    "messages",
    "tokenizer",
)
OUTPUT_ARGUMENTS = ("output", "rejects")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftref", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        p = sub.add_parser(command.NAME, help=command.HELP, description=command.__doc__)
        command.add_arguments(p)
        p.set_defaults(func=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    quiet.install()  # before any model loads: third-party noise off (reference/quiet.py)
    args = build_parser().parse_args(argv)
    try:
        check_paths(args)
        code = args.func(args)
        end_process_group()
        return code
    except InputError as error:
        print(f"ftref {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ftref {args.command}: interrupted", file=sys.stderr)
        return 130


def check_paths(args: argparse.Namespace) -> None:
    """Before any work: no output over an input, every output writable (X6; reference/paths.py)."""
    from reference import paths

    def given(names, existing):
        values = {f"--{name}": getattr(args, name, None) for name in names}
        return {flag: v for flag, v in values.items() if v is not None and (not existing or Path(v).exists())}

    # A recipe or messages argument may be a name or "-", not a path: only paths that exist are inputs.
    paths.check_outputs(given(OUTPUT_ARGUMENTS, existing=False), given(INPUT_ARGUMENTS, existing=True))


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
