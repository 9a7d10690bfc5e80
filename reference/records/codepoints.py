"""Characters as code points: counting, ordering and locating them across many records with numpy.

The LLM2024 filter asks, over hundreds of thousands of records, "how often does each character occur"
and "which records hold this character or string". Asked record by record in Python, that is the cost
the seed pays; asked of one array of code points (the records laid end to end, as the seed's tot_text)
it is a handful of vectorised passes. Counts are exact, and `most_common` orders ties by first
appearance exactly as `collections.Counter(text).most_common()` does.

A table can be split into shards (contiguous runs of records, e.g. one per process): `Summary` carries
a shard's counts and first appearances, and `merge` combines shard summaries into the whole text's.
"""

from __future__ import annotations

from dataclasses import dataclass

UNICODE = 0x110000
NONE = 1 << 62  # rank of "not an NG string"
CHUNK = 1 << 20


class CharTable:
    """The records' text as one array of code points, laid out as the seed's tot_text:
    response, " ", instruction for each record in turn."""

    def __init__(self, pairs: list):
        import numpy as np

        parts, lengths, response_lengths = [], [], []
        for pair in pairs:
            parts += (pair.response, " ", pair.instruction)
            lengths.append(len(pair.response) + 1 + len(pair.instruction))
            response_lengths.append(len(pair.response))
        # Kept as intp: numpy casts any other index type to intp on every gather and bincount.
        self.codes = np.frombuffer("".join(parts).encode("utf-32-le"), dtype=np.uint32).astype(np.intp)
        self.lengths = np.array(lengths, dtype=np.int64)
        self.starts = np.cumsum(self.lengths) - self.lengths
        self.separators = self.starts + np.array(response_lengths, dtype=np.int64)

    @classmethod
    def subset(cls, table: CharTable, rows: list[int], changed: dict) -> CharTable:
        """The table of records `rows` of `table`, in that order; `changed` maps a row to its new Pair.

        Unchanged records reuse their slice of code points; only changed ones are encoded again."""
        import numpy as np

        pieces, lengths, response_lengths = [], [], []
        for k in rows:
            pair = changed.get(k)
            if pair is None:
                start = int(table.starts[k])
                pieces.append(table.codes[start : start + int(table.lengths[k])])
                lengths.append(int(table.lengths[k]))
                response_lengths.append(int(table.separators[k]) - start)
            else:
                text = pair.response + " " + pair.instruction
                pieces.append(np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.intp))
                lengths.append(len(text))
                response_lengths.append(len(pair.response))
        subset = cls.__new__(cls)
        subset.codes = np.concatenate(pieces) if pieces else np.empty(0, dtype=np.intp)
        subset.lengths = np.array(lengths, dtype=np.int64)
        subset.starts = np.cumsum(subset.lengths) - subset.lengths
        subset.separators = subset.starts + np.array(response_lengths, dtype=np.int64)
        return subset

    def record_of(self, positions):
        import numpy as np

        return np.searchsorted(self.starts, positions, side="right") - 1

    def summary(self, keep_records=None) -> Summary:
        """Counts and first appearances over all records, or over those where keep_records is True."""
        import numpy as np

        return summarize(self.codes if keep_records is None else self.codes[np.repeat(keep_records, self.lengths)])

    def most_common(self, keep_records=None) -> list[tuple[str, int]]:
        """collections.Counter(tot_text).most_common(): by count, ties in order of first appearance."""
        return merge([self.summary(keep_records)])

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
        return {
            r: (low, chr(code))
            for r, low, code in zip(
                records[heads].tolist(), hit_ranks[heads].tolist(), codes[heads].tolist(), strict=True
            )
        }

    def first_hits(
        self, strings: dict[str, int], counts: dict[str, int], instruction_only: bool = False
    ) -> dict[int, tuple[int, str]]:
        """Record -> (lowest index, string) over the strings of `strings` (string -> index) that occur
        inside one field of the record (the instruction alone when `instruction_only`).

        Each string is anchored on its rarest character: the positions of all anchors are gathered in
        one pass over the code points, and at each anchor position the string's other code points are
        compared in place. A match may not cross the " " between the fields or the end of a record."""
        import numpy as np

        anchors = {}
        for string in strings:
            char = min(string, key=lambda c: (counts.get(c, 0), c))
            anchors[string] = (string.index(char), ord(char))
        if not anchors or self.codes.size == 0:
            return {}
        wanted = np.zeros(UNICODE, dtype=bool)
        wanted[[code for _, code in anchors.values()]] = True
        positions = np.flatnonzero(wanted[self.codes])
        anchor_codes = self.codes[positions]
        order = np.argsort(anchor_codes, kind="stable")
        positions, anchor_codes = positions[order], anchor_codes[order]
        found_records, found_index = [], []
        for string, (offset, code) in anchors.items():
            at = positions[np.searchsorted(anchor_codes, code) : np.searchsorted(anchor_codes, code, side="right")]
            starts = at - offset
            starts = starts[(starts >= 0) & (starts + len(string) <= self.codes.size)]
            for i, char in enumerate(string):
                if i != offset and starts.size:
                    starts = starts[self.codes[starts + i] == ord(char)]
            if starts.size == 0:
                continue
            records = self.record_of(starts)
            ends, separators = starts + len(string), self.separators[records]
            in_instruction = (starts > separators) & (ends <= self.starts[records] + self.lengths[records])
            inside = in_instruction if instruction_only else in_instruction | (ends <= separators)
            records = np.unique(records[inside])
            found_records.append(records)
            found_index.append(np.full(records.size, strings[string], dtype=np.int64))
        if not found_records:
            return {}
        records, index = np.concatenate(found_records), np.concatenate(found_index)
        order = np.lexsort((index, records))
        records, index = records[order], index[order]
        heads = np.flatnonzero(np.r_[True, records[1:] != records[:-1]])
        by_index = {i: s for s, i in reversed(strings.items())}
        return {r: (i, by_index[i]) for r, i in zip(records[heads].tolist(), index[heads].tolist(), strict=True)}


def first_appearance(codes):
    """Code point -> position of its first appearance in `codes` (only meaningful where it appears).

    Blocks of growing size are scanned for characters not seen before, so the work after the first
    blocks is one gather per position: new characters become rare quickly in real text."""
    import numpy as np

    first = np.zeros(UNICODE, dtype=np.int64)
    seen = np.zeros(UNICODE, dtype=bool)
    start, block = 0, 4096
    while start < len(codes):
        chunk = codes[start : start + block]
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


@dataclass
class Summary:
    """Per-character counts and first appearances of a run of text (sparse: present characters only)."""

    codes: object  # np.ndarray[uint32]
    counts: object  # np.ndarray[int64]
    first: object  # np.ndarray[int64], positions within this run
    length: int


def summarize(codes) -> Summary:
    import numpy as np

    counts = np.zeros(UNICODE, dtype=np.int64)
    for start in range(0, len(codes), CHUNK):  # bincount copies its input to int64: a chunk at a time, not all of it
        counts += np.bincount(codes[start : start + CHUNK], minlength=UNICODE)
    present = np.flatnonzero(counts)
    return Summary(present.astype(np.uint32), counts[present], first_appearance(codes)[present], len(codes))


def merge(summaries: list[Summary]) -> list[tuple[str, int]]:
    """Counter(whole text).most_common() from the summaries of consecutive runs of it."""
    import numpy as np

    counts = np.zeros(UNICODE, dtype=np.int64)
    first = np.full(UNICODE, np.iinfo(np.int64).max, dtype=np.int64)
    offset = 0
    for summary in summaries:
        codes = summary.codes.astype(np.int64)
        counts[codes] += summary.counts
        np.minimum.at(first, codes, summary.first + offset)
        offset += summary.length
    present = np.flatnonzero(counts)
    order = present[np.lexsort((first[present], -counts[present]))]
    return [(chr(code), int(count)) for code, count in zip(order.tolist(), counts[order].tolist(), strict=True)]
