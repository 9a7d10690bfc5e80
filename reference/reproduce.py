"""The main job: the LLM2024 pipeline end to end, on the embedded fixtures by default.

    filter (seed 001 §2.2.1) -> training set = kept magpie records + QA111 (C10)
    -> QLoRA SFT with the llm2024 recipe (NF4 base, r=64, alpaca-ja) -> continue the adapter on QA111
    -> retrieved few-shot generation for the tasks (§2.3) -> output.jsonl

Each stage writes into the output directory, and `report.md` gathers the filter counts, the step
plans, the loss curves (an SVG picture and the numbers), tokens/s and where every file is. The
defaults below are sized for the tiny fixture model on a CPU; with a real model and data, pass
their paths and larger steps (`--set max_steps=...`), the stages are the same code.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from reference.paths import write_text_atomic

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


@dataclass
class Pipeline:
    model: str = str(FIXTURES / "models" / "tiny-gemma2")
    """Base model directory."""
    magpie: str | None = None
    """Magpie-style records to filter; None: 3,000 generated ones (reference/synthetic.py, seed 0). The
    80-record fixture sample is too small for this filter: with so few records nearly every
    character is counted 19 times or fewer, and pass 1 drops them all."""
    qa: str = str(FIXTURES / "data" / "qa111_sample.jsonl")
    """The QA111 set: training data and the few-shot pool."""
    tasks: str = str(FIXTURES / "data" / "tasks_sample.jsonl")
    """Tasks to answer."""
    embedder: str = str(FIXTURES / "models" / "tiny-embedder")
    """Sentence-transformers model for retrieval."""
    recipe: str = "llm2024"
    overrides: list = field(
        default_factory=lambda: [
            "max_steps=6",
            "per_device_train_batch_size=4",
            "gradient_accumulation_steps=1",
            "warmup_steps=1",
            "save_steps=3",
            "logging_steps=1",
            "learning_rate=2e-3",
            "sft.max_seq_length=96",
        ]
    )
    """CPU-sized cuts of the recipe (the recipe's own values for everything else)."""
    continue_steps: int = 3
    """Optimizer steps when continuing the adapter on QA111."""
    k: int = 3
    """Shots per task."""
    max_new_tokens: int = 32


def run(pipeline: Pipeline, output: str | Path, say=print) -> dict:
    from reference import data, filters, generation, recipes, retrieval, train

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    recipe = recipes.apply_overrides(recipes.load_recipe(pipeline.recipe), pipeline.overrides)

    say("1/5 filter")
    if pipeline.magpie is None:
        from reference.synthetic import magpie_records, write_jsonl

        write_jsonl(magpie_records(3000, seed=0), out / "magpie.jsonl")
    magpie = pipeline.magpie or str(out / "magpie.jsonl")
    config = filters.FilterConfig.from_recipe(recipe)
    kept = filters.filter_file(magpie, str(out / "filtered.jsonl"), str(out / "rejects.jsonl"), config, workers=1)
    if kept.counts["kept"] == 0:
        from reference.errors import InputError

        raise InputError(
            f"{magpie}: the filter kept no record (see {out / 'rejects.jsonl'}); too few records for its "
            f"rare-character rule?"
        )

    say("2/5 training set = kept records + QA111")
    table = data.training_set(out / "filtered.jsonl", pipeline.qa)
    with open(out / "train.jsonl", "w", encoding="utf-8") as f:
        for row in table:
            f.write(
                json.dumps({"instruction": row["instruction"], "response": row["response"]}, ensure_ascii=False) + "\n"
            )

    say("3/5 QLoRA SFT")
    sft = train.run(recipe, pipeline.model, str(out / "train.jsonl"), str(out / "sft"), say=say, overwrite=True)

    say("4/5 continue the adapter on QA111")
    more = recipes.apply_overrides(recipe, [f"max_steps={pipeline.continue_steps}"])
    continued = train.run(
        more,
        pipeline.model,
        pipeline.qa,
        str(out / "continued"),
        columns=dict(data.QA111_COLUMNS),
        adapter=str(out / "sft"),
        say=say,
        overwrite=True,
    )

    say("5/5 retrieved few-shot generation")
    from reference import lora, models

    model, _ = models.load_causal_lm(pipeline.model, dtype="bfloat16", quantization=train.quantization_of(recipe))
    model = lora.load_adapter(model, out / "continued", trainable=False)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(out / "continued"), local_files_only=True)
    shots = data.read_text_rows(pipeline.qa, ("input", "output"))
    tasks = data.read_text_rows(pipeline.tasks, ("input",))
    pool = retrieval.ShotPool([(s["input"], s["output"]) for s in shots], retrieval.load_embedder(pipeline.embedder))
    fitted = [retrieval.fit(pool.top(t["input"], pipeline.k), t["input"], tokenizer) for t in tasks]
    outputs = generation.generate(
        model,
        tokenizer,
        [f.prompt for f in fitted],
        generation.GenerationSettings(max_new_tokens=pipeline.max_new_tokens),
    )
    generation.write_outputs(out / "output.jsonl", outputs, [t.get("task_id", i) for i, t in enumerate(tasks)])

    shown = {**asdict(pipeline), "overrides": [recipes.shown(o) for o in pipeline.overrides]}  # X7: no token
    summary = {
        "pipeline": shown,
        "filter": kept.counts,
        "training_records": len(table),
        "sft": train.summary(sft),
        "continued": train.summary(continued),
        "tasks": len(tasks),
        "prompt_tokens": [f.tokens for f in fitted],
        "output": str(out / "output.jsonl"),
    }
    write_text_atomic(out / "summary.json", json.dumps(summary, ensure_ascii=False, indent=2) + "\n")
    write_report(out, summary, sft, continued)
    say(f"done: {out / 'output.jsonl'}, report {out / 'report.md'}")
    return summary


def loss_svg(curves: dict[str, list[float]], width: int = 480, height: int = 200) -> str:
    """A small line chart of per-step losses, one polyline per run, as self-contained SVG."""
    values = [v for losses in curves.values() for v in losses]
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    steps = max(len(losses) for losses in curves.values())
    colours = ["#1f77b4", "#d62728", "#2ca02c"]
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white" stroke="#ccc"/>',
    ]
    for n, (name, losses) in enumerate(curves.items()):
        points = " ".join(
            f"{40 + i * (width - 60) / max(steps - 1, 1):.1f},{height - 25 - (v - low) / span * (height - 50):.1f}"
            for i, v in enumerate(losses)
        )
        parts.append(f'<polyline fill="none" stroke="{colours[n % 3]}" stroke-width="2" points="{points}"/>')
        parts.append(f'<text x="{width - 150}" y="{18 + 14 * n}" fill="{colours[n % 3]}">{name}</text>')
    parts.append(f'<text x="4" y="20">{high:.3f}</text><text x="4" y="{height - 22}">{low:.3f}</text>')
    parts.append(f'<text x="{width / 2 - 20}" y="{height - 6}">step</text></svg>')
    return "\n".join(parts) + "\n"


def write_report(out: Path, summary: dict, sft, continued) -> None:
    curves = {"SFT": [s["loss"] for s in sft.steps], "continued": [s["loss"] for s in continued.steps]}
    (out / "loss.svg").write_text(loss_svg(curves), encoding="utf-8")
    lines = ["# LLM2024 pipeline run", "", "## Filter (seed 001 §2.2.1)", ""]
    lines += [f"- {rule}: {count}" for rule, count in summary["filter"].items()]
    lines += ["", f"Training set: {summary['training_records']} records (kept magpie + QA111).", ""]
    for name, record in (("SFT", sft), ("Continued", continued)):
        plan = record.step_plan
        lines += [
            f"## {name} ({record.adapter.get('mode')} adapter)",
            "",
            f"- step plan: {plan['total_optimizer_steps']} optimizer steps, "
            f"effective batch {plan['effective_batch_size']}, warmup {plan['warmup_steps']}",
            "- loss: " + ", ".join(f"{step['loss']:.4f}" for step in record.steps),
            f"- first step {record.warmup_step_seconds:.2f} s (warm-up); "
            f"steady {record.steady_tokens_per_second or 0:,.0f} tokens/s",
            f"- manifest: {Path(record.output) / 'manifest.json'}",
            "",
        ]
    lines += [
        "![loss per step](loss.svg)",
        "",
        f"## Generation: {summary['tasks']} tasks -> {summary['output']}",
        "",
        f"Prompt tokens per task: {summary['prompt_tokens']}",
        "",
    ]
    write_text_atomic(out / "report.md", "\n".join(lines))
