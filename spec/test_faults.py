"""Faults and misuse cost no user data (claims X5, X6, X1): --overwrite removes a run's own files only; a finished
run, or one that ended after its last checkpoint, is completed rather than trained again; a closed or full standard
output is handled once, in reference/cli.py; outputs get the permissions the umask gives; an output of the wrong
kind is refused before any work; an interrupted run says what to run next.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from reference.errors import InputError
from reference.training import rundir
from spec.cli_runner import QA, cli_command, offline_env, run_cli, run_main
from spec.conftest import FIXTURES

MODEL, DATA = FIXTURES / "models" / "tiny-gemma2", FIXTURES / "data" / "qa111_sample.jsonl"
TINY = [
    "max_steps=3",
    "per_device_train_batch_size=2",
    "gradient_accumulation_steps=1",
    "warmup_steps=0",
    "save_steps=1",
    "sft.max_seq_length=48",
    "use_cpu=true",
]


def train(output, *extra):
    return run_cli("train", "--recipe", "llm2024", "--model", MODEL, "--data", DATA, *QA, "--output", output, *extra)


def a_users_folder(directory):
    """A folder with a user's notes and a thesis in it: what no run wrote."""
    (directory / "thesis").mkdir(parents=True)
    (directory / "thesis" / "chapter1.tex").write_text("\\chapter{One}", encoding="utf-8")
    (directory / "notes.txt").write_text("my notes", encoding="utf-8")
    return directory


def tree(directory) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# --- --overwrite removes a run's own files only ---


@pytest.mark.claim("X5")
@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_a_folder_that_holds_no_run_and_is_not_empty_is_never_written_into(tmp_path, overwrite):
    """A user's folder is not a run directory: with or without --overwrite the command is refused naming what is
    there, and every file is left as it was (--overwrite once deleted all of it)."""
    folder = a_users_folder(tmp_path / "mine")
    before = tree(folder)
    with pytest.raises(InputError, match=r"is not empty and holds no run \(notes.txt, thesis\)"):
        with rundir.claimed(folder, overwrite=overwrite, say=lambda _: None):
            pass
    assert tree(folder) == before and not (folder / rundir.LOCK).exists()


@pytest.mark.claim("X5")
def test_overwrite_removes_the_old_runs_files_and_keeps_and_names_a_users(tmp_path):
    """The run's record (run.json, manifest.json listing what its save wrote), its checkpoints and its saved files
    go; a user's notes put in the run directory later stay, and the command says it kept them."""
    run = tmp_path / "run"
    (run / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    for name in ("run.json", "adapter_model.safetensors", "adapter_config.json", "tokenizer.json"):
        (run / name).write_text("{}", encoding="utf-8")
    files = ["adapter_config.json", "adapter_model.safetensors", "tokenizer.json"]
    (run / "manifest.json").write_text(json.dumps({"files": files}), encoding="utf-8")
    a_users_folder(run)
    said = []
    with rundir.claimed(run, overwrite=True, say=said.append):
        assert sorted(p.name for p in run.iterdir()) == [".lock", "notes.txt", "thesis"]
    assert said == [f"--overwrite: removed the old run's files from {run}; kept what no run wrote: notes.txt, thesis"]


@pytest.mark.claim("X5")
def test_overwrite_of_a_run_that_ended_before_its_manifest_removes_what_save_pretrained_names(tmp_path):
    """No manifest lists the saved files: the names peft's and transformers' save_pretrained give are the run's."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("run.json", "adapter_model.safetensors", "model-00001-of-00002.safetensors", "my-model.safetensors"):
        (run / name).write_text("{}", encoding="utf-8")
    with rundir.claimed(run, overwrite=True, say=lambda _: None):
        assert sorted(p.name for p in run.iterdir()) == [".lock", "my-model.safetensors"]


# --- a finished run, and one that ended after its last checkpoint ---


@pytest.mark.slow
@pytest.mark.claim("X1", "X5")
def test_resume_of_a_finished_run_says_it_is_complete_and_changes_nothing(tmp_path):
    """It used to train 'step 4/3' at learning rate 0 and replace the manifest with one recording only that step."""
    assert train(tmp_path / "run", *TINY).returncode == 0
    before = tree(tmp_path / "run")
    code, out, err = train(tmp_path / "run", "--resume", *TINY)
    assert code == 0, err
    assert "is complete (3 steps, manifest.json written); nothing to do" in err
    assert json.loads(out)["steps"] == 3
    assert tree(tmp_path / "run") == before


@pytest.mark.slow
@pytest.mark.claim("X1", "X2")
def test_a_run_that_ended_after_its_last_checkpoint_is_completed_from_it_and_verifies(tmp_path):
    """checkpoint-3 holds the last of 3 steps; the run is cut as if killed before its save (adapter and manifest
    gone). --resume trains nothing: it loads checkpoint-3's weights, takes the step records its marker kept, and
    writes the adapter and a manifest that `verify` finds equal to the uninterrupted run's."""
    assert train(tmp_path / "whole", *TINY).returncode == 0
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    for name in ("manifest.json", "adapter_model.safetensors", "adapter_config.json"):
        (tmp_path / "cut" / name).unlink()
    code, _, err = train(tmp_path / "cut", "--resume", *TINY)
    assert code == 0, err
    assert "checkpoint-3 holds the run's last step (3 of 3)" in err and "step 4" not in err
    completed = json.loads((tmp_path / "cut" / "manifest.json").read_text())
    assert [s["step"] for s in completed["steps"]] == [1, 2, 3]
    whole = tmp_path / "whole" / "adapter_model.safetensors"
    assert (tmp_path / "cut" / "adapter_model.safetensors").read_bytes() == whole.read_bytes()
    assert run_cli("verify", tmp_path / "whole", tmp_path / "cut", "--rtol", 0).returncode == 0


def interrupt_train_once(output, marker: str) -> str:
    """Start `train`, send SIGINT (Ctrl-C) once `marker` exists in `output`, return stderr; it must end with 130."""
    command = cli_command(
        "train", "--recipe", "llm2024", "--model", MODEL, "--data", DATA, *QA, "--output", output, *TINY
    )
    process = subprocess.Popen(command, env=offline_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (output / marker).exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    # 130 as a shell reports it: the command's own exit(130), or the end by SIGINT itself (128 + 2 to a shell), seen
    # once in a full-suite run right after the message was printed (the cause, inside a library, not found yet)
    assert process.returncode in (130, -signal.SIGINT) and "Traceback" not in err, (process.returncode, err)
    return err


@pytest.mark.slow
@pytest.mark.claim("X1")
def test_an_interrupted_run_says_what_to_run_next_and_that_command_carries_it_on(tmp_path):
    """Ctrl-C once the run is recorded (run.json) but before any checkpoint: the message names --resume, and --resume
    (which once said 'no checkpoint', while a plain rerun said 'add --resume or --overwrite') starts from step 0."""
    err = interrupt_train_once(tmp_path / "run", "run.json")
    assert "interrupted; to carry the run on, run the same command with --resume" in err
    code, _, err = train(tmp_path / "run", "--resume", *TINY)
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["steps"][-1]["step"] == 3


@pytest.mark.slow
@pytest.mark.claim("X1", "X5")
def test_a_run_interrupted_before_it_was_recorded_says_to_run_the_same_command_and_that_works(tmp_path):
    """Ctrl-C while the model loads (the lock taken, run.json not yet written): nothing of the run exists, so the
    message says to run the same command again, not --resume (which would be refused: no run to carry on)."""
    err = interrupt_train_once(tmp_path / "run", ".lock")
    assert "interrupted before the run was recorded; run the same command again" in err and "--resume" not in err
    assert train(tmp_path / "run", *TINY).returncode == 0


# --- standard output ---


def run_into_a_closed_pipe(*argv) -> tuple[int, str]:
    """The command with a standard output whose reader has gone before it writes (what `| head -1` does to a
    command whose output outgrows the pipe): every write meets EPIPE. Returns the exit code and stderr."""
    reader, writer = os.pipe()
    os.close(reader)
    try:
        done = subprocess.run(cli_command(*argv), env=offline_env(), stdout=writer, stderr=subprocess.PIPE)
    finally:
        os.close(writer)
    return done.returncode, done.stderr.decode()


@pytest.mark.claim("X6")
@pytest.mark.parametrize(
    "argv",
    [["steps", "--records", "5000", "--batch-size", "1", "--save-steps", "1"], ["recipe", "llm2024"]],
    ids=["steps", "recipe"],
)
def test_a_reader_that_closes_stdout_early_ends_the_command_quietly(argv):
    """`ftref steps ... | head -1`: no BrokenPipeError traceback (nor Python's 'Exception ignored' at exit), exit 0."""
    assert run_into_a_closed_pipe(*argv) == (0, "")


@pytest.mark.claim("X6", "X2")
@pytest.mark.parametrize(("run_b", "verdict"), [("sft", 0), ("routes/fresh", 1)])
def test_verify_keeps_its_exit_code_when_its_reader_goes_early(run_b, verdict):
    """verify's exit code says whether B reproduces A; `verify A B | head -1` must not change it."""
    runs = FIXTURES / "reference-run"
    assert run_into_a_closed_pipe("verify", runs / "sft", runs / run_b) == (verdict, "")


@pytest.mark.claim("X6")
def test_a_full_standard_output_is_an_error_naming_it_not_a_traceback():
    with open("/dev/full", "w") as full:
        done = subprocess.run(cli_command("recipe", "llm2024"), env=offline_env(), stdout=full, stderr=subprocess.PIPE)
    err = done.stderr.decode()
    assert done.returncode == 2 and "Traceback" not in err
    assert "standard output: cannot be written (No space left on device)" in err


# --- permissions, kinds ---


@pytest.mark.claim("X6")
def test_files_put_in_place_whole_get_the_mode_the_umask_gives_a_new_file(tmp_path):
    """write_text_atomic and complete_directory write under mkstemp/mkdtemp names (private, 0600/0700) and rename:
    what lands has the mode open() gives under the umask, 0644 and 0755 under 022, 0640 under 027."""
    from reference.paths import complete_directory, write_text_atomic

    for mask, file_mode, folder_mode in ((0o022, 0o644, 0o755), (0o027, 0o640, 0o750)):
        old = os.umask(mask)
        try:
            write_text_atomic(tmp_path / f"{mask}.json", "{}")
            with complete_directory(tmp_path / f"saved-{mask}") as partial:
                (partial / "sub").mkdir()
                (partial / "sub" / "weights.safetensors").write_bytes(b"x")
                os.chmod(partial / "sub" / "weights.safetensors", 0o600)  # as safetensors writes it
        finally:
            os.umask(old)
        assert (tmp_path / f"{mask}.json").stat().st_mode & 0o777 == file_mode
        assert (tmp_path / f"saved-{mask}" / "sub").stat().st_mode & 0o777 == folder_mode
        assert (tmp_path / f"saved-{mask}" / "sub" / "weights.safetensors").stat().st_mode & 0o777 == file_mode


@pytest.mark.claim("X6")
@pytest.mark.parametrize(
    ("argv", "kind"),
    [
        (["train", "--recipe", "llm2024", "--model", MODEL, "--data", DATA, *QA], "file"),
        (["quantize", "--model", MODEL], "file"),
        (["merge", "--model", MODEL, "--adapter", FIXTURES], "file"),
        (["generate", "--model", MODEL, "--tasks", DATA, "--shots", DATA], "directory"),
    ],
    ids=["train", "quantize", "merge", "generate"],
)
def test_an_output_of_the_wrong_kind_is_refused_before_any_work(tmp_path, argv, kind):
    """train, quantize and merge write a directory, generate a file: a file (or a folder) already there under
    --output is refused at once, before a model loads, and is left as it was."""
    target = tmp_path / "out"
    target.mkdir() if kind == "directory" else target.write_text("mine", encoding="utf-8")
    code, _, err = run_main(*argv, "--output", target)
    assert code == 2 and f"--output {target}: a {kind} is there" in err
    assert target.is_dir() if kind == "directory" else target.read_text(encoding="utf-8") == "mine"


# --- what --resume and verify compare, and what the main job compares ---


@pytest.mark.claim("X5", "X2")
@pytest.mark.parametrize(
    "override",
    ["lora.r=16", "lora.lora_dropout=0.1", "sft.max_seq_length=64", "quantization.bnb_4bit_use_double_quant=false"],
)
def test_resume_and_verify_name_a_changed_lora_sft_or_quantization_setting(tmp_path, override):
    """run.json records the recipe's [lora], [sft] and [quantization] sections beside the TrainingArguments: a
    --resume with one of them changed is refused naming it, and verify names it as a settings difference."""
    from reference.settings import training_arguments
    from reference.settings.recipes import apply_overrides, load_recipe
    from reference.training import manifest

    def what_runs(recipe):
        settings = training_arguments.resolved_settings(recipe, str(tmp_path / "checkpoints"))
        return {"model": {"weights_sha256": "m"}, "data": {"sha256": "d"}, "settings": settings}

    recipe = load_recipe("llm2024")
    first, second = what_runs(recipe), what_runs(apply_overrides(recipe, [override]))
    rundir.write_or_check(tmp_path, first, resume=False)
    key = override.partition("=")[0]
    with pytest.raises(InputError, match=f"settings: {key}: "):
        rundir.write_or_check(tmp_path, second, resume=True)
    differences = manifest.what_ran_differences(first, second)["settings"]
    assert [line.partition(":")[0] for line in differences] == [key]


@pytest.mark.claim("M4")
def test_the_main_jobs_reference_check_compares_this_runs_manifests_with_the_committed_ones(tmp_path):
    """The committed reference run copied as if this job had made it, one loss of its sft run moved by 10%: the
    check says sft does not reproduce and the two routes do (compared with itself, every run would)."""
    from reference.job import reproduce

    shutil.copytree(reproduce.REFERENCE_RUN, tmp_path / "job")
    sft = tmp_path / "job" / "sft" / "manifest.json"
    recorded = json.loads(sft.read_text(encoding="utf-8"))
    recorded["steps"][1]["loss"] *= 1.1
    sft.write_text(json.dumps(recorded), encoding="utf-8")
    verdicts = reproduce.compare_with_reference(tmp_path / "job", say=lambda _: None)["runs"]
    assert {run: v["reproduces"] for run, v in verdicts.items()} == {
        "routes/fresh": True,
        "routes/trainable": True,
        "sft": False,
    }


# --- a full disk ---


@pytest.fixture
def small_device(tmp_path):
    """A 700 KiB file system (tmpfs): room for a run's records, not for its first checkpoint."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.slow
@pytest.mark.claim("X6", "X1")
def test_a_run_that_fills_its_disk_exits_2_naming_it_and_leaves_no_half_checkpoint(small_device):
    """The first checkpoint does not fit: exit 2 naming the checkpoints folder and the space left (it was torch's
    RuntimeError 'unexpected pos' as a traceback), and the half-written checkpoint is gone, its space free again."""
    code, _, err = train(small_device / "run", *TINY)
    assert code == 2 and "Traceback" not in err
    assert f"--output {small_device / 'run' / 'checkpoints'}: no space left on the device" in err
    assert list((small_device / "run" / "checkpoints").iterdir()) == []
    assert shutil.disk_usage(small_device).free > 600 * 1024


@pytest.mark.claim("X5", "X1")
@pytest.mark.parametrize("content", ['{"model": {"weights_sha256": "m"}, "da', "[]", '{"model": 1}'])
def test_resume_of_a_run_whose_record_is_damaged_is_refused_naming_it(tmp_path, content):
    """A half-written or foreign run.json cannot say what the run trained: --resume is exit 2 naming the file and
    --overwrite, never a traceback."""
    (tmp_path / "run.json").write_text(content, encoding="utf-8")
    what_runs = {"model": {"weights_sha256": "m"}, "data": {"sha256": "d"}, "settings": {}}
    with pytest.raises(InputError, match=r"--resume: .*run.json is damaged .* use --overwrite"):
        rundir.write_or_check(tmp_path, what_runs, resume=True)


# --- the caches a command writes into ---


@pytest.mark.claim("X6")
def test_a_cache_variable_pointing_at_a_file_is_named_not_blamed_on_the_data(tmp_path, monkeypatch):
    """HF_HOME=FILE: datasets would fail with NotADirectoryError '<FILE>/datasets' while reading the data, and the
    message used to name the data file. The check names the cache folder and HF_HOME."""
    from reference.records import caches

    a_file = tmp_path / "hf-home"
    a_file.write_text("not a folder", encoding="utf-8")
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(a_file))
    with pytest.raises(
        InputError, match=rf"the datasets cache {a_file / 'datasets'} \(chosen by HF_HOME\): {a_file} is a file"
    ):
        caches.require_writable_cache()
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    assert caches.require_writable_cache() == tmp_path / "cache" and (tmp_path / "cache").is_dir()


@pytest.mark.claim("X6")
def test_a_read_only_home_is_named_with_the_variable_that_chose_the_cache(tmp_path, monkeypatch):
    """HOME on a read-only file system (root may write anywhere else, so a read-only tmpfs stands in)."""
    from reference.records import caches

    home = tmp_path / "home"
    home.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(home)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {done.stderr.decode().strip()}")
    try:
        for name in ("HF_DATASETS_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HOME", str(home))
        with pytest.raises(InputError, match=r"\(chosen by HOME\): it cannot be written \(Read-only file system\)"):
            caches.require_writable_cache()
    finally:
        subprocess.run(["umount", str(home)], check=False)


@pytest.mark.slow
@pytest.mark.claim("X6", "A3")
def test_a_merge_that_fills_its_disk_exits_2_naming_it_and_leaves_no_partial_model(saved_adapter, small_device):
    """The merged model (about 1 MB of bf16 weights) does not fit in 700 KiB: exit 2 naming --output and the space
    left, no traceback, and neither the output nor a hidden partial folder is left on the device."""
    code, _, err = run_cli("merge", "--model", MODEL, "--adapter", saved_adapter, "--output", small_device / "merged")
    assert code == 2 and "Traceback" not in err
    assert f"{small_device / 'merged'}: no space left on the device" in err
    assert list(small_device.iterdir()) == []


@pytest.mark.claim("X10")
@pytest.mark.parametrize(("world_size", "says"), [("2", "2 processes were started"), ("1", "and this is one")])
def test_an_fsdp_run_that_forms_no_process_group_says_how_many_processes_were_started(monkeypatch, world_size, says):
    """The refusal is true to what ran: under torchrun (WORLD_SIZE=2) it no longer says 'this is one process'."""
    from types import SimpleNamespace

    from transformers.training_args import ParallelMode

    from reference.training import distributed

    monkeypatch.setenv("WORLD_SIZE", world_size)
    args = SimpleNamespace(fsdp="full_shard", fsdp_config={}, parallel_mode=ParallelMode.NOT_PARALLEL)
    with pytest.raises(InputError, match=says):
        distributed.check_arguments(args, adapter=True)


@pytest.mark.claim("X5")
def test_a_users_checkpoints_folder_is_not_taken_for_a_run(tmp_path):
    """A folder holding only `checkpoints/` (a user's own, from another tool) holds no run: refused, since a failed
    run removes the checkpoints it finds half-written and the Trainer rotates old ones."""
    (tmp_path / "mine" / "checkpoints" / "checkpoint-100").mkdir(parents=True)
    with pytest.raises(InputError, match=r"is not empty and holds no run \(checkpoints\)"):
        with rundir.claimed(tmp_path / "mine", say=lambda _: None):
            pass


@pytest.mark.claim("X5", "X6")
def test_what_a_killed_write_left_is_the_runs_and_goes_with_overwrite(tmp_path):
    """A kill -9 during write-then-rename leaves `.run.json.XXXX.partial` (and no run.json): the folder is still the
    run's to write (not refused as a user's), and --overwrite of a run removes such leftovers with its files."""
    run = tmp_path / "run"
    run.mkdir()
    (run / ".run.json.k3j2.partial").write_text("{", encoding="utf-8")
    with rundir.claimed(run, say=lambda _: None):
        pass
    (run / "run.json").write_text("{}", encoding="utf-8")
    with rundir.claimed(run, overwrite=True, say=lambda _: None):
        assert sorted(p.name for p in run.iterdir()) == [".lock"]


@pytest.mark.claim("X6")
def test_a_broken_symbolic_link_at_an_output_is_refused_naming_where_it_points(tmp_path):
    (tmp_path / "out").symlink_to(tmp_path / "gone")
    code, _, err = run_main("quantize", "--model", MODEL, "--output", tmp_path / "out")
    assert code == 2 and f"a broken symbolic link is there (to {tmp_path / 'gone'})" in err


@pytest.mark.claim("X6")
def test_a_folder_where_the_filter_writes_its_character_table_is_refused_before_any_output_changes(tmp_path):
    """kept.jsonl's table goes to kept.chars.tsv: a folder there would fail only at the last rename, after the
    output had been replaced. It is refused first; the old output stays, and no temporary file is left."""
    (tmp_path / "kept.jsonl").write_text("old output\n", encoding="utf-8")
    (tmp_path / "kept.chars.tsv").mkdir()
    data = FIXTURES / "data" / "magpie_sample.jsonl"
    code, _, err = run_main(
        "filter", "--input", data, "--output", tmp_path / "kept.jsonl", "--rejects", tmp_path / "rejects.jsonl"
    )
    assert code == 2 and f"{tmp_path / 'kept.chars.tsv'}: a directory is there" in err
    assert (tmp_path / "kept.jsonl").read_text(encoding="utf-8") == "old output\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.chars.tsv", "kept.jsonl"]


@pytest.mark.slow
@pytest.mark.claim("X6")
def test_train_with_hf_home_pointing_at_a_file_names_the_cache_and_the_variable(tmp_path):
    """It said '<data>: cannot be read as json: NotADirectoryError', blaming the data file."""
    a_file = tmp_path / "hf-home"
    a_file.write_text("not a folder", encoding="utf-8")
    command = ["train", "--recipe", "llm2024", "--model", MODEL, "--data", DATA, *QA, "--output", tmp_path / "run"]
    env = offline_env(HF_HOME=str(a_file))
    env.pop("HF_DATASETS_CACHE", None)  # it would choose the cache instead of HF_HOME
    code, _, err = run_cli(*command, *TINY, env=env)
    assert code == 2 and "Traceback" not in err and str(DATA) not in err
    assert f"the datasets cache {a_file / 'datasets'} (chosen by HF_HOME): {a_file} is a file, not a folder" in err


@pytest.mark.claim("X5", "M3")
def test_the_main_job_writes_only_into_a_new_or_empty_folder_or_one_it_wrote_before(tmp_path):
    """reproduce writes report.md, summary.json, output.jsonl and more at the top of --output: a user's folder is
    refused before any work, naming what is in it, and left as it was; an empty folder gets the job's marker, and
    a folder the job wrote (its marker, or its summary.json and report.md from before the marker) is written again."""
    folder = a_users_folder(tmp_path / "mine")
    (folder / "report.md").write_text("my report", encoding="utf-8")
    before = tree(folder)
    code, _, err = run_main("reproduce", "--output", folder)
    assert code == 2 and "is not empty and was not written by this job (notes.txt, report.md, thesis)" in err
    assert tree(folder) == before

    assert rundir.job_folder(tmp_path / "new") == tmp_path / "new" and (tmp_path / "new" / rundir.JOB).is_file()
    (tmp_path / "new" / "report.md").write_text("the job's", encoding="utf-8")
    rundir.job_folder(tmp_path / "new")
    older = tmp_path / "older"
    older.mkdir()
    for name in ("summary.json", "report.md", "train.jsonl"):
        (older / name).write_text("{}", encoding="utf-8")
    rundir.job_folder(older)
