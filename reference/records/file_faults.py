"""Where a data file stops being readable, said as a person would look for it: "row R (line L): why".

The dataset loaders (pyarrow's JSON and CSV readers) fail with a byte offset at best, or only when a row is
read, and take some faults silently. So a JSON or JSON Lines file is read here with the standard library alone
before the loader reads it, and a CSV file when the loader fails, to find the first row at fault: bytes that
are not UTF-8, a JSON Lines line that is not a JSON object, a JSON document that does not parse, a CSV row with
more fields than its header. Rows count the records (blank lines skipped; CSV: after the header) and lines
count the file's lines, both from 1. Parquet and saved datasets are not inspected.

The rules every JSON Lines reader of the project shares live here too (reference/records/data.py's three readers:
the datasets loader, the filter's own parser and the small task/shot/pair files):

* a JSON object that gives a key twice is refused, naming the key (`UNIQUE_KEYS`): json and pyarrow would keep
  one of the values without a word ({"input": "a", "input": "b"} is "b" to both), at any depth;
* a UTF-8 byte order mark at the very start of a file (`BOM`; Windows editors write one) is read as no
  character at all, as pyarrow's JSON and CSV readers do; anywhere else U+FEFF is a character, and a line
  that starts with it is not JSON.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

BOM = b"\xef\xbb\xbf"
"""The UTF-8 byte order mark: skipped at the start of a file, nowhere else."""
BLANK = " \t\n\r\x0b\x0c"
"""What bytes.strip() removes: a line of nothing else is blank, no record."""


class RepeatedKey(ValueError):
    """A JSON object that gives one key twice."""


def unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """json's object_pairs_hook: the object as a dict, or RepeatedKey naming the first key given twice."""
    row = dict(pairs)
    if len(row) != len(pairs):
        seen = set()
        key = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise RepeatedKey(f"key {key!r} appears twice in one object")
    return row


UNIQUE_KEYS = json.JSONDecoder(object_pairs_hook=unique_keys)
"""json.loads's decoder, refusing an object with a repeated key (RepeatedKey). Its `scan_once` is the C
scanner that reference/records/data.py's fast JSONL parser calls; `decode(text)` is json.loads(text) for a str."""


def locate_fault(source: Path, kind: str, content: bytes | None = None) -> str | None:
    """Where a JSON Lines, JSON or CSV file stops being readable, as "row R (line L): why" (JSON: "line L,
    column C: why"); None when no row is at fault. Rows count the records (blank lines skipped; CSV: after
    the header) and lines the file's lines, both from 1. A repeated key is a fault (`UNIQUE_KEYS`); a byte
    order mark at the start is not (`BOM`). `content`: the file's bytes, when the caller has read them."""
    if kind not in ("json", "csv"):
        return None
    content = source.read_bytes() if content is None else content
    fault = not_utf8(content)
    if fault or kind == "csv":
        return fault or _csv_fault(source)
    text = content.decode("utf-8").removeprefix("\ufeff")
    lines = text.split("\n")
    return _json_lines_fault(lines) if _is_json_lines(source, lines) else _json_fault(text)


def not_utf8(content: bytes) -> str | None:
    try:
        content.decode("utf-8")
    except UnicodeDecodeError as error:
        line = content.count(b"\n", 0, error.start) + 1
        return f"line {line}: not UTF-8 ({error.reason} at byte {error.start} of the file)"
    return None


def _is_json_lines(source: Path, lines: list[str]) -> bool:
    if source.suffix == ".jsonl":
        return True
    first = next((line for line in lines if line.strip(BLANK)), "")
    try:
        return isinstance(json.loads(first), dict)  # a repeated key makes no line less of a record here
    except ValueError:
        return False


def _json_lines_fault(lines: list[str]) -> str | None:
    row = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip(BLANK):
            continue
        row += 1
        try:
            value = UNIQUE_KEYS.decode(line)
        except RepeatedKey as error:
            return f"row {row} (line {number}): {error}"
        except ValueError as error:
            return f"row {row} (line {number}): not JSON ({error})"
        if not isinstance(value, dict):
            return f"row {row} (line {number}): expected a JSON object, got {type(value).__name__}"
    return None


def _json_fault(text: str) -> str | None:
    try:
        UNIQUE_KEYS.decode(text)
    except RepeatedKey as error:
        return _repeated_in_array(text) or str(error)
    except json.JSONDecodeError as error:
        return f"line {error.lineno}, column {error.colno}: not JSON ({error.msg})"
    return None


_SPACE = re.compile(r"[ \t\n\r]*")  # JSON's whitespace


def _repeated_in_array(text: str) -> str | None:
    """Which record of a JSON array (a document that parses but for a repeated key) repeats a key first,
    as "row R (line L): why"; None when the document is not an array."""
    at = _SPACE.match(text).end()
    if not text.startswith("[", at):
        return None
    plain, row = json.JSONDecoder(), 0
    at = _SPACE.match(text, at + 1).end()
    while at < len(text) and text[at] != "]":
        row += 1
        try:
            UNIQUE_KEYS.raw_decode(text, at)
        except RepeatedKey as error:
            return f"row {row} (line {text.count(chr(10), 0, at) + 1}): {error}"
        _, at = plain.raw_decode(text, at)
        at = _SPACE.match(text, at).end()
        at = _SPACE.match(text, at + 1).end() if text.startswith(",", at) else at
    return None


def _csv_fault(source: Path) -> str | None:
    with open(source, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle, strict=True)
        try:
            header = next(reader, [])
        except csv.Error as error:
            return f"line 1 (the header): {error}"
        row, start = 0, reader.line_num + 1
        try:
            for fields in reader:
                if fields:  # a blank line is no record
                    row += 1
                    if len(fields) > len(header):
                        return f"row {row} (line {start}): {len(fields)} fields, the header has {len(header)}"
                start = reader.line_num + 1
        except csv.Error as error:
            return f"row {row + 1} (line {start}): {error}"
    return None
