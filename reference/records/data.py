"""Datasets: records with columns, from files, mapped to instruction/response (seed 004 §2, seed 001 §2.2).

A dataset is structured data: one row is one record, a record has columns. Three ways in:

* `parse_jsonl` / `read_pairs` turn JSONL bytes into instruction/response pairs with nothing but `json`
  — the filter's path, which must start fast and must not lose a row: a line that is not UTF-8, not
  JSON or not a record comes back as an `Unreadable` item with its line number, never skipped.
* `load_records` builds a `datasets.Dataset` from JSONL, JSON, CSV, Parquet or a saved dataset folder
  and maps named columns to instruction/response; a missing file or column, or a row whose value is
  not text, is an `InputError` naming the file, the row number and the column.
* `read_text_rows` reads the small JSONL files of tasks, shots and preference pairs.

All three read JSON Lines by the rules of reference/records/file_faults.py: a row whose object gives a key twice is
refused (unreadable, for the filter), naming the key; a UTF-8 byte order mark at the start of a file is skipped.

Four record shapes are read, the first whose columns a row has (`--columns` names others):

* magpie (llm-jp/magpie-sft-v1.0): a `conversations` list; the instruction is the content of the first `user`
  turn and the response that of the first `assistant` turn, "" when there is none (C3);
* trl's conversational format: `messages`, a list of {role, content}, exactly one `user` turn then one
  `assistant` turn (a system turn or more turns are refused, by row: the recipe's formats render one exchange);
* trl's prompt-completion format: `prompt` and `completion`, both text, or both lists of one {role, content} turn
  (a `user` prompt, an `assistant` completion);
* `instruction` and `response`. The QA111 set maps input -> instruction and output -> response (C10).

Each becomes instruction/response and is rendered with the recipe's format (reference/modeling/formats.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from reference.errors import InputError
from reference.records import caches
from reference.records.file_faults import BLANK, BOM, UNIQUE_KEYS, RepeatedKey, locate_fault, not_utf8

SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
QA111_COLUMNS = {"instruction": "input", "response": "output"}


@dataclass
class Pair:
    """One training record: where it came from and its instruction/response text."""

    line: int
    instruction: str
    response: str
    id: object = None


@dataclass
class Unreadable:
    """A line that is not a usable record, with why."""

    line: int
    error: str
    text: str


def magpie_pair(conversations: list) -> tuple[str, str]:
    """Instruction = first user turn's content, response = first assistant turn's content ("" if none)."""
    user = next((turn["content"] for turn in conversations if turn["role"] == "user"), "")
    assistant = next((turn["content"] for turn in conversations if turn["role"] == "assistant"), "")
    return user, assistant


SHAPES = (("conversations",), ("messages",), ("prompt", "completion"), ("instruction", "response"))
"""The record shapes, in the order a row's columns are matched (see the module docstring)."""


def shape_of(columns) -> tuple[str, ...] | None:
    """The first record shape whose columns are all among `columns`; None when none is."""
    return next((shape for shape in SHAPES if set(shape) <= set(columns)), None)


def _turns(value, roles: tuple[str, ...], column: str) -> list[str]:
    """The contents of a list of {role, content} turns whose roles are exactly `roles`, in order."""
    if not isinstance(value, list) or not all(isinstance(t, dict) and "role" in t and "content" in t for t in value):
        raise ValueError(f"{column!r} must be a list of {{role, content}} objects")
    found = [t["role"] for t in value]
    if tuple(found) != roles:
        raise ValueError(
            f"{column!r} has the turns {found}; one exchange ({', '.join(roles)}) is read: the recipe's formats render "
            "a user turn and an assistant turn, no system turn (multi-turn records are not handled)"
        )
    return [t["content"] for t in value]


def exchange(row: dict, shape: tuple[str, ...]) -> tuple[str, str]:
    """(instruction, response) of a row of that shape; ValueError naming the column when it is not one."""
    if shape == ("conversations",):
        try:
            return magpie_pair(row["conversations"])
        except (TypeError, KeyError):
            raise ValueError("'conversations' must be a list of {role, content} objects") from None
    if shape == ("messages",):
        return tuple(_turns(row["messages"], ("user", "assistant"), "messages"))
    if shape == ("prompt", "completion") and isinstance(row["prompt"], list):
        return _turns(row["prompt"], ("user",), "prompt")[0], _turns(row["completion"], ("assistant",), "completion")[0]
    return row[shape[0]], row[shape[1]]


def pair_from_row(row: object, line: int) -> Pair:
    """A Pair from a row of any record shape (see the module docstring); ValueError if it has none."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    shape = shape_of(row)
    if shape is None:
        raise ValueError(
            "needs 'conversations' (magpie), 'messages', 'prompt' and 'completion', or 'instruction' and 'response'"
        )
    instruction, response = exchange(row, shape)
    if type(instruction) is not str or type(response) is not str:
        raise ValueError("the instruction and the response must be text")
    return Pair(line, instruction, response, row.get("id"))


_scan = UNIQUE_KEYS.scan_once  # json.loads without its per-call Python wrapper; a repeated key is refused


def _loads(text: str):
    """json.loads(text) for one JSONL line: the C scanner, then nothing but whitespace may follow."""
    start = len(text) - len(text.lstrip(" \t\n\r"))  # JSON's whitespace only, as json.loads
    try:
        value, end = _scan(text, start)
    except StopIteration as stop:
        raise json.JSONDecodeError("Expecting value", text, stop.value) from None
    if text[end:].strip(" \t\n\r"):
        raise json.JSONDecodeError("Extra data", text, end)
    return value


_BLANK = BLANK  # what bytes.strip() removes: a line of only these is blank


def parse_jsonl(data, first_line: int = 1, start: int = 0, end: int | None = None) -> list[Pair | Unreadable]:
    """Each line of JSONL bytes (bytes or an mmap; data[start:end]) as a Pair, or as Unreadable with its
    line number (blank lines skipped).

    A line that is not UTF-8 or not JSON, an object that gives a key twice, or a row that is neither magpie
    nor instruction/response, is Unreadable: reported, never skipped. A byte order mark at the start of the
    file (start 0) is skipped. Lines are decoded straight from `data`, never copied first."""
    end = len(data) if end is None else end
    items: list[Pair | Unreadable] = []
    view, number, at = memoryview(data), first_line, start
    if start == 0 and data[: len(BOM)] == BOM:
        at = len(BOM)
    try:
        while at < end:
            stop = data.find(b"\n", at, end)
            stop = end if stop == -1 else stop
            try:
                text = str(view[at:stop], "utf-8")
            except UnicodeDecodeError as error:
                raw = bytes(view[at:stop])
                if raw.strip():
                    items.append(
                        Unreadable(
                            line=number,
                            error=f"not UTF-8 ({error.reason} at byte {error.start})",
                            text=raw.decode("utf-8", errors="replace"),
                        )
                    )
            else:
                if text.strip(_BLANK):
                    try:
                        items.append(pair_from_row(_loads(text), number))
                    except (json.JSONDecodeError, ValueError) as error:
                        items.append(Unreadable(line=number, error=str(error), text=text.rstrip("\r")))
            at, number = stop + 1, number + 1
    finally:
        view.release()
    return items


def read_pairs(path: str | Path) -> list[Pair | Unreadable]:
    """The lines of a JSONL file as Pairs and Unreadables (see parse_jsonl)."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise InputError(f"{path}: cannot open: {error.strerror}") from None
    return parse_jsonl(data)


def _format(path: Path) -> str:
    if path.is_dir():
        return "saved"
    if path.suffix not in SUFFIXES:
        raise InputError(f"{path}: unknown format {path.suffix!r}; use {', '.join(SUFFIXES)} or a saved dataset folder")
    return SUFFIXES[path.suffix]


def load_table(path: str | Path):
    """A `datasets.Dataset` from a JSONL/JSON/CSV/Parquet file or a folder saved with save_to_disk."""
    source = Path(path)
    if not source.exists():
        raise InputError(f"{path}: no such file or folder")
    kind = _format(source)
    raw = source.read_bytes() if source.is_file() else None
    if raw is not None and not raw.removeprefix(BOM).strip():
        raise InputError(f"{path}: the file is empty: no records")
    fault = None
    if kind == "json":  # every row read first: the loader keeps one value of a repeated key without a word
        fault = locate_fault(source, kind, raw)
    elif kind == "csv":  # the loader may read bytes that are not UTF-8 and fail only when a row is read
        fault = not_utf8(raw)
    if fault:
        raise InputError(f"{path}, {fault}")
    if kind != "saved":  # the loader writes the file as Arrow tables into its cache first
        caches.require_writable_cache()
    import datasets

    datasets.disable_progress_bars()
    try:
        if kind == "saved":
            table = datasets.load_from_disk(str(source))
        else:
            table = datasets.load_dataset(kind, data_files=str(source), split="train")
    except Exception as error:  # the loaders raise many types; name the file and say what went wrong
        fault = locate_fault(source, kind)  # their messages name a byte position at best: find the row
        raise InputError(
            f"{path}, {fault}" if fault else f"{path}: cannot be read as {kind}: {type(error).__name__}: {error}"
        ) from None
    if isinstance(table, datasets.DatasetDict):
        raise InputError(f"{path}: holds several splits ({', '.join(table)}); save one split")
    return table


def load_records(path: str | Path, columns: dict[str, str] | None = None):
    """A Dataset with `instruction` and `response` columns.

    `columns` maps instruction/response to the file's column names, e.g. {"instruction": "input",
    "response": "output"}; without it, the first record shape the file's columns hold (see the module docstring).
    Every value must be a string: the first one that is not is an error naming file, row and column.
    """
    table = load_table(path)
    shape = shape_of(table.column_names) if columns is None else None
    if shape == ("conversations",):
        require_magpie_rows(table["conversations"], path)
    if shape in (("conversations",), ("messages",), ("prompt", "completion")):
        pairs = []
        for number, row in enumerate(table.select_columns(list(shape)), start=1):
            try:
                pairs.append(exchange(row, shape))
            except ValueError as error:
                raise InputError(f"{path}, row {number}: {error}") from None
            if not all(isinstance(text, str) for text in pairs[-1]):
                raise InputError(f"{path}, row {number}: {' and '.join(shape)} must give text, got {pairs[-1]!r}"[:500])
        instructions, responses = zip(*pairs, strict=True) if pairs else ((), ())
        import datasets

        return datasets.Dataset.from_dict({"instruction": list(instructions), "response": list(responses)})
    columns = columns or {"instruction": "instruction", "response": "response"}
    if columns["instruction"] == columns["response"]:
        raise InputError(f"{path}: instruction and response are both column {columns['instruction']!r}")
    missing = [c for c in columns.values() if c not in table.column_names]
    if missing:
        raise InputError(f"{path}: no column {missing[0]!r} (columns: {', '.join(table.column_names)})")
    for target, column in columns.items():
        for row, value in enumerate(table[column], start=1):
            if not isinstance(value, str):
                raise InputError(f"{path}, row {row}, column {column!r}: expected text for {target}, got {value!r}")
    selected = table.select_columns(list(columns.values()))
    return selected.rename_columns({v: k for k, v in columns.items() if v != k})


def require_magpie_rows(column: list, path) -> None:
    """Every `conversations` value must be a list of {role, content} turns whose chosen contents are text."""
    for row, conversations in enumerate(column, start=1):
        try:
            pair = magpie_pair(conversations)
        except (TypeError, KeyError):
            pair = None
        if pair is None or not all(isinstance(text, str) for text in pair):
            raise InputError(
                f"{path}, row {row}, column 'conversations': expected a list of {{role, content}} "
                f"turns with text contents, got {conversations!r}"[:500]
            )


def training_set(filtered_path: str | Path, qa_path: str | Path):
    """C10: the filtered magpie records followed by the QA111 set (input -> instruction, output -> response)."""
    import datasets

    magpie = load_records(filtered_path)
    qa = load_records(qa_path, QA111_COLUMNS)
    return datasets.concatenate_datasets([magpie.select_columns(["instruction", "response"]), qa])


def parse_columns(text: str | None, names: tuple[str, ...], some: bool = False) -> dict | None:
    """A `--columns` map, `name=COLUMN,...` naming every one of `names` once (with `some`, any of them):
    `instruction=input,response=output` -> {"instruction": "input", "response": "output"}; None when not given."""
    if not text:
        return None
    pairs = [item.partition("=") for item in text.split(",")]
    columns = {k.strip(): v.strip() for k, sep, v in pairs if sep and v.strip()}
    complete = set(columns) <= set(names) if some else set(columns) == set(names)
    if not complete or len(columns) != len(pairs) or not columns:
        wanted = ",".join(f"{name}=COLUMN" for name in names)
        raise InputError(f"--columns {text!r}: expected {'any of ' if some else ''}{wanted}")
    return columns


def read_text_rows(
    path: str | Path, needed: tuple[str, ...], with_lines: bool = False, columns: dict | None = None
) -> list:
    """The rows of a small JSONL file, each an object with non-empty text in every `needed` field;
    the first row that is not is an error naming the file, the line and the fields (or the key it gives
    twice). A byte order mark at the start is skipped. `columns` (parse_columns) names the file's column for each
    needed field; the row is given under the needed names too. With `with_lines`, (line number, row) pairs, for
    callers that check more and must name the line."""
    try:
        content = Path(path).read_bytes()
    except OSError as error:
        raise InputError(f"{path}: cannot read: {error.strerror or error}") from None
    fault = not_utf8(content)
    if fault:
        raise InputError(f"{path}, {fault}")
    lines = content.decode("utf-8").removeprefix("\ufeff").split("\n")  # split(): a row may hold U+2028
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip(BLANK):
            continue
        try:
            row = UNIQUE_KEYS.decode(line)
        except RepeatedKey as error:
            raise InputError(f"{path}, line {number}: {error}") from None
        except ValueError as error:
            raise InputError(f"{path}, line {number}: not JSON ({error})") from None
        names = {k: (columns or {}).get(k, k) for k in needed}
        missing = [
            c for c in names.values() if not isinstance(row, dict) or not isinstance(row.get(c), str) or not row[c]
        ]
        if missing:
            raise InputError(f"{path}, line {number}: needs non-empty text in {', '.join(missing)}")
        row = {**row, **{k: row[c] for k, c in names.items()}}
        rows.append((number, row) if with_lines else row)
    if not rows:
        raise InputError(f"{path}: no rows")
    return rows
