"""The `filter` command (reference/filters.py's file path and its forked workers): the seed's bytes out, every
dropped row in the rejects file, bad input named with exit 2, and no torch or transformers imported."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from reference.synthetic import magpie_records, write_jsonl


def run_cli(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "reference", "filter", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def small_input(tmp_path, text: str = '{"instruction": "日本", "response": "東京"}\n'):
    source = tmp_path / "in.jsonl"
    source.write_text(text, encoding="utf-8")
    return source


@pytest.mark.slow
@pytest.mark.claim("C9")
def test_filter_command_output_is_byte_identical_to_the_seeds_and_unescaped_utf8(tmp_path, fixtures_dir):
    rows = magpie_records(3000, seed=7)
    source = tmp_path / "magpie.jsonl"
    write_jsonl(rows, source)
    with open(source, "a", encoding="utf-8") as f:
        f.write(open(fixtures_dir / "data" / "magpie_sample.jsonl", encoding="utf-8").read() + "{broken\n")
    ours, rejects, theirs = tmp_path / "ours.jsonl", tmp_path / "rejects.jsonl", tmp_path / "seed.jsonl"
    result = run_cli("--input", source, "--output", ours, "--rejects", rejects, "--json")
    assert result.returncode == 0, result.stderr
    seed = subprocess.run(
        [sys.executable, "benchmarks/seed_filter.py", "--input", source, "--output", theirs],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert seed.returncode == 0, seed.stderr
    assert ours.read_bytes() == theirs.read_bytes()
    text = ours.read_text(encoding="utf-8")
    assert "\\u" not in text and "の" in text
    summary = json.loads(result.stdout)
    rejected = [json.loads(line) for line in rejects.read_text(encoding="utf-8").splitlines()]
    assert summary["counts"]["input_rows"] == 3081 == summary["counts"]["kept"] + len(rejected)
    assert {"line": 3081, "rule": "unreadable"}.items() <= rejected[-1].items()
    assert summary["char_table"][0][1] >= summary["char_table"][-1][1]


@pytest.mark.claim("C9")
def test_filter_strict_makes_an_unreadable_line_an_error_naming_it(tmp_path):
    source = small_input(tmp_path, '{"instruction": "a", "response": "b"}\n{"instruction": 1}\n')
    result = run_cli("--input", source, "--output", tmp_path / "o", "--rejects", tmp_path / "r", "--strict")
    assert result.returncode == 2 and f"{source}, line 2" in result.stderr and "Traceback" not in result.stderr


def test_filter_refuses_a_missing_input_with_exit_2(tmp_path):
    result = run_cli("--input", tmp_path / "nope.jsonl", "--output", tmp_path / "o", "--rejects", tmp_path / "r")
    assert result.returncode == 2 and "nope.jsonl" in result.stderr


def test_filter_refuses_one_file_for_both_output_and_rejects_with_exit_2(tmp_path):
    result = run_cli("--input", small_input(tmp_path), "--output", tmp_path / "o", "--rejects", tmp_path / "o")
    assert result.returncode == 2 and "same file" in result.stderr and "Traceback" not in result.stderr


def test_filter_command_imports_neither_torch_nor_transformers(tmp_path):
    source = small_input(tmp_path)
    code = (
        "import sys; from reference.cli import main; "
        f"main(['filter','--input',{str(source)!r},'--output',{str(tmp_path / 'o')!r},"
        f"'--rejects',{str(tmp_path / 'r')!r}]); "
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip().endswith("False False"), result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.claim("C9")
def test_forked_workers_write_the_same_bytes_as_one_process(tmp_path):
    source = tmp_path / "magpie.jsonl"
    write_jsonl(magpie_records(3000, seed=5), source)
    with open(source, "ab") as f:
        f.write(b'{"instruction": "\xff\xfe", "response": "x"}\n')  # not UTF-8: a reject, not a crash
    runs = {}
    for workers in ("1", "3"):
        out, rej = tmp_path / f"o{workers}", tmp_path / f"r{workers}"
        result = run_cli("--input", source, "--output", out, "--rejects", rej, "--workers", workers, "--json")
        assert result.returncode == 0, result.stderr
        summary = {k: v for k, v in json.loads(result.stdout).items() if k not in ("output", "rejects")}
        runs[workers] = (out.read_bytes(), rej.read_bytes(), summary)
    assert runs["1"] == runs["3"]
    last = json.loads(runs["3"][1].decode("utf-8").splitlines()[-1])
    assert (last["line"], last["rule"]) == (3001, "unreadable") and "not UTF-8" in last["detail"]
    strict = run_cli(
        "--input", source, "--output", tmp_path / "s", "--rejects", tmp_path / "t", "--workers", 3, "--strict"
    )
    assert strict.returncode == 2 and f"{source}, line 3001: not UTF-8" in strict.stderr
