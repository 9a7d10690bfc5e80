"""Datasets (reference/records/data.py): loading every format into records and mapping columns; clear errors."""

from __future__ import annotations

import json

import pytest

from reference.errors import InputError
from reference.records.data import QA111_COLUMNS, Pair, Unreadable, load_records, read_pairs, training_set

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
    """80 lines, 80 records. Hand-copied from the fixture: m001 is one user and one assistant turn; m019 has
    no assistant turn (response ""); m023 opens with a system turn and has two exchanges (the first user
    and the first assistant turn are taken); m042 has only an assistant turn (instruction ""); m062 is empty."""
    records = load_records(fixtures_dir / "data" / "magpie_sample.jsonl")
    assert len(records) == 80 and records.column_names == ["instruction", "response"]
    assert records[0] == {
        "instruction": "肉じゃがをおいしく作るコツを教えてください。",
        "response": (
            "肉じゃがをおいしく作るには、最初に牛肉を炒めて香りを出してから野菜を加えるのがポイントです。じゃがいもは"
            "煮崩れしにくいメークインを使うと、形がきれいに残ります。調味料は砂糖を先に入れ、しょうゆは後から加えると"
            "味がしみ込みやすくなります。火を止めてからしばらく置くと、さらに味がなじみます。"
        ),
    }
    assert records[18] == {"instruction": "おいしいコーヒーの入れ方を教えてください。", "response": ""}
    assert records[22] == {
        "instruction": "そばとうどんの違いを教えてください。",
        "response": (
            "そばはそば粉を主な原料とした麺で、細めで独特の香りがあるのが特徴です。一方、うどんは小麦粉から作られ、"
            "太くてもちもちとした食感があります。一般に、東日本ではそば、西日本ではうどんが好まれる傾向があるといわれて"
            "います。"
        ),
    }
    assert records[41] == {
        "instruction": "",
        "response": (
            "コーヒーをおいしく入れるには、豆を飲む直前にひくことが大切です。お湯は沸騰してから少し冷まし、九十度前後で"
            "注ぐと苦みが出すぎません。最初に少量のお湯で粉を蒸らすと、香りがしっかり引き出されます。"
        ),
    }
    assert records[61] == {"instruction": "", "response": ""}


@pytest.mark.claim("P2", "C3")
def test_magpie_turns_are_chosen_by_role_not_by_position(tmp_path):
    """Written here: the assistant speaks first, then the user twice and the assistant again."""
    path = tmp_path / "magpie.jsonl"
    turns = [
        {"role": "assistant", "content": "先に答え"},
        {"role": "user", "content": "一つ目の質問"},
        {"role": "user", "content": "二つ目の質問"},
        {"role": "assistant", "content": "後の答え"},
    ]
    path.write_text(json.dumps({"conversations": turns}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert load_records(path).to_list() == [{"instruction": "一つ目の質問", "response": "先に答え"}]


@pytest.mark.claim("P2")
@pytest.mark.parametrize(
    "conversations", ["text, not turns", [{"content": "no role"}], [{"role": "user", "content": 3}]]
)
def test_a_magpie_row_that_is_not_a_list_of_turns_names_file_row_and_column(tmp_path, conversations):
    path = tmp_path / "magpie.jsonl"
    rows = [{"conversations": [{"role": "user", "content": "質問"}]}, {"conversations": conversations}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(InputError) as error:
        load_records(path)
    assert f"{path}, row 2" in str(error.value)


@pytest.mark.claim("P2")
@pytest.mark.parametrize(
    "suffix, text, where",
    [
        (".jsonl", '{"input": "a", "output": "b"}\n\n{"input": "c" "output": "d"}\n', "row 2 (line 3): not JSON"),
        (".jsonl", '{"input": "a", "output": "b"}\n"just a string"\n', "row 2 (line 2): expected a JSON object"),
        (".json", '[{"input": "a", "output": "b"},\n {"input": "c" "output": "d"}]\n', "line 2, column 16: not JSON"),
        (".csv", "input,output\na,b\nc,d,e\n", "row 2 (line 3): 3 fields, the header has 2"),
        (".csv", 'input,output\n"a,b\n', "row 1 (line 2)"),
        (".jsonl", b'{"input": "a", "output": "b"}\n{"input": "\xff", "output": "c"}\n', "line 2: not UTF-8"),
    ],
    ids=["jsonl-not-json", "jsonl-not-an-object", "json-document", "csv-extra-field", "csv-open-quote", "not-utf8"],
)
def test_an_unreadable_row_names_the_file_and_the_row(tmp_path, suffix, text, where):
    """Rows count records from 1 (blank lines and the CSV header are no records); lines count the file's lines.
    A JSON document (not JSON Lines) has no rows: its line and column are named."""
    path = tmp_path / f"data{suffix}"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    with pytest.raises(InputError) as error:
        load_records(path, QA111_COLUMNS)
    assert f"{path}, {where}" in str(error.value)


@pytest.mark.claim("P2")
def test_a_missing_column_names_the_file_and_the_column(tmp_path):
    path = write(tmp_path, "csv")
    with pytest.raises(InputError) as error:
        load_records(path, {"instruction": "question", "response": "output"})
    assert str(path) in str(error.value) and "'question'" in str(error.value)


@pytest.mark.claim("P2")
def test_instruction_and_response_mapped_to_one_column_is_refused_naming_it(tmp_path):
    """`--columns instruction=input,response=input` would train the model to echo its prompt."""
    path = write(tmp_path, "csv")
    with pytest.raises(InputError, match="instruction and response are both column 'input'"):
        load_records(path, {"instruction": "input", "response": "input"})


@pytest.mark.claim("P2")
def test_a_row_that_is_not_text_names_file_row_and_column(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        "\n".join(json.dumps(r, ensure_ascii=False) for r in [ROWS[0], {"input": "三行目？", "output": None}]) + "\n",
        encoding="utf-8",
    )
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


@pytest.mark.claim("P2")
@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_an_empty_file_is_named_as_empty(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(InputError, match="the file is empty: no records"):
        load_records(path)


# ------------------------------------------------------------------ one JSON Lines rule for every reader

BOM = b"\xef\xbb\xbf"
"""The UTF-8 byte order mark that Windows editors write at the start of a file."""
REPEATED = [
    ('{"input": "a", "input": "b", "output": "c"}', "'input'"),
    ('{"conversations": [{"role": "user", "role": "assistant", "content": "x"}], "output": "c"}', "'role'"),
]
"""A row that gives a key twice, at the top and nested: json and pyarrow keep one of the values without a word."""


def qa_lines(*rows: str) -> bytes:
    return "".join(f"{row}\n" for row in rows).encode()


GOOD = '{"input": "日本の首都は？", "output": "東京です。"}'


@pytest.mark.claim("P2")
@pytest.mark.parametrize("row, key", REPEATED, ids=["top-level", "nested"])
def test_a_jsonl_row_that_gives_a_key_twice_is_refused_naming_file_row_line_and_key(tmp_path, row, key):
    """The datasets loader took {"input": "a", "input": "b"} as "b" (or failed naming no row); every row is now read
    with the standard library first."""
    path = tmp_path / "data.jsonl"
    path.write_bytes(qa_lines(GOOD, "", row))
    with pytest.raises(InputError) as error:
        load_records(path, QA111_COLUMNS)
    assert f"{path}, row 2 (line 3): key {key} appears twice in one object" in str(error.value)


@pytest.mark.claim("P2")
def test_a_json_array_record_that_gives_a_key_twice_is_named_by_row_and_line(tmp_path):
    """A JSON document's records load with the last value of a repeated key, silently, unless read first."""
    path = tmp_path / "data.json"
    path.write_text(f"[{GOOD},\n {GOOD},\n {REPEATED[0][0]}]\n", encoding="utf-8")
    with pytest.raises(InputError) as error:
        load_records(path, QA111_COLUMNS)
    assert f"{path}, row 3 (line 3): key 'input' appears twice in one object" in str(error.value)


@pytest.mark.claim("P2")
@pytest.mark.parametrize("row, key", REPEATED, ids=["top-level", "nested"])
def test_small_jsonl_files_refuse_a_repeated_key_naming_file_line_and_key(tmp_path, row, key):
    """Tasks, shots, DPO pairs and preference rows (read_text_rows) took the last value."""
    from reference.records.data import read_text_rows

    path = tmp_path / "tasks.jsonl"
    path.write_bytes(qa_lines(GOOD, row))
    with pytest.raises(InputError) as error:
        read_text_rows(path, ("input",))
    assert f"{path}, line 2: key {key} appears twice in one object" in str(error.value)


@pytest.mark.claim("P2")
def test_the_filters_reader_reports_a_repeated_key_as_an_unreadable_line_naming_it(tmp_path):
    """The filter's own parser (parse_jsonl) kept the last instruction; the row is now unreadable, like any
    row that cannot be taken as one record (the filter rejects it, or refuses it with --strict)."""
    path = tmp_path / "magpie.jsonl"
    path.write_bytes(qa_lines('{"instruction": "a", "response": "b"}', '{"instruction": "a", "instruction": "x"}'))
    items = read_pairs(path)
    assert isinstance(items[0], Pair)
    assert isinstance(items[1], Unreadable) and items[1].line == 2
    assert items[1].error == "key 'instruction' appears twice in one object"


@pytest.mark.claim("P2")
@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv"])
def test_a_byte_order_mark_at_the_start_of_a_file_is_skipped(tmp_path, fmt):
    """The same records as the file without it: pyarrow's readers skip it, and so does every reader here."""
    path = write(tmp_path, fmt)
    plain = load_records(path, QA111_COLUMNS).to_list()
    path.write_bytes(BOM + path.read_bytes())
    assert load_records(path, QA111_COLUMNS).to_list() == plain


@pytest.mark.claim("P2")
def test_the_small_jsonl_files_and_the_filters_reader_skip_a_byte_order_mark_too(tmp_path):
    """read_text_rows refused line 1 as "not JSON (Unexpected UTF-8 BOM)"; parse_jsonl called it unreadable."""
    from reference.records.data import parse_jsonl, read_text_rows

    rows = qa_lines(GOOD, '{"input": "一年は何日？", "output": "365日です。"}')
    path = tmp_path / "tasks.jsonl"
    path.write_bytes(BOM + rows)
    assert read_text_rows(path, ("input", "output"), with_lines=True) == [
        (1, json.loads(GOOD)),
        (2, {"input": "一年は何日？", "output": "365日です。"}),
    ]
    pairs = qa_lines('{"instruction": "a", "response": "b"}', '{"instruction": "c", "response": "d"}')
    assert parse_jsonl(BOM + pairs) == parse_jsonl(pairs)
    assert [type(item) for item in parse_jsonl(BOM + pairs)] == [Pair, Pair]


@pytest.mark.claim("P2")
def test_a_byte_order_mark_inside_a_file_is_no_mark_but_a_character_the_row_cannot_start_with(tmp_path):
    """Only the file's first bytes can be a mark; a second file appended with its own is a faulty row."""
    from reference.records.data import parse_jsonl

    path = tmp_path / "data.jsonl"
    path.write_bytes(qa_lines(GOOD) + BOM + qa_lines(GOOD))
    with pytest.raises(InputError, match=r"row 2 \(line 2\): not JSON"):
        load_records(path, QA111_COLUMNS)
    pairs = qa_lines('{"instruction": "a", "response": "b"}')
    assert isinstance(parse_jsonl(pairs + BOM + pairs)[1], Unreadable)


# --- trl's dataset formats: conversational (`messages`) and prompt-completion ---------------------------------------

AS_INSTRUCTIONS = [{"instruction": r["input"], "response": r["output"]} for r in ROWS]


def jsonl(tmp_path, name: str, rows: list[dict]):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def turns(*pairs: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in pairs]


@pytest.mark.claim("P2")
def test_conversational_messages_load_as_their_user_and_assistant_turns(tmp_path):
    """trl's conversational format: a `messages` list of one user turn then one assistant turn is the record's
    instruction and response, as its instruction/response twin is; training renders both the same."""
    rows = [{"messages": turns(("user", r["input"]), ("assistant", r["output"]))} for r in ROWS]
    assert list(load_records(jsonl(tmp_path, "chat.jsonl", rows))) == AS_INSTRUCTIONS
    assert [(p.instruction, p.response) for p in read_pairs(jsonl(tmp_path, "chat2.jsonl", rows))] == [
        (r["input"], r["output"]) for r in ROWS
    ]


@pytest.mark.claim("P2")
def test_prompt_completion_records_load_as_text_or_as_one_turn_each(tmp_path):
    """trl's prompt-completion format: `prompt` and `completion` as text, or as a user turn and an assistant
    turn; a file may hold both kinds of row."""
    first, second = ROWS
    rows = [
        {"prompt": first["input"], "completion": first["output"]},
        {"prompt": turns(("user", second["input"])), "completion": turns(("assistant", second["output"]))},
    ]
    assert list(load_records(jsonl(tmp_path, "pc.jsonl", rows))) == AS_INSTRUCTIONS


@pytest.mark.claim("P2")
@pytest.mark.parametrize(
    "messages, found",
    [
        (turns(("system", "丁寧に。"), ("user", "質問"), ("assistant", "答え")), "['system', 'user', 'assistant']"),
        (turns(("user", "質問"), ("assistant", "答え"), ("user", "次"), ("assistant", "答え2")), "'user', 'assistant'"),
        (turns(("assistant", "答え"), ("user", "質問")), "['assistant', 'user']"),
    ],
    ids=["a system turn", "two exchanges", "the answer first"],
)
def test_a_conversation_that_is_not_one_exchange_is_refused_naming_the_row_not_cut(tmp_path, messages, found):
    """The recipe's formats render one user turn and one assistant turn: a system turn, a second exchange or
    turns out of order would be lost or misread, so the row is named (row 2 here) and nothing trains. The filter's
    reader reports the same row as unreadable, by line."""
    rows = [{"messages": turns(("user", "質問"), ("assistant", "答え"))}, {"messages": messages}]
    path = jsonl(tmp_path, "chat.jsonl", rows)
    with pytest.raises(InputError, match=r"chat\.jsonl, row 2: 'messages' has the turns") as error:
        load_records(path)
    assert found in str(error.value)
    items = read_pairs(path)
    assert isinstance(items[0], Pair) and isinstance(items[1], Unreadable) and items[1].line == 2
