"""`steps`: the step plan a transformers.Trainer run makes, without running it (claims P9, P10, L4)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys

from reference.commands.arguments import finite
from reference.training.steps import StepSettings, format_table, plan

NAME = "steps"
HELP = "the step plan a transformers.Trainer run makes (claims P9, P10, L4)"


def warmup_steps_or_fraction(value: str) -> float:
    """--warmup: whole steps (an int) or a fraction of the total steps (< 1)."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--warmup takes steps (int) or a fraction < 1, got {value!r}") from None
    if not math.isfinite(number) or number < 0 or (number >= 1 and number != int(number)):
        raise argparse.ArgumentTypeError(f"--warmup takes steps (int) or a fraction < 1, got {value!r}")
    return number


def steps_or_fraction(value: str) -> float:
    """--save-steps, --logging-steps: any finite number (StepSettings checks that it is > 0 and whole if >= 1)."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of steps or a fraction < 1, got {value!r}") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"expected a number of steps or a fraction < 1, got {value!r}")
    return number


# How a flag's text becomes the field's value: by field name where the field needs its own check, else by type.
READ_BY_NAME = {"warmup": warmup_steps_or_fraction, "save_steps": steps_or_fraction, "logging_steps": steps_or_fraction}
READ_BY_TYPE = {"int": int, "int | None": int, "float": finite, "str": str}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per StepSettings field, litgpt's pattern: `batch_size` -> `--batch-size`, its help the field's
    metadata help, its default the field's. A field without a default is a required flag, a bool one a switch.
    A bad value ends in exit code 2 naming the flag: from the readers above, or from StepSettings' own checks."""
    for field in dataclasses.fields(StepSettings):
        flag, doc = "--" + field.name.replace("_", "-"), field.metadata["help"].replace("%", "%%")
        if field.default is dataclasses.MISSING:
            p.add_argument(flag, type=READ_BY_TYPE[field.type], required=True, help=f"{doc} (required)")
        elif field.type == "bool":
            p.add_argument(flag, action="store_true", help=f"{doc} (default: off)")
        else:
            read = READ_BY_NAME.get(field.name, READ_BY_TYPE[field.type])
            p.add_argument(flag, type=read, default=field.default, help=f"{doc} (default: {field.default})")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    settings = StepSettings(**{field.name: getattr(args, field.name) for field in dataclasses.fields(StepSettings)})
    result = plan(settings)
    if result.warmup_warning():
        print(result.warmup_warning(), file=sys.stderr)
    if args.json:
        print(json.dumps({**result.to_dict(), "settings": dataclasses.asdict(settings)}, indent=2))
    else:
        print(format_table(settings, result))
    return 0
