"""`filter`: the LLM2024 quality filter over a JSONL file (claims C3-C9).

The per-rule counts come last on stdout; the full character table of the kept records is written to a
file beside --output (the top few are shown)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from reference.commands.arguments import positive_int, progress
from reference.errors import InputError

NAME = "filter"
HELP = "the LLM2024 quality filter (claims C3-C9)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="JSONL: magpie rows (conversations) or instruction/response rows")
    p.add_argument("--output", required=True, help="JSONL of kept records: id (if any), instruction, response")
    p.add_argument("--rejects", required=True, help="JSONL of dropped rows with the rule that dropped each")
    p.add_argument(
        "--recipe", default="llm2024", help="recipe whose [filter] constants to use (default llm2024, the seed's)"
    )
    p.add_argument("--strict", action="store_true", help="an unreadable line is an error (exit 2) instead of a reject")
    p.add_argument(
        "--workers", type=positive_int, default=None, help="processes to use, >= 1 (default: one per available core)"
    )
    p.add_argument("--json", action="store_true", help="print counts and the character table as JSON")


def _not_a_directory(path: str, flag: str) -> None:
    target = Path(path)
    if target.is_dir():
        raise InputError(f"{flag} {path}: is a directory")
    target.parent.mkdir(parents=True, exist_ok=True)


def run(args: argparse.Namespace) -> int:
    from reference import filters, recipes

    config = filters.FilterConfig.from_recipe(recipes.load_recipe(args.recipe))
    source = Path(args.input)
    if not source.is_file():
        raise InputError(f"--input {args.input}: no such file")
    _not_a_directory(args.output, "--output")
    _not_a_directory(args.rejects, "--rejects")
    if Path(args.output).resolve() == Path(args.rejects).resolve():
        raise InputError(f"--output and --rejects are the same file: {args.output}")
    filters.keep_freed_memory()
    bar = progress(source.stat().st_size // 800, "filter: language check")  # about 800 bytes a record
    result = filters.filter_file(
        args.input,
        args.output,
        args.rejects,
        config,
        workers=args.workers,
        strict=args.strict,
        progress=bar.update if bar else None,
    )
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
            "char_table": result.char_table,
        }
        print(json.dumps(report, ensure_ascii=False))
        return 0
    lines = ["character frequencies of the kept records:"]
    lines += [f"{char}: {count}" for char, count in result.char_table]
    lines += [f"{rule:>16}: {count}" for rule, count in counts.items()]
    lines += [
        f"pass-1 NG list: {result.ng_list_size} strings; pass-2 rare characters: {result.pass2_ng_size}",
        f"kept {counts['kept']} of {counts['input_rows']} rows -> {args.output}; rejects -> {args.rejects}",
    ]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
