"""`generate`: retrieved few-shot prompts, then generation with the seed's settings (seed 001 §2.3, C18-C21)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from reference.commands.arguments import positive_int, progress, say

NAME = "generate"
HELP = "retrieved few-shot prompts and generation with the seed's settings (C18-C21)"
FIXTURE_EMBEDDER = Path(__file__).resolve().parents[2] / "fixtures" / "models" / "tiny-embedder"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from reference import generation, retrieval  # light modules: the defaults live there

    p.add_argument("--model", required=True, help="local model directory (weights + tokenizer)")
    p.add_argument("--adapter", default=None, help="a saved LoRA adapter to generate with")
    p.add_argument("--tasks", required=True, help="JSONL with 'input' (and optionally 'task_id') per task")
    p.add_argument("--shots", required=True, help="JSONL shot pool with 'input' and 'output' (Japanese-QA111 style)")
    p.add_argument(
        "--embedder",
        default=str(FIXTURE_EMBEDDER),
        help="local sentence-transformers directory (default: the fixture embedder)",
    )
    p.add_argument(
        "--k",
        type=positive_int,
        default=retrieval.DEFAULT_K,
        help="shots retrieved per task, >= 1: always few-shot, there is no zero-shot mode "
        "(default %(default)s, the seed's)",
    )
    p.add_argument(
        "--window",
        type=positive_int,
        default=retrieval.DEFAULT_WINDOW,
        help="prompt tokens at most; least similar shots are dropped (default %(default)s, the seed's)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=generation.GenerationSettings.max_new_tokens,
        help=">= 1 (default %(default)s, the seed's)",
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=1, help="prompts per generate call, left-padded (default 1)"
    )
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="model weights' dtype (default float32)"
    )
    p.add_argument("--output", required=True, help="JSONL of {task_id, output}")


def run(args: argparse.Namespace) -> int:
    from reference import generation, lora, models, retrieval
    from reference.data import read_text_rows

    tasks = read_text_rows(args.tasks, ("input",))
    shots = read_text_rows(args.shots, ("input", "output"))
    model, _ = models.load_causal_lm(args.model, dtype=args.dtype)
    if args.adapter:
        model = lora.load_adapter(model, args.adapter, trainable=False)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.adapter or args.model, local_files_only=True)
    pool = retrieval.ShotPool([(s["input"], s["output"]) for s in shots], retrieval.load_embedder(args.embedder))
    prompts = []
    for number, task in enumerate(tasks):
        fitted = retrieval.fit(pool.top(task["input"], args.k), task["input"], tokenizer, args.window)
        if fitted.dropped:
            say(f"task {number}: prompt over {args.window} tokens; dropped the {fitted.dropped} least similar shots")
        prompts.append(fitted.prompt)
    settings = generation.GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    bar = progress(len(prompts), "generate")
    outputs = generation.generate(model, tokenizer, prompts, settings, progress=bar.update if bar else None)
    if bar:
        bar.close()
    generation.write_outputs(args.output, outputs, [t.get("task_id", i) for i, t in enumerate(tasks)])
    report = {"output": args.output, "tasks": len(tasks), "settings": generation.settings_record(settings)}
    print(json.dumps(report, ensure_ascii=False, indent=2))
    return 0
