"""`dpo`: DPO with a LoRA policy; the reference is the starting adapter, frozen (claims D3, X9)."""

from __future__ import annotations

import argparse
import json

from reference.commands.arguments import positive_float, positive_int, say

NAME = "dpo"
HELP = "DPO with a LoRA policy; the reference is the starting adapter, frozen (D3, X9)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local model directory (weights + tokenizer)")
    p.add_argument("--data", required=True, help="JSONL of {prompt, chosen, rejected}")
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
    from dataclasses import asdict
    from pathlib import Path

    from transformers import AutoTokenizer

    from reference import dpo, lora, models, paths
    from reference.shapes import PROJECTIONS

    pairs = dpo.read_pairs(args.data)
    model, identity = models.load_causal_lm(args.model)
    if args.adapter:
        policy = lora.load_adapter(model, args.adapter, trainable=True)
    else:
        policy = lora.attach(model, {"r": args.r, "lora_alpha": 2 * args.r, "target_modules": list(PROJECTIONS)})
    tokenizer = AutoTokenizer.from_pretrained(args.adapter or args.model, local_files_only=True)
    settings = dpo.DPOSettings(beta=args.beta, learning_rate=args.lr, steps=args.steps)
    record = dpo.train(policy, tokenizer, pairs, settings, say=say)
    out = Path(args.output)
    with paths.complete_directory(out) as partial:
        policy.save_pretrained(partial, safe_serialization=True, selected_adapters=[policy.active_adapter])
        tokenizer.save_pretrained(partial)
    result = {
        **asdict(record),
        "model": asdict(identity),
        "pairs": len(pairs),
        "adapter": args.adapter,
        "reference": f"the starting adapter ({args.adapter or 'fresh, B = 0: the base'}), frozen",
    }
    paths.write_text_atomic(out / "dpo.json", json.dumps(result, ensure_ascii=False, indent=2) + "\n")
    print(json.dumps({"output": str(out), "losses": record.losses, "margins": record.margins}, indent=2))
    return 0
