"""`add-tokens`: register special tokens and grow the embeddings to match (claim P5)."""

from __future__ import annotations

import argparse
import json

from reference.commands.arguments import declare_paths

NAME = "add-tokens"
HELP = "register special tokens and grow the embeddings (claim P5)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    declare_paths(p, reads=("model",), writes=("output",))
    p.add_argument("--model", required=True, help="local model directory (weights + tokenizer)")
    p.add_argument("--tokens", required=True, nargs="+", help="tokens to register, e.g. '<user_name>'")
    p.add_argument("--output", required=True, help="directory to save the grown model and tokenizer")


def run(args: argparse.Namespace) -> int:
    from reference.modeling import vocab

    print(json.dumps(vocab.add_special_tokens(args.model, args.tokens, args.output), ensure_ascii=False, indent=2))
    return 0
