"""`continue`: seed 000's routes for training further from a saved LoRA adapter (claims A1-A3).

`--mode adapter` keeps training the same adapter, loaded trainable; `--mode merge` folds it into the base
(merged-base/ inside the run directory) and trains a fresh adapter on top (reference.methods.continuation)."""

from __future__ import annotations

import argparse

from reference.commands.arguments import add_run_options, for_this_machine, print_run, recipe_of

NAME = "continue"
HELP = "train further from a saved LoRA adapter (claims A1-A3)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default="llm2024", help="recipe name or TOML file (default llm2024)")
    p.add_argument("--model", required=True, help="the base model directory the adapter was trained on")
    p.add_argument("--adapter", required=True, help="the saved adapter directory")
    p.add_argument(
        "--mode",
        choices=["adapter", "merge"],  # reference.methods.continuation.MODES, not imported here: it loads torch
        default="adapter",
        help="adapter: keep training the same adapter (trainable); merge: fold it into the base, then "
        "train a fresh adapter (default adapter)",
    )
    add_run_options(p)


def run(args: argparse.Namespace) -> int:
    from reference.methods import continuation, train

    recipe = for_this_machine(args, recipe_of(args))
    manifest = continuation.continue_training(
        recipe,
        args.model,
        args.adapter,
        args.data,
        args.output,
        mode=args.mode,
        columns=train.parse_columns(args.columns),
        resume=args.resume,
        overwrite=args.overwrite,
    )
    print_run(manifest)
    return 0
