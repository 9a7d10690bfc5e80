"""The LLM2024 quality filter (seed 001 §2.2.1): same records out as the seed's algorithm, much faster.

The seed's pipeline, in order, over instruction/response records:

1. Pass 1: count characters over ``response + " " + instruction`` of every record, before any
   replacement; each character counted ``pass1_max_count`` (19) times or fewer joins the NG list,
   after the seed's own NG strings.
2. ``replace_dict``, key by key in dict order, on response and instruction (a dict built from the
   seed's literal, so its repeated key counts once).
3. Drop the record if any NG string occurs in its response or instruction, or an ``instruct_ng_list``
   string in its instruction.
4. pycld2 on the instruction, then on the response: keep only when each reports a whitelisted
   language (``ja``) at ``threshold`` (60) percent or more. A detector error drops the record.
5. Pass 2: recount over the kept records (after replacement); characters counted fewer than
   ``pass2_min_count`` (10) times are NG; drop the records containing them. Output keeps input order.

Why it is fast where the seed is slow: the seed tests every NG string against every record (cost
records x NG strings, and the NG list holds thousands of rare characters). Here the records' text is
one array of code points (reference/codepoints.py): counting is a bincount, single-character NG strings
are a table lookup for all records at once, and a longer string (or a replacement key) is searched for
only in the records holding its rarest characters. A record whose instruction already fails the
language test is not sent to the detector again (the seed drops it either way). The input is cut into
shards, one per core, that go through the stages side by side; between passes only per-character
counts travel, and the shards' outputs are joined in input order. The kept records are the same, byte
for byte: the spec tests compare with a literal transcription of the seed (benchmarks/seed_filter.py).

Every dropped record is reported with the rule that dropped it: ``unreadable``, ``ng_string`` (one
of the seed's strings), ``rare_char_pass1``, ``instruct_ng``, ``detector_error``, ``language`` or
``rare_char_pass2``, with the offending string (the first in NG-list order) or the detector's figures.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from reference.codepoints import Candidates, CharTable, Summary, merge, rank_array
from reference.data import Pair, Unreadable, parse_jsonl
from reference.errors import InputError

RULES = ("unreadable", "ng_string", "rare_char_pass1", "instruct_ng", "detector_error", "language", "rare_char_pass2")


@dataclass(frozen=True)
class FilterConfig:
    """The filter's constants; the `llm2024` recipe holds the seed's."""

    whitelist: frozenset
    """Language codes pycld2 may report (seed: {"ja"})."""
    threshold: int
    """Minimum percent of the text in a whitelisted language (seed: 60)."""
    pass1_max_count: int
    """Characters counted this often or less over all records are NG (seed: 19)."""
    pass2_min_count: int
    """Characters counted less often than this over the kept records are NG (seed: 10)."""
    replace: dict
    """Replacements applied in order; built with dict semantics from the seed's literal."""
    ng_list: tuple
    """NG strings checked in response and instruction, in the seed's order (repeats kept)."""
    instruct_ng_list: tuple = ()
    """NG strings checked in the instruction only (seed: empty)."""

    @classmethod
    def from_recipe(cls, recipe) -> FilterConfig:
        section = recipe.filter
        needed = ("whitelist", "threshold", "pass1_max_count", "pass2_min_count", "replace_pairs", "ng_list")
        missing = [k for k in needed if k not in section]
        if missing:
            raise InputError(f"recipe {recipe.name!r}: [filter] lacks {', '.join(missing)}")
        pairs = section["replace_pairs"]
        if not all(isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in pairs):
            raise InputError(f"recipe {recipe.name!r}: [filter] replace_pairs must be [key, value] string pairs")
        strings = [k for k, _ in pairs] + list(section["ng_list"]) + list(section.get("instruct_ng_list", []))
        if any(not isinstance(s, str) or s == "" for s in strings):
            raise InputError(f"recipe {recipe.name!r}: [filter] strings must be non-empty text")
        return cls(
            whitelist=frozenset(section["whitelist"]),
            threshold=section["threshold"],
            pass1_max_count=section["pass1_max_count"],
            pass2_min_count=section["pass2_min_count"],
            replace=dict(pairs),
            ng_list=tuple(section["ng_list"]),
            instruct_ng_list=tuple(section.get("instruct_ng_list", [])),
        )


@dataclass
class Reject:
    line: int
    rule: str
    detail: object
    record: Pair | Unreadable

    def to_row(self) -> dict:
        row = {"line": self.line, "rule": self.rule, "detail": self.detail}
        if isinstance(self.record, Unreadable):
            row["text"] = self.record.text
        else:
            if self.record.id is not None:
                row["id"] = self.record.id
            row.update(instruction=self.record.instruction, response=self.record.response)
        return row


@dataclass
class FilterResult:
    kept: list[Pair]
    rejects: list[Reject]
    ng_list_size: int
    """Length of the pass-1 NG list: the seed's strings plus the rare characters (the seed's first "ng:")."""
    pass2_ng_size: int
    char_table: list[tuple[str, int]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return rule_counts(Counter(r.rule for r in self.rejects), kept=len(self.kept))


def rule_counts(rejected: Counter, kept: int) -> dict[str, int]:
    """Rows in, rows kept, and rows dropped by each rule (every rule listed, zeros included)."""
    return {"input_rows": kept + sum(rejected.values()), "kept": kept, **{rule: rejected.get(rule, 0) for rule in RULES}}


class StringFinder:
    """Which strings of an ordered list occur in one record: the first in list order.

    Used for the few records whose text a replacement changed (the code-point table holds the text
    before replacement): it works from the record's own set of characters, looking for a longer string
    only when the record holds that string's rarest character."""

    def __init__(self, strings: list[str], counts: dict[str, int]):
        self.first_index: dict[str, int] = {}
        for index, string in enumerate(strings):
            self.first_index.setdefault(string, index)
        self.single = {s: i for s, i in self.first_index.items() if len(s) == 1}
        self.single_set = frozenset(self.single)  # set & frozenset walks the smaller side; set & dict walks the dict
        self.by_trigger: dict[str, list[tuple[int, str]]] = {}
        for string, index in self.first_index.items():
            if len(string) > 1:
                trigger = min(string, key=lambda c: (counts.get(c, 0), c))
                self.by_trigger.setdefault(trigger, []).append((index, string))

    def first_longer(self, chars: set[str], *texts: str, best=None) -> tuple[int, str] | None:
        for trigger in chars & self.by_trigger.keys():
            for index, string in self.by_trigger[trigger]:
                if (best is None or index < best[0]) and any(string in text for text in texts):
                    best = (index, string)
        return best

    def first(self, chars: set[str], *texts: str) -> tuple[int, str] | None:
        best = None
        for char in chars & self.single_set:
            if best is None or self.single[char] < best[0]:
                best = (self.single[char], char)
        return self.first_longer(chars, *texts, best=best)


def detect_language(text: str, config: FilterConfig) -> tuple[bool, list | None]:
    """pycld2's verdict: (a whitelisted language at >= threshold percent?, the detector's figures when not)."""
    import pycld2

    details = pycld2.detect(text)[2]
    for _, code, percent, _ in details:
        if percent >= config.threshold and code in config.whitelist:
            return True, None
    return False, [[name, code, percent] for name, code, percent, _ in details]


def language_verdict(instruction: str, response: str, config: FilterConfig) -> tuple[str, object] | None:
    """None when both fields pass; else (rule, detail). The response is not examined once the
    instruction has failed: the seed drops such a record whatever the response gives."""
    try:
        ok, details = detect_language(instruction, config)
        if not ok:
            return "language", {"field": "instruction", "detected": details}
        ok, details = detect_language(response, config)
        if not ok:
            return "language", {"field": "response", "detected": details}
    except Exception as error:  # noqa: BLE001 - the seed drops the record on any detector error; so do we, with why
        return "detector_error", f"{type(error).__name__}: {error}"
    return None


# json.dumps(row, ensure_ascii=False) builds an encoder per call; one shared encoder writes the same text.
_encode_row = json.JSONEncoder(ensure_ascii=False).encode


def output_row(pair: Pair) -> dict:
    """A kept record as written to the output JSONL: id (when the input had one), instruction, response."""
    row = {} if pair.id is None else {"id": pair.id}
    row.update(instruction=pair.instruction, response=pair.response)
    return row


def replace_all(text: str, replace: dict) -> str:
    """The seed's replacement loop: each key in dict order, on the text as the earlier keys left it."""
    for key, value in replace.items():
        if key in text:
            text = text.replace(key, value)
    return text


@dataclass
class Plan:
    """What pass 1 decided, sent to every shard: the NG list and the global character counts."""

    ng_strings: list
    static_count: int
    counts: dict


def make_plan(config: FilterConfig, common: list[tuple[str, int]]) -> Plan:
    rare = [char for char, count in common if count <= config.pass1_max_count]
    return Plan(ng_strings=list(config.ng_list) + rare, static_count=len(config.ng_list), counts=dict(common))


class Shard:
    """A contiguous run of the input, taken through the stages; one per process when run in parallel."""

    def __init__(self, items: list):
        self.records: list[Pair] = [item for item in items if isinstance(item, Pair)]
        self.rejects: list[Reject] = [Reject(item.line, "unreadable", item.error, item)
                                      for item in items if isinstance(item, Unreadable)]
        self.kept: list[Pair] = []

    def first_unreadable(self) -> tuple[int, str] | None:
        return next(((r.line, r.detail) for r in self.rejects if r.rule == "unreadable"), None)

    def pass1(self) -> Summary:
        self.table = CharTable(self.records)
        return self.table.summary()

    def screen(self, plan: Plan, config: FilterConfig, progress=None) -> Summary:
        """NG strings (after replacement) and language; returns the pass-2 counts of what is left."""
        records, table = self.records, self.table
        finder = StringFinder(plan.ng_strings, plan.counts)
        instruct_finder = StringFinder(list(config.instruct_ng_list), plan.counts)
        longer = {string: i for string, i in finder.first_index.items() if len(string) > 1}
        candidates = Candidates(table, list(longer) + list(instruct_finder.first_index) + list(config.replace), plan.counts)
        both_fields = lambda k: (records[k].response, records[k].instruction)  # noqa: E731
        single_hits = table.min_rank_per_record(rank_array(finder.single))
        longer_hits = candidates.first_hits(longer, both_fields)
        instruct_hits = candidates.first_hits(instruct_finder.first_index, lambda k: (records[k].instruction,))
        may_replace = set(candidates.first_hits(dict.fromkeys(config.replace, 0), both_fields))
        del candidates

        passed: list[tuple[Pair, Pair, int]] = []  # (replaced, original, row in the table)
        for k, pair in enumerate(records):
            if k in may_replace:  # the table holds the text before replacement: check the new text here
                instruction = replace_all(pair.instruction, config.replace)
                response = replace_all(pair.response, config.replace)
                hit = finder.first(set(instruction) | set(response), response, instruction)
                instruct_hit = instruct_finder.first(set(instruction), instruction)
                replaced = Pair(pair.line, instruction, response, pair.id)
            else:
                hit = min(filter(None, (single_hits.get(k), longer_hits.get(k))), default=None)
                instruct_hit, replaced = instruct_hits.get(k), pair
            if hit is not None:
                rule = "ng_string" if hit[0] < plan.static_count else "rare_char_pass1"
                self.rejects.append(Reject(pair.line, rule, hit[1], pair))
            elif instruct_hit is not None:
                self.rejects.append(Reject(pair.line, "instruct_ng", instruct_hit[1], pair))
            else:
                passed.append((replaced, pair, k))

        self.language_kept, rows = [], []
        for done, (replaced, original, k) in enumerate(passed, start=1):
            verdict = language_verdict(replaced.instruction, replaced.response, config)
            if verdict is None:
                self.language_kept.append((replaced, original))
                rows.append(k)
            else:
                self.rejects.append(Reject(original.line, *verdict, original))
            if progress is not None and done % 1000 == 0:
                progress(1000)
        if progress is not None:
            progress(len(passed) % 1000)
        changed = {k: replaced for (replaced, original), k in zip(self.language_kept, rows, strict=True) if replaced is not original}
        self.table2 = CharTable.subset(self.table, rows, changed)
        del self.table
        return self.table2.summary()

    def pass2(self, rank2: dict[str, int]) -> Summary:
        """Drop the records holding a pass-2 rare character; returns the counts of the kept records."""
        import numpy as np

        doomed = self.table2.min_rank_per_record(rank_array(rank2))
        for k, (replaced, original) in enumerate(self.language_kept):
            if k in doomed:
                self.rejects.append(Reject(original.line, "rare_char_pass2", doomed[k][1], original))
            else:
                self.kept.append(replaced)
        self.rejects.sort(key=lambda r: r.line)
        keep = np.array([k not in doomed for k in range(len(self.language_kept))], dtype=bool)
        summary = self.table2.summary(keep)
        del self.table2, self.language_kept
        return summary

    def write(self, output: str, rejects: str) -> dict[str, int]:
        """Write this shard's kept rows and rejects (JSONL, UTF-8 unescaped); return its rule counts."""
        with open(output, "w", encoding="utf-8") as out:
            out.writelines(_encode_row(output_row(pair)) + "\n" for pair in self.kept)
        with open(rejects, "w", encoding="utf-8") as out:
            out.writelines(_encode_row(reject.to_row()) + "\n" for reject in self.rejects)
        return dict(Counter(r.rule for r in self.rejects), kept=len(self.kept))


def rare_ranks(common: list[tuple[str, int]], below: int) -> dict[str, int]:
    """Pass 2's NG characters with their place in the seed's NG list (most_common order)."""
    return {char: i for i, (char, count) in enumerate(common) if count < below}


class LocalShards:
    """Shards in this process, asked stage by stage exactly as Workers asks forked ones."""

    def __init__(self, shards: list[Shard], progress=None):
        self.shards, self.progress = shards, progress

    def ask(self, stage: str, args_per_shard) -> list:
        extra = {"progress": self.progress} if stage == "screen" else {}
        return [getattr(shard, stage)(*args, **extra) for shard, args in zip(self.shards, args_per_shard, strict=True)]

    def close(self) -> None:
        pass


def filter_stages(pool, shards: int, config: FilterConfig) -> tuple[Plan, dict[str, int], list[tuple[str, int]]]:
    """Pass 1, screening and pass 2 over every shard; between them only character counts are merged.
    Returns the plan (pass-1 NG list), pass 2's rare characters and the kept records' character table."""
    same = [()] * shards
    plan = make_plan(config, merge(pool.ask("pass1", same)))
    rank2 = rare_ranks(merge(pool.ask("screen", [(plan, config)] * shards)), config.pass2_min_count)
    table = merge(pool.ask("pass2", [(rank2,)] * shards))
    return plan, rank2, table


def run_filter(items, config: FilterConfig, shards: int = 1, progress=None) -> FilterResult:
    """The whole pipeline in this process over `items` (Pairs and Unreadables), cut into `shards`."""
    items = list(items)
    size = -(-len(items) // max(shards, 1)) or 1
    parts = [Shard(items[i:i + size]) for i in range(0, len(items), size)] or [Shard([])]
    plan, rank2, table = filter_stages(LocalShards(parts, progress), len(parts), config)
    return FilterResult(kept=[p for part in parts for p in part.kept], rejects=[r for part in parts for r in part.rejects],
                        ng_list_size=len(plan.ng_strings), pass2_ng_size=len(rank2), char_table=table)


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def split_lines(data: bytes, parts: int) -> list[tuple[int, int, int]]:
    """Cut the file's bytes at line ends into `parts` runs: (start, end, number of the first line)."""
    cuts = [0]
    for i in range(1, parts):
        at = data.find(b"\n", max(cuts[-1], len(data) * i // parts))
        cuts.append(len(data) if at == -1 else at + 1)
    cuts.append(len(data))
    runs, line = [], 1
    for start, end in zip(cuts[:-1], cuts[1:], strict=True):
        if end > start:
            runs.append((start, end, line))
            line += data.count(b"\n", start, end)
    return runs


def _serve(connection, data: bytes, start: int, end: int, first_line: int) -> None:
    """A worker process: parse its run of lines into a Shard, then do what the parent asks, stage by stage."""
    try:
        shard = Shard(parse_jsonl(data[start:end], first_line))
        del data
        while True:
            stage, args = connection.recv()
            if stage == "stop":
                return
            if stage == "screen":
                result = shard.screen(*args, progress=lambda n: connection.send(("progress", n)))
            else:
                result = getattr(shard, stage)(*args)
            connection.send(("done", result))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
        connection.send(("error", traceback.format_exc()))


class Workers:
    """One forked process per run of the input; `ask` sends every shard a stage and gathers the answers."""

    def __init__(self, data: bytes, runs, progress=None):
        import multiprocessing

        context = multiprocessing.get_context("fork")
        self.progress = progress
        self.connections, self.processes = [], []
        for start, end, first_line in runs:
            parent, child = context.Pipe()
            process = context.Process(target=_serve, args=(child, data, start, end, first_line), daemon=True)
            process.start()
            child.close()
            self.connections.append(parent)
            self.processes.append(process)

    def ask(self, stage: str, args_per_shard) -> list:
        for connection, args in zip(self.connections, args_per_shard, strict=True):
            connection.send((stage, args))
        answers = []
        for connection in self.connections:
            while True:
                kind, value = connection.recv()
                if kind == "progress":
                    if self.progress:
                        self.progress(value)
                    continue
                if kind == "error":
                    raise RuntimeError(f"a filter worker failed:\n{value}")
                answers.append(value)
                break
        return answers

    def close(self) -> None:
        for connection in self.connections:
            try:
                connection.send(("stop", ()))
            except (BrokenPipeError, OSError):
                pass
        for process in self.processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()


@dataclass
class FileResult:
    counts: dict
    ng_list_size: int
    pass2_ng_size: int
    char_table: list = field(default_factory=list)


def filter_file(source: str, output: str, rejects: str, config: FilterConfig, workers: int | None = None,
                strict: bool = False, progress=None) -> FileResult:
    """The filter over a JSONL file, written to `output` and `rejects`, on up to `workers` processes."""
    try:
        data = Path(source).read_bytes()
    except OSError as error:
        raise InputError(f"{source}: cannot open: {error.strerror}") from None
    import multiprocessing

    workers = workers or default_workers()
    if workers <= 1 or len(data) < (1 << 20) or "fork" not in multiprocessing.get_all_start_methods():
        runs = [(0, len(data), 1)]
        pool = LocalShards([Shard(parse_jsonl(data, 1))], progress)
    else:
        import numpy  # noqa: F401 - imported once here, inherited by the forked workers
        import pycld2  # noqa: F401

        runs = split_lines(data, workers)
        pool = Workers(data, runs, progress)
    del data
    try:
        if strict:
            bad = min(filter(None, pool.ask("first_unreadable", [()] * len(runs))), default=None)
            if bad is not None:
                raise InputError(f"{source}, line {bad[0]}: {bad[1]}")
        plan, rank2, table = filter_stages(pool, len(runs), config)
        with tempfile.TemporaryDirectory(dir=Path(output).resolve().parent) as tmp:
            pieces = [(f"{tmp}/out{i}", f"{tmp}/rej{i}") for i in range(len(runs))]
            counts = pool.ask("write", pieces)
            for target, index in ((output, 0), (rejects, 1)):
                with open(target, "wb") as joined:
                    for piece in pieces:
                        with open(piece[index], "rb") as part:
                            shutil.copyfileobj(part, joined)
    finally:
        pool.close()
    rejected = Counter()
    for shard_counts in counts:
        rejected.update(shard_counts)
    kept = rejected.pop("kept")
    return FileResult(counts=rule_counts(rejected, kept), ng_list_size=len(plan.ng_strings),
                      pass2_ng_size=len(rank2), char_table=table)
