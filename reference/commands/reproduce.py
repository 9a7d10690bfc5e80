"""`reproduce`: the LLM2024 pipeline end to end on the embedded fixtures, and seed 000's routes measured
(the main job; claims M1-M4). Progress goes to stderr, one line per stage and per training step; the result
is report.md in the output directory."""

from __future__ import annotations

import argparse
import json

from reference.commands.arguments import declare_paths, positive_int
from reference.messages import say

NAME = "reproduce"
HELP = "the main job: filter, QLoRA SFT, few-shot generation, seed 000's continuation routes, report.md"
PATHS = (
    ("model", "base model"),
    ("magpie", "magpie JSONL to filter"),
    ("qa", "QA111 JSONL (input/output)"),
    ("new_data", "seed 000's new data, JSONL (input/output)"),
    ("tasks", "tasks JSONL (input)"),
    ("embedder", "sentence-transformers directory"),
    ("recipe", "recipe"),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    declare_paths(p, reads=("model", "tasks", "embedder", "magpie", "qa", "new_data", "recipe"), writes=("output",))
    p.add_argument("--output", default="runs/reproduce", help="directory for every stage's files and report.md")
    for name, what in PATHS:
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None, help=f"{what} (default: the fixture's)")
    p.add_argument(
        "--set", action="append", default=[], metavar="key=value", help="more recipe overrides for SFT (repeatable)"
    )
    p.add_argument(
        "--continue-steps", type=positive_int, default=None, help="optimizer steps of each seed 000 route (default 16)"
    )


def run(args: argparse.Namespace) -> int:
    from reference.job import reproduce
    from reference.settings import recipes

    pipeline = reproduce.Pipeline()
    for name, _ in PATHS:
        if getattr(args, name):
            setattr(pipeline, name, getattr(args, name))
    pipeline.overrides += args.set
    if args.continue_steps:
        pipeline.continue_steps = args.continue_steps
    recipes.check_numbers(recipes.apply_overrides(recipes.load_recipe(pipeline.recipe), pipeline.overrides))
    summary = reproduce.run(pipeline, args.output, say=say)
    shown = {k: summary[k] for k in ("filter", "training_records", "learning", "verdict", "output")}
    print(json.dumps({**shown, "seconds": round(summary["seconds"]["total"], 1)}, ensure_ascii=False, indent=2))
    return 0
