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
    from reference import generation, retrieval  # light modules (torch loads inside them): the defaults live there

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
        help="prompt tokens at most; least similar shots are dropped, and a task that does not fit alone is "
        "refused, named; prompts also fit the model's context (max_position_embeddings) (default %(default)s, "
        "the seed's)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=generation.MAX_NEW_TOKENS,
        help=">= 1 (default %(default)s, the seed's)",
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=8,
        help="prompts per generate call, sorted by length and left-padded; greedy outputs equal batch 1's, the "
        "seed's one task at a time (default 8: 5.65x the tasks/s of batch 1 on a CPU, benchmarks/results)",
    )
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="model weights' dtype (default float32)"
    )
    p.add_argument("--output", required=True, help="JSONL of {task_id, output}")


def run(args: argparse.Namespace) -> int:
    from reference import generation, retrieval

    numbered = generation.read_tasks(args.tasks, with_lines=True)  # bad rows fail before loading
    tasks, shots = [task for _, task in numbered], retrieval.read_shots(args.shots)
    names = generation.task_names(tasks, args.tasks, [line for line, _ in numbered])
    model, tokenizer = generation.load_for_inference(args.model, args.adapter, dtype=args.dtype)
    config = generation.seed_generation_config(tokenizer, max_new_tokens=args.max_new_tokens)
    bar = progress(len(tasks), "generate")  # a person watching a long run sees it move
    answers = generation.answer_tasks(
        model,
        tokenizer,
        tasks,
        shots,
        args.embedder,
        config,
        k=args.k,
        window=args.window,
        batch_size=args.batch_size,
        say=say,
        progress=bar.update if bar else None,
        names=names,
    )
    if bar:
        bar.close()
    generation.write_outputs(args.output, answers.outputs, answers.task_ids)
    settings = generation.settings_record(config, args.batch_size)
    print(json.dumps({"output": args.output, "tasks": len(tasks), "settings": settings}, ensure_ascii=False, indent=2))
    return 0
