"""`generate`: retrieved few-shot prompts, then generation with the seed's settings (seed 001 §2.3, C18-C21).

`--tasks FILE --shots FILE` answers every task of a file, each with its k most similar shots, into `--output`;
`--prompt TEXT` answers one prompt and prints the answer, zero-shot (the seed's prompt with no examples) unless
`--shots` is given too."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from reference.commands.arguments import declare_paths, positive_int, progress
from reference.messages import say

NAME = "generate"
HELP = "retrieved few-shot prompts and generation with the seed's settings (C18-C21)"
FIXTURE_EMBEDDER = Path(__file__).resolve().parents[2] / "fixtures" / "models" / "tiny-embedder"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from reference.inference import generation, retrieval  # light modules (torch loads inside): the defaults

    declare_paths(p, reads=("model", "adapter", "tasks", "shots", "embedder"), writes=("output",), files=True)

    p.add_argument("--model", required=True, help="local model directory (weights + tokenizer)")
    p.add_argument("--adapter", default=None, help="a saved LoRA adapter to generate with")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--tasks", help="JSONL with 'input' (and optionally 'task_id') per task")
    what.add_argument(
        "--prompt", help="one task's text: its answer is printed (zero-shot: the seed's prompt with no examples)"
    )
    p.add_argument(
        "--shots",
        default=None,
        help="JSONL shot pool with 'input' and 'output' (Japanese-QA111 style); needed with --tasks, optional "
        "with --prompt",
    )
    p.add_argument(
        "--columns",
        default=None,
        help="the files' names for input, output (shots) and task_id (tasks), any of them: "
        "input=question,output=answer",
    )
    p.add_argument(
        "--embedder",
        default=str(FIXTURE_EMBEDDER),
        help="local sentence-transformers directory (default: the fixture embedder)",
    )
    p.add_argument(
        "--k",
        type=positive_int,
        default=retrieval.DEFAULT_K,
        help="shots retrieved per task, >= 1 (default %(default)s, the seed's); for zero-shot give --prompt "
        "without --shots",
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
    p.add_argument(
        "--output", default=None, help="JSONL of {task_id, output}; needed with --tasks, optional with --prompt"
    )


def run(args: argparse.Namespace) -> int:
    from reference.errors import InputError
    from reference.inference import generation, retrieval
    from reference.records import data

    if args.tasks is not None and (args.shots is None or args.output is None):
        raise InputError("--tasks needs --shots (the pool shots are retrieved from) and --output (a JSONL file)")
    columns = data.parse_columns(args.columns, ("input", "output", "task_id"), some=True)
    if args.prompt is not None:
        if not args.prompt.strip():
            raise InputError("--prompt: empty; give the task's text")
        numbered, source = [(1, {"input": args.prompt})], None
    else:
        numbered, source = generation.read_tasks(args.tasks, with_lines=True, columns=columns), args.tasks
    tasks = [task for _, task in numbered]  # bad rows fail before loading
    shots = retrieval.read_shots(args.shots, columns) if args.shots else []
    names = generation.task_names(tasks, source, [line for line, _ in numbered]) if source else ["--prompt"]
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
    if args.output is not None:
        generation.write_outputs(args.output, answers.outputs, answers.task_ids)
    settings = generation.settings_record(config, args.batch_size, tokenizer)
    result = {"output": args.output, "tasks": len(tasks), "shots": len(shots), "settings": settings}
    if args.prompt is not None:
        result["answer"], result["prompt_tokens"] = answers.outputs[0], answers.prompt_tokens[0]
    print(json.dumps(result, ensure_ascii=False, indent=2))
    return 0
