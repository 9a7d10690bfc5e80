"""The `filter` command when things go wrong (claim X6): its three files (--output, --rejects and the character
table beside the output) are written under new hidden names and renamed into place together once all are
whole, so an input is never one of them, a full disk or a failed write exits 2 naming the file with nothing
left behind, SIGTERM and Ctrl-C leave no temporary file, and the forked workers end with the command, even
when it is killed outright.

The full-disk tests make a real small file system (a tmpfs of a few pages: root on Linux; skipped elsewhere)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from reference.records.synthetic import magpie_records, write_jsonl
from spec.cli_runner import cli_command, offline_env, run_cli, run_main

PAGE = 4096
GOOD = json.dumps({"instruction": "日本の四季について説明してください。", "response": "日本には春夏秋冬があります。"})
OLD = {"kept.jsonl": b"old output\n", "rejects.jsonl": b"old rejects\n", "kept.chars.tsv": b"old table\n"}


def filter_args(source, folder, *more):
    outputs = ("--output", folder / "kept.jsonl", "--rejects", folder / "rejects.jsonl")
    return ("filter", "--input", source, *outputs, *more)


def plant_old_outputs(folder):
    """Outputs of an earlier run, which a failed run must leave byte for byte as they were."""
    for name, content in OLD.items():
        (folder / name).write_bytes(content)


def listing(folder) -> dict[str, bytes]:
    return {entry.name: entry.read_bytes() for entry in folder.iterdir()}


@pytest.fixture
def small_disk(tmp_path):
    """`small_disk(kib)`: a new folder on a tmpfs of that size (tmpfs counts each file's bytes in whole pages)."""
    mounted = []

    def mount(kib: int):
        if not sys.platform.startswith("linux") or shutil.which("mount") is None:
            pytest.skip("a small file system is made with Linux's mount -t tmpfs")
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(folder)], capture_output=True, text=True
        )
        if done.returncode != 0:
            pytest.skip(f"mounting a {kib} KiB tmpfs is not permitted here: {done.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], capture_output=True)


@pytest.mark.claim("X6")
@pytest.mark.parametrize("flag", ["--output", "--rejects"])
def test_an_input_named_like_an_outputs_temporary_file_is_left_byte_identical(tmp_path, flag):
    """`--input kept.jsonl.partial --output kept.jsonl` once destroyed its input: the temporary name was the
    fixed `<output>.partial`. Temporary files are new (mkstemp), so the input is read, kept byte for byte,
    and the run leaves exactly its three outputs beside it."""
    outputs = {"--output": tmp_path / "kept.jsonl", "--rejects": tmp_path / "rejects.jsonl"}
    source = tmp_path / f"{outputs[flag].name}.partial"
    source.write_text((GOOD + "\n") * 30 + "{broken\n", encoding="utf-8")
    before = source.read_bytes()
    result = run_cli("filter", "--input", source, "--output", outputs["--output"], "--rejects", outputs["--rejects"])
    assert result.returncode == 0, result.stderr
    assert source.read_bytes() == before
    assert sorted(listing(tmp_path)) == sorted([source.name, "kept.jsonl", "rejects.jsonl", "kept.chars.tsv"])
    assert outputs["--output"].read_text(encoding="utf-8").count("\n") == 30
    assert json.loads(outputs["--rejects"].read_text(encoding="utf-8"))["rule"] == "unreadable"
    assert all(oct(path.stat().st_mode & 0o777) == oct(0o666 & ~current_umask()) for path in outputs.values())


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.mark.claim("X6")
@pytest.mark.parametrize("workers", [1, 2])
def test_an_existing_output_is_untouched_when_the_run_fails_late_in_the_input(tmp_path, workers):
    """A malformed row near the end of a 1 MiB input under --strict stops the run after the workers have
    read everything: the outputs of an earlier run (output, rejects, character table) stay byte for byte
    as they were, and no temporary file is left."""
    source = tmp_path / "in.jsonl"
    source.write_text((GOOD + "\n") * 9000 + '{"instruction": 1}\n' + (GOOD + "\n") * 3, encoding="utf-8")
    assert source.stat().st_size > 1 << 20  # big enough for forked workers
    out = tmp_path / "out"
    out.mkdir()
    plant_old_outputs(out)
    result = run_cli(*filter_args(source, out, "--strict", "--workers", workers))
    assert result.returncode == 2 and f"{source}, line 9001" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert listing(out) == OLD


def fault_corpus(folder):
    """Over 1 MiB (the workers' threshold): 7,000 copies of one good record (all kept) and 40 unreadable
    lines (40 rejects of some 200 bytes each)."""
    source = folder / "in.jsonl"
    broken = "".join(f'{{"broken {i}" ' + "x" * 150 + "\n" for i in range(40))
    source.write_text((GOOD + "\n") * 3500 + broken + (GOOD + "\n") * 3500, encoding="utf-8")
    return source


def pages(size: int) -> int:
    return -(-size // PAGE)


@pytest.mark.slow
@pytest.mark.claim("X6")
@pytest.mark.parametrize(
    "failing, workers",
    [("kept.jsonl", 2), ("rejects.jsonl", 2), ("kept.chars.tsv", 2), ("kept.jsonl", 1), ("kept.chars.tsv", 1)],
)
def test_a_full_disk_exits_2_naming_the_file_and_leaves_every_output_as_it_was(tmp_path, small_disk, failing, workers):
    """On a real file system just too small for one of the three files (written in this order: output,
    rejects, character table) the command exits 2 naming that file and ENOSPC, with no traceback; the
    outputs of an earlier run are as they were and no temporary file is left to fill the disk."""
    source = fault_corpus(tmp_path)
    roomy = tmp_path / "roomy"
    roomy.mkdir()
    assert run_cli(*filter_args(source, roomy, "--workers", workers)).returncode == 0
    sizes = {name: (roomy / name).stat().st_size for name in ("kept.jsonl", "rejects.jsonl", "kept.chars.tsv")}
    order = list(sizes)
    before = sum(pages(sizes[name]) for name in order[: order.index(failing)])
    # The earlier run's three files, everything written before the failing one, and one page short of it.
    disk = small_disk(PAGE // 1024 * (len(OLD) + before + pages(sizes[failing]) - 1))
    plant_old_outputs(disk)
    result = run_cli(*filter_args(source, disk, "--workers", workers))
    assert result.returncode == 2, result.stderr
    assert f"{disk / failing}: cannot write (No space left on device, ENOSPC)" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1
    assert listing(disk) == OLD


@pytest.mark.claim("X6")
@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES, errno.EIO])
@pytest.mark.parametrize("failing", ["kept.jsonl", "rejects.jsonl", "kept.chars.tsv"])
def test_any_failed_write_exits_2_naming_the_file_and_its_error(tmp_path, monkeypatch, failing, code):
    """A write refused by the file system (made to fail here for the one file) is exit 2 with one line that
    names the file, the reason and the errno; the earlier outputs stay as they were, nothing else is left."""
    real_pwrite = os.pwrite

    def pwrite(fd, data, offset):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(f".{failing}."):
            raise OSError(code, os.strerror(code))
        return real_pwrite(fd, data, offset)

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("finds the file a descriptor writes through /proc/self/fd (Linux)")
    monkeypatch.setattr(os, "pwrite", pwrite)
    source = tmp_path / "in.jsonl"
    source.write_text((GOOD + "\n") * 30 + "{broken\n", encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    plant_old_outputs(out)
    code_out, stdout, stderr = run_main(*filter_args(source, out))
    expected = f"{out / failing}: cannot write ({os.strerror(code)}, {errno.errorcode[code]}); no output was changed"
    assert code_out == 2 and expected in stderr and "Traceback" not in stderr, stderr
    assert listing(out) == OLD


@pytest.mark.claim("X6")
def test_a_folder_that_turns_read_only_after_the_checks_exits_2_naming_the_output(tmp_path, small_disk, monkeypatch):
    """A folder found writable before the work can be read-only when the files are made (here: the
    up-front checks skipped, the output on a read-only tmpfs): exit 2, EROFS and the output named."""
    from reference import paths

    monkeypatch.setattr(paths, "check_outputs", lambda outputs, inputs: None)
    disk = small_disk(64)
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    source = tmp_path / "in.jsonl"
    source.write_text((GOOD + "\n") * 30, encoding="utf-8")
    code, _, stderr = run_main(*filter_args(source, disk))
    assert code == 2 and f"--output {disk / 'kept.jsonl'}: cannot write (Read-only file system, EROFS)" in stderr
    assert list(disk.iterdir()) == []


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory):
    """About 80 MB of generated magpie records: two workers take a few seconds over it."""
    source = tmp_path_factory.mktemp("big") / "magpie.jsonl"
    write_jsonl(magpie_records(100_000, seed=3), source)
    return source


def start_filter(source, out):
    """The command with two workers, in a session of its own (a terminal's Ctrl-C goes to the whole group);
    returns it and its workers once both are forked and its temporary files exist."""
    import psutil

    process = subprocess.Popen(
        cli_command(*filter_args(source, out, "--workers", 2)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=offline_env(),
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        workers = psutil.Process(process.pid).children()
        if len(workers) == 2:
            return process, workers
        time.sleep(0.005)
    process.kill()
    pytest.fail(f"the command never had two workers (exit {process.wait()}): {process.stderr.read()}")


def ended(workers, within: float) -> bool:
    import psutil

    gone, alive = psutil.wait_procs(workers, timeout=within)
    return all(worker.status() == psutil.STATUS_ZOMBIE for worker in alive)


@pytest.mark.slow
@pytest.mark.claim("X6")
def test_killing_the_command_outright_ends_its_workers(tmp_path, big_corpus):
    """SIGKILL gives the command no chance to stop its forked workers (some 130 MB each): the kernel ends
    them with it (PR_SET_PDEATHSIG), within a few seconds, not never."""
    pytest.importorskip("psutil")
    out = tmp_path / "out"
    out.mkdir()
    process, workers = start_filter(big_corpus, out)
    try:
        process.kill()
        process.wait()
        assert ended(workers, within=5), [(w.pid, w.status()) for w in workers if w.is_running()]
    finally:
        for worker in workers:
            if worker.is_running():
                worker.kill()


@pytest.mark.slow
@pytest.mark.claim("X6")
@pytest.mark.parametrize("name, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_sigterm_and_ctrl_c_stop_the_command_with_one_line_and_leave_no_temporary_file(
    tmp_path, big_corpus, name, code
):
    """`kill PID` (SIGTERM, to the command) and Ctrl-C (SIGINT, to its whole process group, workers too)
    mid-run: the command stops its workers, removes its temporary files, says so in one line and exits
    143 or 130; the outputs of an earlier run are as they were."""
    pytest.importorskip("psutil")
    out = tmp_path / "out"
    out.mkdir()
    plant_old_outputs(out)
    process, workers = start_filter(big_corpus, out)
    try:
        if name == "SIGTERM":
            process.send_signal(signal.SIGTERM)
        else:
            os.killpg(process.pid, signal.SIGINT)
        stderr = process.communicate(timeout=60)[1]
        assert process.returncode == code, stderr
        assert "Traceback" not in stderr and len(stderr.splitlines()) == 1 and "filter" in stderr, stderr
        assert ended(workers, within=5)
        assert listing(out) == OLD
    finally:
        for worker in workers:
            if worker.is_running():
                worker.kill()
        if process.poll() is None:
            process.kill()
