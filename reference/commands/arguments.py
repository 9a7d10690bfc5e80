"""Argument types and argument groups shared by several commands.

Every number is validated where argparse reads it: a bad value is `argument --NAME: must be >= 1, got '0'`,
exit 2, before anything loads.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from reference.messages import say


def _number(value: str, kind: type) -> int | float:
    """VALUE read as an int or a float; inf and nan are refused: no count or rate is endless or undefined."""
    try:
        number = kind(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {'a whole number' if kind is int else 'a number'}, got {value!r}"
        ) from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {value!r}")
    return number


def finite(value: str) -> float:
    """An argparse type: any finite float (the command checks its own range)."""
    return _number(value, float)


def at_least(minimum: int | float, kind: type = int):
    """An argparse type: a finite `kind` >= minimum; argparse reports 'argument --NAME: must be >= ...', exit 2."""

    def check(value: str) -> int | float:
        number = _number(value, kind)
        if number < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value!r}")
        return number

    check.__name__ = f"at_least_{minimum}"
    return check


def positive_float(value: str) -> float:
    """An argparse type: a finite float > 0 (a learning rate, a beta, a number of epochs)."""
    number = _number(value, float)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value!r}")
    return number


positive_int = at_least(1)


def progress(total: int, description: str):
    """A tqdm bar on stderr when a person is watching (a terminal) and the input is long; else None."""
    if total < 2000 or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="rec", file=sys.stderr, mininterval=0.5)


def declare_paths(
    p: argparse.ArgumentParser, reads: tuple[str, ...] = (), writes: tuple[str, ...] = (), files: bool = False
) -> None:
    """Name a command's path arguments, for the checks the CLI makes before any work (reference/cli.py, X6): `reads`,
    those naming what it reads (checked when the path exists: a recipe may be a name, messages "-"); `writes`, those
    naming what it writes: files when `files`, else directories. No output may be one of its inputs."""
    p.set_defaults(reads=reads, writes=writes, writes_files=files)


def add_run_options(
    p: argparse.ArgumentParser,
    data: str = "records: JSONL/JSON/CSV/Parquet or a saved dataset folder",
    columns: str = "column map, e.g. instruction=input,response=output (default: magpie conversations or "
    "instruction/response)",
    sections: str = "lora.r=16, sft.max_seq_length=512",
) -> None:
    """What every training command takes besides its recipe and model: data, output, columns, resume or overwrite,
    and key=value overrides of the recipe (reference.training.runs)."""
    declare_paths(p, reads=("model", "adapter", "data", "recipe"), writes=("output",))
    p.add_argument("--data", required=True, help=data)
    p.add_argument(
        "--output", required=True, help="directory for the adapter, tokenizer, checkpoints/ and manifest.json"
    )
    p.add_argument("--columns", default=None, help=columns)
    again = p.add_mutually_exclusive_group()
    again.add_argument(
        "--resume",
        action="store_true",
        help="carry on from the newest complete checkpoint in OUTPUT/checkpoints (the same model, data "
        "and settings, checked)",
    )
    again.add_argument(
        "--overwrite",
        action="store_true",
        help="start again in an OUTPUT that holds a run: its files are removed first",
    )
    add_cpu_dtype(p)
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help=f"recipe overrides: a TrainingArguments name, or section.key ({sections})",
    )


def add_cpu_dtype(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cpu-dtype",
        choices=["auto", "recipe"],
        default="auto",
        help="on a CPU, auto computes in fp32 where this CPU and model train faster so (a bf16 recipe is kept only "
        "with AMX and a hidden size >= 512; reference/training/cpu.py), recipe keeps the recipe's (default: auto)",
    )


def recipe_of(args: argparse.Namespace):
    """The command's --recipe with its key=value overrides applied, every setting checked
    (reference.settings.recipes)."""
    from reference.settings import recipes

    recipe = recipes.apply_overrides(recipes.load_recipe(args.recipe), args.overrides)
    recipes.check_numbers(recipe)
    return recipe


def for_this_machine(args: argparse.Namespace, recipe):
    """The recipe as a command runs it here (reference.training.cpu): on a CPU, torch's threads lowered to the CPUs
    the process may use (a warning when other work holds some), and the compute dtype this CPU trains --model
    fastest in (unless --cpu-dtype recipe); each said."""
    import torch

    from reference.modeling import shapes
    from reference.training import cpu

    if torch.cuda.is_available():
        return recipe
    threads = cpu.use_threads(cpu.choose_threads())
    say(f"cpu: {threads.threads} torch threads ({threads.reason})")
    if threads.warning:
        say(f"cpu: {threads.warning}")
    if getattr(args, "cpu_dtype", "auto") == "recipe":
        return recipe
    try:
        config = shapes.load_config(args.model)
    except (OSError, ValueError):
        return recipe  # the run refuses the model directory itself, by name
    hidden = config.get("hidden_size") or config.get("text_config", {}).get("hidden_size")
    adapted, why = cpu.adapt_dtype(recipe, hidden)
    if why:
        say(f"cpu: fp32 compute instead of the recipe's half precision: {why}")
    return adapted


def run_method(args: argparse.Namespace, run, columns: dict | None, **extra) -> int:
    """A training command's work: the recipe with its overrides (recipe_of) as this machine runs it
    (for_this_machine), the method's `run` on --model, --data and --output with --resume or --overwrite
    (reference.training.runs), and the run's summary printed."""
    record = run(
        for_this_machine(args, recipe_of(args)),
        args.model,
        args.data,
        args.output,
        columns=columns,
        resume=args.resume,
        overwrite=args.overwrite,
        **extra,
    )
    print_run(record)
    return 0


def print_run(record) -> None:
    """A training run's summary as JSON on stdout, from the main process only under torchrun."""
    from reference.training import runs

    if os.environ.get("RANK", "0") != "0":
        return
    print(json.dumps(runs.summary(record), indent=2))
