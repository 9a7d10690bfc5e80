"""`recipe`: a named recipe, or every setting it resolves to (claims P7, P12, C13, C17, C22)."""

from __future__ import annotations

import argparse
import json

from reference.settings.recipes import builtin_names

NAME = "recipe"
HELP = "show a named recipe, or its fully resolved settings (claims P7, P12, C13, C17, C22)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help=f"recipe name ({', '.join(builtin_names())}) or a TOML file")
    p.add_argument("--resolved", action="store_true", help="print every setting, defaults included, as JSON")
    p.add_argument("--output-dir", default="runs/recipe", help="output_dir to resolve TrainingArguments with")


def run(args: argparse.Namespace) -> int:
    from reference.settings import recipes, training_arguments

    recipe = recipes.load_recipe(args.name)
    if args.resolved:
        settings = training_arguments.resolved_settings(recipe, output_dir=args.output_dir)
        print(json.dumps(settings, ensure_ascii=False, indent=2, default=str))
    else:
        print(recipes.describe(recipe))
    return 0
