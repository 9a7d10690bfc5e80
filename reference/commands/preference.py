"""`preference`: the LMSYS 3-class preference classifier, trained or predicting (claims L1, A5)."""

from __future__ import annotations

import argparse
import json

from reference.commands.arguments import at_least, positive_float, positive_int, say

NAME = "preference"
HELP = "the LMSYS 3-class preference classifier (claims L1, A5)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from reference import preference  # a light module: the defaults live there

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
        default=preference.PreferenceConfig.max_length,
        help="tokens per input, >= 3 so each of the 3 parts gets one when spread (default %(default)s, the thread's)",
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=preference.PreferenceConfig.batch_size,
        help="default %(default)s (the thread's)",
    )
    p.add_argument(
        "--spread-max-length", action="store_true", help="cut each part to max_length // 3 instead of the joined input"
    )
    p.add_argument("--tta", action="store_true", help="predict: average with a and b swapped")
    p.add_argument("--epochs", type=positive_float, default=3.0, help="train: epochs (default 3)")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="train: learning rate (default 1e-3)")


def run(args: argparse.Namespace) -> int:
    from reference import lora, paths, preference

    config = preference.PreferenceConfig(
        max_length=args.max_length,
        batch_size=args.batch_size,
        spread_max_length=args.spread_max_length,
        tta=args.tta,
    )
    if args.action == "train":
        result = preference.train(
            args.model, args.data, args.output, config, epochs=args.epochs, learning_rate=args.lr, say=say
        )
        print(json.dumps(result, indent=2))
        return 0
    model, tokenizer = preference.load_classifier(args.model)
    if args.adapter:
        model = lora.load_adapter(model, args.adapter, trainable=False)
    rows = preference.read_rows(args.data, need_labels=False)
    probabilities = preference.predict(model, tokenizer, rows, config).tolist()
    lines = [json.dumps(dict(zip(preference.LABELS, row, strict=True))) + "\n" for row in probabilities]
    paths.write_text_atomic(args.output, "".join(lines))
    print(json.dumps({"output": args.output, "rows": len(rows), "config": config.__dict__}, indent=2))
    return 0
