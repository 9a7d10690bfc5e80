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


# --- what each method refuses before anything loads or the output directory is claimed ------------------------------


def classifier_adapter(directory, tiny_gemma2_dir):
    """A saved preference-classifier adapter (peft task SEQ_CLS) on tiny-gemma2, untrained."""
    import peft
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_gemma2_dir), num_labels=3)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], task_type="SEQ_CLS")
    peft.get_peft_model(model, config).save_pretrained(directory)
    return directory


@pytest.mark.claim("X12")
@pytest.mark.parametrize("command", ["dpo", "train", "preference train"])
def test_an_adapter_made_for_another_task_is_refused_before_the_output_is_claimed(
    command, tiny_gemma2_dir, fixtures_dir, saved_adapter, tmp_path
):
    """A classifier's adapter (SEQ_CLS) cannot continue as a causal LM's policy, nor a causal LM's (CAUSAL_LM)
    as a classifier: peft would fail half-way (or load it silently into the wrong head). Exit 2, both tasks named."""
    from spec.cli_runner import run_main

    wrong = saved_adapter if command == "preference train" else classifier_adapter(tmp_path / "cls", tiny_gemma2_dir)
    data = {"dpo": "preference_pairs.jsonl", "train": "qa111_sample.jsonl", "preference train": "lmsys_sample.jsonl"}
    argv = [*command.split(), "--model", tiny_gemma2_dir, "--data", fixtures_dir / "data" / data[command]]
    argv += ["--adapter", wrong, "--output", tmp_path / "out"]
    if command == "train":
        argv = ["continue", *argv[1:], "--recipe", "llm2024"]
    code, out, err = run_main(*argv)
    assert code == 2 and "an adapter for task" in err and ("SEQ_CLS" in err and "CAUSAL_LM" in err), err
    assert not (tmp_path / "out").exists()


@pytest.mark.claim("X12")
@pytest.mark.parametrize(
    "command, override, reads",
    [
        ("dpo", "sft.max_seq_length=10", "dpo"),
        ("train", "dpo.beta=5", "sft"),
        ("preference train", "dpo.beta=5", "classifier"),
    ],
)
def test_a_setting_of_another_methods_section_is_refused_not_ignored(
    command, override, reads, tiny_gemma2_dir, fixtures_dir, tmp_path
):
    from spec.cli_runner import run_main

    argv = [*command.split(), "--model", tiny_gemma2_dir, "--data", fixtures_dir / "data" / "x.jsonl"]
    argv += ["--output", tmp_path / "out", override] + (["--recipe", "llm2024"] if command == "train" else [])
    code, _, err = run_main(*argv)
    assert code == 2 and f"sets {override.partition('=')[0]}, which" in err and f"it reads [{reads}]" in err, err


@pytest.mark.claim("X12")
def test_trls_bare_beta_is_pointed_to_the_dpo_section(tiny_gemma2_dir, fixtures_dir, tmp_path):
    from spec.cli_runner import run_main

    data = fixtures_dir / "data" / "preference_pairs.jsonl"
    code, _, err = run_main("dpo", "--model", tiny_gemma2_dir, "--data", data, "--output", tmp_path / "o", "beta=0.2")
    assert code == 2 and "has no argument 'beta'; did you mean 'dpo.beta'?" in err


@pytest.mark.claim("X12", "L1")
def test_a_classifier_file_too_small_to_split_is_refused_before_an_old_run_is_overwritten(
    tiny_gemma2_dir, fixtures_dir, tmp_path
):
    """One row: the held-out split takes max(1, int(1 x 0.25)) = 1 row and leaves none to train on. Refused
    before the output directory is claimed, so --overwrite has not removed the run already there."""
    from spec.cli_runner import run_main

    one = tmp_path / "one.jsonl"
    one.write_text((fixtures_dir / "data" / "lmsys_sample.jsonl").read_text(encoding="utf-8").splitlines()[0] + "\n")
    old = tmp_path / "old"
    old.mkdir()
    (old / "run.json").write_text("{}")
    argv = ["preference", "train", "--model", tiny_gemma2_dir, "--data", one, "--output", old, "--overwrite"]
    code, _, err = run_main(*argv)
    assert code == 2 and "1 row(s) leave nothing to train on after holding out 1" in err, err
    assert (old / "run.json").read_text() == "{}"


@pytest.mark.slow
@pytest.mark.claim("D3", "X9")
def test_dpo_turns_dropout_off_so_the_first_loss_is_exactly_log_2(tiny_gemma2_dir, fixtures_dir, tmp_path):
    """With lora_dropout 0.5 the policy's and the reference's passes would drop different units and the first
    loss would not be log 2; trl's DPOTrainer turns dropout off (disable_dropout), and so does the run."""
    import math

    recipe = recipes.apply_overrides(recipes.load_recipe("dpo"), ["max_steps=1", "lora.lora_dropout=0.5"])
    lines = []
    record = dpo.run(
        recipe, tiny_gemma2_dir, fixtures_dir / "data" / "preference_pairs.jsonl", tmp_path, say=lines.append
    )
    assert record.steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert any("dropout set to 0 in" in line for line in lines)


@pytest.mark.slow
@pytest.mark.claim("L1", "A1")
def test_continuing_a_classifier_starts_from_its_held_out_score(tiny_gemma2_dir, fixtures_dir, tmp_path):
    """`preference train --adapter FIRST` (seed 000's question, for the classifier): the run's log-loss before
    training is the saved classifier's, on the same held-out rows (same data, same seed): the first run's
    log-loss after, to the bf16 rounding of the saved adapter."""
    data = fixtures_dir / "data" / "lmsys_refusals.jsonl"
    on = ["--model", tiny_gemma2_dir, "--data", data, "max_steps=6", "classifier.max_length=48"]
    first = run_cli("preference", "train", *on, "--output", tmp_path / "first")
    assert first.returncode == 0, first.stderr[-2000:]
    again = run_cli("preference", "train", *on, "--output", tmp_path / "again", "--adapter", tmp_path / "first")
    assert again.returncode == 0, again.stderr[-2000:]
    before = json.loads(again.stdout)["results"]["log_loss_before"]
    assert before == pytest.approx(json.loads(first.stdout)["results"]["log_loss_after"], abs=5e-3)
    assert json.loads(again.stdout)["adapter"]["mode"] == "loaded"
