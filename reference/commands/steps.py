"""`steps`: the step plan a transformers.Trainer run makes, without running it (claims P9, P10, L4)."""

from __future__ import annotations

import argparse
import json
import math
import sys

from reference.commands.arguments import finite

NAME = "steps"
HELP = "the step plan a transformers.Trainer run makes (claims P9, P10, L4)"


def _warmup(value: str) -> float:
    """--warmup: whole steps (an int) or a fraction of the total steps (< 1)."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--warmup takes steps (int) or a fraction < 1, got {value!r}") from None
    if not math.isfinite(number) or number < 0 or (number >= 1 and number != int(number)):
        raise argparse.ArgumentTypeError(f"--warmup takes steps (int) or a fraction < 1, got {value!r}")
    return number


def _steps_or_fraction(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of steps or a fraction < 1, got {value!r}") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"expected a number of steps or a fraction < 1, got {value!r}")
    return number


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--records", type=int, required=True, help="rows in the training set")
    p.add_argument("--batch-size", type=int, required=True, help="per_device_train_batch_size")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient_accumulation_steps (default 1)")
    p.add_argument("--epochs", type=finite, default=3.0, help="num_train_epochs, may be fractional (default 3.0)")
    p.add_argument("--max-steps", type=int, default=-1, help="total optimizer steps; overrides --epochs when > 0")
    p.add_argument("--world-size", type=int, default=1, help="data-parallel processes (default 1)")
    p.add_argument("--warmup", type=_warmup, default=0, help="warmup steps (int) or fraction < 1 of total (default 0)")
    p.add_argument("--save-strategy", default="steps", help="steps | epoch | no (default steps)")
    p.add_argument(
        "--save-steps",
        type=_steps_or_fraction,
        default=500,
        help="steps between checkpoints, or a fraction < 1 (default 500)",
    )
    p.add_argument("--save-total-limit", type=int, default=None, help="newest checkpoints kept (default: all)")
    p.add_argument("--logging-strategy", default="steps", help="steps | epoch | no (default steps)")
    p.add_argument(
        "--logging-steps",
        type=_steps_or_fraction,
        default=500,
        help="steps between loss log lines, or a fraction < 1 (default 500)",
    )
    p.add_argument("--logging-first-step", action="store_true", help="also log after step 1")
    p.add_argument("--drop-last", action="store_true", help="dataloader_drop_last")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    from reference import steps

    settings = steps.StepSettings(
        records=args.records,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        epochs=args.epochs,
        max_steps=args.max_steps,
        world_size=args.world_size,
        warmup=args.warmup,
        save_strategy=args.save_strategy,
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        logging_strategy=args.logging_strategy,
        logging_steps=args.logging_steps,
        logging_first_step=args.logging_first_step,
        drop_last=args.drop_last,
    )
    result = steps.plan(settings)
    if result.warmup_warning():
        print(result.warmup_warning(), file=sys.stderr)
    if args.json:
        print(json.dumps({**result.to_dict(), "settings": settings.__dict__}, indent=2))
    else:
        print(steps.format_table(settings, result))
    return 0
