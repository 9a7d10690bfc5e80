"""The LLM2024 quality filter (seed 001 §2.2.1): the same records out as the seed's algorithm, much faster.

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

Why it is fast where the seed is slow: the seed tests every NG string against every record, and the NG
list holds thousands of rare characters. Here the records' text is one array of code points
(reference/records/codepoints.py): counting is a bincount, single-character NG strings are one table lookup for
all records, and a longer string (or a replacement key) is looked for only where its rarest character
stands. A record whose instruction fails the language test is not sent to the detector again (the seed
drops it either way). The kept records are the same, byte for byte, as those of the seed's algorithm
transcribed literally (reference/records/seed_filter.py), which the spec compares them with.

Every dropped record is reported with the rule that dropped it: ``unreadable``, ``ng_string`` (one
of the seed's strings), ``rare_char_pass1``, ``instruct_ng``, ``detector_error``, ``language`` or
``rare_char_pass2``, with the offending string (the first in NG-list order) or the detector's figures.

The records are cut into shards that go through the stages side by side and meet only through
per-character counts: `run_filter` runs them in this process over records in memory;
reference/records/filter_workers.py runs them over a JSONL file, one forked process per core (`filter_file`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple

from reference.errors import InputError
from reference.records.codepoints import CharTable, Summary, merge, rank_array
from reference.records.data import Pair, Unreadable

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
    """A dropped row: its line in the input, the rule that dropped it, and why (the string, the figures)."""

    line: int
    rule: str
    detail: object
    record: Pair | Unreadable

    def to_row(self) -> dict:
        """The row of the rejects file: line, rule, detail, then the record as read."""
        row = {"line": self.line, "rule": self.rule, "detail": self.detail}
        if isinstance(self.record, Unreadable):
            row["text"] = self.record.text
        else:
            row.update(output_row(self.record))
        return row


def output_row(pair: Pair) -> dict:
    """A kept record as written to the output JSONL: id (when the input had one), instruction, response."""
    row = {} if pair.id is None else {"id": pair.id}
    row.update(instruction=pair.instruction, response=pair.response)
    return row


@dataclass
class FilterResult:
    """What a filter run found, over records in memory (`run_filter`) or a file (`filter_file`)."""

    counts: dict[str, int]
    """Rows in, rows kept, and rows dropped by each rule (every rule listed, zeros included)."""
    ng_list_size: int
    """Length of the pass-1 NG list: the seed's strings plus the rare characters (the seed's first "ng:")."""
    pass2_ng_size: int
    """Pass 2's rare characters (the seed's second "ng:")."""
    char_table: list[tuple[str, int]]
    """Counter(text of the kept records).most_common(): the seed's closing table."""
    kept: list[Pair] | None = None
    """The kept records, in input order (None when they were written to a file)."""
    rejects: list[Reject] | None = None
    """The dropped rows with their rules, in input order (None when they were written to a file)."""


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

    def first(self, chars: set[str], *texts: str) -> tuple[int, str] | None:
        """(index, string) of the first listed string found in `texts`, whose characters are `chars`."""
        found = [(self.single[char], char) for char in chars & self.single_set]
        for trigger in chars & self.by_trigger.keys():
            found += [(i, string) for i, string in self.by_trigger[trigger] if any(string in t for t in texts)]
        return min(found, default=None)


def language_ok(details, whitelist, threshold: int) -> bool:
    """The seed's test over pycld2's details (name, code, percent, score): does any entry, not only the
    first, report a whitelisted code at `threshold` percent or more?"""
    return any(code in whitelist and percent >= threshold for _, code, percent, _ in details)


def language_verdict(instruction: str, response: str, config: FilterConfig) -> tuple[str, object] | None:
    """pycld2 on the instruction, then the response: None when both pass, else (rule, detail) with the
    detector's figures. The response is not examined once the instruction has failed: the seed drops such
    a record whatever the response gives."""
    import pycld2

    try:
        for field, text in (("instruction", instruction), ("response", response)):
            details = pycld2.detect(text)[2]
            if not language_ok(details, config.whitelist, config.threshold):
                detected = [[name, code, percent] for name, code, percent, _ in details]
                return "language", {"field": field, "detected": detected}
    except Exception as error:  # noqa: BLE001 - the seed drops the record on any detector error; so do we, with why
        return "detector_error", f"{type(error).__name__}: {error}"
    return None


def replace_all(text: str, replace: dict) -> str:
    """The seed's replacement loop: each key in dict order, on the text as the earlier keys left it."""
    for key, value in replace.items():
        if key in text:
            text = text.replace(key, value)
    return text


@dataclass
class NgList:
    """Pass 1's verdict, sent to every shard: the NG list and the character counts it was made from."""

    strings: list[str]
    """The seed's NG strings, then the rare characters in most_common order."""
    from_seed: int
    """How many of `strings` are the seed's own: a hit at a lower index is `ng_string`, else `rare_char_pass1`."""
    counts: dict[str, int]

    @classmethod
    def after_pass1(cls, config: FilterConfig, common: list[tuple[str, int]]) -> NgList:
        rare = [char for char, count in common if count <= config.pass1_max_count]
        return cls(strings=list(config.ng_list) + rare, from_seed=len(config.ng_list), counts=dict(common))


def rare_ranks(common: list[tuple[str, int]], below: int) -> dict[str, int]:
    """Pass 2's NG characters with their place in the seed's NG list (most_common order)."""
    return {char: i for i, (char, count) in enumerate(common) if count < below}


class Candidate(NamedTuple):
    """A record that passed the NG strings, on its way to the language test."""

    record: Pair
    """Its text after replacement: what the later rules read and the output holds."""
    original: Pair
    """As read: what a reject shows."""
    row: int
    """Its row in the pass-1 character table."""


class Shard:
    """A contiguous run of the input, taken through the stages; one per process when run in parallel."""

    def __init__(self, items: list):
        self.records: list[Pair] = [item for item in items if isinstance(item, Pair)]
        self.rejects: list[Reject] = [
            Reject(item.line, "unreadable", item.error, item) for item in items if isinstance(item, Unreadable)
        ]
        self.kept: list[Pair] = []

    def pass1(self) -> Summary:
        self.table = CharTable(self.records)
        return self.table.summary()

    def screen(self, ng: NgList, config: FilterConfig, progress=None) -> Summary:
        """NG strings (after replacement) and language; returns the pass-2 counts of what is left."""
        candidates = self._ng_strings(ng, config)
        self.survivors: list[Candidate] = []
        for done, candidate in enumerate(candidates, start=1):
            verdict = language_verdict(candidate.record.instruction, candidate.record.response, config)
            if verdict is None:
                self.survivors.append(candidate)
            else:
                self.rejects.append(Reject(candidate.original.line, *verdict, candidate.original))
            if progress is not None and done % 1000 == 0:
                progress(1000)
        if progress is not None:
            progress(len(candidates) % 1000)
        replaced = {s.row: s.record for s in self.survivors if s.record is not s.original}
        self.survivor_table = CharTable.subset(self.table, [s.row for s in self.survivors], replaced)
        del self.table
        return self.survivor_table.summary()

    def _ng_strings(self, ng: NgList, config: FilterConfig) -> list[Candidate]:
        """Reject the records holding an NG string (or an instruct_ng string in the instruction)."""
        table = self.table
        finder = StringFinder(ng.strings, ng.counts)
        instruct_finder = StringFinder(list(config.instruct_ng_list), ng.counts)
        longer = {string: i for string, i in finder.first_index.items() if len(string) > 1}
        single_hits = table.min_rank_per_record(rank_array(finder.single))
        longer_hits = table.first_hits(longer, ng.counts)
        instruct_hits = table.first_hits(instruct_finder.first_index, ng.counts, instruction_only=True)
        may_replace = set(table.first_hits(dict.fromkeys(config.replace, 0), ng.counts))

        candidates = []
        for row, pair in enumerate(self.records):
            if row in may_replace:  # the table holds the text before replacement: look in the new text here
                instruction = replace_all(pair.instruction, config.replace)
                response = replace_all(pair.response, config.replace)
                record = Pair(pair.line, instruction, response, pair.id)
                hit = finder.first(set(instruction) | set(response), response, instruction)
                instruct_hit = instruct_finder.first(set(instruction), instruction)
            else:
                record = pair
                hit = min(filter(None, (single_hits.get(row), longer_hits.get(row))), default=None)
                instruct_hit = instruct_hits.get(row)
            if hit is not None:
                index, string = hit
                rule = "ng_string" if index < ng.from_seed else "rare_char_pass1"
                self.rejects.append(Reject(pair.line, rule, string, pair))
            elif instruct_hit is not None:
                _, string = instruct_hit
                self.rejects.append(Reject(pair.line, "instruct_ng", string, pair))
            else:
                candidates.append(Candidate(record, pair, row))
        return candidates

    def pass2(self, rare: dict[str, int]) -> Summary:
        """Drop the records holding a pass-2 rare character; returns the counts of the kept records."""
        import numpy as np

        doomed = self.survivor_table.min_rank_per_record(rank_array(rare))
        for k, survivor in enumerate(self.survivors):
            if k in doomed:
                _, char = doomed[k]
                self.rejects.append(Reject(survivor.original.line, "rare_char_pass2", char, survivor.original))
            else:
                self.kept.append(survivor.record)
        self.rejects.sort(key=lambda r: r.line)
        keep = np.array([k not in doomed for k in range(len(self.survivors))], dtype=bool)
        summary = self.survivor_table.summary(keep)
        del self.survivor_table, self.survivors
        return summary

    def tally(self) -> Counter:
        """Rows kept and rows dropped by each rule."""
        return Counter([r.rule for r in self.rejects], kept=len(self.kept))


class LocalShards:
    """Shards in this process, asked stage by stage exactly as filter_workers.Workers asks forked ones."""

    def __init__(self, shards: list[Shard], progress=None):
        self.shards, self.progress = shards, progress

    def ask(self, stage: str, args_per_shard) -> list:
        extra = {"progress": self.progress} if stage == "screen" else {}
        return [getattr(shard, stage)(*args, **extra) for shard, args in zip(self.shards, args_per_shard, strict=True)]

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


def filter_stages(pool, shards: int, config: FilterConfig) -> FilterResult:
    """Pass 1, screening and pass 2 over every shard of `pool`; between them only character counts are
    merged. The records stay in the shards (the result's `kept` and `rejects` are None)."""
    same = [()] * shards
    ng = NgList.after_pass1(config, merge(pool.ask("pass1", same)))
    rare = rare_ranks(merge(pool.ask("screen", [(ng, config)] * shards)), config.pass2_min_count)
    char_table = merge(pool.ask("pass2", [(rare,)] * shards))
    tally = sum(pool.ask("tally", same), Counter())
    counts = {"input_rows": sum(tally.values()), "kept": tally["kept"], **{rule: tally[rule] for rule in RULES}}
    return FilterResult(counts, ng_list_size=len(ng.strings), pass2_ng_size=len(rare), char_table=char_table)


def run_filter(items, config: FilterConfig, shards: int = 1, progress=None) -> FilterResult:
    """The whole pipeline in this process over `items` (Pairs and Unreadables), cut into `shards`."""
    items = list(items)
    size = -(-len(items) // max(shards, 1)) or 1
    parts = [Shard(items[i : i + size]) for i in range(0, len(items), size)] or [Shard([])]
    result = filter_stages(LocalShards(parts, progress), len(parts), config)
    result.kept = [pair for part in parts for pair in part.kept]
    result.rejects = [reject for part in parts for reject in part.rejects]
    return result
