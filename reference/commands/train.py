"""`train`: LoRA/QLoRA supervised fine-tuning with a recipe (claims P1, P3, C11-C16, L2)."""

from __future__ import annotations

import argparse

from reference.commands.arguments import add_run_options, print_run, recipe_of
from reference.settings.recipes import builtin_names

NAME = "train"
HELP = "LoRA/QLoRA supervised fine-tuning with a recipe (claims P1, P3, C11-C16, L2)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", required=True, help=f"recipe name ({', '.join(builtin_names())}) or a TOML file")
    p.add_argument("--model", required=True, help="local model directory (weights + tokenizer)")
    add_run_options(p)


def run(args: argparse.Namespace) -> int:
    from reference.methods import train

    recipe = recipe_of(args)
    columns = train.parse_columns(args.columns)
    record = train.run(
        recipe, args.model, args.data, args.output, columns=columns, resume=args.resume, overwrite=args.overwrite
    )
    print_run(record)
    return 0
