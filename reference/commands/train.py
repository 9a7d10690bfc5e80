"""`train`: LoRA/QLoRA supervised fine-tuning with a recipe (claims P1, P3, C11-C16, L2)."""

from __future__ import annotations

import argparse

from reference.commands.arguments import add_run_options, run_method
from reference.settings.recipes import builtin_names

NAME = "train"
HELP = "LoRA/QLoRA supervised fine-tuning with a recipe (claims P1, P3, C11-C16, L2)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", required=True, help=f"recipe name ({', '.join(builtin_names())}) or a TOML file")
    p.add_argument("--model", required=True, help="local model directory (weights + tokenizer)")
    add_run_options(p)


def run(args: argparse.Namespace) -> int:
    from reference.methods import train

    return run_method(args, train.run, train.parse_columns(args.columns))
