"""The filter's speed against the seed's algorithm: whole processes, start-up included, side by side.

    python benchmarks/bench_filter.py [--records 30000] [--repeats 3] [--response-lines 4 9] [--json FILE]
    pytest benchmarks/bench_filter.py --benchmark-only      # a small CI-sized run of the same comparison

Both commands read the same generated magpie-style corpus (reference/records/synthetic.py) and must write
byte-identical output; each is timed as a separate process (`python -m reference filter` against
`python -m reference.records.seed_filter`, the seed's algorithm transcribed literally), median of the repeats
after one warm-up run of ours (the seed's algorithm is slow enough that its first run is its steady
state). The ratio is seed / ours.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.record import report  # noqa: E402
from reference.benchmarking import machine  # noqa: E402
from reference.records.synthetic import magpie_records, write_jsonl  # noqa: E402


def timed(command: list[str]) -> float:
    """Seconds the command took; a failure ends the benchmark with the child's own error, not a traceback."""
    start = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} ... failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def compare(records: int, repeats: int, response_lines=(4, 9), seed_repeats: int | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "magpie.jsonl"
        write_jsonl(magpie_records(records, seed=0, response_lines=tuple(response_lines)), corpus)
        ours = [
            sys.executable,
            "-m",
            "reference",
            "filter",
            "--input",
            str(corpus),
            "--output",
            f"{tmp}/ours.jsonl",
            "--rejects",
            f"{tmp}/rejects.jsonl",
        ]
        seed = [
            sys.executable,
            "-m",
            "reference.records.seed_filter",
            "--input",
            str(corpus),
            "--output",
            f"{tmp}/seed.jsonl",
        ]
        timed(ours)  # warm-up: page cache, imports
        ours_times = [timed(ours) for _ in range(repeats)]
        seed_times = [timed(seed) for _ in range(seed_repeats or repeats)]
        identical = Path(f"{tmp}/ours.jsonl").read_bytes() == Path(f"{tmp}/seed.jsonl").read_bytes()
        kept = sum(1 for _ in open(f"{tmp}/ours.jsonl", encoding="utf-8"))
        size = corpus.stat().st_size
    ours_median, seed_median = statistics.median(ours_times), statistics.median(seed_times)
    return {
        "records": records,
        "corpus_bytes": size,
        "response_lines": list(response_lines),
        "kept": kept,
        "identical_output": identical,
        "ours_seconds": ours_times,
        "seed_seconds": seed_times,
        "ours_median_s": round(ours_median, 3),
        "seed_median_s": round(seed_median, 3),
        "speedup": round(seed_median / ours_median, 2),
    }


def test_filter_is_faster_than_the_seeds_algorithm_with_identical_output(benchmark):
    """CI-sized: 3,000 records. The full 30,000-record comparison is this script's main()."""
    result = benchmark.pedantic(compare, args=(3000, 1), kwargs={"seed_repeats": 1}, rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    assert result["identical_output"] and result["speedup"] > 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=30_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--response-lines", type=int, nargs=2, default=(4, 9))
    parser.add_argument("--json", default=None, help="append the result to this JSON file (a list)")
    args = parser.parse_args()
    result = {**compare(args.records, args.repeats, args.response_lines), **machine.describe(("numpy", "pycld2"))}
    report(result, args.json)
    return 0 if result["identical_output"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
