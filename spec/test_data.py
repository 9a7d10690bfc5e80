"""Datasets (reference/data.py): loading every format into records and mapping columns; clear errors."""

from __future__ import annotations

import json

import pytest

from reference.data import QA111_COLUMNS, Pair, Unreadable, load_records, read_pairs, training_set
from reference.errors import InputError

ROWS = [{"input": "日本の首都は？", "output": "東京です。"}, {"input": "一年は何日？", "output": "365日です。"}]


def write(tmp_path, fmt: str):
    """ROWS in one format, written with pandas/datasets (the libraries, not the code under test)."""
    import datasets
    import pandas as pd

    frame = pd.DataFrame(ROWS)
    path = tmp_path / f"qa.{fmt}" if fmt != "saved" else tmp_path / "saved"
    if fmt == "jsonl":
        frame.to_json(path, orient="records", lines=True, force_ascii=False)
    elif fmt == "json":
        frame.to_json(path, orient="records", force_ascii=False)
    elif fmt == "csv":
        frame.to_csv(path, index=False)
    elif fmt == "parquet":
        frame.to_parquet(path)
    else:
        datasets.Dataset.from_pandas(frame).save_to_disk(str(path))
    return path


@pytest.mark.claim("P2")
@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet", "saved"])
def test_every_format_loads_as_records_with_columns_mapped(tmp_path, fmt):
    records = load_records(write(tmp_path, fmt), QA111_COLUMNS)
    assert records.column_names == ["instruction", "response"]
    assert records.to_list() == [{"instruction": r["input"], "response": r["output"]} for r in ROWS]


@pytest.mark.claim("P2", "C3")
def test_magpie_rows_load_as_first_user_and_assistant_turns(fixtures_dir):
    records = load_records(fixtures_dir / "data" / "magpie_sample.jsonl")
    assert len(records) == 80 and records.column_names == ["instruction", "response"]
    streamed = [p for p in read_pairs(fixtures_dir / "data" / "magpie_sample.jsonl")]
    assert records.to_list() == [{"instruction": p.instruction, "response": p.response} for p in streamed]


@pytest.mark.claim("P2")
def test_a_missing_column_names_the_file_and_the_column(tmp_path):
    path = write(tmp_path, "csv")
    with pytest.raises(InputError) as error:
        load_records(path, {"instruction": "question", "response": "output"})
    assert str(path) in str(error.value) and "'question'" in str(error.value)


@pytest.mark.claim("P2")
def test_a_row_that_is_not_text_names_file_row_and_column(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in
                              [ROWS[0], {"input": "三行目？", "output": None}]) + "\n", encoding="utf-8")
    with pytest.raises(InputError) as error:
        load_records(path, QA111_COLUMNS)
    assert f"{path}, row 2, column 'output'" in str(error.value)


@pytest.mark.claim("P2")
def test_an_unreadable_line_is_reported_with_its_number_not_skipped(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"instruction": "a", "response": "b"}\n\n{"instruction": "c"\n[1, 2]\n', encoding="utf-8")
    items = list(read_pairs(path))
    assert isinstance(items[0], Pair) and items[0].line == 1
    assert [(type(i), i.line) for i in items[1:]] == [(Unreadable, 3), (Unreadable, 4)]
    assert "expected a JSON object" in items[2].error


@pytest.mark.claim("P2")
@pytest.mark.parametrize("name,message", [("nope.jsonl", "no such file"), ("data.txt", "unknown format")])
def test_a_missing_or_unknown_file_is_named(tmp_path, name, message):
    path = tmp_path / name
    if name.endswith(".txt"):
        path.write_text("x", encoding="utf-8")
    with pytest.raises(InputError, match=message):
        load_records(path)


@pytest.mark.claim("C10")
def test_the_training_set_is_filtered_magpie_then_qa111_mapped(tmp_path, fixtures_dir):
    filtered = tmp_path / "filtered.jsonl"
    kept = [{"id": "m001", "instruction": "指示", "response": "応答"}]
    filtered.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")
    qa = fixtures_dir / "data" / "qa111_sample.jsonl"
    combined = training_set(filtered, qa)
    qa_rows = [json.loads(line) for line in qa.read_text(encoding="utf-8").splitlines()]
    assert len(combined) == 1 + len(qa_rows) == 25
    assert combined[0] == {"instruction": "指示", "response": "応答"}
    assert combined[1] == {"instruction": qa_rows[0]["input"], "response": qa_rows[0]["output"]}
