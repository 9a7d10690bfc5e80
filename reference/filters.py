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
records x NG strings, and the NG list holds thousands of rare characters). Here each record's set of
characters is built once; single-character NG strings are found by set intersection, and a longer
string (or a replacement key) is searched for only when the record contains that string's rarest
character. A record whose instruction already fails the language test is not sent to the detector
a second time (the seed drops it either way). The kept records are the same, byte for byte; the
spec tests compare with a literal transcription of the seed (benchmarks/seed_filter.py).

Every dropped record is reported with the rule that dropped it: ``unreadable``, ``ng_string`` (one
of the seed's strings), ``rare_char_pass1``, ``instruct_ng``, ``detector_error``, ``language`` or
``rare_char_pass2``, with the offending string (the first in NG-list order) or the detector's figures.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from reference.data import Pair, Unreadable
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
        found = Counter(r.rule for r in self.rejects)
        return {"input_rows": len(self.kept) + len(self.rejects), "kept": len(self.kept),
                **{rule: found.get(rule, 0) for rule in RULES}}


def output_row(pair: Pair) -> dict:
    """A kept record as written to the output JSONL: id (when the input had one), instruction, response."""
    row = {} if pair.id is None else {"id": pair.id}
    row.update(instruction=pair.instruction, response=pair.response)
    return row


UNICODE = 0x110000
NONE = 1 << 62  # rank of "not an NG string"


class CharTable:
    """The records' text as one array of code points, laid out as the seed's tot_text:
    response, " ", instruction for each record in turn."""

    def __init__(self, pairs: list[Pair]):
        import numpy as np

        parts, lengths, response_lengths = [], [], []
        for pair in pairs:
            parts += (pair.response, " ", pair.instruction)
            lengths.append(len(pair.response) + 1 + len(pair.instruction))
            response_lengths.append(len(pair.response))
        self.text = "".join(parts)
        self.codes = np.frombuffer(self.text.encode("utf-32-le"), dtype=np.uint32)
        self.lengths = np.array(lengths, dtype=np.int64)
        self.starts = np.cumsum(self.lengths) - self.lengths
        self.separators = self.starts + np.array(response_lengths, dtype=np.int64)

    def record_of(self, positions):
        import numpy as np

        return np.searchsorted(self.starts, positions, side="right") - 1

    def most_common(self, keep_records=None) -> list[tuple[str, int]]:
        """collections.Counter(tot_text).most_common(): by count, ties in order of first appearance."""
        import numpy as np

        codes = self.codes if keep_records is None else self.codes[np.repeat(keep_records, self.lengths)]
        counts = np.bincount(codes, minlength=UNICODE)
        present = np.flatnonzero(counts)
        first = first_appearance(codes)
        order = present[np.lexsort((first[present], -counts[present]))]
        return [(chr(code), int(count)) for code, count in zip(order.tolist(), counts[order].tolist(), strict=True)]

    def min_rank_per_record(self, rank) -> dict[int, tuple[int, str]]:
        """For each record holding a character with a finite rank: (lowest rank, that character)."""
        import numpy as np

        hits = (rank < NONE)[self.codes]  # a byte per position; the ranks are looked up at the hits only
        hits[self.separators] = False  # the " " between fields belongs to no field
        positions = np.flatnonzero(hits)
        if positions.size == 0:
            return {}
        records, hit_ranks = self.record_of(positions), rank[self.codes[positions]]
        order = np.lexsort((hit_ranks, records))
        records, hit_ranks, codes = records[order], hit_ranks[order], self.codes[positions[order]]
        heads = np.flatnonzero(np.r_[True, records[1:] != records[:-1]])
        return {r: (low, chr(code)) for r, low, code in
                zip(records[heads].tolist(), hit_ranks[heads].tolist(), codes[heads].tolist(), strict=True)}

    def records_holding(self, chars) -> dict:
        """For each character: the sorted indices of the records that hold it (one pass for all)."""
        import numpy as np

        empty = np.empty(0, dtype=np.int64)
        wanted = sorted({ord(c) for c in chars})
        if not wanted:
            return {}
        mask = np.zeros(UNICODE, dtype=bool)
        mask[wanted] = True
        hits = mask[self.codes]
        hits[self.separators] = False
        positions = np.flatnonzero(hits)
        if positions.size == 0:
            return dict.fromkeys(chars, empty)
        pairs = np.unique((self.codes[positions].astype(np.int64) << 32) | self.record_of(positions))
        codes, records = pairs >> 32, pairs & 0xFFFFFFFF
        bounds = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1], True])
        found = {chr(int(codes[a])): records[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)}
        return {c: found.get(c, empty) for c in chars}

    def records_containing(self, string: str) -> list[int]:
        """Records whose text (fields and the separator between them) contains `string`, by str.find."""
        import numpy as np

        positions, at = [], self.text.find(string)
        while at != -1:
            positions.append(at)
            at = self.text.find(string, at + 1)
        return np.unique(self.record_of(np.array(positions, dtype=np.int64))).tolist() if positions else []


def first_appearance(codes):
    """Code point -> position of its first appearance in `codes` (only meaningful where it appears).

    Blocks of growing size are scanned for characters not seen before, so the work after the first
    blocks is one gather per position: new characters become rare quickly in real text."""
    import numpy as np

    first = np.zeros(UNICODE, dtype=np.int64)
    seen = np.zeros(UNICODE, dtype=bool)
    start, block = 0, 4096
    while start < len(codes):
        chunk = codes[start:start + block]
        fresh = np.flatnonzero(~seen[chunk])
        if fresh.size:
            values, index = np.unique(chunk[fresh], return_index=True)
            first[values] = start + fresh[index]
            seen[values] = True
        start, block = start + block, min(block * 2, 1 << 20)
    return first


def rank_array(strings: dict[str, int]):
    """Code point -> rank of the single-character strings (NONE elsewhere)."""
    import numpy as np

    rank = np.full(UNICODE, NONE, dtype=np.int64)
    for string, index in strings.items():
        rank[ord(string)] = index
    return rank


class StringFinder:
    """Which strings of an ordered list occur in a record: the first one in list order.

    Single characters are looked up in a code-point table for all records at once (CharTable); a
    longer string can only occur where its rarest character does, so it is searched for only in the
    records holding that character.
    """

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


def replace_all(text: str, replace: dict) -> str:
    """The seed's replacement loop: each key in dict order, on the text as the earlier keys left it."""
    for key, value in replace.items():
        if key in text:
            text = text.replace(key, value)
    return text


class Candidates:
    """The records that may hold a string, for exact checks on those records alone.

    A string can only occur where each of its characters does: the candidates are the records holding
    its two rarest characters. When even its rarest character is common (a key written in hiragana),
    the whole text is searched with str.find instead, which is cheaper than checking most records."""

    COMMON = 20_000  # occurrences above which a character is no help in narrowing the records

    def __init__(self, table: CharTable, strings, counts: dict[str, int]):
        self.table = table
        self.keys = {s: sorted(set(s), key=lambda c: (counts.get(c, 0), c))[:2] for s in strings}
        self.by_find = {s for s, chars in self.keys.items() if counts.get(chars[0], 0) > self.COMMON}
        self.by_char = table.records_holding({c for s, chars in self.keys.items() if s not in self.by_find for c in chars})

    def of(self, string: str) -> list[int]:
        import numpy as np

        if string in self.by_find:
            return self.table.records_containing(string)
        arrays = [self.by_char[c] for c in self.keys[string]]
        found = arrays[0] if len(arrays) == 1 else np.intersect1d(arrays[0], arrays[1], assume_unique=True)
        return found.tolist()

    def first_hits(self, strings: dict[str, int], fields) -> dict[int, tuple[int, str]]:
        """Record -> (lowest index, string) over the strings found in one of `fields(record)`."""
        hits: dict[int, tuple[int, str]] = {}
        for string, index in strings.items():
            for k in self.of(string):
                if (k not in hits or index < hits[k][0]) and any(string in text for text in fields(k)):
                    hits[k] = (index, string)
        return hits


def detect_language(text: str, config: FilterConfig) -> tuple[bool, list]:
    """pycld2's verdict: (a whitelisted language at >= threshold percent?, the detector's details)."""
    import pycld2

    _, _, details = pycld2.detect(text)
    ok = any(code in config.whitelist and percent >= config.threshold for _, code, percent, _ in details)
    return ok, [[name, code, percent] for name, code, percent, _ in details]


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


_JOBS: tuple = ()  # (pairs, config) for forked workers, which inherit it instead of receiving copies


def _verdicts(bounds: tuple[int, int]) -> list:
    pairs, config = _JOBS
    return [language_verdict(p.instruction, p.response, config) for p in pairs[bounds[0]:bounds[1]]]


def language_verdicts(pairs: list[Pair], config: FilterConfig, workers: int, progress=None) -> list:
    """language_verdict for each pair; on several forked processes when there are many."""
    global _JOBS
    import multiprocessing

    if workers <= 1 or len(pairs) < 2000 or "fork" not in multiprocessing.get_all_start_methods():
        _JOBS = (pairs, config)
        result = _verdicts((0, len(pairs)))
        if progress:
            progress(len(pairs))
        return result
    chunk = max(500, len(pairs) // (workers * 8))
    bounds = [(start, min(start + chunk, len(pairs))) for start in range(0, len(pairs), chunk)]
    _JOBS = (pairs, config)
    verdicts: list = []
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        for part in pool.imap(_verdicts, bounds):
            verdicts += part
            if progress:
                progress(len(part))
    _JOBS = ()
    return verdicts


def default_workers() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_filter(items: Iterable[Pair | Unreadable], config: FilterConfig, progress=None, workers: int | None = None) -> FilterResult:
    """Apply the seed's pipeline. `progress(n)` is told as records pass the language stage."""
    records: list[Pair] = []
    rejects: list[Reject] = []
    for item in items:
        if isinstance(item, Unreadable):
            rejects.append(Reject(item.line, "unreadable", item.error, item))
        else:
            records.append(item)

    # Pass 1: rare characters over every record, before replacement.
    table = CharTable(records)
    common = table.most_common()
    counts = dict(common)
    ng_strings = list(config.ng_list) + [char for char, count in common if count <= config.pass1_max_count]
    finder = StringFinder(ng_strings, counts)
    instruct_finder = StringFinder(list(config.instruct_ng_list), counts)
    single_hits = table.min_rank_per_record(rank_array(finder.single))
    longer = {string: i for string, i in finder.first_index.items() if len(string) > 1}
    candidates = Candidates(table, list(longer) + list(instruct_finder.first_index) + list(config.replace), counts)
    both_fields = lambda k: (records[k].response, records[k].instruction)  # noqa: E731
    longer_hits = candidates.first_hits(longer, both_fields)
    instruct_hits = candidates.first_hits(instruct_finder.first_index, lambda k: (records[k].instruction,))
    may_replace = set(candidates.first_hits(dict.fromkeys(config.replace, 0), both_fields))

    passed: list[tuple[Pair, Pair]] = []  # (replaced, original)
    for k, pair in enumerate(records):
        if k in may_replace:  # the code-point table holds the text before replacement: check the new text here
            instruction, response = replace_all(pair.instruction, config.replace), replace_all(pair.response, config.replace)
            hit = finder.first(set(instruction) | set(response), response, instruction)
            instruct_hit = instruct_finder.first(set(instruction), instruction)
            replaced = Pair(pair.line, instruction, response, pair.id)
        else:
            hit = min(filter(None, (single_hits.get(k), longer_hits.get(k))), default=None)
            instruct_hit = instruct_hits.get(k)
            replaced = pair
        if hit is not None:
            rule = "ng_string" if hit[0] < len(config.ng_list) else "rare_char_pass1"
            rejects.append(Reject(pair.line, rule, hit[1], pair))
        elif instruct_hit is not None:
            rejects.append(Reject(pair.line, "instruct_ng", instruct_hit[1], pair))
        else:
            passed.append((replaced, pair))

    verdicts = language_verdicts([replaced for replaced, _ in passed], config, workers or default_workers(), progress)
    language_kept = []
    for (replaced, original), verdict in zip(passed, verdicts, strict=True):
        if verdict is None:
            language_kept.append((replaced, original))
        else:
            rejects.append(Reject(original.line, *verdict, original))

    # Pass 2: rare characters over the kept records, after replacement.
    table2 = CharTable([replaced for replaced, _ in language_kept])
    rank2 = {char: i for i, (char, count) in enumerate(table2.most_common()) if count < config.pass2_min_count}
    doomed = table2.min_rank_per_record(rank_array(rank2))
    kept = []
    for k, (replaced, original) in enumerate(language_kept):
        if k in doomed:
            rejects.append(Reject(original.line, "rare_char_pass2", doomed[k][1], original))
        else:
            kept.append(replaced)
    import numpy as np

    keep = np.array([k not in doomed for k in range(len(language_kept))], dtype=bool)
    rejects.sort(key=lambda r: r.line)
    return FilterResult(kept=kept, rejects=rejects, ng_list_size=len(ng_strings), pass2_ng_size=len(rank2),
                        char_table=table2.most_common(keep) if len(language_kept) else [])
