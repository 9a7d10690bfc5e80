"""The main job: the LLM2024 pipeline end to end on the embedded fixtures, and seed 000's question measured.

    1 filter (seed 001 §2.2.1) -> 2 training set = kept magpie records + QA111 (C10)
    -> 3 QLoRA SFT with the llm2024 recipe, its training answers scored before and after (M1)
    -> 4 retrieved few-shot generation for the tasks (§2.3) -> output.jsonl
    -> 5 seed 000: continue on new data by each route (reference/job/routes.py, M2)
    -> 6 report.md, summary.json and two pictures (reference/job/report.py, M3)

The defaults are sized for the fixture model (fixtures/models/small-gemma2) on 2 CPU cores, the whole job
in well under 3 minutes: SFT takes SFT_STEPS steps of 16 records, most of one epoch over the ~1,900 training
records, at a learning rate of 1e-2 after a warmup of a tenth of the run (the recipe's 300 warmup steps would
outlast it); each route trains CONTINUE_STEPS steps of 8 records over the 32 new records. Everything else is
the recipe's. With a real model and data, pass their paths and larger steps (`--set max_steps=...`): the
stages are the same code. The training answers are scored on a fixed sample of the training set
(SCORED_RECORDS records, evenly spaced) and on the whole new data set.

Not handled here: choosing settings for a real model (the recipe's are the seed's), and judging outputs.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from reference.paths import write_text_atomic
from reference.settings import sections

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
REFERENCE_RUN = FIXTURES / "reference-run"
REFERENCE_RTOL = 0.02
"""verify's tolerance against the committed reference run: per-step losses within 2% (same CPU kind: 0)."""
SFT_STEPS, CONTINUE_STEPS, SCORED_RECORDS = 100, 16, 48
STAGES = 6


@dataclass
class Pipeline:
    model: str = str(FIXTURES / "models" / "small-gemma2")
    """Base model directory."""
    magpie: str | None = None
    """Magpie-style records to filter; None: 3,000 generated ones (reference/records/synthetic.py, seed 0). The
    80-record fixture sample is too small for this filter: with so few records nearly every
    character is counted 19 times or fewer, and pass 1 drops them all."""
    qa: str = str(FIXTURES / "data" / "qa111_sample.jsonl")
    """The QA111 set: part of the training data, and the few-shot pool."""
    new_data: str = str(FIXTURES / "data" / "qa_new_sample.jsonl")
    """Seed 000's new data (input/output): records the SFT never saw, to continue on."""
    tasks: str = str(FIXTURES / "data" / "tasks_sample.jsonl")
    """Tasks to answer."""
    embedder: str = str(FIXTURES / "models" / "tiny-embedder")
    """Sentence-transformers model for retrieval."""
    recipe: str = "llm2024"
    overrides: list = field(
        default_factory=lambda: [
            f"max_steps={SFT_STEPS}",
            "per_device_train_batch_size=16",
            "gradient_accumulation_steps=1",
            f"warmup_steps={SFT_STEPS // 10}",
            f"save_steps={SFT_STEPS // 2}",
            "logging_steps=1",
            "learning_rate=1e-2",
            "sft.max_seq_length=128",
            "bf16=false",
            "quantization.bnb_4bit_compute_dtype=float32",
            "sft.gradient_checkpointing=false",
        ]
    )
    """CPU-sized cuts of the recipe for SFT (the recipe's own values for everything else)."""
    continue_steps: int = CONTINUE_STEPS
    """Optimizer steps of 8 records for each of seed 000's routes, on top of the SFT settings."""
    scored_records: int = SCORED_RECORDS
    """Training records whose answers are scored before and after SFT (evenly spaced over the set)."""
    k: int = 3
    """Shots per task."""
    threads: int | None = 1
    """torch threads (None: torch's default, one per core). The fixture model's matrices are too small for a
    second thread to pay: on this project's 2-core machine, shared, an SFT step took 0.62 s with one thread
    and 1.34 s with two. One thread also gives the same sums on any machine (M4)."""
    max_new_tokens: int = 48
    batch_size: int = 8
    """Tasks per generate call (reference/inference/generation.py: the outputs equal one at a time's)."""


class Clock:
    """Numbered progress lines, one per stage, and how long each stage took."""

    def __init__(self, say):
        self.say, self.seconds, self.started = say, {}, time.perf_counter()

    @contextmanager
    def stage(self, name: str, description: str):
        self.say(f"[{len(self.seconds) + 1}/{STAGES}] {description}")
        started = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - started

    def total(self) -> float:
        return time.perf_counter() - self.started


class Scorer:
    """Loss and accuracy on the answers of the scored training records ("old") and of the new data ("new"),
    for a base with or without an adapter, loaded as training loads it; each model is scored once."""

    def __init__(self, pipeline: Pipeline, recipe, old_rows: list, new_rows: list, say):
        from reference.inference import scoring
        from reference.modeling import lora, vocab

        tokenizer = self.tokenizer = vocab.pad_with_eos(lora.load_tokenizer(pipeline.model))
        length = sections.resolve("sft", recipe.sft).max_seq_length
        self.sets = {
            "old": scoring.encode_answers(tokenizer, recipe.format, old_rows, length),
            "new": scoring.encode_answers(tokenizer, recipe.format, new_rows, length),
        }
        self.recipe, self.say, self.cache = recipe, say, {}

    def __call__(self, model_dir, adapter_dir=None) -> dict:
        from reference.inference import scoring

        key = (str(model_dir), str(adapter_dir))
        if key not in self.cache:
            model, _ = load_model(self.recipe, model_dir, adapter_dir)
            self.cache[key] = {name: scoring.score(model, self.tokenizer, rows) for name, rows in self.sets.items()}
            shown = ", ".join(
                f"{n} data loss {s.loss:.3f} accuracy {s.accuracy:.1%}" for n, s in self.cache[key].items()
            )
            self.say(f"scored {Path(model_dir).name}{' + ' + Path(adapter_dir).name if adapter_dir else ''}: {shown}")
        return self.cache[key]


def run(pipeline: Pipeline, output: str | Path, say=print) -> dict:
    from reference.job import report, routes
    from reference.methods import train
    from reference.records import data
    from reference.settings import recipes
    from reference.training import rundir

    out = rundir.job_folder(output)  # never a user's folder: the job replaces files of the names it writes
    if pipeline.threads:
        import torch

        torch.set_num_threads(pipeline.threads)
    clock = Clock(say)
    recipe = recipes.apply_overrides(recipes.load_recipe(pipeline.recipe), pipeline.overrides)

    with clock.stage("filter", "filter the magpie-style records (seed 001 §2.2.1)"):
        counts = filter_magpie(pipeline, recipe, out)
    with clock.stage("training set", "training set = kept records + QA111 (C10)"):
        table = data.training_set(out / "filtered.jsonl", pipeline.qa)
        rows = [{"instruction": r["instruction"], "response": r["response"]} for r in table]
        write_text_atomic(out / "train.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        new_rows = list(data.load_records(pipeline.new_data, dict(data.QA111_COLUMNS)))
        every = max(1, len(rows) // pipeline.scored_records)
        scorer = Scorer(pipeline, recipe, rows[::every][: pipeline.scored_records], new_rows, say)

    with clock.stage("SFT", "QLoRA SFT on the training set, its answers scored before and after (M1)"):
        before = scorer(pipeline.model)
        sft = train.run(recipe, pipeline.model, str(out / "train.jsonl"), str(out / "sft"), say=say, overwrite=True)
        after = scorer(pipeline.model, out / "sft")

    with clock.stage("generation", "retrieved few-shot generation for the tasks (seed 001 §2.3)"):
        answers = answer_tasks(pipeline, recipe, out / "sft", say)
        write_outputs(out / "output.jsonl", answers)

    with clock.stage("routes", "seed 000: continue on new data by each route (M2)"):
        more = recipes.apply_overrides(recipe, continue_overrides(pipeline.continue_steps))
        columns = dict(data.QA111_COLUMNS)
        taken = routes.run_routes(
            more, pipeline.model, str(out / "sft"), pipeline.new_data, columns, out / "routes", scorer, say
        )

    with clock.stage("report", "report.md, loss.svg, continuation.svg, routes.svg"):
        summary = {
            "pipeline": {**asdict(pipeline), "overrides": [recipes.shown(o) for o in pipeline.overrides]},  # X7
            "continue_overrides": continue_overrides(pipeline.continue_steps),
            "threads": pipeline.threads,
            "filter": counts,
            "training_records": len(rows),
            "new_records": len(new_rows),
            "sft": report.run_summary(sft, out),
            "learning": {
                "records": len(scorer.sets["old"]),
                "vocabulary": len(scorer.tokenizer),
                "before": before["old"].to_dict(),
                "after": after["old"].to_dict(),
            },
            "outputs": answers,
            "routes": [report.route_summary(r, out) for r in taken],
            "verdict": routes.verdict(taken, before["old"].loss, after["old"].loss, after["old"].accuracy),
            "reference_run": compare_with_reference(out, say) if is_default(pipeline) else None,
            "output": "output.jsonl",
        }
        summary["seconds"] = {"stages": dict(clock.seconds), "total": clock.total()}
        report.write(out, summary)
    summary["seconds"]["total"] = clock.total()
    write_text_atomic(out / "summary.json", json.dumps(summary, ensure_ascii=False, indent=2) + "\n")
    say(f"done in {clock.total():.0f} s: {out / 'report.md'} (outputs in {out / 'output.jsonl'})")
    return summary


def continue_overrides(steps: int) -> list[str]:
    """Each route's cuts on top of the SFT settings: `steps` steps of 8 records, an eighth of them warmup, at
    a fifth of SFT's learning rate (continued training usually takes smaller steps than the first run)."""
    return [
        f"max_steps={steps}",
        "per_device_train_batch_size=8",
        f"warmup_steps={steps // 8}",
        f"save_steps={steps}",
        "learning_rate=2e-3",
    ]


def filter_magpie(pipeline: Pipeline, recipe, out: Path) -> dict:
    """The seed's filter over the magpie records (3,000 generated ones by default); its per-rule counts."""
    from reference.errors import InputError
    from reference.records import filter_workers, filters

    if pipeline.magpie is None:
        from reference.records.synthetic import magpie_records, write_jsonl

        write_jsonl(magpie_records(3000, seed=0), out / "magpie.jsonl")
    magpie = pipeline.magpie or str(out / "magpie.jsonl")
    config = filters.FilterConfig.from_recipe(recipe)
    kept = filter_workers.filter_file(
        magpie, str(out / "filtered.jsonl"), str(out / "rejects.jsonl"), config, workers=1
    )
    if kept.counts["kept"] == 0:
        raise InputError(
            f"{magpie}: the filter kept no record (see {out / 'rejects.jsonl'}); too few records for its "
            f"rare-character rule?"
        )
    return kept.counts


def load_model(recipe, model_dir, adapter_dir=None):
    """(model, tokenizer): the base as training loads it (the recipe's quantisation and dtype), the adapter
    on it frozen (reference/inference/generation.py)."""
    from reference.inference import generation
    from reference.modeling import models

    quantization, bnb_4bit_settings = models.recipe_quantization(recipe.quantization)
    return generation.load_for_inference(
        model_dir,
        adapter_dir,
        dtype="bfloat16" if recipe.training_arguments.get("bf16") else "float32",
        quantization=quantization,
        quantization_section=bnb_4bit_settings,
    )


def answer_tasks(pipeline: Pipeline, recipe, adapter: Path, say) -> list[dict]:
    """The tasks answered by the base with the SFT adapter, seed 001 §2.3's way (reference/inference/generation.py)."""
    from reference.inference import generation, retrieval

    model, tokenizer = load_model(recipe, pipeline.model, adapter)
    tasks = generation.read_tasks(pipeline.tasks)
    config = generation.seed_generation_config(tokenizer, max_new_tokens=pipeline.max_new_tokens)
    shots = retrieval.read_shots(pipeline.qa)
    answers = generation.answer_tasks(
        model, tokenizer, tasks, shots, pipeline.embedder, config, k=pipeline.k, batch_size=pipeline.batch_size, say=say
    )
    return [
        {"task_id": task_id, "input": task["input"], "output": output, "prompt_tokens": tokens}
        for task, task_id, output, tokens in zip(
            tasks, answers.task_ids, answers.outputs, answers.prompt_tokens, strict=True
        )
    ]


def write_outputs(path: Path, answers: list[dict]) -> None:
    from reference.inference import generation

    generation.write_outputs(path, [a["output"] for a in answers], [a["task_id"] for a in answers])


def is_default(pipeline: Pipeline) -> bool:
    """The embedded default's model and data (the reference run's); settings are for verify to compare."""
    paths = ("model", "magpie", "qa", "new_data", "recipe")
    return all(getattr(pipeline, name) == getattr(Pipeline(), name) for name in paths)


def reference_runs(directory: Path = REFERENCE_RUN) -> list[str]:
    """The runs of the committed reference run (relative paths of the folders holding a manifest.json)."""
    return sorted(str(p.parent.relative_to(directory)) for p in directory.rglob("manifest.json"))


def compare_with_reference(out: Path, say) -> dict | None:
    """verify (reference/training/manifest.py) of each run of this job against the committed reference run (M4)."""
    from reference.training import manifest

    if not REFERENCE_RUN.is_dir():
        return None
    verdicts = {}
    for run in reference_runs():
        verdict = manifest.compare(manifest.load(REFERENCE_RUN / run), manifest.load(out / run), rtol=REFERENCE_RTOL)
        verdicts[run] = {"reproduces": verdict.reproduces, "report": manifest.report(verdict, "reference", "this run")}
        say(f"{run}: {'reproduces' if verdict.reproduces else 'does NOT reproduce'} the reference run")
    return {"rtol": REFERENCE_RTOL, "runs": verdicts}
