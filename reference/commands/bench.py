"""`bench`: training and generation tokens/s of a local model on the device at hand, or with --plan the memory and
FLOPs of a published shape under a recipe, without weights (claim X13).

    python -m reference bench                                   the fixture model small-gemma2, the llm2024 recipe
    python -m reference bench --model DIR --recipe FILE key=value ...   your model and settings
    python -m reference bench --against trl                     trl's SFTTrainer at its best setting beside it
    python -m reference bench --shape gemma-2-2b --layers 2     a published shape with random weights, cut to 2 layers
    python -m reference bench --plan --shape gemma-2-27b lora.r=128     does it fit, how long a step takes

A table on stdout; the results as JSON in --output (bench.json), written again after each part so that a later
error loses nothing already measured (the error is named, exit code 2)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from reference.commands.arguments import add_cpu_dtype, declare_paths, positive_int
from reference.messages import say

NAME = "bench"
HELP = "training and generation tokens/s on this device, or --plan: memory and FLOPs of a published shape (X13)"
FIXTURE_MODEL = Path(__file__).resolve().parents[2] / "fixtures" / "models" / "small-gemma2"


def add_arguments(p: argparse.ArgumentParser) -> None:
    declare_paths(p, reads=("model", "recipe"), writes=("output",))
    p.add_argument(
        "--model", default=str(FIXTURE_MODEL), help="local model directory (default: fixtures' small-gemma2)"
    )
    p.add_argument("--recipe", default="llm2024", help="recipe name or TOML file (default: llm2024)")
    p.add_argument(
        "--output", default="runs/bench", help="directory for bench.json and the timed run (default: %(default)s)"
    )
    p.add_argument("--steps", type=positive_int, default=6, help="optimizer steps timed, the first apart (default 6)")
    p.add_argument("--new-tokens", type=positive_int, default=32, help="tokens each generated row decodes (default 32)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="rows generated at once (default 8)")
    p.add_argument("--skip", choices=["training", "generation"], action="append", default=[], help="leave a part out")
    p.add_argument("--against", choices=["trl"], default=None, help="also time trl's SFTTrainer at its best setting")
    p.add_argument("--plan", action="store_true", help="no measurement: memory and FLOPs of --shape under the recipe")
    p.add_argument(
        "--shape",
        default=None,
        help="a published shape (gemma-2-2b/9b/27b, llama-3.1-8b) or a directory with its config.json: timed with "
        "random weights (built in OUTPUT), or with --plan planned (default for --plan: gemma-2-27b)",
    )
    p.add_argument("--layers", type=positive_int, default=None, help="--shape: keep its first N decoder layers")
    p.add_argument("--mfu", type=float, default=0.4, help="--plan: the MFU step times are given at (default 0.4)")
    add_cpu_dtype(p)
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="recipe overrides (per_device_train_batch_size=2, lora.r=128)"
    )


def plan(args, recipe) -> int:
    """The plan of --shape under the recipe, read as a run reads it: the TrainingArguments it resolves to
    (training_arguments.resolve), peft's LoraConfig of its [lora], and the BitsAndBytesConfig the loader builds."""
    from reference.benchmarking import plan as planning
    from reference.modeling import lora, models, shapes
    from reference.settings import sections, training_arguments

    args.shape = args.shape or "gemma-2-27b"
    config = shapes.load_config(args.shape)
    arguments = training_arguments.resolve(recipe, str(Path(args.output) / "checkpoints")).arguments
    quantization, bnb_4bit = models.recipe_quantization(recipe.quantization)
    if quantization == "nf4" and models.bnb_config(quantization, bnb_4bit).bnb_4bit_use_double_quant:
        quantization = "nf4-dq"
    adapter = lora.lora_config(recipe.lora)
    chosen = adapter.target_modules or shapes.PROJECTIONS  # peft keeps a set: shown in the projections' order
    targets = [m for m in shapes.PROJECTIONS if m in chosen] + sorted(set(chosen) - set(shapes.PROJECTIONS))
    batch, seq_len = arguments.per_device_train_batch_size, sections.resolve("sft", recipe.sft).max_seq_length
    result = planning.plan(
        config,
        args.shape,
        adapter.r,
        targets,
        batch,
        seq_len,
        quantization,
        str(getattr(arguments.optim, "value", arguments.optim)),
        arguments.activation_checkpointing,
        args.mfu,
        layer_bytes=planning.measured_layer_bytes(config, adapter.r, targets, batch, seq_len),
    )
    print(planning.table(result))
    Path(args.output).mkdir(parents=True, exist_ok=True)
    write(Path(args.output), {"plan": result.to_dict()})
    return 0


def random_model(args, output: Path) -> Path:
    """--shape with random weights (reference.benchmarking.random_weights) in OUTPUT/model-NAME[-Nl]; refused beside
    --model, which names another model."""
    from reference.benchmarking import random_weights
    from reference.errors import InputError
    from reference.modeling import shapes

    if args.model != str(FIXTURE_MODEL):
        raise InputError("bench: --model and --shape name two models; give one")
    try:
        config = random_weights.shape_config(shapes.load_config(args.shape), args.layers)
    except (OSError, ValueError) as error:
        raise InputError(
            f"--shape {args.shape}: not a published shape nor a directory with a config.json ({error})"
        ) from None
    name = Path(args.shape).name + (f"-{config['num_hidden_layers']}l" if args.layers else "")
    return random_weights.build(config, output / f"model-{name}", say)


def write(output: Path, results: dict) -> None:
    from reference.paths import write_text_atomic

    write_text_atomic(output / "bench.json", json.dumps(results, indent=2, default=str) + "\n")


def run(args: argparse.Namespace) -> int:
    from reference.commands.arguments import for_this_machine, recipe_of

    recipe = recipe_of(args)
    if args.layers and (args.plan or not args.shape):
        from reference.errors import InputError

        raise InputError("bench: --layers cuts a --shape timed with random weights (--plan plans the whole shape)")
    if args.plan:
        return plan(args, recipe)
    from reference.benchmarking import measure, peer

    output = Path(args.output)
    if args.shape:
        args.model = str(random_model(args, output))
    recipe = for_this_machine(args, recipe)  # the threads and dtype a run here gets; trl is timed on the same

    output.mkdir(parents=True, exist_ok=True)
    from reference.benchmarking import machine

    results = {"model": str(Path(args.model).resolve()), "recipe": recipe.name, "overrides": args.overrides}
    results.update(machine=machine.describe(), notes=[], errors=[])

    def part(name: str, measuring) -> None:
        """One part measured and written at once; a failure is recorded by name and the other parts still run."""
        try:
            results[name] = measuring()
        except Exception as error:  # noqa: BLE001 - a benchmark reports what failed and keeps what it measured
            results["errors"].append(f"{name}: {type(error).__name__}: {error}")
        write(output, results)

    if "training" not in args.skip:
        say(f"bench: training {args.steps} steps of {recipe.name} on {args.model}")
        part("training", lambda: measure.training(recipe, args.model, output, args.steps, lambda line: None))
    if args.against == "trl" and not peer.available():
        results["notes"].append(peer.install_hint())
    elif args.against == "trl" and "training" in results:
        say("bench: trl's SFTTrainer on the same records and settings")
        device, ours = results["training"]["device"], results["training"]["tokens_per_second"]

        def trl():
            theirs = peer.trl_training(recipe, args.model, output / "records.jsonl", output / "trl", args.steps, device)
            return {**theirs, "ratio": ours / theirs["tokens_per_second"]}

        part("trl", trl)
    if "generation" not in args.skip:
        say(f"bench: generating {args.batch_size} x {args.new_tokens} tokens")
        dtype = "bfloat16" if recipe.training_arguments.get("bf16") and measure.cuda_available() else "float32"
        part("generation", lambda: measure.generation(args.model, args.new_tokens, args.batch_size, dtype))
    print(measure.table(results))
    for line in results["notes"] + results["errors"]:
        say(f"bench: {line}")
    say(f"bench: results in {output / 'bench.json'}")
    return 2 if results["errors"] else 0
