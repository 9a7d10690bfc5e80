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
are a table lookup for all records at once, and a longer string (or a replacement key) is looked for
only where its rarest character stands, comparing its other code points in place. A record whose
instruction already fails the language test is not sent to the detector again (the seed drops it
either way). The input is cut into shards, one per core, that read their own part of the file and go
through the stages side by side; between passes only per-character counts travel, and each shard
writes its rows at its own offset of the output files, so they come out in input order.
The kept records are the same, byte for byte: the spec tests compare with a literal transcription
of the seed (benchmarks/seed_filter.py).

Every dropped record is reported with the rule that dropped it: ``unreadable``, ``ng_string`` (one
of the seed's strings), ``rare_char_pass1``, ``instruct_ng``, ``detector_error``, ``language`` or
``rare_char_pass2``, with the offending string (the first in NG-list order) or the detector's figures.
"""

from __future__ import annotations

import json
import os
import traceback
from collections import Counter
from dataclasses import dataclass, field

from reference.codepoints import CharTable, Summary, merge, rank_array
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

    def to_line(self) -> str:
        """json.dumps(self.to_row(), ensure_ascii=False) + newline, without building the dict."""
        head = f'{{"line": {self.line}, "rule": "{self.rule}", "detail": {_encode_value(self.detail)}, '
        if isinstance(self.record, Unreadable):
            return head + f'"text": {_quote(self.record.text)}}}\n'
        return head + _fields(self.record)


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
    return {
        "input_rows": kept + sum(rejected.values()),
        "kept": kept,
        **{rule: rejected.get(rule, 0) for rule in RULES},
    }


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


def language_ok(details, whitelist, threshold: int) -> bool:
    """The seed's test over pycld2's details (name, code, percent, score): does any entry, not only the
    first, report a whitelisted code at `threshold` percent or more?"""
    return any(code in whitelist and percent >= threshold for _, code, percent, _ in details)


def detect_language(text: str, config: FilterConfig) -> tuple[bool, list | None]:
    """pycld2's verdict: (a whitelisted language at >= threshold percent?, the detector's figures when not)."""
    import pycld2

    details = pycld2.detect(text)[2]
    if language_ok(details, config.whitelist, config.threshold):
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


# json.dumps(value, ensure_ascii=False) builds an encoder per call; one shared encoder writes the same
# text, and for a string it is json's C encode_basestring, which the row writers below call directly.
_encode_value = json.JSONEncoder(ensure_ascii=False).encode
_quote = json.encoder.encode_basestring


def output_row(pair: Pair) -> dict:
    """A kept record as written to the output JSONL: id (when the input had one), instruction, response."""
    row = {} if pair.id is None else {"id": pair.id}
    row.update(instruction=pair.instruction, response=pair.response)
    return row


def _fields(pair: Pair) -> str:
    head = "" if pair.id is None else f'"id": {_encode_value(pair.id)}, '
    return f'{head}"instruction": {_quote(pair.instruction)}, "response": {_quote(pair.response)}}}\n'


def output_line(pair: Pair) -> str:
    """json.dumps(output_row(pair), ensure_ascii=False) + newline: the seed's output line."""
    return "{" + _fields(pair)


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
        self.rejects: list[Reject] = [
            Reject(item.line, "unreadable", item.error, item) for item in items if isinstance(item, Unreadable)
        ]
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
        single_hits = table.min_rank_per_record(rank_array(finder.single))
        longer_hits = table.first_hits(longer, plan.counts)
        instruct_hits = table.first_hits(instruct_finder.first_index, plan.counts, instruction_only=True)
        may_replace = set(table.first_hits(dict.fromkeys(config.replace, 0), plan.counts))

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
        changed = {
            k: replaced
            for (replaced, original), k in zip(self.language_kept, rows, strict=True)
            if replaced is not original
        }
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

    def encode(self) -> tuple[int, int, dict[str, int]]:
        """Encode this shard's kept rows and rejects (JSONL, UTF-8, unescaped); return their sizes in
        bytes and the shard's rule counts, so that every shard can write at its place in the files."""
        self.encoded = (
            "".join(map(output_line, self.kept)).encode(),
            "".join(r.to_line() for r in self.rejects).encode(),
        )
        return (
            len(self.encoded[0]),
            len(self.encoded[1]),
            dict(Counter(r.rule for r in self.rejects), kept=len(self.kept)),
        )

    def write_at(self, output: str, output_offset: int, rejects: str, rejects_offset: int) -> None:
        for path, offset, data in (
            (output, output_offset, self.encoded[0]),
            (rejects, rejects_offset, self.encoded[1]),
        ):
            fd = os.open(path, os.O_WRONLY)
            try:
                view = memoryview(data)
                while view:
                    written = os.pwrite(fd, view, offset)
                    view, offset = view[written:], offset + written
            finally:
                os.close(fd)
        del self.encoded


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
    parts = [Shard(items[i : i + size]) for i in range(0, len(items), size)] or [Shard([])]
    plan, rank2, table = filter_stages(LocalShards(parts, progress), len(parts), config)
    return FilterResult(
        kept=[p for part in parts for p in part.kept],
        rejects=[r for part in parts for r in part.rejects],
        ng_list_size=len(plan.ng_strings),
        pass2_ng_size=len(rank2),
        char_table=table,
    )


M_TOP_PAD = -2  # glibc mallopt parameter (malloc.h)


def keep_freed_memory(pad: int = 256 << 20) -> bool:
    """Ask glibc to keep up to `pad` bytes of freed heap instead of handing it back to the kernel at
    once (True when set; False where malloc is not glibc's). For the `filter` command, not for a library.

    The filter allocates and frees many large buffers (record strings, code-point arrays); with the
    default padding each is returned to the kernel and faulted in afresh when the memory is used again.
    On the 69 MB benchmark corpus this took the process from about 1.62 s to 1.51 s (system time
    0.5 s to 0.33 s) on 2 cores. The output does not change."""
    import ctypes

    try:
        return bool(ctypes.CDLL(None).mallopt(M_TOP_PAD, pad))
    except (OSError, AttributeError):
        return False


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def split_lines(data, parts: int) -> list[tuple[int, int]]:
    """Cut the file's bytes (bytes or an mmap) at line ends into at most `parts` runs: (start, end)."""
    cuts = [0]
    for i in range(1, parts):
        at = data.find(b"\n", max(cuts[-1], len(data) * i // parts))
        cuts.append(len(data) if at == -1 else at + 1)
    cuts.append(len(data))
    return [(start, end) for start, end in zip(cuts[:-1], cuts[1:], strict=True) if end > start]


def lines_before(data, end: int, block: int = 1 << 23) -> int:
    """Newlines in data[:end], read a block at a time (data may be an mmap, which has no count)."""
    return sum(data[at : min(at + block, end)].count(b"\n") for at in range(0, end, block))


def _serve(connection, data, start: int, end: int) -> None:
    """A worker process: read and parse its run of lines into a Shard (numbering its lines itself, so
    that the parent reads nothing), then do what the parent asks, stage by stage."""
    import gc

    gc.disable()  # records and their strings hold no cycles: the collector's passes over them are wasted
    try:
        shard = Shard(parse_jsonl(data, 1 + lines_before(data, start), start, end))
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

    def __init__(self, data, runs, progress=None):
        import multiprocessing

        context = multiprocessing.get_context("fork")
        self.progress = progress
        self.connections, self.processes = [], []
        for start, end in runs:
            parent, child = context.Pipe()
            process = context.Process(target=_serve, args=(child, data, start, end), daemon=True)
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


def filter_file(
    source: str,
    output: str,
    rejects: str,
    config: FilterConfig,
    workers: int | None = None,
    strict: bool = False,
    progress=None,
) -> FileResult:
    """The filter over a JSONL file, written to `output` and `rejects`, on up to `workers` processes."""
    import mmap
    import multiprocessing

    try:
        file = open(source, "rb")
    except OSError as error:
        raise InputError(f"{source}: cannot open: {error.strerror}") from None
    with file:
        size = os.fstat(file.fileno()).st_size
        workers = workers or default_workers()
        if workers <= 1 or size < (1 << 20) or "fork" not in multiprocessing.get_all_start_methods():
            runs = [(0, size)]
            pool = LocalShards([Shard(parse_jsonl(file.read(), 1))], progress)
        else:
            os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # no BLAS here: no idle BLAS threads per process
            import numpy  # noqa: F401 - imported once here, inherited by the forked workers
            import pycld2  # noqa: F401

            # The workers read their own runs of the mapped file; the parent reads only near the cuts.
            with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
                runs = split_lines(data, workers)
                pool = Workers(data, runs, progress)
    try:
        if strict:
            bad = min(filter(None, pool.ask("first_unreadable", [()] * len(runs))), default=None)
            if bad is not None:
                raise InputError(f"{source}, line {bad[0]}: {bad[1]}")
        plan, rank2, table = filter_stages(pool, len(runs), config)
        encoded = pool.ask("encode", [()] * len(runs))
        # Shards write their bytes at their offsets, in input order, into files beside the targets that are
        # renamed into place once whole: no half-written output under its final name (X6).
        partial = {target: f"{target}.partial" for target in (output, rejects)}
        for path in partial.values():
            open(path, "wb").close()
        offsets = [(sum(e[0] for e in encoded[:i]), sum(e[1] for e in encoded[:i])) for i in range(len(runs))]
        pool.ask(
            "write_at",
            [(partial[output], at_output, partial[rejects], at_rejects) for at_output, at_rejects in offsets],
        )
        for target, path in partial.items():
            os.replace(path, target)
        counts = [e[2] for e in encoded]
    finally:
        pool.close()
    rejected = Counter()
    for shard_counts in counts:
        rejected.update(shard_counts)
    kept = rejected.pop("kept")
    return FileResult(
        counts=rule_counts(rejected, kept),
        ng_list_size=len(plan.ng_strings),
        pass2_ng_size=len(rank2),
        char_table=table,
    )
