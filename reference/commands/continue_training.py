"""`continue`: seed 000's routes for training further from a saved LoRA adapter (claims A1-A3).

`--mode adapter` keeps training the same adapter, loaded trainable; `--mode merge` folds it into the base
(merged-base/ inside the run directory) and trains a fresh adapter on top."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from reference.commands.arguments import add_run_options, print_run, say

NAME = "continue"
HELP = "train further from a saved LoRA adapter (claims A1-A3)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default="llm2024", help="recipe name or TOML file (default llm2024)")
    p.add_argument("--model", required=True, help="the base model directory the adapter was trained on")
    p.add_argument("--adapter", required=True, help="the saved adapter directory")
    p.add_argument(
        "--mode",
        choices=["adapter", "merge"],
        default="adapter",
        help="adapter: keep training the same adapter (trainable); merge: fold it into the base, then "
        "train a fresh adapter (default adapter)",
    )
    add_run_options(p)


def run(args: argparse.Namespace) -> int:
    from reference import lora, models, recipes, rundir, train

    recipe = recipes.apply_overrides(recipes.load_recipe(args.recipe), args.overrides)
    recipes.check_numbers(recipe)
    columns = train.parse_columns(args.columns)
    if args.mode == "adapter":
        record = train.run(
            recipe,
            args.model,
            args.data,
            args.output,
            columns=columns,
            adapter=args.adapter,
            resume=args.resume,
            overwrite=args.overwrite,
        )
        print_run(record)
        return 0
    output = Path(args.output)
    if args.overwrite and rundir.holds_a_run(output):
        shutil.rmtree(output)  # before the merge writes its base into it
    rundir.check_reuse(output, args.resume, overwrite=False)
    merged = output / "merged-base"
    if not (args.resume and merged.is_dir()):  # resuming: the base the run was merged onto is there
        lora.merge(args.model, args.adapter, merged, quantization=models.quantization_name(recipe.quantization))
        say(f"merged {args.adapter} into {args.model} -> {merged}; training a new adapter on it")
    record = train.run(recipe, str(merged), args.data, args.output, columns=columns, resume=args.resume)
    print_run(record)
    return 0
