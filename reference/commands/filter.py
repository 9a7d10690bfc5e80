"""`filter`: the LLM2024 quality filter over a JSONL file (claims C3-C9).

The seed prints the character table of the kept records, one line per character (hundreds of lines);
here the whole table goes to a file beside --output (`<output stem>.chars.tsv`), stdout shows its top
few, and the per-rule counts come last. `--json` prints the counts and the whole table as JSON.

The three files are written under new hidden names beside their targets and renamed into place together
once all are whole (X6): a full disk, a read-only folder, SIGTERM (exit 143) or Ctrl-C (exit 130) leaves no
temporary file and every target as it was, and says so in one line; the workers end with the command."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from reference.commands.arguments import declare_paths, positive_int, progress
from reference.errors import InputError

NAME = "filter"
HELP = "the LLM2024 quality filter (claims C3-C9)"
TOP_CHARACTERS = 10


def add_arguments(p: argparse.ArgumentParser) -> None:
    declare_paths(p, reads=("input", "recipe"), writes=("output", "rejects"), files=True)
    p.add_argument("--input", required=True, help="JSONL: magpie rows (conversations) or instruction/response rows")
    p.add_argument(
        "--output",
        required=True,
        help="JSONL of kept records: id (if any), instruction, response; their character table goes beside it "
        "as <output stem>.chars.tsv",
    )
    p.add_argument("--rejects", required=True, help="JSONL of dropped rows with the rule that dropped each")
    p.add_argument(
        "--recipe", default="llm2024", help="recipe whose [filter] constants to use (default llm2024, the seed's)"
    )
    p.add_argument("--strict", action="store_true", help="an unreadable line is an error (exit 2) instead of a reject")
    p.add_argument(
        "--workers", type=positive_int, default=None, help="processes to use, >= 1 (default: one per available core)"
    )
    p.add_argument("--json", action="store_true", help="print counts and the whole character table as JSON")


def char_table_path(output: str) -> Path:
    """Where the character table of the records kept in `output` goes: kept.jsonl -> kept.chars.tsv."""
    return Path(output).with_suffix(".chars.tsv")


def shown(char: str) -> str:
    """A character as a person can read it on one line: \\n, \\t, \\u2028 and the like escaped."""
    return char if char.isprintable() else char.encode("unicode_escape").decode("ascii")


def char_table_tsv(table: list[tuple[str, int]]) -> str:
    """The table as TSV, most common first: the character (escaped when unprintable), its code point, count."""
    lines = ["character\tcode_point\tcount"]
    lines += [f"{shown(char)}\tU+{ord(char):04X}\t{count}" for char, count in table]
    return "\n".join(lines) + "\n"


def _outputs(args: argparse.Namespace) -> Path:
    """Refuse before any work one file for two outputs, or a character table over an input (X6; the CLI has
    checked --output and --rejects, their kind included: paths.require_kind); return where the table goes."""
    from reference import paths

    for path in (args.output, args.rejects):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    if Path(args.output).resolve() == Path(args.rejects).resolve():
        raise InputError(f"--output and --rejects are the same file: {args.output}")
    table = char_table_path(args.output)
    if table.resolve() == Path(args.rejects).resolve():
        raise InputError(f"--rejects {args.rejects} is where the character table of --output goes ({table})")
    inputs = {"--input": args.input, "--recipe": args.recipe}
    paths.check_outputs({"the character table": table}, {k: v for k, v in inputs.items() if Path(v).exists()})
    return table


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt, so that the run's temporary
    files are removed and its workers stopped on the way out."""


def _terminated(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the clean-up takes a moment: let it finish
    raise Terminated


def run(args: argparse.Namespace) -> int:
    previous = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, _terminated)
    except ValueError:  # not the main thread: SIGTERM keeps its handler
        previous = _terminated
    try:
        return _run(args)
    except Terminated:
        print(f"ftref {NAME}: terminated (SIGTERM); outputs are whole or absent, run it again", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        if previous is not _terminated:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _run(args: argparse.Namespace) -> int:
    from reference.records import filter_workers, filters
    from reference.settings import recipes
    from reference.staged import StagedFiles

    config = filters.FilterConfig.from_recipe(recipes.load_recipe(args.recipe))
    source = Path(args.input)
    if not source.is_file():
        raise InputError(f"--input {args.input}: no such file")
    table_path = _outputs(args)
    filter_workers.keep_freed_memory()
    targets = {"--output": args.output, "--rejects": args.rejects, "the character table": table_path}
    bar = progress(source.stat().st_size // 800, "filter: language check")  # about 800 bytes a record
    try:
        with StagedFiles(targets) as staged:
            result = filter_workers.filter_file(
                args.input,
                args.output,
                args.rejects,
                config,
                workers=args.workers,
                strict=args.strict,
                progress=bar.update if bar else None,
                staged=staged,
            )
            staged.write(table_path, char_table_tsv(result.char_table).encode())
    finally:
        if bar:
            bar.close()
    counts = result.counts
    if args.json:
        report = {
            "counts": counts,
            "ng_list_size": result.ng_list_size,
            "pass2_ng_size": result.pass2_ng_size,
            "output": args.output,
            "rejects": args.rejects,
            "char_table_file": str(table_path),
            "char_table": result.char_table,
        }
        print(json.dumps(report, ensure_ascii=False))
        return 0
    top = result.char_table[:TOP_CHARACTERS]
    lines = [f"character frequencies of the kept records, top {len(top)} of {len(result.char_table)}:"]
    lines += [f"{count:>12}  U+{ord(char):04X}  {shown(char)}" for char, count in top]
    lines += [f"the whole table: {table_path}", ""]
    lines += [f"{rule:>16}: {count}" for rule, count in counts.items()]
    lines += [
        f"pass-1 NG list: {result.ng_list_size} strings; pass-2 rare characters: {result.pass2_ng_size}",
        f"kept {counts['kept']} of {counts['input_rows']} rows -> {args.output}; rejects -> {args.rejects}",
    ]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
