"""`quantize`: quantise a local model once and save it (claim C1)."""

from __future__ import annotations

import argparse
import json

from reference.commands.arguments import declare_paths

NAME = "quantize"
HELP = "quantise a local model once and save it (claim C1)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    declare_paths(p, reads=("model",), writes=("output",))
    p.add_argument("--model", required=True, help="local model directory (weights + tokenizer)")
    p.add_argument("--output", required=True, help="directory for the quantised model and tokenizer")
    p.add_argument(
        "--bits",
        type=int,
        choices=[4, 8],
        default=4,
        help="4: NF4 with double quantisation, bf16 compute (seed 001); 8: LLM.int8 (default 4)",
    )


def run(args: argparse.Namespace) -> int:
    from reference.modeling import models

    identity = models.quantize_and_save(args.model, args.output, {4: "nf4", 8: "8bit"}[args.bits])
    report = {"output": identity.path, "quantization": identity.quantization, "weights_sha256": identity.weights_sha256}
    print(json.dumps(report, indent=2))
    return 0
