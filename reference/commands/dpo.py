"""`dpo`: DPO with a LoRA policy; the reference is the starting adapter, frozen (claims D3, X9)."""

from __future__ import annotations

import argparse
import json

from reference.commands.arguments import positive_float, positive_int, say

NAME = "dpo"
HELP = "DPO with a LoRA policy; the reference is the starting adapter, frozen (D3, X9)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local model directory (weights + tokenizer)")
    p.add_argument(
        "--data",
        required=True,
        help="JSONL of {prompt, chosen, rejected}, chosen != rejected in every pair (a pair with "
        "nothing to prefer is refused, its line named, before the model loads)",
    )
    p.add_argument("--output", required=True, help="directory for the adapter, tokenizer and dpo.json")
    p.add_argument(
        "--adapter",
        default=None,
        help="start from this saved adapter (e.g. the SFT one): the policy, and frozen, the reference",
    )
    p.add_argument("--beta", type=positive_float, default=0.1, help="KL strength beta (default 0.1)")
    p.add_argument("--lr", type=positive_float, default=5e-4, help="AdamW learning rate (default 5e-4)")
    p.add_argument("--steps", type=positive_int, default=10, help="optimizer steps over all pairs (default 10)")
    p.add_argument("--r", type=positive_int, default=8, help="rank of a fresh adapter, alpha = 2r (default 8)")


def run(args: argparse.Namespace) -> int:
    from reference import dpo

    settings = dpo.DPOSettings(beta=args.beta, learning_rate=args.lr, steps=args.steps)
    result = dpo.run(args.model, args.data, args.output, settings, adapter=args.adapter, r=args.r, say=say)
    print(json.dumps({"output": args.output, "losses": result["losses"], "margins": result["margins"]}, indent=2))
    return 0
