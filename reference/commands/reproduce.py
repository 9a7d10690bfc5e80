"""`reproduce`: the LLM2024 pipeline end to end on the embedded fixtures (the main job; M1-M4)."""

from __future__ import annotations

import argparse
import json

from reference.commands.arguments import say

NAME = "reproduce"
HELP = "the LLM2024 pipeline end to end: filter, QLoRA SFT, continue, few-shot generation"
PATHS = (
    ("model", "base model"),
    ("magpie", "magpie JSONL to filter"),
    ("qa", "QA111 JSONL (input/output)"),
    ("tasks", "tasks JSONL (input)"),
    ("embedder", "sentence-transformers directory"),
    ("recipe", "recipe"),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", default="runs/reproduce", help="directory for every stage's files and report.md")
    for name, what in PATHS:
        p.add_argument(f"--{name}", default=None, help=f"{what} (default: the fixture's)")
    p.add_argument("--set", action="append", default=[], metavar="key=value", help="more recipe overrides (repeatable)")


def run(args: argparse.Namespace) -> int:
    from reference import recipes, reproduce

    pipeline = reproduce.Pipeline()
    for name, _ in PATHS:
        if getattr(args, name):
            setattr(pipeline, name, getattr(args, name))
    pipeline.overrides += args.set
    recipes.check_numbers(recipes.apply_overrides(recipes.load_recipe(pipeline.recipe), pipeline.overrides))
    summary = reproduce.run(pipeline, args.output, say=say)
    print(json.dumps({k: summary[k] for k in ("filter", "training_records", "output")}, ensure_ascii=False, indent=2))
    return 0
