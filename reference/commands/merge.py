"""`merge`: fold a LoRA adapter into its base and save the merged model (claim A3).

The base is loaded as the adapter was trained on it, which the run that saved the adapter records (the
manifest.json beside it, a checkpoint's run.json: model.quantization); an NF4 or 8-bit base is
dequantised before the merge. `--quantization` that contradicts the record is refused unless `--override-record` says it
is meant; an adapter made for another kind of model than `--model` is refused before anything loads."""

from __future__ import annotations

import argparse
import json

from reference.commands.arguments import declare_paths
from reference.messages import say

NAME = "merge"
HELP = "fold a LoRA adapter into its base and save the merged model (claim A3)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    declare_paths(p, reads=("model", "adapter"), writes=("output",))
    p.add_argument("--model", required=True, help="the base model directory")
    p.add_argument("--adapter", required=True, help="the saved adapter directory")
    p.add_argument("--output", required=True, help="directory for the merged bf16 model and tokenizer")
    p.add_argument(
        "--quantization",
        choices=["none", "nf4", "8bit"],  # reference.modeling.models.QUANTIZATIONS, not imported here: it loads torch
        default=None,
        help="how the base was loaded when the adapter was trained; nf4 and 8bit dequantise that base before "
        "merging (default: as the adapter records it, else none with a note; a base saved 4-bit is always "
        "dequantised). A choice that contradicts the record is refused unless --override-record",
    )
    p.add_argument(
        "--override-record",
        action="store_true",
        help="merge with --quantization although the adapter records another (e.g. fold a QLoRA adapter into "
        "the full-precision base on purpose); the summary keeps both",
    )


def run(args: argparse.Namespace) -> int:
    from reference.errors import InputError
    from reference.modeling import lora

    if args.override_record and args.quantization is None:
        raise InputError("--override-record: give the --quantization to merge with instead of the recorded one")
    summary = lora.merge(
        args.model,
        args.adapter,
        args.output,
        quantization=args.quantization,
        override_record=args.override_record,
        say=say,
    )
    print(json.dumps(summary, indent=2))
    return 0
