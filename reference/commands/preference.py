"""`preference`: the LMSYS 3-class preference classifier, trained or predicting (claims L1, A5)."""

from __future__ import annotations

import argparse
import json

from reference.commands.arguments import at_least, positive_float, positive_int, say

NAME = "preference"
HELP = "the LMSYS 3-class preference classifier (claims L1, A5)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["train", "predict"])
    p.add_argument("--model", required=True, help="local causal-LM directory (the backbone)")
    p.add_argument(
        "--data", required=True, help="competition-format JSONL: prompt, response_a, response_b (+ winner_* to train)"
    )
    p.add_argument(
        "--output",
        required=True,
        help="train: directory for adapter + preference.json; predict: JSONL of probabilities",
    )
    p.add_argument("--adapter", default=None, help="predict: a trained classifier adapter")
    p.add_argument(
        "--max-length",
        type=at_least(3),
        default=None,
        help="tokens per input, >= 3 so each of the 3 parts gets one when spread (default: the thread's, 2048)",
    )
    p.add_argument("--batch-size", type=positive_int, default=None, help="rows per batch (default: the thread's, 4)")
    p.add_argument(
        "--spread-max-length", action="store_true", help="cut each part to max_length // 3 instead of the joined input"
    )
    p.add_argument("--tta", action="store_true", help="predict: average with a and b swapped")
    p.add_argument("--epochs", type=positive_float, default=3.0, help="train: epochs (default 3)")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="train: learning rate (default 1e-3)")


def config_of(args: argparse.Namespace):
    """The thread's Config (PreferenceConfig's defaults, seed 000) with what the command line gives."""
    from reference.preference import PreferenceConfig

    given = {
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "spread_max_length": args.spread_max_length,
        "tta": args.tta,
    }
    return PreferenceConfig(**{name: value for name, value in given.items() if value is not None})


def run(args: argparse.Namespace) -> int:
    from reference import preference

    config = config_of(args)
    if args.action == "train":
        result = preference.train(
            args.model, args.data, args.output, config, epochs=args.epochs, learning_rate=args.lr, say=say
        )
    else:
        result = preference.predict_file(args.model, args.data, args.output, config, adapter=args.adapter)
    print(json.dumps(result, indent=2))
    return 0
