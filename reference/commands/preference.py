"""`preference`: the LMSYS 3-class preference classifier, trained as a run like `train` or predicting (claims L1, A5,
X12)."""

from __future__ import annotations

import argparse
import json

from reference.commands.arguments import add_run_options, at_least, declare_paths, positive_int, run_method

NAME = "preference"
HELP = "the LMSYS 3-class preference classifier: train (a run like `train`) or predict (claims L1, A5, X12)"
DATA = "competition-format JSONL: prompt, response_a, response_b (JSON lists of turns, or text)"
COLUMNS = "prompt=COLUMN,response_a=COLUMN,response_b=COLUMN: the file's names for the three texts"


def add_arguments(p: argparse.ArgumentParser) -> None:
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    train = actions.add_parser("train", help="train the classifier: a run with a recipe, like `train`")
    train.add_argument(
        "--recipe", default="lmsys-classifier", help="recipe name or a TOML file (default: lmsys-classifier)"
    )
    train.add_argument("--model", required=True, help="local causal-LM directory (the backbone)")
    train.add_argument(
        "--adapter", default=None, help="continue training this saved classifier adapter (loaded trainable)"
    )
    add_run_options(
        train,
        data=DATA + ", with the one-hot winner_model_a, winner_model_b, winner_tie",
        columns=COLUMNS,
        sections="classifier.max_length=512, classifier.spread_max_length=true, lora.r=16",
    )

    predict = actions.add_parser("predict", help="write each row's three probabilities")
    declare_paths(predict, reads=("model", "adapter", "data"), writes=("output",), files=True)
    predict.add_argument("--model", required=True, help="local causal-LM directory (the backbone)")
    predict.add_argument("--data", required=True, help=DATA)
    predict.add_argument("--output", required=True, help="JSONL of probabilities, one object per row")
    predict.add_argument("--adapter", default=None, help="a trained classifier adapter")
    predict.add_argument("--columns", default=None, help=COLUMNS)
    predict.add_argument(
        "--max-length",
        type=at_least(3),
        default=None,
        help="tokens per input, >= 3 so each of the 3 parts gets one when spread (default: the thread's, 2048)",
    )
    predict.add_argument(
        "--batch-size", type=positive_int, default=None, help="rows per batch (default: the thread's, 4)"
    )
    predict.add_argument(
        "--spread-max-length", action="store_true", help="cut each part to max_length // 3 instead of the joined input"
    )
    predict.add_argument("--tta", action="store_true", help="average with a and b swapped")


def config_of(args: argparse.Namespace):
    """The thread's Config (PreferenceConfig's defaults, seed 000) with what the command line gives."""
    from reference.settings.sections import PreferenceConfig

    given = {
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "spread_max_length": args.spread_max_length,
        "tta": args.tta,
    }
    return PreferenceConfig(**{name: value for name, value in given.items() if value is not None})


def run(args: argparse.Namespace) -> int:
    from reference.methods import preference
    from reference.records import data

    columns = data.parse_columns(args.columns, preference.COLUMNS[:3])
    if args.action == "train":
        return run_method(args, preference.run, columns, adapter=args.adapter)
    config = config_of(args)
    result = preference.predict_file(args.model, args.data, args.output, config, adapter=args.adapter, columns=columns)
    print(json.dumps(result, indent=2))
    return 0
