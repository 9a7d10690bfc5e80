"""The main job's report: report.md, loss.svg, continuation.svg and routes.svg in the run directory (claim M3).

Written for someone who has just run the job: how long it took, what each stage did, each step plan as a
fraction of an epoch, how well the model predicts its training answers before and after SFT, what it wrote
for each task, seed 000's routes side by side with a verdict, and every file by its path relative to the run
directory (the report stays right when the directory is moved). A warmup that outlasts its run is warned
about (reference.training.steps.StepPlan.warmup_warning).
"""

from __future__ import annotations

import math
from pathlib import Path

from reference.job import charts
from reference.paths import write_text_atomic


def relative(path, root: Path) -> str:
    """`path` relative to the run directory when it lies inside it, else as given."""
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def plan_summary(step_plan: dict, records: int) -> dict:
    """A step plan in the terms a reader needs: steps, records per step, the share of an epoch, warmup."""
    from reference.training.steps import StepPlan

    plan = StepPlan(**step_plan)
    return {
        "steps": plan.total_optimizer_steps,
        "records_per_step": plan.effective_batch_size,
        "records": records,
        "steps_per_epoch": plan.optimizer_steps_per_epoch,
        "epochs": plan.total_optimizer_steps / plan.optimizer_steps_per_epoch,
        "warmup_steps": plan.warmup_steps,
        "warmup_warning": plan.warmup_warning(),
    }


def run_summary(record, root: Path) -> dict:
    """A training run (reference.methods.train's record) for the report: paths relative to the run directory."""
    settings = record.settings.get("training_arguments", {})
    return {
        "output": relative(record.output, root),
        "manifest": relative(Path(record.output) / "manifest.json", root),
        "adapter": {k: (relative(v, root) if k == "path" else v) for k, v in record.adapter.items()},
        "trainable_parameters": record.trainable_parameters,
        "all_parameters": record.all_parameters,
        "max_seq_length": record.data.get("max_seq_length"),
        "batches": "padding-free" if record.settings.get("sft", {}).get("padding_free") else "padded",
        "loss_computed": record.loss,
        "loss_on": record.data.get("loss_on"),
        "plan": plan_summary(record.step_plan, record.data["records"]),
        "learning_rate": settings.get("learning_rate"),
        "losses": [step["loss"] for step in record.steps],
        "train_seconds": record.train_seconds,
        "steady_tokens_per_second": record.steady_tokens_per_second,
    }


def route_summary(route, root: Path) -> dict:
    def scores(pair):
        return None if pair is None else {name: score.to_dict() for name, score in pair.items()}

    return {
        "name": route.name,
        "title": route.title,
        "before": scores(route.before),
        "after": scores(route.after),
        "refused": route.refused,
        "trainable_weights": route.trainable_weights,
        "run": run_summary(route.run, root) if route.run is not None else None,
        "notes": route.notes,
    }


SHORT_NAMES = {
    "trainable": "adapter loaded\ntrainable",
    "merge": "merged, new\nadapter on top",
    "frozen": "peft's default\nfrozen load",
    "fresh": "fresh adapter\non the bare base",
}


def loss_scope(run: dict) -> str:
    """What a run's training loss averages over: the recipe's [sft] loss_on."""
    return "every token" if run.get("loss_on") == "all" else "answer tokens"


def loss_svg(summary: dict) -> str:
    """SFT's per-step loss, on its own step axis."""
    sft = summary["sft"]["losses"]
    series = [charts.Series("SFT (old data)", list(range(1, len(sft) + 1)), sft)]
    label = f"training loss (nats per token, {loss_scope(summary['sft'])})"
    return charts.line_chart(series, "optimizer step", label)


def continuation_svg(summary: dict) -> str:
    """Each route's per-step loss on the new data, on its own step axis: each starts its own schedule at step 1."""
    series = [
        charts.Series(route["title"], list(range(1, len(route["run"]["losses"]) + 1)), route["run"]["losses"])
        for route in summary["routes"]
        if route["run"] is not None
    ]
    label = f"training loss (nats per token, {loss_scope(summary['sft'])})"
    return charts.line_chart(series, "optimizer step of the route's own run", label)


def routes_svg(summary: dict) -> str:
    bars = ["old data, before", "old data, after", "new data, before", "new data, after"]
    values = []
    for route in summary["routes"]:
        after = route["after"] or {}
        values.append(
            [
                route["before"]["old"]["loss"],
                after.get("old", {}).get("loss"),
                route["before"]["new"]["loss"],
                after.get("new", {}).get("loss"),
            ]
        )
    groups = [SHORT_NAMES[r["name"]] + (" (refused)" if r["refused"] else "") for r in summary["routes"]]
    colours = ["#9ecae1", "#1f5fa8", "#fdbe85", "#d9480f"]  # light: before, dark: after
    return charts.bar_chart(groups, bars, values, "answer loss (nats per token; lower is better)", colours)


def write(out: Path, summary: dict) -> None:
    write_text_atomic(out / "loss.svg", loss_svg(summary))
    write_text_atomic(out / "continuation.svg", continuation_svg(summary))
    write_text_atomic(out / "routes.svg", routes_svg(summary))
    write_text_atomic(out / "report.md", markdown(summary))


def _plan_line(run: dict) -> list[str]:
    plan = run["plan"]
    lines = [
        f"- step plan: {plan['steps']} optimizer steps of {plan['records_per_step']} records = "
        f"{plan['epochs']:.2f} of an epoch over {plan['records']:,} records (an epoch is {plan['steps_per_epoch']} "
        f"steps); warmup {plan['warmup_steps']} steps to a peak learning rate of {run['learning_rate']:g}"
    ]
    if plan["warmup_warning"]:
        lines.append(f"- **{plan['warmup_warning']}**")
    return lines


def _run_lines(run: dict) -> list[str]:
    losses = run["losses"]
    mode = run["adapter"].get("mode", "")
    return [
        *_plan_line(run),
        f"- adapter {mode}, {run['trainable_parameters']:,} trainable weights; loss {losses[0]:.3f} at step 1, "
        f"{losses[-1]:.3f} at step {len(losses)}",
        f"- {run['train_seconds']:.1f} s of training, {run['steady_tokens_per_second'] or 0:,.0f} tokens/s after "
        f"the first step ({run['batches']} batches; loss: {run['loss_computed']}); manifest: `{run['manifest']}`",
    ]


def _outputs_caveat(summary: dict) -> list[str]:
    """What the outputs can and cannot show, in numbers: the model's size, its training, the prompts' length."""
    sft, prompts = summary["sft"], [a["prompt_tokens"] for a in summary["outputs"]]
    if not prompts:
        return []
    return [
        f"Read these as the pipeline at work, not as answers: the model has {sft['all_parameters']:,} weights, "
        f"trained {len(sft['losses'])} steps on generated text within a {sft['max_seq_length']}-token window, and "
        f"these prompts hold {min(prompts):,} to {max(prompts):,} tokens (the retrieved examples); a model this "
        "small and briefly trained repeats itself. With a real model and data the same stage gives real answers.",
        "",
    ]


def _score_cells(pair: dict | None, name: str) -> tuple[str, str]:
    if pair is None:
        return "—", "—"
    return f"{pair[name]['loss']:.3f}", f"{pair[name]['accuracy']:.1%}"


def markdown(summary: dict) -> str:
    seconds, learning, sft = summary["seconds"], summary["learning"], summary["sft"]
    counts = summary["filter"]
    lines = [
        "# The LLM2024 pipeline on the embedded fixtures",
        "",
        "The seed 001 pipeline (filter, QLoRA SFT with the `llm2024` recipe, retrieved few-shot generation) on a "
        "small random Gemma-2 made for the tests, then seed 000's question (how to train an adapter again on new "
        "data) answered by measurement. The model starts knowing nothing: what matters is what changes.",
        "",
        f"**Total time: {seconds['total']:.0f} s** ("
        + ", ".join(f"{name} {s:.0f} s" for name, s in seconds["stages"].items())
        + f"; {summary['threads'] or 'all'} torch thread(s)). All paths below are relative to this report's directory.",
        "",
        "Settings: the `llm2024` recipe with these cuts for a CPU: "
        + ", ".join(f"`{o}`" for o in summary["pipeline"]["overrides"])
        + " (bf16 arithmetic is emulated on a CPU without AVX512-BF16, and checkpointing only saves memory); "
        "each route of section 5 on top: " + ", ".join(f"`{o}`" for o in summary["continue_overrides"]) + ".",
        "",
        "## 1. Filter (seed 001 §2.2.1)",
        "",
        f"Kept {counts['kept']:,} of {counts['input_rows']:,} magpie-style records (`filtered.jsonl`; every dropped "
        "record is in `rejects.jsonl` with its rule):",
        "",
        "| rule | records |",
        "|---|---:|",
        *[f"| {rule} | {n:,} |" for rule, n in counts.items() if rule not in ("input_rows", "kept")],
        "",
        "## 2. Training set (C10)",
        "",
        f"{summary['training_records']:,} records: the kept ones and QA111 (`train.jsonl`).",
        "",
        "## 3. QLoRA SFT: what the model learned (M1)",
        "",
        *_run_lines(sft),
        "",
        f"How well the model predicts the answers of {learning['records']} training records "
        f"({learning['before']['tokens']:,} answer tokens), as a loss per answer token. A uniform guess over the "
        f"{learning['vocabulary']:,}-token vocabulary scores ln {learning['vocabulary']:,} = "
        f"{math.log(learning['vocabulary']):.3f}; a random base starts near it, or above it when its guesses are "
        f"confidently wrong. The training curve of section 6 averages over {loss_scope(sft)} of each record (the "
        f"recipe's loss_on), so its numbers are not this table's:",
        "",
        "| | loss (nats per token) | per-token accuracy |",
        "|---|---:|---:|",
        f"| before SFT (the base) | {learning['before']['loss']:.3f} | {learning['before']['accuracy']:.1%} |",
        f"| after SFT | {learning['after']['loss']:.3f} | {learning['after']['accuracy']:.1%} |",
        "",
        "## 4. Outputs (`output.jsonl`)",
        "",
        "The SFT model's answers with the seed's generation settings (greedy, repetition penalty 1.1, banned "
        f"words; {summary['pipeline']['batch_size']} tasks per batch, the outputs of one at a time), each prompt "
        "holding the most similar QA111 examples:",
        "",
        "| task | input | output |",
        "|---|---|---|",
        *[
            f"| {a['task_id']} | {_cell(a['input'])} | {_cell(a['output']) or '*(empty)*'} |"
            for a in summary["outputs"]
        ],
        "",
        *_outputs_caveat(summary),
        *_routes_section(summary),
        "## 6. Training loss per step",
        "",
        f"The loss each step trained on, averaged over {loss_scope(sft)} of its records (the recipe's loss_on).",
        "",
        "![training loss per optimizer step of SFT](loss.svg)",
        "",
        "Each route's own run on the new data, from its step 1 (each starts its own schedule):",
        "",
        "![training loss per optimizer step of each route](continuation.svg)",
        "",
        *_reference_section(summary.get("reference_run")),
    ]
    return "\n".join(lines) + "\n"


def _routes_section(summary: dict) -> list[str]:
    lines = [
        "## 5. Seed 000: training the adapter again on new data (M2)",
        "",
        f"Old data: the training set above (scored on the same {summary['learning']['records']} records). New data: "
        f"{summary['new_records']} records the SFT never saw. Each route continues from the SFT adapter on the new "
        "data with the same settings:",
        "",
        "| route | old data: loss before → after | accuracy | new data: loss before → after | accuracy | run |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for route in summary["routes"]:
        old_before, old_acc_before = _score_cells(route["before"], "old")
        old_after, old_acc = _score_cells(route["after"], "old")
        new_before, new_acc_before = _score_cells(route["before"], "new")
        new_after, new_acc = _score_cells(route["after"], "new")
        where = f"`{route['run']['output']}`" if route["run"] else "refused"
        lines.append(
            f"| {route['title']} | {old_before} → {old_after} | {old_acc_before} → {old_acc} | {new_before} → "
            f"{new_after} | {new_acc_before} → {new_acc} | {where} |"
        )
    lines += [
        "",
        f"**{summary['verdict']}** (kept: the share of SFT's drop in old-data loss, base → SFT, still there after "
        "the route.)",
        "",
    ]
    merged = next((r for r in summary["routes"] if r["name"] == "merge" and r["run"]), None)
    if merged:
        lines += [
            f"The merged route starts from a model of its own: the SFT adapter folded into the base in bf16, then "
            f"quantised again to NF4 to train on, which rounds the adapter's update. So its old-data loss before "
            f"({merged['before']['old']['loss']:.3f}) is close to, not equal to, SFT's after "
            f"({summary['learning']['after']['loss']:.3f}).",
            "",
        ]
    for route in summary["routes"]:
        if route["run"]:
            mode = route["run"]["adapter"].get("mode", "")
            lines += [f"- {route['title']}: adapter {mode}; " + _plan_line(route["run"])[0][2:]]
    for route in summary["routes"]:
        if route["refused"]:
            lines += [
                "",
                f'Route "{route["title"]}": {route["trainable_weights"]} weights trainable, so the '
                f'project refuses to train it: "{route["refused"]}".',
            ]
    return [*lines, "", "![answer loss on the old and the new data, before and after each route](routes.svg)", ""]


def _reference_section(reference: dict | None) -> list[str]:
    if not reference:
        return []
    lines = [
        "## 7. Does this install reproduce the reference run? (M4)",
        "",
        f"`verify` of each run against the committed reference run (fixtures/reference-run in the repository; "
        f"per-step losses within rtol {reference['rtol']}):",
        "",
    ]
    for run, verdict in reference["runs"].items():
        lines.append(f"- `{run}`: {'reproduces' if verdict['reproduces'] else '**does not reproduce**'}")
    return [*lines, ""]


def _cell(text: str) -> str:
    """Text for one table cell: one line, pipes escaped, at most 120 characters."""
    flat = " ".join(text.split()).replace("|", "\\|")
    return flat if len(flat) <= 120 else flat[:119] + "…"
