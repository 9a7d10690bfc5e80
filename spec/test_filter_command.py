"""The `filter` command (reference/records/filter_workers.py: the file, its forked workers): the seed's bytes out, every
dropped row in the rejects file, the character table in a file beside the output with its top few and the
counts last on stdout, bad input named with exit 2, and no torch or transformers imported."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest

from reference.records.synthetic import magpie_records, write_jsonl
from spec.cli_runner import run_cli


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
    result = run_cli("filter", "--input", source, "--output", ours, "--rejects", rejects, "--json")
    assert result.returncode == 0, result.stderr
    seed = subprocess.run(
        [sys.executable, "-m", "reference.records.seed_filter", "--input", source, "--output", theirs],
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
    assert summary["char_table_file"] == str(tmp_path / "ours.chars.tsv")


@pytest.mark.claim("C9")
def test_filter_strict_makes_an_unreadable_line_an_error_naming_it(tmp_path):
    source = small_input(tmp_path, '{"instruction": "a", "response": "b"}\n{"instruction": 1}\n')
    result = run_cli("filter", "--input", source, "--output", tmp_path / "o", "--rejects", tmp_path / "r", "--strict")
    assert result.returncode == 2 and f"{source}, line 2" in result.stderr and "Traceback" not in result.stderr


def test_filter_refuses_a_missing_input_with_exit_2(tmp_path):
    result = run_cli(
        "filter", "--input", tmp_path / "nope.jsonl", "--output", tmp_path / "o", "--rejects", tmp_path / "r"
    )
    assert result.returncode == 2 and "nope.jsonl" in result.stderr


def test_filter_refuses_one_file_for_both_output_and_rejects_with_exit_2(tmp_path):
    result = run_cli(
        "filter", "--input", small_input(tmp_path), "--output", tmp_path / "o", "--rejects", tmp_path / "o"
    )
    assert result.returncode == 2 and "same file" in result.stderr and "Traceback" not in result.stderr


def test_filter_command_imports_neither_torch_nor_transformers(tmp_path):
    """`python -X importtime -m reference filter ...` lists on stderr every module the run imports; the
    filter's own modules are among them, torch and transformers are not (the command starts in a blink)."""
    result = run_cli(
        "filter",
        "--input",
        small_input(tmp_path),
        "--output",
        tmp_path / "o",
        "--rejects",
        tmp_path / "r",
        python_flags=("-X", "importtime"),
    )
    assert result.returncode == 0, result.stderr
    listed = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time")]
    assert {"reference.records.filters", "reference.records.filter_workers", "numpy"} <= set(listed)
    assert [name for name in listed if name.split(".")[0] in ("torch", "transformers")] == []


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
        result = run_cli("filter", "--input", source, "--output", out, "--rejects", rej, "--workers", workers, "--json")
        assert result.returncode == 0, result.stderr
        paths = ("output", "rejects", "char_table_file")
        summary = {k: v for k, v in json.loads(result.stdout).items() if k not in paths}
        chars = tmp_path / f"o{workers}.chars.tsv"
        runs[workers] = (out.read_bytes(), rej.read_bytes(), chars.read_bytes(), summary)
    assert runs["1"] == runs["3"]
    last = json.loads(runs["3"][1].decode("utf-8").splitlines()[-1])
    assert (last["line"], last["rule"]) == (3001, "unreadable") and "not UTF-8" in last["detail"]
    strict = run_cli(
        "filter", "--input", source, "--output", tmp_path / "s", "--rejects", tmp_path / "t", "--workers", 3, "--strict"
    )
    assert strict.returncode == 2 and f"{source}, line 3001: not UTF-8" in strict.stderr


INSTRUCTION = "日本の四季について簡単に説明してください。"
RESPONSE = "日本には春夏秋冬の四つの季節があります。\n桜の花や紅葉を楽しむ人も多いです。"


@pytest.mark.claim("C9")
def test_filter_writes_the_whole_character_table_beside_output_and_prints_its_top_10_then_the_counts(tmp_path):
    """Forty copies of one record: every character is counted 40 times per place in it, so all forty are
    kept and the table is Counter(40 x (response + " " + instruction)).most_common(): 43 characters, の
    first (春夏秋冬の, 四つの, 桜の and 日本の: 4 x 40 = 160). The response's newline is written escaped
    (\\n, U+000A). stdout: the top 10, the table's path, then the counts and the two closing lines."""
    row = json.dumps({"instruction": INSTRUCTION, "response": RESPONSE}, ensure_ascii=False)
    source = small_input(tmp_path, (row + "\n") * 40)
    result = run_cli(
        "filter", "--input", source, "--output", tmp_path / "kept.jsonl", "--rejects", tmp_path / "rejects.jsonl"
    )
    assert result.returncode == 0, result.stderr
    expected = Counter((RESPONSE + " " + INSTRUCTION) * 40).most_common()
    assert len(expected) == 43 and expected[0] == ("の", 160)

    table = (tmp_path / "kept.chars.tsv").read_text(encoding="utf-8").splitlines()
    assert table[0] == "character\tcode_point\tcount"
    assert [line.split("\t") for line in table[1:]] == [
        ["\\n" if char == "\n" else char, f"U+{ord(char):04X}", str(count)] for char, count in expected
    ]

    lines = result.stdout.splitlines()
    assert lines[0] == "character frequencies of the kept records, top 10 of 43:"
    assert [line.split() for line in lines[1:11]] == [[str(n), f"U+{ord(c):04X}", c] for c, n in expected[:10]]
    assert lines[11:13] == [f"the whole table: {tmp_path / 'kept.chars.tsv'}", ""]
    counts = {"input_rows": 40, "kept": 40, "unreadable": 0, "ng_string": 0, "rare_char_pass1": 0}
    counts.update(instruct_ng=0, detector_error=0, language=0, rare_char_pass2=0)
    assert [line.strip() for line in lines[13:-2]] == [f"{rule}: {n}" for rule, n in counts.items()]
    assert lines[-1].startswith("kept 40 of 40 rows -> ") and len(lines) == 13 + 9 + 2


@pytest.mark.parametrize("flag", ["--input", "--rejects"])
def test_filter_refuses_a_character_table_over_the_input_or_the_rejects_with_exit_2(tmp_path, flag):
    """--output kept.jsonl puts the table at kept.chars.tsv: an --input or --rejects of that name is refused
    before any work, and the file is left as it was."""
    taken = tmp_path / "kept.chars.tsv"
    taken.write_text("not to be overwritten\n", encoding="utf-8")
    paths = {"--input": small_input(tmp_path), "--output": tmp_path / "kept.jsonl", "--rejects": tmp_path / "r"}
    paths[flag] = taken
    result = run_cli("filter", *[part for flag_and_path in paths.items() for part in flag_and_path])
    assert result.returncode == 2 and "character table" in result.stderr and "Traceback" not in result.stderr
    assert taken.read_text(encoding="utf-8") == "not to be overwritten\n" and not (tmp_path / "kept.jsonl").exists()
