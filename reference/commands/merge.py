"""`merge`: fold a LoRA adapter into its base and save the merged model (claim A3)."""

from __future__ import annotations

import argparse
import json

NAME = "merge"
HELP = "fold a LoRA adapter into its base and save the merged model (claim A3)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="the base model directory")
    p.add_argument("--adapter", required=True, help="the saved adapter directory")
    p.add_argument("--output", required=True, help="directory for the merged bf16 model and tokenizer")
    p.add_argument(
        "--quantization",
        choices=["none", "nf4"],
        default="none",
        help="how the base was loaded when the adapter was trained; nf4 dequantises that base before "
        "merging (default none; a base saved 4-bit is always dequantised)",
    )


def run(args: argparse.Namespace) -> int:
    from reference import lora

    print(json.dumps(lora.merge(args.model, args.adapter, args.output, quantization=args.quantization), indent=2))
    return 0
