"""The main job (`reproduce`: reference/job/reproduce.py, routes.py, report.py, charts.py) and `verify`.

The job runs once for this module, the way a user runs it (`python -m reference reproduce`, a new process,
stderr not a terminal); every test of claims M1-M4 reads what that one run wrote. Expected values are
derived by hand in the docstrings, recomputed here with transformers' own loss, or read from the committed
reference run.
"""

from __future__ import annotations

import json
import math
import re
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from reference.job import reproduce
from reference.settings.recipes import apply_overrides, load_recipe
from reference.training import manifest
from spec.cli_runner import run_cli
from spec.observe import SHORT, Observed, run_recipe

SECRET = "hf_REPRODUCEsecret42"  # X7: a token given as a setting is written nowhere
SVG = "{http://www.w3.org/2000/svg}"


class Job:
    def __init__(self, directory: Path, ran, seconds: float):
        self.dir, self.ran, self.seconds = directory, ran, seconds
        self.summary = json.loads((directory / "summary.json").read_text(encoding="utf-8"))
        self.report = (directory / "report.md").read_text(encoding="utf-8")
        self.routes = {route["name"]: route for route in self.summary["routes"]}


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Job:
    directory = tmp_path_factory.mktemp("reproduce")
    started = time.perf_counter()
    ran = run_cli("reproduce", "--output", directory, "--set", f"hub_token={SECRET}", timeout=900)
    seconds = time.perf_counter() - started
    assert ran.returncode == 0, ran.stderr[-3000:]
    return Job(directory, ran, seconds)


@pytest.mark.slow
@pytest.mark.claim("X2")
def test_verify_says_a_repeated_run_reproduces_and_names_where_a_changed_one_diverges(tmp_path, fixtures_dir):
    """Same recipe, model and data twice on the CPU: every per-step loss equal. A third run with another
    learning rate differs in that setting, and its losses part from step 2 (step 1 is computed before
    the first update, so it is the same)."""
    model, data = fixtures_dir / "models" / "tiny-gemma2", fixtures_dir / "data" / "qa111_sample.jsonl"
    recipe = apply_overrides(load_recipe("llm2024"), SHORT)
    for name, run_recipe_ in (("a", recipe), ("b", recipe), ("c", apply_overrides(recipe, ["learning_rate=1e-2"]))):
        run_recipe(run_recipe_, model, data, tmp_path / name, Observed())
    same = manifest.compare(manifest.load(tmp_path / "a"), manifest.load(tmp_path / "b"), rtol=0)
    assert same.reproduces and same.max_loss_difference == 0 and same.steps_compared == [1, 2, 3, 4]
    changed = manifest.compare(manifest.load(tmp_path / "a"), manifest.load(tmp_path / "c"))
    assert not changed.reproduces
    assert changed.differences["settings"] == ["training_arguments.learning_rate: 0.002 vs 0.01"]
    assert changed.differences["losses"][0].startswith("loss diverges first at step 2")
    cli = run_cli("verify", tmp_path / "a", tmp_path / "c", timeout=120)
    assert cli.returncode == 1 and "does not reproduce" in cli.stdout
    missing = run_cli("verify", tmp_path / "a", tmp_path / "nope", timeout=120)
    assert missing.returncode == 2 and "nope" in missing.stderr


@pytest.mark.slow
@pytest.mark.claim("C10", "X2", "X7")
def test_the_main_job_runs_the_llm2024_pipeline_end_to_end(job):
    assert SECRET not in job.ran.stdout + job.ran.stderr
    assert [p for p in job.dir.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()] == []
    kept, qa = job.summary["filter"]["kept"], 24
    assert job.summary["training_records"] == kept + qa  # C10: kept magpie records + the QA111 set
    rows = [json.loads(line) for line in (job.dir / "output.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["task_id"] for r in rows] == [0, 1, 2, 3]
    assert "## 1. Filter" in job.report and "adapter created" in job.report and "adapter loaded" in job.report
    assert (job.dir / "loss.svg").read_text().startswith("<svg") and (job.dir / "sft" / "manifest.json").is_file()


# ---------------------------------------------------------------- M1: the model learns its training answers


@pytest.mark.slow
@pytest.mark.claim("M1")
def test_sft_lowers_the_loss_and_raises_the_accuracy_on_its_training_answers(job):
    """Before SFT the random base is close to a uniform guess over the 3,000-token vocabulary: a loss near
    ln 3000 = 8.01 nats per token and almost no answer token right. After SFT the loss on the same answers
    is at least a nat lower and at least one answer token in twenty is predicted right."""
    before, after = job.summary["learning"]["before"], job.summary["learning"]["after"]
    assert abs(before["loss"] - math.log(3000)) < 1.0 and before["accuracy"] < 0.01
    assert after["loss"] < before["loss"] - 1.0 and after["accuracy"] > 0.05
    assert after["tokens"] == before["tokens"] > 1000
    assert f"| before SFT (the base) | {before['loss']:.3f} | {before['accuracy']:.1%} |" in job.report
    assert f"| after SFT | {after['loss']:.3f} | {after['accuracy']:.1%} |" in job.report
    from transformers import AutoTokenizer

    model = Path(__file__).resolve().parent.parent / "fixtures" / "models" / "small-gemma2"
    vocabulary = len(AutoTokenizer.from_pretrained(str(model)))
    assert f"scores ln {vocabulary:,} = {math.log(vocabulary):.3f}" in job.report  # the uniform guess, as a number


@pytest.mark.slow
@pytest.mark.claim("M1")
def test_the_reported_answer_loss_is_what_transformers_computes_for_the_trained_model(job):
    """The base with the saved SFT adapter (NF4, fp32 compute, as the job trains), fed the scored training
    records in one batch padded by transformers' own collator, prompts masked (-100): transformers' causal-LM
    loss, the mean over the answer tokens, equals the reported loss after SFT (within 1%: the job scores in
    batches of 16, padded differently)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, DataCollatorForSeq2Seq

    from reference.methods import sft
    from reference.modeling import lora

    pipeline = reproduce.Pipeline()
    tokenizer = AutoTokenizer.from_pretrained(str(job.dir / "sft"), padding_side="right")
    rows = [json.loads(line) for line in (job.dir / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    scored = rows[:: len(rows) // pipeline.scored_records][: pipeline.scored_records]
    encoded = [
        sft.encode_record(tokenizer, "alpaca-ja", r["instruction"], r["response"], 128, "response") for r in scored
    ]
    batch = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)(encoded)
    nf4 = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    base = AutoModelForCausalLM.from_pretrained(pipeline.model, dtype=torch.float32, quantization_config=nf4)
    model = lora.load_adapter(base, job.dir / "sft", trainable=False).eval()
    with torch.no_grad():
        loss = model(**batch).loss.item()
    assert loss == pytest.approx(job.summary["learning"]["after"]["loss"], rel=0.01)


@pytest.mark.slow
@pytest.mark.claim("M1")
def test_the_outputs_are_non_empty_and_shown_beside_their_tasks(job):
    tasks = [json.loads(line) for line in Path(reproduce.Pipeline().tasks).read_text(encoding="utf-8").splitlines()]
    rows = [json.loads(line) for line in (job.dir / "output.jsonl").read_text(encoding="utf-8").splitlines()]
    assert all(row["output"].strip() for row in rows)
    for task, row in zip(tasks, rows, strict=True):
        line = next(line for line in job.report.splitlines() if line.startswith(f"| {task['task_id']} | "))
        assert task["input"] in line and " ".join(row["output"].split())[:100] in line


@pytest.mark.slow
@pytest.mark.claim("M1", "M3")
def test_the_report_says_what_outputs_of_a_model_this_small_can_show(job):
    """Beside the outputs, the numbers that explain them: the model's weights (the SFT manifest's count), the
    128-token window it trained within (the job's sft.max_seq_length) and the prompts' lengths (summary.json)."""
    summary = json.loads((job.dir / "summary.json").read_text(encoding="utf-8"))
    prompts = [answer["prompt_tokens"] for answer in summary["outputs"]]
    weights = json.loads((job.dir / "sft" / "manifest.json").read_text(encoding="utf-8"))["all_parameters"]
    assert "sft.max_seq_length=128" in reproduce.Pipeline().overrides
    assert f"the model has {weights:,} weights" in job.report and "within a 128-token window" in job.report
    assert f"these prompts hold {min(prompts):,} to {max(prompts):,} tokens" in job.report


# ---------------------------------------------------------------- M2: seed 000's routes measured


@pytest.mark.slow
@pytest.mark.claim("M2")
def test_seed_000s_old_and_new_data_are_disjoint(job):
    old = [json.loads(line) for line in (job.dir / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    new = [json.loads(line) for line in Path(reproduce.Pipeline().new_data).read_text(encoding="utf-8").splitlines()]
    assert {r["instruction"] for r in old}.isdisjoint(r["input"] for r in new)
    assert {r["response"] for r in old}.isdisjoint(r["output"] for r in new)
    assert job.summary["new_records"] == len(new) == 32


@pytest.mark.slow
@pytest.mark.claim("M2", "A1", "A3")
def test_each_route_starts_where_it_should_and_trains_what_it_says(job):
    """trainable and frozen start from the SFT model; fresh from the bare base; merge from the merged base
    (quantised again, so close to the SFT model but not equal). The manifests say which adapter each trained."""
    learning, routes = job.summary["learning"], job.routes
    assert routes["trainable"]["before"]["old"] == routes["frozen"]["before"]["old"] == learning["after"]
    assert routes["fresh"]["before"]["old"] == learning["before"]
    assert routes["merge"]["before"]["old"]["loss"] == pytest.approx(learning["after"]["loss"], abs=0.3)
    mode = {
        name: manifest.load(job.dir / "routes" / name)["adapter"]["mode"] for name in ("trainable", "merge", "fresh")
    }
    assert mode == {"trainable": "loaded", "merge": "created", "fresh": "created"}
    merged = manifest.load(job.dir / "routes" / "merge")["model"]["path"]
    assert Path(merged).name == "merged-base"


@pytest.mark.slow
@pytest.mark.claim("M2", "A1", "A3")
def test_every_trained_route_lowers_the_loss_on_the_new_data(job):
    for name in ("trainable", "merge", "fresh"):
        route = job.routes[name]
        assert route["after"]["new"]["loss"] < route["before"]["new"]["loss"] - 0.3, name


@pytest.mark.slow
@pytest.mark.claim("M2", "A1", "A3")
def test_loaded_trainable_and_merged_routes_keep_the_old_data_better_than_a_fresh_adapter(job):
    """A fresh adapter on the bare base never saw the old data: its old-data loss stays near the base's.
    The routes that continue from the SFT adapter keep most of SFT's drop on the old data."""
    fresh = job.routes["fresh"]["after"]["old"]["loss"]
    for name in ("trainable", "merge"):
        assert job.routes[name]["after"]["old"]["loss"] < fresh - 0.3, name


@pytest.mark.slow
@pytest.mark.claim("M2", "A2")
def test_peft_default_frozen_load_is_refused_and_the_report_says_why(job):
    frozen = job.routes["frozen"]
    assert frozen["trainable_weights"] == 0 and frozen["after"] is None and frozen["run"] is None
    assert "is_trainable=False" in frozen["refused"] and "changes nothing" in frozen["refused"]
    assert frozen["refused"] in job.report
    assert not (job.dir / "routes" / "frozen").exists()


@pytest.mark.slow
@pytest.mark.claim("M2")
def test_the_report_tables_every_route_with_a_picture_and_says_which_keep_what_was_learned_first(job):
    for route in job.summary["routes"]:
        old = route["before"]["old"]["loss"]
        row = next(line for line in job.report.splitlines() if line.startswith(f"| {route['title']} | "))
        assert f"{old:.3f} → " in row
    verdict = job.summary["verdict"]
    assert f"**{verdict}**" in job.report
    keep, lose = verdict.split(";")[0].lower(), verdict.split(";")[1]
    assert "adapter loaded trainable" in keep and "merged, new adapter on top" in keep
    assert "keep most of sft's drop in old-data loss" in keep
    for route in job.summary["routes"][:2]:  # the verdict gives each kept route's old-data accuracy, as the table
        assert f"old-data accuracy {route['after']['old']['accuracy']:.1%}" in verdict
    assert "fresh adapter on the bare base" in lose and "loses the old" in lose
    assert "refused" in verdict.split(";")[2]
    svg = ET.parse(job.dir / "routes.svg").getroot()
    assert "](routes.svg)" in job.report
    assert len(svg.findall(f".//{SVG}rect")) >= 1 + 3 * 4 + 2  # background, 4 bars x 3 trained routes, frozen's 2


# ---------------------------------------------------------------- M3: a report a newcomer can read


@pytest.mark.slow
@pytest.mark.claim("M3")
def test_the_job_takes_under_3_minutes_with_a_progress_line_per_stage_and_per_step(job):
    assert job.seconds < 180, f"{job.seconds:.0f} s"
    lines = job.ran.stderr.splitlines()
    assert [line[:5] for line in lines if re.match(r"\[\d/6\] ", line)] == [f"[{i}/6]" for i in range(1, 7)]
    sft = reproduce.SFT_STEPS
    assert [n for n in range(1, sft + 1) if any(f"step {n}/{sft} loss" in line for line in lines)] == list(
        range(1, sft + 1)
    )
    route_steps = [line for line in lines if re.search(rf"step \d+/{reproduce.CONTINUE_STEPS} loss", line)]
    assert len(route_steps) == 3 * reproduce.CONTINUE_STEPS


@pytest.mark.slow
@pytest.mark.claim("M3")
def test_the_report_gives_the_total_time_and_each_step_plan_as_a_fraction_of_an_epoch(job):
    """SFT: 100 steps of 16 records over R training records; an epoch is ceil(R / 16) steps, so the run is
    100 / ceil(R / 16) of an epoch. Each route: 16 steps of 8 over the 32 new records; an epoch is
    ceil(32 / 8) = 4 steps, so 16 / 4 = 4.00 epochs."""
    total = re.search(r"\*\*Total time: (\d+) s\*\*", job.report)
    assert total and 0 < int(total.group(1)) <= job.seconds
    records = job.summary["training_records"]
    per_epoch = math.ceil(records / 16)
    assert (
        f"100 optimizer steps of 16 records = {100 / per_epoch:.2f} of an epoch over {records:,} records "
        f"(an epoch is {per_epoch} steps)" in job.report
    )
    assert job.report.count("16 optimizer steps of 8 records = 4.00 of an epoch over 32 records") == 3


@pytest.mark.slow
@pytest.mark.claim("M3")
def test_the_loss_pictures_say_what_the_loss_averages_over_and_give_each_route_its_own_step_axis(job):
    """loss.svg: SFT's steps, the loss over every token (llm2024 trains with loss_on = all), which the report says
    beside the answer-token table. continuation.svg: each of the 3 trained routes from its own step 1, as each
    starts its own schedule, drawn over the same x positions."""
    svg = ET.parse(job.dir / "loss.svg").getroot()
    texts = [t.text for t in svg.iter(f"{SVG}text")]
    assert "optimizer step" in texts and "training loss (nats per token, every token)" in texts
    assert "0" in texts and str(reproduce.SFT_STEPS) in texts  # tick labels from 0, the step axis up to the last
    lines = [line.get("points").split() for line in svg.iter(f"{SVG}polyline")]
    assert len(lines) == 1 and len(lines[0]) == reproduce.SFT_STEPS
    routes = ET.parse(job.dir / "continuation.svg").getroot()
    xs = [[float(p.split(",")[0]) for p in line.get("points").split()] for line in routes.iter(f"{SVG}polyline")]
    assert len(xs) == 3 and all(x == xs[0] and len(x) == reproduce.CONTINUE_STEPS for x in xs)
    assert "](loss.svg)" in job.report and "](continuation.svg)" in job.report
    assert "averages over every token of each record" in job.report


@pytest.mark.slow
@pytest.mark.claim("M3")
def test_every_path_in_the_report_is_relative_to_the_run_directory_and_exists(job):
    assert str(job.dir) not in job.report and str(job.dir.resolve()) not in job.report
    named = re.findall(r"`([\w./-]+\.(?:jsonl|json|svg)|[\w.-]+/[\w./-]*)`", job.report) + re.findall(
        r"\]\(([\w./-]+)\)", job.report
    )
    assert "sft/manifest.json" in named and "output.jsonl" in named
    assert [path for path in named if not (job.dir / path).exists()] == []


@pytest.mark.slow
@pytest.mark.claim("M3")
def test_third_party_loading_bars_stay_out_of_a_log(job):
    assert "Loading weights" not in job.ran.stderr and "pip install kernels" not in job.ran.stderr


@pytest.mark.claim("M3", "L2")
def test_a_warmup_longer_than_its_run_is_warned_about_in_the_report():
    """4 steps with a warmup of 10: the learning rate never reaches its peak. The report's line, written out: the
    warmup of 10 steps is not shorter than the run's 4."""
    from reference.job import report
    from reference.training import steps

    plan = steps.plan(steps.StepSettings(records=32, batch_size=8, max_steps=4, warmup=10))
    run = {"plan": report.plan_summary(plan.to_dict(), 32), "learning_rate": 1e-2}
    lines = report._plan_line(run)
    assert lines[0].startswith("- step plan: 4 optimizer steps of 8 records = 1.00 of an epoch over 32 records")
    assert lines[1] == (
        "- **warning: warmup of 10 steps is not shorter than the run's 4 steps: the learning rate never reaches its "
        "peak**"
    )
    shorter = steps.plan(steps.StepSettings(records=32, batch_size=8, max_steps=4, warmup=1))
    assert report._plan_line({"plan": report.plan_summary(shorter.to_dict(), 32), "learning_rate": 1e-2})[1:] == []


# ---------------------------------------------------------------- M4: the committed reference run


@pytest.mark.slow
@pytest.mark.claim("M4", "X2")
def test_a_fresh_run_reproduces_the_committed_reference_run_within_the_stated_tolerance(job):
    runs = reproduce.reference_runs()
    assert runs == ["routes/fresh", "routes/trainable", "sft"]
    for run in runs:
        verdict = manifest.compare(
            manifest.load(reproduce.REFERENCE_RUN / run), manifest.load(job.dir / run), rtol=reproduce.REFERENCE_RTOL
        )
        assert verdict.reproduces, (run, verdict.differences)
        assert len(verdict.steps_compared) == len(manifest.load(job.dir / run)["steps"])
    assert job.summary["reference_run"]["runs"]["sft"]["reproduces"] is True
    assert "- `sft`: reproduces" in job.report
    cli = run_cli("verify", reproduce.REFERENCE_RUN / "sft", job.dir / "sft", "--rtol", reproduce.REFERENCE_RTOL)
    assert cli.returncode == 0 and "reproduces" in cli.stdout


# ---------------------------------------------------------------- around the main job: curves and quiet logs


@pytest.mark.slow
@pytest.mark.claim("L2", "P12")
def test_report_to_tensorboard_writes_event_files_in_the_run_directory(tmp_path, fixtures_dir):
    """`report_to=tensorboard` goes to the Trainer's own TensorBoardCallback (no network): its event files
    land under the run directory (output_dir/runs/...), and TensorBoard's reader finds one train/loss value
    per logged step (logging_steps=1: steps 1 to 4), each the step's loss of the manifest (the Trainer
    rounds its logged loss to 4 decimals)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = apply_overrides(load_recipe("llm2024"), [*SHORT, "report_to=tensorboard"])
    record = run_recipe(
        recipe,
        fixtures_dir / "models" / "tiny-gemma2",
        fixtures_dir / "data" / "qa111_sample.jsonl",
        tmp_path / "run",
        Observed(),
    )
    events = sorted((tmp_path / "run").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file in the run directory"
    curves = EventAccumulator(str(events[0].parent))
    curves.Reload()
    losses = curves.Scalars("train/loss")
    assert [e.step for e in losses] == [1, 2, 3, 4]
    assert [e.value for e in losses] == pytest.approx([round(s["loss"], 4) for s in record.steps], abs=1e-4)


POINTLESS_ADVICE = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make "
    "sure you already `pip install kernels` and the kernels >= 0.11.1",
    "transformers.training_args": "When using FSDP, prefer `fsdp_config['activation_checkpointing']` (FSDP's own "
    "activation checkpointing) over the `activation_checkpointing` training argument; %s",
}
"""The messages as bitsandbytes 0.50 and transformers 5.23 log them."""


@pytest.mark.parametrize("logger", list(POINTLESS_ADVICE))
def test_third_party_advice_that_would_not_help_is_dropped_and_nothing_else(caplog, logger):
    """bitsandbytes' `pip install kernels` hint on a CPU with AVX512-BF16 (it falls back to its own kernel, and
    there is no hub to fetch one from) and transformers' advice to use FSDP's own checkpointing (with an adapter it
    saves an empty one, reference/training/distributed.py): dropped. Another warning of the same logger, and the
    project's
    own, still show."""
    import logging

    from reference import quiet

    quiet.install()
    with caplog.at_level(logging.WARNING):
        logging.getLogger(logger).warning(POINTLESS_ADVICE[logger], "...")
        logging.getLogger(logger).warning("another warning of that logger")
        logging.getLogger("reference").warning("the project's own warning")
    assert [r.getMessage() for r in caplog.records] == ["another warning of that logger", "the project's own warning"]


@pytest.mark.slow
def test_weight_loading_bars_go_to_a_terminal_but_not_to_a_log():
    """A model load in a new process whose stderr is a pipe: transformers draws its "Loading weights" bar
    there unless reference.quiet is installed first."""
    import subprocess
    import sys

    from spec.cli_runner import offline_env

    load = "from reference.modeling import models; models.load_causal_lm('fixtures/models/tiny-gemma2')"
    env = {k: v for k, v in offline_env().items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    root = Path(reproduce.__file__).resolve().parents[2]  # the repository: reference/job/reproduce.py
    plain = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, env=env, cwd=root)
    quiet = subprocess.run(
        [sys.executable, "-c", f"from reference import quiet; quiet.install(); {load}"],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
    )
    assert plain.returncode == quiet.returncode == 0, plain.stderr + quiet.stderr
    assert "Loading weights" in plain.stderr and "Loading weights" not in quiet.stderr
