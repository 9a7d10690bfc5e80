"""The command line as a user types it: `python -m reference COMMAND ...` in a new process, offline.

Every test runs a command through `run_cli` (spec/cli_runner.py) and reads its exit code, stdout and
stderr; a refusal that comes before any work runs through `run_main`, the same `cli.main` in this
process, which spares it a new interpreter's seconds of importing torch. What the commands compute is
pinned by the method tests (test_steps.py, test_continuation.py, test_merge.py); here, that a command
reaches it, prints it, and refuses bad input with exit code 2 naming the argument. The number ranges
every command checks are in test_cli_inputs.py. The adapter the `merge` and `continue` commands start
from is the `saved_adapter` fixture of spec/conftest.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from reference.modeling import models
from reference.training import checkpoints
from reference.training.steps import StepSettings
from spec.adapters import (
    ON_THE_CPU,
    THREE_STEPS,
    TOLERANCE,
    adapter_tensors,
    base_plus_adapter_logits,
    logits_of,
    max_difference,
    trained_b,
)
from spec.cli_runner import QA, cli_command, offline_env, run_cli, run_main

# --- steps (P9, P10, L4): its flags are StepSettings' fields ---

STEPS_HELP = {
    "--records RECORDS": "Rows in the training set. (required)",
    "--grad-accum GRAD_ACCUM": "gradient_accumulation_steps: micro-batches per optimizer step. (default: 1)",
    "--epochs EPOCHS": "num_train_epochs; may be fractional. Ignored when max_steps > 0. (default: 3.0)",
    "--save-total-limit SAVE_TOTAL_LIMIT": "Checkpoints kept on disk, the newest; None (unset) or <= 0 keeps them "
    "all. (default: None)",
    "--drop-last": "dataloader_drop_last: drop the last incomplete batch. (default: off)",
}
"""Some flags' help as it should read: the field's help in reference/training/steps.py, then its default."""


def test_every_step_setting_is_a_flag_whose_help_is_its_fields_help_and_default():
    """litgpt's pattern: one flag per StepSettings field (`batch_size` -> `--batch-size`), described once."""
    result = run_cli("steps", "--help", env={"COLUMNS": "1000"})  # no wrapped lines
    assert result.returncode == 0, result.stderr
    help_text = " ".join(result.stdout.split())
    for field in dataclasses.fields(StepSettings):
        assert f"--{field.name.replace('_', '-')}" in help_text
    for flag, text in STEPS_HELP.items():
        assert f"{flag} {text}" in help_text


def test_every_steps_flag_reaches_the_step_settings():
    """Each flag given a value that is not its default comes back, under its field's name, in the JSON."""
    given = {
        "records": 14,
        "batch_size": 1,
        "grad_accum": 2,
        "epochs": 2.0,
        "max_steps": 5,
        "world_size": 2,
        "warmup": 2.0,
        "save_strategy": "epoch",
        "save_steps": 4.0,
        "save_total_limit": 1,
        "logging_strategy": "no",
        "logging_steps": 3.0,
    }
    flags = [part for name, value in given.items() for part in (f"--{name.replace('_', '-')}", str(value))]
    result = run_cli("steps", *flags, "--logging-first-step", "--drop-last", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["settings"] == {**given, "logging_first_step": True, "drop_last": True}


@pytest.mark.claim("P9", "L4")
def test_steps_cli_prints_json_with_the_contract_keys():
    """15,000 steps (P9); warmup 0.125 of them = 1,875; STEPS_PER_EPOCH = 10,000 // 2 = 5,000."""
    result = run_cli("steps", "--records", "10000", "--batch-size", "2", "--epochs", "3", "--warmup", "0.125", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    for key in (
        "micro_batches",
        "micro_batches_per_epoch",
        "optimizer_steps_per_epoch",
        "total_optimizer_steps",
        "effective_batch_size",
        "warmup_steps",
        "checkpoints_written",
        "checkpoints_kept",
        "log_lines",
        "custom_loop_steps_per_epoch",
    ):
        assert key in data
    assert (data["total_optimizer_steps"], data["warmup_steps"]) == (15_000, 1_875)
    assert data["custom_loop_steps_per_epoch"] == 5_000
    assert data["checkpoints_written"] == 30  # every 500 steps (the Trainer's default) up to 15,000


@pytest.mark.claim("L4")
def test_steps_cli_table_shows_trainer_and_custom_loop_side_by_side():
    """1001 records, batch 2, 2 processes: the Trainer takes ceil(ceil(1001/2)/2) = 251 steps an epoch, the
    custom loop 1001 // (2 x 2) = 250, dropping 1 record."""
    result = run_cli("steps", "--records", "1001", "--batch-size", "2", "--world-size", "2", "--epochs", "1")
    assert result.returncode == 0, result.stderr
    assert "total optimizer steps" in result.stdout and "251" in result.stdout
    assert "STEPS_PER_EPOCH" in result.stdout and "250 (drops 1 records)" in result.stdout


@pytest.mark.parametrize(
    "args,named",
    [
        (["--records", "0", "--batch-size", "2"], "--records"),
        (["--records", "10", "--batch-size", "0"], "--batch-size"),
        (["--records", "10", "--batch-size", "2", "--warmup", "2.5"], "--warmup"),
        (["--records", "10", "--batch-size", "2", "--warmup", "abc"], "--warmup"),
        (["--records", "10", "--batch-size", "2", "--save-strategy", "sometimes"], "--save-strategy"),
        (["--records", "ten", "--batch-size", "2"], "--records"),
    ],
)
def test_steps_cli_rejects_bad_arguments_with_exit_2_naming_the_argument(args, named):
    result = run_cli("steps", *args)
    assert result.returncode == 2
    assert named in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.claim("P10")
@pytest.mark.parametrize("warmup,max_steps,warned", [(300, 4, True), (4, 4, True), (3, 4, False), (0, 4, False)])
def test_warmup_that_lasts_the_whole_run_is_warned_about(warmup, max_steps, warned):
    """The README's old example: warmup 300 and max_steps 4 train at 0, 1/300, 2/300, 3/300 of the rate.
    Warmup 4 of 4 steps never reaches the peak either (the last step runs at 3/4); warmup 3 of 4 does."""
    result = run_cli("steps", "--records", 100, "--batch-size", 4, "--max-steps", max_steps, "--warmup", warmup)
    assert result.returncode == 0
    assert ("warning: warmup of" in result.stderr and "never reaches its peak" in result.stderr) is warned


# --- merge and continue (A1, A3, X6) ---


@pytest.mark.slow
@pytest.mark.claim("A3")
def test_the_merge_command_dequantises_an_nf4_base_and_prints_what_it_merged(saved_adapter, tiny_gemma2_dir, tmp_path):
    """`merge --quantization nf4` runs lora.merge (test_merge.py) and prints its summary; the model it
    writes is a plain bf16 one."""
    output = tmp_path / "model"
    result = run_cli(
        "merge", "--model", tiny_gemma2_dir, "--adapter", saved_adapter, "--output", output, "--quantization", "nf4"
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["base_quantization"] == "nf4" and summary["merged"] == str(output.resolve())
    model, identity = models.load_causal_lm(output, dtype="bfloat16")
    assert identity.quantization == "none" and model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


@pytest.mark.slow
def test_a_command_logging_to_a_pipe_draws_no_weight_loading_bars_and_no_kernels_hint(
    saved_adapter, tiny_gemma2_dir, tmp_path
):
    """Every command installs reference.quiet first (cli.main): with stderr a pipe, as a log file is, `merge` of an
    NF4 base loads two models and its stderr holds no "Loading weights" bar and no `pip install kernels` advice
    (spec/test_reproduce.py shows the bar appears in the same pipe without it)."""
    command = cli_command("merge", "--model", tiny_gemma2_dir, "--adapter", saved_adapter, "--output", tmp_path / "m")
    env = {k: v for k, v in offline_env().items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "Loading weights" not in done.stderr and "pip install kernels" not in done.stderr


class OpensAFile:
    """Unpickling this opens (creates) a file: the proof that a pickle was loaded."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.mark.claim("X6")
def test_an_adapter_with_only_pickled_weights_is_refused_without_unpickling_them(
    saved_adapter, tiny_gemma2_dir, tmp_path
):
    """Adapters load from safetensors only: adapter_model.bin is a pickle, and unpickling runs whatever it
    names. Here it would create `unpickled`; the merge command refuses with exit 2 and the file never appears."""
    pickled = tmp_path / "pickled"
    shutil.copytree(saved_adapter, pickled)
    (pickled / "adapter_model.safetensors").unlink()
    (pickled / "adapter_model.bin").write_bytes(pickle.dumps(OpensAFile(tmp_path / "unpickled")))
    code, _, err = run_main("merge", "--model", tiny_gemma2_dir, "--adapter", pickled, "--output", tmp_path / "merged")
    assert code == 2 and "no adapter_model.safetensors" in err and "never unpickled" in err
    assert not (tmp_path / "unpickled").exists() and not (tmp_path / "merged").exists()


@pytest.mark.slow
@pytest.mark.claim("A1")
def test_the_continue_command_keeps_training_the_saved_adapter(saved_adapter, tiny_gemma2_dir, magpie_data, tmp_path):
    on = ["--model", tiny_gemma2_dir, "--adapter", saved_adapter]
    code, out, err = run_cli("continue", *on, "--data", magpie_data, "--output", tmp_path, *THREE_STEPS)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["adapter"]["mode"] == "loaded"
    assert summary["adapter"]["path"] == str(saved_adapter.resolve())
    assert summary["steps"] == 3 and summary["last_loss"] < summary["first_loss"]


@pytest.mark.slow
@pytest.mark.claim("A3")
def test_continuing_by_merging_trains_a_fresh_adapter_on_the_merged_base(
    saved_adapter, tiny_gemma2_dir, magpie_data, tmp_path
):
    """`continue --mode merge`: the merged base (the recipe's NF4 dequantised, as lora.merge does) gets a new
    adapter that starts at zero and trains: the run says it created one, and its loss falls."""
    on = ["--model", tiny_gemma2_dir, "--adapter", saved_adapter]
    code, out, err = run_cli(
        "continue", "--mode", "merge", *on, "--data", magpie_data, "--output", tmp_path, *THREE_STEPS
    )
    assert code == 0, err
    summary = json.loads(out)
    assert summary["adapter"]["mode"] == "created" and summary["last_loss"] < summary["first_loss"]
    merged_base, identity = models.load_causal_lm(tmp_path / "merged-base", dtype="bfloat16")
    expected = base_plus_adapter_logits(tiny_gemma2_dir, saved_adapter)
    assert identity.quantization == "none" and max_difference(logits_of(merged_base.eval()), expected) <= 4 * TOLERANCE


@pytest.mark.claim("A1")
def test_a_missing_adapter_is_named_with_exit_code_2(tiny_gemma2_dir, qa_data, tmp_path):
    on = ["--model", tiny_gemma2_dir, "--adapter", tmp_path / "no-adapter"]
    code, _, err = run_main("continue", *on, "--data", qa_data, *QA, "--output", tmp_path / "x")
    assert code == 2 and str(tmp_path / "no-adapter") in err and "no adapter_config.json" in err


# --- train under torchrun (X3) ---


def rank_logs(log_dir: Path) -> dict[str, str]:
    """Every file torchrun wrote per rank (stdout.log, stderr.log), whole, by path."""
    return {str(p.relative_to(log_dir)): p.read_text(errors="replace") for p in sorted(log_dir.rglob("*.log"))}


def torchrun_failure(result, log_dir: Path) -> str:
    logs = "".join(f"\n===== {name} =====\n{text}" for name, text in rank_logs(log_dir).items())
    return f"torchrun exit {result.returncode}\n===== launcher stderr =====\n{result.stderr}{logs}"


SLOW_RANK_1 = """
import os
if os.environ.get("RANK") == "1":  # the second process writes its part of each checkpoint 2 s late
    import time
    from transformers import Trainer
    save_rng_state = Trainer._save_rng_state
    def late(self, output_dir):
        time.sleep(2)
        save_rng_state(self, output_dir)
    Trainer._save_rng_state = late
"""


@pytest.mark.slow
@pytest.mark.claim("X3")
def test_torchrun_with_two_processes_follows_the_world_size_step_plan_and_keeps_both_in_step(
    tmp_path, tiny_gemma2_dir, qa_data
):
    """`torchrun --nproc_per_node 2` (DDP over gloo on the CPU) with the llm2024 recipe. By hand: 24 records,
    batch 2 on each of 2 processes = 6 micro-batches per process, accumulation 2 -> 3 optimizer steps in the
    epoch (a single process would take 6). Both processes end with the same, trained adapter weights.

    Each process writes its own RNG state into a checkpoint; the Trainer's save of it is made 2 s late on
    rank 1 (a sitecustomize on its path), and the final checkpoint must still be marked complete with both
    files in the marker: the marker waits for every process.

    The rendezvous store binds port 0 itself (a free port, chosen by the OS when it binds: no clash with a
    run beside this one, no window between finding the port and taking it). Each rank's whole stdout and
    stderr go to files, shown in full on failure; faulthandler dumps every thread's stack on a fatal signal."""
    logs, hooks = tmp_path / "logs", tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SLOW_RANK_1)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    launcher += ["--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0", "--rdzv-id", uuid.uuid4().hex]
    launcher += ["--log-dir", str(logs), "--redirects", "3"]
    train = ["-m", "reference", "train", "--recipe", "llm2024", "--model", str(tiny_gemma2_dir)]
    train += ["--data", str(qa_data), *QA, "--output", str(tmp_path / "run")]
    train += ["num_train_epochs=1", "per_device_train_batch_size=2", "gradient_accumulation_steps=2"]
    train += ["warmup_steps=0", "save_steps=100", "learning_rate=2e-3", "sft.max_seq_length=40", ON_THE_CPU]
    # gloo, on a GPU machine too
    path = os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")]))
    env = offline_env(PYTHONPATH=path, PYTHONFAULTHANDLER="1", TORCH_SHOW_CPP_STACKTRACES="1")
    result = subprocess.run([*launcher, *train], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, torchrun_failure(result, logs)

    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["step_plan"]["world_size"] == 2 and manifest["step_plan"]["micro_batches_per_epoch"] == 6
    assert manifest["step_plan"]["total_optimizer_steps"] == 3 == len(manifest["steps"])
    digests = manifest["trainable_sha256_per_process"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert manifest["steps"][-1]["loss"] < manifest["steps"][0]["loss"]
    assert trained_b(adapter_tensors(tmp_path / "run"))
    final = tmp_path / "run" / "checkpoints" / "checkpoint-3"
    marked = json.loads((final / "complete.json").read_text())["files"]
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(marked) and checkpoints.why_incomplete(final) is None
    outputs = {name: text for name, text in rank_logs(logs).items() if name.endswith("stdout.log")}
    assert sorted(text.count('"manifest"') for text in outputs.values()) == [0, 1]  # one summary, from rank 0


def test_version_is_the_packages_own():
    """`ftref --version` says the version pip installed (the package metadata), exit 0."""
    from importlib import metadata

    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"ftref {metadata.version('ftref')}"
