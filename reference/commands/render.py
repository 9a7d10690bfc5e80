"""`render`: messages in a prompt format, optionally through a tokenizer (claims P4, P11, C2, C11)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from reference.commands.arguments import declare_paths
from reference.errors import InputError

NAME = "render"
HELP = "render messages in a prompt format (claims P4, P11, C2, C11)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    declare_paths(p, reads=("messages", "tokenizer"))
    p.add_argument("--format", required=True, choices=["gemma2", "llama3.1", "alpaca-ja"])
    p.add_argument("--messages", required=True, help="JSON file with a list of {role, content}, or - for stdin")
    p.add_argument("--add-generation-prompt", action="store_true", help="end with the assistant/model turn opener")
    p.add_argument(
        "--tokenizer", default=None, help="local tokenizer directory: render with its chat template and print ids"
    )
    p.add_argument(
        "--date", default=None, help="llama3.1 'Today Date' (default: 26 Jul 2024, as the official template)"
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="with --tokenizer: print {text, input_ids, tokens, pieces} as JSON (tokens: the vocabulary's entries, "
        "pieces: the text each token decodes to)",
    )


def read_messages(source: str) -> list[dict]:
    """A JSON list of {role, content} (or {"messages": [...]}) from a file or stdin ("-"), checked."""
    where = "stdin" if source == "-" else source
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    except OSError as error:
        raise InputError(f"--messages: cannot read {where}: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise InputError(f"--messages: {where} is not UTF-8 text (byte {error.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(
            f"--messages: {where} is not JSON (line {error.lineno}, column {error.colno}): {error.msg}"
        ) from None
    if isinstance(data, dict) and "messages" in data:
        data = data["messages"]
    if not isinstance(data, list):
        raise InputError(
            f'--messages: {where} must hold a JSON list of {{role, content}} objects (or {{"messages": [...]}})'
        )
    for index, message in enumerate(data):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise InputError(f"--messages: {where}, message {index}: needs 'role' and 'content'")
        if message["content"] is None:  # a template would print it as the word None
            raise InputError(f"--messages: {where}, message {index}: content is null")
    return data


def run(args: argparse.Namespace) -> int:
    from reference.modeling import formats

    messages = read_messages(args.messages)
    if args.tokenizer is None:
        text = formats.render(args.format, messages, args.add_generation_prompt, date_string=args.date)
        sys.stdout.write(text)
        return 0

    from reference.modeling.vocab import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    if args.format == "alpaca-ja":
        text = formats.render(args.format, messages, eos_token=tokenizer.eos_token)
    else:
        text = formats.render_with_tokenizer(tokenizer, args.format, messages, args.add_generation_prompt, args.date)
    ids = formats.encode_prompt(tokenizer, text)
    if args.json:
        tokens = tokenizer.convert_ids_to_tokens(ids)  # the vocabulary's entries: byte-level BPE spells bytes as
        # letters (Ċ a newline, æĹ¥æľ¬ 日本), so each token's own text is given beside them
        pieces = [tokenizer.decode([i]) for i in ids]
        print(json.dumps({"text": text, "input_ids": ids, "tokens": tokens, "pieces": pieces}, ensure_ascii=False))
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
        print(f"input_ids ({len(ids)}): {json.dumps(ids)}", file=sys.stderr)
    return 0
