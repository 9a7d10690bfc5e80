"""`dpo`: DPO with a LoRA policy as a run like `train`; the reference is the starting adapter, frozen (D3, X9, X12)."""

from __future__ import annotations

import argparse

from reference.commands.arguments import add_run_options, run_method

NAME = "dpo"
HELP = "DPO with a LoRA policy, a run like `train`; the reference is the starting adapter, frozen (D3, X9, X12)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--recipe", default="dpo", help="recipe name or a TOML file (default: dpo, reference/recipes/dpo.toml)"
    )
    p.add_argument("--model", required=True, help="local model directory (weights + tokenizer)")
    p.add_argument(
        "--adapter",
        default=None,
        help="start from this saved adapter (e.g. the SFT one): the policy, and frozen, the reference "
        "(default: a fresh adapter from the recipe's [lora])",
    )
    add_run_options(
        p,
        data="JSONL of {prompt, chosen, rejected}, chosen != rejected in every pair (a pair with nothing to prefer "
        "is refused, its line named, before the model loads)",
        columns="prompt=COLUMN,chosen=COLUMN,rejected=COLUMN: the file's names for the three fields",
        sections="dpo.beta=0.2, dpo.max_length=512, lora.r=16",
    )


def run(args: argparse.Namespace) -> int:
    from reference.methods import dpo
    from reference.records import data

    return run_method(args, dpo.run, data.parse_columns(args.columns, dpo.COLUMNS), adapter=args.adapter)
