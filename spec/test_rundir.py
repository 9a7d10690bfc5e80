"""A run directory belongs to one run (reference/training/rundir.py, claim X5): a lock while a run writes it, reuse only
with --resume or --overwrite, and --resume refused when the model, data or settings differ from the run's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from reference.errors import InputError
from reference.training import rundir
from spec.cli_runner import QA, cli_command, offline_env, run_cli, run_main
from spec.conftest import FIXTURES

MODEL, DATA = FIXTURES / "models" / "tiny-gemma2", FIXTURES / "data" / "qa111_sample.jsonl"
TINY = [
    "max_steps=2",
    "per_device_train_batch_size=2",
    "gradient_accumulation_steps=1",
    "warmup_steps=0",
    "save_steps=1",
    "sft.max_seq_length=48",
    "use_cpu=true",
]


def train_command(output, *extra, data=DATA) -> list:
    """`train --recipe llm2024` of the tiny Gemma-2 on `data` (the QA fixture) into `output`, then `extra`."""
    return ["train", "--recipe", "llm2024", "--model", MODEL, "--data", data, *QA, "--output", output, *extra]


def train(output, *extra, data=DATA) -> tuple[int, str]:
    result = run_cli(*train_command(output, *extra, *TINY, data=data))
    return result.returncode, result.stderr


@pytest.mark.claim("X5")
def test_a_second_run_into_a_directory_being_written_is_refused_naming_the_holder(tmp_path):
    with rundir.claimed(tmp_path / "run", say=lambda text: None):
        assert (tmp_path / "run" / ".lock").read_text() == str(os.getpid())
        with pytest.raises(InputError, match=f"another run \\(process {os.getpid()}\\) is writing this directory"):
            with rundir.claimed(tmp_path / "run"):
                pass
    assert not (tmp_path / "run" / ".lock").exists()  # released when the run ends


@pytest.mark.claim("X5")
def test_a_stale_lock_of_a_process_that_is_gone_is_named_and_taken_over(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / ".lock").write_text(str(gone.pid))
    said = []
    with rundir.claimed(tmp_path, say=said.append):
        assert (tmp_path / ".lock").read_text() == str(os.getpid())
    assert said == [f"--output {tmp_path}: removing a stale lock of process {gone.pid}, which is gone"]


@pytest.mark.claim("X5")
@pytest.mark.parametrize("marker", ["run.json", "manifest.json"])
def test_a_directory_holding_a_run_is_reused_only_with_resume_or_overwrite(tmp_path, marker):
    (tmp_path / marker).write_text("{}")
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(InputError, match="holds a run already: add --resume .* or --overwrite"):
        with rundir.claimed(tmp_path):
            pass
    with rundir.claimed(tmp_path, resume=True):
        assert (tmp_path / marker).exists()
    with rundir.claimed(tmp_path, overwrite=True):
        assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]  # the old files went first


@pytest.mark.claim("X5")
def test_resume_needs_a_run_and_excludes_overwrite(tmp_path):
    with pytest.raises(InputError, match="holds no run to carry on"):
        with rundir.claimed(tmp_path, resume=True):
            pass
    with pytest.raises(InputError, match="choose one"):
        with rundir.claimed(tmp_path, resume=True, overwrite=True):
            pass
    code, _, err = run_main(*train_command(tmp_path / "o", "--resume", "--overwrite"))
    assert code == 2 and "not allowed with argument" in err


@pytest.mark.slow
@pytest.mark.claim("X5")
def test_reusing_a_finished_runs_directory_needs_a_flag_and_resume_checks_data_and_settings(tmp_path):
    """The reviewer's case: a finished run in D; `train --output D` again is refused (it used to mix the two
    runs' checkpoints, and a later --resume carried on the first run's); --resume with other data or another
    learning rate is refused naming each; --overwrite starts again with the old checkpoints gone."""
    code, err = train(tmp_path / "d")
    assert code == 0, err
    first = json.loads((tmp_path / "d" / "run.json").read_text())
    code, err = train(tmp_path / "d")
    assert code == 2 and "holds a run already" in err and "Traceback" not in err
    other = tmp_path / "other.jsonl"
    other.write_text(DATA.read_text(encoding="utf-8").replace("。", "！"), encoding="utf-8")
    code, err = train(tmp_path / "d", "--resume", "learning_rate=0.5", data=other)
    assert code == 2 and "--resume: this command differs" in err
    assert f"data: {DATA} vs {other}" in err and "training_arguments.learning_rate: 0.0002 vs 0.5" in err
    (tmp_path / "d" / "checkpoints" / "checkpoint-1" / "stale-file").write_text("from the first run")
    code, err = train(tmp_path / "d", "--overwrite", "learning_rate=1e-3")
    assert code == 0, err
    assert not (tmp_path / "d" / "checkpoints" / "checkpoint-1" / "stale-file").exists()
    again = json.loads((tmp_path / "d" / "run.json").read_text())
    assert (
        again["settings"]["training_arguments"]["learning_rate"]
        == 1e-3
        != first["settings"]["training_arguments"]["learning_rate"]
    )


@pytest.mark.slow
@pytest.mark.claim("X5")
def test_a_second_train_into_a_directory_another_train_is_writing_is_refused_and_the_first_finishes(tmp_path):
    """Two real processes: while the first trains (its step plan printed, so it holds the directory; then paused
    with SIGSTOP, so that it cannot finish first however fast it trains), the second is refused at once naming the
    first's process id; the first, let go on (SIGCONT), ends normally with its own manifest."""
    command = cli_command(*train_command(tmp_path / "d", *TINY, "max_steps=6"))
    first = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=offline_env())
    seen = []
    for line in first.stderr:
        seen.append(line)
        if line.startswith("step plan"):
            break
    os.kill(first.pid, signal.SIGSTOP)
    try:
        code, err = train(tmp_path / "d")
    finally:
        os.kill(first.pid, signal.SIGCONT)
    seen += first.stderr.readlines()
    assert first.wait(timeout=300) == 0, "".join(seen)
    assert code == 2 and f"another run (process {first.pid}) is writing this directory" in err
    assert len(json.loads((tmp_path / "d" / "manifest.json").read_text())["steps"]) == 6
