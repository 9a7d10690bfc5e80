"""Where a data file stops being readable, said as a person would look for it: "row R (line L): why".

The dataset loaders (pyarrow's JSON and CSV readers) fail with a byte offset at best, or only when a row is
read. When they fail, the file is read again here with the standard library alone to find the first row at
fault: bytes that are not UTF-8, a JSON Lines line that is not a JSON object, a JSON document that does not
parse, a CSV row with more fields than its header. Rows count the records (blank lines skipped; CSV: after
the header) and lines count the file's lines, both from 1. Parquet and saved datasets are not inspected.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path


def locate_fault(source: Path, kind: str) -> str | None:
    """Where a JSON Lines, JSON or CSV file stops being readable, as "row R (line L): why" (JSON: "line L,
    column C: why"); None when no row is at fault. Rows count the records (blank lines skipped; CSV: after
    the header) and lines the file's lines, both from 1."""
    if kind not in ("json", "csv"):
        return None
    content = source.read_bytes()
    fault = not_utf8(content)
    if fault or kind == "csv":
        return fault or _csv_fault(source)
    lines = content.split(b"\n")
    return _json_lines_fault(lines) if _is_json_lines(source, lines) else _json_fault(source)


def not_utf8(content: bytes) -> str | None:
    try:
        content.decode("utf-8")
    except UnicodeDecodeError as error:
        line = content.count(b"\n", 0, error.start) + 1
        return f"line {line}: not UTF-8 ({error.reason} at byte {error.start} of the file)"
    return None


def _is_json_lines(source: Path, lines: list[bytes]) -> bool:
    if source.suffix == ".jsonl":
        return True
    first = next((raw for raw in lines if raw.strip()), b"")
    try:
        return isinstance(json.loads(first), dict)
    except ValueError:
        return False


def _json_lines_fault(lines: list[bytes]) -> str | None:
    row = 0
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        row += 1
        try:
            value = json.loads(raw)
        except ValueError as error:
            return f"row {row} (line {number}): not JSON ({error})"
        if not isinstance(value, dict):
            return f"row {row} (line {number}): expected a JSON object, got {type(value).__name__}"
    return None


def _json_fault(source: Path) -> str | None:
    try:
        json.loads(source.read_bytes())
    except json.JSONDecodeError as error:
        return f"line {error.lineno}, column {error.colno}: not JSON ({error.msg})"
    return None


def _csv_fault(source: Path) -> str | None:
    with open(source, newline="", encoding="utf-8") as handle:
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
