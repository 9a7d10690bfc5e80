"""The project's SFT step against trl's SFTTrainer at its best setting, through the `bench` command itself
(`python -m reference bench --against trl --skip generation`), lever by lever (issue 21 item 4, claim X13).

Each configuration is a whole `bench` process, run in rounds whose order rotates (so that a change in the machine's
load falls on every configuration alike); each process times the project and then trl on the same records,
base and arguments, so every ratio is measured side by side. The configurations add the levers one at a time:

    recipe-dtype   the recipe's bf16 on the CPU (--cpu-dtype recipe), every layer recomputed (sft.recompute=all)
    cpu-dtype      + the CPU's compute dtype (reference/training/cpu.py: fp32 below hidden 512 or without AMX)
    default        + recompute = fit (reference/training/recompute.py): the llm2024 recipe as it is

trl gets the same dtype and threads in each (the command adapts the recipe before either side runs) and recomputes
every layer, as the recipe's gradient_checkpointing says. Models: the fixture model (hidden 128, 2 layers) and the
benchmarks' small Gemma-2 (hidden 256, 4 layers, random weights, `bench --shape`). `--busy N` runs N busy loops
beside it (the ratio under load).

    python benchmarks/bench_vs_trl.py --rounds 2 --json benchmarks/results/bench-cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.record import SMALL_GEMMA2, report  # noqa: E402
from reference.benchmarking import machine  # noqa: E402

MODELS_SHOWN = {"fixture": [], "small-gemma2": ["--shape", "DIR-of-SMALL_GEMMA2"]}
CONFIGURATIONS = {
    "recipe-dtype": ["--cpu-dtype", "recipe", "sft.recompute=all"],
    "cpu-dtype": ["sft.recompute=all"],
    "default": [],
}


def small_gemma2_shape(directory: Path) -> Path:
    """The benchmarks' small Gemma-2 as a config.json `bench --shape` reads (the fixture tokenizer's vocabulary)."""
    from reference.modeling.shapes import GEMMA2_COMMON

    directory.mkdir(parents=True, exist_ok=True)
    config = {**GEMMA2_COMMON, **SMALL_GEMMA2, "vocab_size": 2862}
    (directory / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    return directory


def bench(model: list[str], configuration: str, output: Path, steps: int) -> dict:
    """One `bench --against trl` process; its bench.json."""
    command = [sys.executable, "-m", "reference", "bench", *model, "--against", "trl", "--skip", "generation"]
    command += ["--steps", str(steps), "--output", str(output), *CONFIGURATIONS[configuration]]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads((output / "bench.json").read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--busy", type=int, default=0, help="busy loops running beside the benchmark")
    parser.add_argument("--models", nargs="+", default=["fixture", "small-gemma2"])
    parser.add_argument("--configurations", nargs="+", default=list(CONFIGURATIONS), choices=list(CONFIGURATIONS))
    parser.add_argument("--json", default=None, help="append the result to this JSON list")
    args = parser.parse_args()
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            models = {"fixture": [], "small-gemma2": ["--shape", str(small_gemma2_shape(Path(tmp) / "small-gemma2"))]}
            runs = {(m, c): [] for m in args.models for c in args.configurations}
            for round_ in range(args.rounds):
                keys = list(runs)
                keys = keys[round_ % len(keys) :] + keys[: round_ % len(keys)]
                for model, configuration in keys:
                    measured = bench(models[model], configuration, Path(tmp) / model, args.steps)
                    runs[(model, configuration)].append(measured)
                    ours, theirs = measured["training"], measured["trl"]
                    print(
                        f"round {round_ + 1} {model} {configuration}: {ours['tokens_per_second']:,.0f} against "
                        f"{theirs['tokens_per_second']:,.0f} real tokens/s, {theirs['ratio']:.2f}x",
                        file=sys.stderr,
                    )
    finally:
        for process in busy:
            process.kill()
    command = "python -m reference bench --against trl --skip generation"
    summary = {
        f"{model} {configuration}": {
            "command": " ".join([command, *MODELS_SHOWN[model], *CONFIGURATIONS[configuration]]),
            "tokens_per_second": statistics.median(r["training"]["tokens_per_second"] for r in measured),
            "trl_tokens_per_second": statistics.median(r["trl"]["tokens_per_second"] for r in measured),
            "ratio_median": statistics.median(r["trl"]["ratio"] for r in measured),
            "ratios": [round(r["trl"]["ratio"], 3) for r in measured],
            "compute_dtype": measured[0]["training"]["compute_dtype"],
            "mfu": statistics.median(r["training"]["mfu"] for r in measured),
            "peak_memory_bytes": statistics.median(r["training"]["peak_memory_bytes"] for r in measured),
            "trl_setting": measured[0]["trl"]["setting"],
        }
        for (model, configuration), measured in runs.items()
    }
    result = {"busy_loops": args.busy, "rounds": args.rounds, "steps": args.steps, "summary": summary}
    report({**result, "machine": machine.describe()}, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
