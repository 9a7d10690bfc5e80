"""The command line: `python -m reference <command>` (also installed as `ftref`).

Bad input exits with code 2 and one message on stderr naming the file, row or argument; no traceback.
Heavy libraries are imported inside the commands that need them so `steps` and `render` start fast.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

from reference.errors import InputError


def _number(value: str, kind: type) -> int | float:
    """VALUE read as an int or a float; inf and nan are refused: no count or rate is endless or undefined."""
    try:
        number = kind(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {'a whole number' if kind is int else 'a number'}, got {value!r}"
        ) from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {value!r}")
    return number


def finite(value: str) -> float:
    """An argparse type: any finite float (the command checks its own range)."""
    return _number(value, float)


def at_least(minimum: int | float, kind: type = int):
    """An argparse type: a finite `kind` >= minimum; argparse reports 'argument --NAME: must be >= ...', exit 2."""

    def check(value: str) -> int | float:
        number = _number(value, kind)
        if number < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value!r}")
        return number

    check.__name__ = f"at_least_{minimum}"
    return check


def positive_float(value: str) -> float:
    """An argparse type: a finite float > 0 (a learning rate, a beta, a number of epochs)."""
    number = _number(value, float)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value!r}")
    return number


positive_int = at_least(1)


def _warmup(value: str) -> float:
    """--warmup: whole steps (an int) or a fraction of the total steps (< 1)."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--warmup takes steps (int) or a fraction < 1, got {value!r}") from None
    if not math.isfinite(number) or number < 0 or (number >= 1 and number != int(number)):
        raise argparse.ArgumentTypeError(f"--warmup takes steps (int) or a fraction < 1, got {value!r}")
    return number


def _steps_or_fraction(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of steps or a fraction < 1, got {value!r}") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"expected a number of steps or a fraction < 1, got {value!r}")
    return number


def cmd_steps(args: argparse.Namespace) -> int:
    from reference import steps

    settings = steps.StepSettings(
        records=args.records,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        epochs=args.epochs,
        max_steps=args.max_steps,
        world_size=args.world_size,
        warmup=args.warmup,
        save_strategy=args.save_strategy,
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        logging_strategy=args.logging_strategy,
        logging_steps=args.logging_steps,
        logging_first_step=args.logging_first_step,
        drop_last=args.drop_last,
    )
    result = steps.plan(settings)
    if result.warmup_warning():
        print(result.warmup_warning(), file=sys.stderr)
    if args.json:
        print(json.dumps({**result.to_dict(), "settings": settings.__dict__}, indent=2))
    else:
        print(steps.format_table(settings, result))
    return 0


def _read_messages(source: str) -> list[dict]:
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


def cmd_render(args: argparse.Namespace) -> int:
    from reference import formats

    messages = _read_messages(args.messages)
    if args.tokenizer is None:
        text = formats.render(args.format, messages, args.add_generation_prompt, date_string=args.date)
        sys.stdout.write(text)
        return 0

    from reference.vocab import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    if args.format == "alpaca-ja":
        text = formats.render(args.format, messages, eos_token=tokenizer.eos_token)
    else:
        text = formats.render_with_tokenizer(tokenizer, args.format, messages, args.add_generation_prompt, args.date)
    ids = formats.encode_prompt(tokenizer, text)
    if args.json:
        print(
            json.dumps(
                {"text": text, "input_ids": ids, "tokens": tokenizer.convert_ids_to_tokens(ids)}, ensure_ascii=False
            )
        )
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
        print(f"input_ids ({len(ids)}): {json.dumps(ids)}", file=sys.stderr)
    return 0


def cmd_add_tokens(args: argparse.Namespace) -> int:
    from reference import vocab

    report = vocab.add_special_tokens(args.model, args.tokens, args.output)
    print(json.dumps(report, ensure_ascii=False, indent=2))
    return 0


def _progress(total: int, description: str):
    """A tqdm bar on stderr when a person is watching (a terminal) and the input is long; else None."""
    if total < 2000 or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="rec", file=sys.stderr, mininterval=0.5)


def _writable(path: str, flag: str) -> Path:
    target = Path(path)
    if target.is_dir():
        raise InputError(f"{flag} {path}: is a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def cmd_filter(args: argparse.Namespace) -> int:
    from reference import filters, recipes

    config = filters.FilterConfig.from_recipe(recipes.load_recipe(args.recipe))
    source = Path(args.input)
    if not source.is_file():
        raise InputError(f"--input {args.input}: no such file")
    _writable(args.output, "--output")
    _writable(args.rejects, "--rejects")
    if Path(args.output).resolve() == Path(args.rejects).resolve():
        raise InputError(f"--output and --rejects are the same file: {args.output}")
    filters.keep_freed_memory()
    bar = _progress(source.stat().st_size // 800, "filter: language check")  # about 800 bytes a record
    result = filters.filter_file(
        args.input,
        args.output,
        args.rejects,
        config,
        workers=args.workers,
        strict=args.strict,
        progress=bar.update if bar else None,
    )
    if bar:
        bar.close()
    counts = result.counts
    if args.json:
        print(
            json.dumps(
                {
                    "counts": counts,
                    "ng_list_size": result.ng_list_size,
                    "pass2_ng_size": result.pass2_ng_size,
                    "output": args.output,
                    "rejects": args.rejects,
                    "char_table": result.char_table,
                },
                ensure_ascii=False,
            )
        )
        return 0
    lines = [f"{rule:>16}: {count}" for rule, count in counts.items()]
    lines += [
        f"pass-1 NG list: {result.ng_list_size} strings; pass-2 rare characters: {result.pass2_ng_size}",
        f"kept {counts['kept']} of {counts['input_rows']} rows -> {args.output}; rejects -> {args.rejects}",
        "character frequencies of the kept records:",
    ]
    lines += [f"{char}: {count}" for char, count in result.char_table]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def cmd_recipe(args: argparse.Namespace) -> int:
    from reference import recipes

    recipe = recipes.load_recipe(args.name)
    if args.resolved:
        print(
            json.dumps(
                recipes.resolved_settings(recipe, output_dir=args.output_dir), ensure_ascii=False, indent=2, default=str
            )
        )
    else:
        print(recipes.describe(recipe))
    return 0


def _whole(value, minimum: int | None = None) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and (minimum is None or value >= minimum)


def check_training_numbers(recipe) -> None:
    """The recipe's counts and rates once the key=value overrides are in, checked before anything loads.
    Counts are whole numbers >= 1; learning_rate, and num_train_epochs unless max_steps > 0, are finite and > 0.
    The message names the setting: `per_device_train_batch_size=0: must be a whole number >= 1`."""
    arguments = recipe.training_arguments
    counts = {
        "per_device_train_batch_size": arguments.get("per_device_train_batch_size"),
        "gradient_accumulation_steps": arguments.get("gradient_accumulation_steps"),
        "lora.r": recipe.lora.get("r"),
        "sft.max_seq_length": recipe.sft.get("max_seq_length"),
    }
    for name, value in counts.items():
        if value is not None and not _whole(value, 1):
            raise InputError(f"{name}={value!r}: must be a whole number >= 1")
    max_steps = arguments.get("max_steps", -1)
    if not _whole(max_steps):
        raise InputError(f"max_steps={max_steps!r}: must be a whole number (<= 0: train num_train_epochs)")
    rates = {"learning_rate": arguments.get("learning_rate")}
    if max_steps <= 0:
        rates["num_train_epochs"] = arguments.get("num_train_epochs")
    for name, value in rates.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
            raise InputError(f"{name}={value!r}: must be a finite number > 0")


def cmd_train(args: argparse.Namespace) -> int:
    from reference import recipes, train

    recipe = recipes.apply_overrides(recipes.load_recipe(args.recipe), args.overrides)
    check_training_numbers(recipe)
    record = train.run(
        recipe,
        args.model,
        args.data,
        args.output,
        columns=train.parse_columns(args.columns),
        resume=args.resume,
        overwrite=args.overwrite,
    )
    _print_run(record)
    return 0


def cmd_continue(args: argparse.Namespace) -> int:
    """Seed 000's two routes: keep training the saved adapter, or merge it and train a new one on top."""
    from reference import lora, recipes, train

    recipe = recipes.apply_overrides(recipes.load_recipe(args.recipe), args.overrides)
    check_training_numbers(recipe)
    if args.mode == "adapter":
        record = train.run(
            recipe,
            args.model,
            args.data,
            args.output,
            columns=train.parse_columns(args.columns),
            adapter=args.adapter,
            resume=args.resume,
            overwrite=args.overwrite,
        )
    else:
        from reference import rundir

        output = Path(args.output)
        if args.overwrite and rundir.holds_a_run(output):
            shutil.rmtree(output)  # before the merge writes its base into it
        rundir.check_reuse(output, args.resume, overwrite=False)
        merged = output / "merged-base"
        if not (args.resume and merged.is_dir()):  # resuming: the base the run was merged onto is there
            lora.merge(args.model, args.adapter, merged, quantization=train.quantization_of(recipe))
            print(f"merged {args.adapter} into {args.model} -> {merged}; training a new adapter on it", file=sys.stderr)
        record = train.run(
            recipe, str(merged), args.data, args.output, columns=train.parse_columns(args.columns), resume=args.resume
        )
    _print_run(record)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from reference import lora

    print(json.dumps(lora.merge(args.model, args.adapter, args.output, quantization=args.quantization), indent=2))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Seed 001 §2.3: retrieved few-shot prompts, then generation with the seed's settings."""
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
            print(
                f"task {number}: prompt over {args.window} tokens; dropped the {fitted.dropped} least similar shots",
                file=sys.stderr,
            )
        prompts.append(fitted.prompt)
    settings = generation.GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    bar = _progress(len(prompts), "generate")
    outputs = generation.generate(model, tokenizer, prompts, settings, progress=bar.update if bar else None)
    if bar:
        bar.close()
    generation.write_outputs(args.output, outputs, [t.get("task_id", i) for i, t in enumerate(tasks)])
    print(
        json.dumps(
            {"output": args.output, "tasks": len(tasks), "settings": generation.settings_record(settings)},
            ensure_ascii=False,
            indent=2,
        )
    )
    return 0


def cmd_preference(args: argparse.Namespace) -> int:
    from reference import paths, preference

    config = preference.PreferenceConfig(
        max_length=args.max_length,
        batch_size=args.batch_size,
        spread_max_length=args.spread_max_length,
        tta=getattr(args, "tta", False),
    )
    if args.action == "train":
        result = preference.train(
            args.model,
            args.data,
            args.output,
            config,
            epochs=args.epochs,
            learning_rate=args.lr,
            say=lambda text: print(text, file=sys.stderr),
        )
        print(json.dumps(result, indent=2))
        return 0
    from reference import lora

    model, tokenizer = preference.load_classifier(args.model)
    if args.adapter:
        model = lora.load_adapter(model, args.adapter, trainable=False)
    rows = preference.read_rows(args.data, need_labels=False)
    probabilities = preference.predict(model, tokenizer, rows, config).tolist()
    lines = [json.dumps(dict(zip(preference.LABELS, row, strict=True))) + "\n" for row in probabilities]
    paths.write_text_atomic(args.output, "".join(lines))
    print(json.dumps({"output": args.output, "rows": len(rows), "config": config.__dict__}, indent=2))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from reference import manifest

    verdict = manifest.compare(manifest.load(args.run_a), manifest.load(args.run_b), rtol=args.rtol)
    print(manifest.report(verdict, args.run_a, args.run_b))
    return 0 if verdict.reproduces else 1


def cmd_reproduce(args: argparse.Namespace) -> int:
    from reference import reproduce

    pipeline = reproduce.Pipeline()
    for name in ("model", "magpie", "qa", "tasks", "embedder", "recipe"):
        if getattr(args, name):
            setattr(pipeline, name, getattr(args, name))
    pipeline.overrides += args.set
    from reference import recipes

    check_training_numbers(recipes.apply_overrides(recipes.load_recipe(pipeline.recipe), pipeline.overrides))
    summary = reproduce.run(pipeline, args.output, say=lambda text: print(text, file=sys.stderr))
    print(json.dumps({k: summary[k] for k in ("filter", "training_records", "output")}, ensure_ascii=False, indent=2))
    return 0


def cmd_dpo(args: argparse.Namespace) -> int:
    from dataclasses import asdict

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
    record = dpo.train(policy, tokenizer, pairs, settings, say=lambda text: print(text, file=sys.stderr))
    out = Path(args.output)
    with paths.complete_directory(out) as partial:
        policy.save_pretrained(
            partial, safe_serialization=True, selected_adapters=[policy.active_adapter]
        )  # policy only
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


def _print_run(record) -> None:
    import os

    from reference import train

    if os.environ.get("RANK", "0") != "0":  # torchrun: one summary, from the main process
        return
    last = record.steps[-1] if record.steps else {}
    print(
        json.dumps(
            {
                "output": record.output,
                "manifest": str(Path(record.output) / train.MANIFEST),
                "steps": len(record.steps),
                "first_loss": record.steps[0]["loss"] if record.steps else None,
                "last_loss": last.get("loss"),
                "steady_tokens_per_second": record.steady_tokens_per_second,
                "trainable_parameters": record.trainable_parameters,
                "adapter": record.adapter,
                "resumed_from": record.resumed_from,
            },
            indent=2,
        )
    )


def cmd_quantize(args: argparse.Namespace) -> int:
    from reference import models

    identity = models.quantize_and_save(args.model, args.output, {4: "nf4", 8: "8bit"}[args.bits])
    print(
        json.dumps(
            {"output": identity.path, "quantization": identity.quantization, "weights_sha256": identity.weights_sha256},
            indent=2,
        )
    )
    return 0


def _run_arguments(p: argparse.ArgumentParser) -> None:
    """What every training command takes besides its model: data, output, columns, resume, overrides."""
    p.add_argument("--data", required=True, help="records: JSONL/JSON/CSV/Parquet or a saved dataset folder")
    p.add_argument(
        "--output", required=True, help="directory for the adapter, tokenizer, checkpoints/ and manifest.json"
    )
    p.add_argument(
        "--columns",
        default=None,
        help="column map, e.g. instruction=input,response=output (default: "
        "magpie conversations or instruction/response)",
    )
    again = p.add_mutually_exclusive_group()
    again.add_argument(
        "--resume",
        action="store_true",
        help="carry on from the newest complete checkpoint in OUTPUT/checkpoints (the same model, data "
        "and settings, checked)",
    )
    again.add_argument(
        "--overwrite",
        action="store_true",
        help="start again in an OUTPUT that holds a run: its files are removed first",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="recipe overrides: a TrainingArguments name, or section.key (lora.r=16, sft.max_seq_length=512)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftref", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("steps", help="the step plan a transformers.Trainer run makes (claims P9, P10, L4)")
    p.add_argument("--records", type=int, required=True, help="rows in the training set")
    p.add_argument("--batch-size", type=int, required=True, help="per_device_train_batch_size")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient_accumulation_steps (default 1)")
    p.add_argument("--epochs", type=finite, default=3.0, help="num_train_epochs, may be fractional (default 3.0)")
    p.add_argument("--max-steps", type=int, default=-1, help="total optimizer steps; overrides --epochs when > 0")
    p.add_argument("--world-size", type=int, default=1, help="data-parallel processes (default 1)")
    p.add_argument("--warmup", type=_warmup, default=0, help="warmup steps (int) or fraction < 1 of total (default 0)")
    p.add_argument("--save-strategy", default="steps", help="steps | epoch | no (default steps)")
    p.add_argument(
        "--save-steps",
        type=_steps_or_fraction,
        default=500,
        help="steps between checkpoints, or a fraction < 1 (default 500)",
    )
    p.add_argument("--save-total-limit", type=int, default=None, help="newest checkpoints kept (default: all)")
    p.add_argument("--logging-strategy", default="steps", help="steps | epoch | no (default steps)")
    p.add_argument(
        "--logging-steps",
        type=_steps_or_fraction,
        default=500,
        help="steps between loss log lines, or a fraction < 1 (default 500)",
    )
    p.add_argument("--logging-first-step", action="store_true", help="also log after step 1")
    p.add_argument("--drop-last", action="store_true", help="dataloader_drop_last")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_steps)

    p = sub.add_parser("render", help="render messages in a prompt format (claims P4, P11, C2, C11)")
    p.add_argument("--format", required=True, choices=["gemma2", "llama3.1", "alpaca-ja"])
    p.add_argument("--messages", required=True, help="JSON file with a list of {role, content}, or - for stdin")
    p.add_argument("--add-generation-prompt", action="store_true", help="end with the assistant/model turn opener")
    p.add_argument(
        "--tokenizer", default=None, help="local tokenizer directory: render with its chat template and print ids"
    )
    p.add_argument(
        "--date", default=None, help="llama3.1 'Today Date' (default: 26 Jul 2024, as the official template)"
    )
    p.add_argument("--json", action="store_true", help="with --tokenizer: print {text, input_ids, tokens} as JSON")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("add-tokens", help="register special tokens and grow the embeddings (claim P5)")
    p.add_argument("--model", required=True, help="local model directory (weights + tokenizer)")
    p.add_argument("--tokens", required=True, nargs="+", help="tokens to register, e.g. '<user_name>'")
    p.add_argument("--output", required=True, help="directory to save the grown model and tokenizer")
    p.set_defaults(func=cmd_add_tokens)

    p = sub.add_parser("filter", help="the LLM2024 quality filter (claims C3-C9)")
    p.add_argument("--input", required=True, help="JSONL: magpie rows (conversations) or instruction/response rows")
    p.add_argument("--output", required=True, help="JSONL of kept records: id (if any), instruction, response")
    p.add_argument("--rejects", required=True, help="JSONL of dropped rows with the rule that dropped each")
    p.add_argument(
        "--recipe", default="llm2024", help="recipe whose [filter] constants to use (default llm2024, the seed's)"
    )
    p.add_argument("--strict", action="store_true", help="an unreadable line is an error (exit 2) instead of a reject")
    p.add_argument(
        "--workers", type=positive_int, default=None, help="processes to use, >= 1 (default: one per available core)"
    )
    p.add_argument("--json", action="store_true", help="print counts and the character table as JSON")
    p.set_defaults(func=cmd_filter)

    p = sub.add_parser("train", help="LoRA/QLoRA supervised fine-tuning with a recipe (claims P1, P3, C11-C16, L2)")
    p.add_argument("--recipe", required=True, help="recipe name (primer, llm2024) or a TOML file")
    p.add_argument("--model", required=True, help="local model directory (weights + tokenizer)")
    _run_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("continue", help="train further from a saved LoRA adapter (claims A1-A3)")
    p.add_argument("--recipe", default="llm2024", help="recipe name or TOML file (default llm2024)")
    p.add_argument("--model", required=True, help="the base model directory the adapter was trained on")
    p.add_argument("--adapter", required=True, help="the saved adapter directory")
    p.add_argument(
        "--mode",
        choices=["adapter", "merge"],
        default="adapter",
        help="adapter: keep training the same adapter (trainable); merge: fold it into the base, then "
        "train a fresh adapter (default adapter)",
    )
    _run_arguments(p)
    p.set_defaults(func=cmd_continue)

    p = sub.add_parser("merge", help="fold a LoRA adapter into its base and save the merged model (claim A3)")
    p.add_argument("--model", required=True, help="the base model directory")
    p.add_argument("--adapter", required=True, help="the saved adapter directory")
    p.add_argument("--output", required=True, help="directory for the merged bf16 model and tokenizer")
    p.add_argument(
        "--quantization",
        choices=["none", "nf4"],
        default="none",
        help="how the base was loaded when the adapter was trained; nf4 dequantises that base before "
        "merging (default none; a base saved 4-bit is always dequantised)",
    )
    p.set_defaults(func=cmd_merge)

    from reference import generation, preference, retrieval  # light modules: the defaults live there

    p = sub.add_parser("generate", help="retrieved few-shot prompts and generation with the seed's settings (C18-C21)")
    p.add_argument("--model", required=True, help="local model directory (weights + tokenizer)")
    p.add_argument("--adapter", default=None, help="a saved LoRA adapter to generate with")
    p.add_argument("--tasks", required=True, help="JSONL with 'input' (and optionally 'task_id') per task")
    p.add_argument("--shots", required=True, help="JSONL shot pool with 'input' and 'output' (Japanese-QA111 style)")
    p.add_argument(
        "--embedder",
        default=str(Path(__file__).resolve().parent.parent / "fixtures" / "models" / "tiny-embedder"),
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
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("preference", help="the LMSYS 3-class preference classifier (claims L1, A5)")
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
    p.set_defaults(func=cmd_preference)

    p = sub.add_parser("verify", help="does run B reproduce run A? compares two manifests (claim X2)")
    p.add_argument("run_a", help="a run directory (or its manifest.json)")
    p.add_argument("run_b", help="another run directory (or its manifest.json)")
    p.add_argument(
        "--rtol",
        type=at_least(0.0, float),
        default=1e-5,
        help="relative tolerance on per-step losses, >= 0 (default 1e-5)",
    )
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "reproduce", help="the LLM2024 pipeline end to end: filter, QLoRA SFT, continue, few-shot generation"
    )
    p.add_argument("--output", default="runs/reproduce", help="directory for every stage's files and report.md")
    for name, what in (
        ("model", "base model"),
        ("magpie", "magpie JSONL to filter"),
        ("qa", "QA111 JSONL (input/output)"),
        ("tasks", "tasks JSONL (input)"),
        ("embedder", "sentence-transformers directory"),
        ("recipe", "recipe"),
    ):
        p.add_argument(f"--{name}", default=None, help=f"{what} (default: the fixture's)")
    p.add_argument("--set", action="append", default=[], metavar="key=value", help="more recipe overrides (repeatable)")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("dpo", help="DPO with a LoRA policy; the reference is the starting adapter, frozen (D3, X9)")
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
    p.set_defaults(func=cmd_dpo)

    p = sub.add_parser("quantize", help="quantise a local model once and save it (claim C1)")
    p.add_argument("--model", required=True, help="local model directory (weights + tokenizer)")
    p.add_argument("--output", required=True, help="directory for the quantised model and tokenizer")
    p.add_argument(
        "--bits",
        type=int,
        choices=[4, 8],
        default=4,
        help="4: NF4 with double quantisation, bf16 compute (seed 001); 8: LLM.int8 (default 4)",
    )
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser(
        "recipe", help="show a named recipe, or its fully resolved settings (claims P7, P12, C13, C17, C22)"
    )
    p.add_argument("name", help="recipe name (primer, llm2024) or a TOML file")
    p.add_argument("--resolved", action="store_true", help="print every setting, defaults included, as JSON")
    p.add_argument("--output-dir", default="runs/recipe", help="output_dir to resolve TrainingArguments with")
    p.set_defaults(func=cmd_recipe)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_paths(args)
        code = args.func(args)
        end_process_group()
        return code
    except InputError as error:
        print(f"ftref {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ftref {args.command}: interrupted", file=sys.stderr)
        return 130


INPUT_ARGUMENTS = (
    "input",
    "model",
    "adapter",
    "data",
    "tasks",
    "shots",
    "embedder",
    "magpie",
    "qa",
    "recipe",
    "messages",
    "tokenizer",
)
OUTPUT_ARGUMENTS = ("output", "rejects")


def check_paths(args: argparse.Namespace) -> None:
    """Before any work: no output over an input, every output writable (X6; reference/paths.py)."""
    from reference import paths

    def given(names, existing):
        values = {f"--{name}": getattr(args, name, None) for name in names}
        return {flag: v for flag, v in values.items() if v is not None and (not existing or Path(v).exists())}

    # A recipe or messages argument may be a name or "-", not a path: only paths that exist are inputs.
    paths.check_outputs(given(OUTPUT_ARGUMENTS, existing=False), given(INPUT_ARGUMENTS, existing=True))


def end_process_group() -> None:
    """Under torchrun the Trainer opens a process group and nothing closes it; its gloo threads then live
    into interpreter shutdown, where torch can abort one rank (SIGABRT) after a successful run. Close it
    here, once every rank has finished its command. Imports nothing when torch was never loaded (filter,
    render, steps)."""
    if "torch.distributed" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
