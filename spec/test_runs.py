"""X12: every training method is a run. DPO and the preference classifier are run here exactly as `train` is run in
spec/test_resume.py and spec/test_rundir.py: a real process per command, a recipe with key=value overrides, one run
per directory, a kill past a checkpoint and `--resume`, and `verify` comparing the manifests.

    runs.run(method, recipe, ...)    the one skeleton (reference/training/runs.py): resolve -> TrainingArguments ->
    Trainer
                                     -> complete checkpoints -> manifest; a method gives its data, model and loss

Both commands are cut to SIX steps with checkpoints at steps 3 and 6, on the fixture data:
    dpo                 preference_pairs.jsonl (12 pairs), batch 4: 3 steps an epoch
    preference train    lmsys_refusals.jsonl (112 rows, 84 trained on), batch 4, inputs cut to 48 tokens
"""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
from safetensors.torch import load_file

from reference.methods import dpo, preference
from reference.settings import recipes
from spec.cli_runner import killed_after_step, run_cli
from spec.observe import Observed

SIX = ["max_steps=6", "save_steps=3", "logging_steps=1", "per_device_train_batch_size=4"]
METHODS = {
    "dpo": (("dpo",), "preference_pairs.jsonl", SIX),
    "classifier": (("preference", "train"), "lmsys_refusals.jsonl", [*SIX, "classifier.max_length=48"]),
}


def command(method: str, model_dir, fixtures_dir, output, *extra) -> list:
    words, data, overrides = METHODS[method]
    return [
        *words,
        "--model",
        model_dir,
        "--data",
        fixtures_dir / "data" / data,
        "--output",
        output,
        *overrides,
        *extra,
    ]


def finished(output) -> SimpleNamespace:
    return SimpleNamespace(
        output=output,
        manifest=json.loads((output / "manifest.json").read_text(encoding="utf-8")),
        adapter=load_file(str(output / "adapter_model.safetensors")),
    )


@pytest.fixture(scope="module", params=sorted(METHODS))
def runs_of(request, tiny_gemma2_dir, fixtures_dir, tmp_path_factory):
    """Per method: the six-step run, the same command again into another directory, and a run killed with SIGKILL
    after step 4 or 5 (past checkpoint-3) then carried on with `--resume`."""
    method = request.param
    done = {}
    for name in ("first", "second"):
        output = tmp_path_factory.mktemp(f"{method}-{name}")
        ran = run_cli(*command(method, tiny_gemma2_dir, fixtures_dir, output))
        assert ran.returncode == 0, ran.stderr[-3000:]
        done[name] = finished(output)

    output = tmp_path_factory.mktemp(f"{method}-killed")
    kill_after = random.Random(method).randint(4, 5)
    killed_after_step(command(method, tiny_gemma2_dir, fixtures_dir, output), kill_after, 6)
    assert not (output / "manifest.json").exists()
    resumed = run_cli(*command(method, tiny_gemma2_dir, fixtures_dir, output, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    done["resumed"] = finished(output)
    done["resumed"].stderr = resumed.stderr
    return SimpleNamespace(method=method, **done)


@pytest.mark.slow
@pytest.mark.claim("X12", "X5")
def test_a_second_run_into_the_same_directory_is_refused_and_changes_nothing(runs_of, tiny_gemma2_dir, fixtures_dir):
    output = runs_of.first.output
    before = {p.name: p.stat().st_mtime_ns for p in output.iterdir()}
    again = run_cli(*command(runs_of.method, tiny_gemma2_dir, fixtures_dir, output))
    assert again.returncode == 2 and "holds a run already" in again.stderr
    assert {p.name: p.stat().st_mtime_ns for p in output.iterdir()} == before


@pytest.mark.slow
@pytest.mark.claim("X12", "X2")
def test_two_runs_of_the_same_command_verify(runs_of):
    result = run_cli("verify", runs_of.first.output, runs_of.second.output, "--rtol", "0")
    assert result.returncode == 0, result.stdout
    assert "losses compared at 6 steps, 1 to 6; largest difference 0" in result.stdout
    assert runs_of.first.manifest["method"] == runs_of.method


@pytest.mark.slow
@pytest.mark.claim("X12", "X1")
def test_a_run_killed_past_a_checkpoint_resumes_to_the_uninterrupted_runs_losses_and_adapter(runs_of):
    """The resumed run carries on from checkpoint-3: its steps 4 to 6 have the uninterrupted run's losses
    exactly, `verify` says it reproduces that run, and the saved adapters are equal bit for bit."""
    resumed = runs_of.resumed
    assert resumed.manifest["resumed_from"].endswith("checkpoint-3")
    assert [s["step"] for s in resumed.manifest["steps"]] == [4, 5, 6]
    result = run_cli("verify", runs_of.first.output, resumed.output, "--rtol", "0")
    assert result.returncode == 0, result.stdout
    first = runs_of.first.adapter
    assert first.keys() == resumed.adapter.keys()
    assert all(first[k].equal(resumed.adapter[k]) for k in first)


@pytest.mark.slow
@pytest.mark.claim("X12", "X8")
@pytest.mark.parametrize("method", sorted(METHODS))
def test_the_manifest_records_the_arguments_the_trainer_ran_with(method, tiny_gemma2_dir, fixtures_dir, tmp_path):
    """What the Trainer was handed (its arguments' to_dict(), seen by a callback once it is built) is what the
    manifest says it ran with, field for field; and the method's own section is recorded with every default
    written out."""
    words, data, overrides = METHODS[method]
    recipe = recipes.apply_overrides(recipes.load_recipe("dpo" if method == "dpo" else "lmsys-classifier"), overrides)
    observed = Observed()
    module = dpo if method == "dpo" else preference
    record = module.run(
        recipe, tiny_gemma2_dir, fixtures_dir / "data" / data, tmp_path, say=lambda _: None, callbacks=[observed]
    )
    written = json.loads((tmp_path / "manifest.json").read_text(encoding="utf-8"))
    assert written["settings"]["training_arguments"] == json.loads(json.dumps(observed.arguments, default=str))
    section = "dpo" if method == "dpo" else "classifier"
    defaults = {
        "dpo": {"beta": 0.1, "max_length": 256},
        "classifier": {
            "max_length": 48,
            "batch_size": 4,
            "spread_max_length": False,
            "tta": False,
            "eval_fraction": 0.25,
        },
    }
    assert written["settings"][section] == defaults[section]
    assert written["method"] == record.method == method and written["settings"]["method"] == method


@pytest.mark.slow
@pytest.mark.claim("X12", "X5")
def test_resuming_with_a_changed_method_setting_is_refused_naming_it(runs_of, tiny_gemma2_dir, fixtures_dir):
    """A checkpoint belongs to the run that wrote it: the same command with the method's own setting changed is a
    different run, and --resume refuses it by name."""
    change = "dpo.beta=0.2" if runs_of.method == "dpo" else "classifier.max_length=40"
    again = run_cli(*command(runs_of.method, tiny_gemma2_dir, fixtures_dir, runs_of.resumed.output, change, "--resume"))
    assert again.returncode == 2, again.stderr[-2000:]
    assert change.partition("=")[0].split(".")[1] in again.stderr
