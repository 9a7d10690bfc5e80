"""Magpie-style corpora with realistic character diversity, for the filter's benchmark and spec tests.

    python -m reference.records.synthetic --records 30000 --output /tmp/magpie.jsonl [--seed 0]

Records are built from the Japanese lines of fixtures/corpus.txt (instruction: 1-2 lines, response:
4-9 lines by default, about 250 characters; magpie-sft responses run longer, see --response-lines).
About one record in five carries a random CJK ideograph from the whole unified block, so
the pass-1 NG list holds thousands of rare characters as it does on real data. A few percent carry each
fault the seed's filter exists for: Chinese drift, Korean, English, NG words, URLs and code fences,
replacement keys, missing turns, and text pycld2 rejects (a control character). Deterministic per seed.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

CORPUS = Path(__file__).resolve().parents[2] / "fixtures" / "corpus.txt"

CHINESE = [
    "这个问题的关键在于我们需要进一步讨论。",
    "因此我们应该从实际出发，认真研究这个现象。",
    "总之，这种方法在实践中非常有效。",
]
KOREAN = ["안녕하세요, 오늘은 날씨가 좋네요.", "이 문제에 대해 자세히 설명해 드리겠습니다."]
ENGLISH = ["Sure, here is a detailed explanation of the topic.", "In summary, the approach works well in practice."]
NG_WORDS = ["翻訳", "英訳", "ドイツ語", "AI assistant", "私は「Claude」", ".com", "韓国語"]
URLS_AND_CODE = ["https://example.org/page", "http://example.org", "```python\nprint(1)\n```", "<h2>見出し</h2>"]
REPLACE_KEYS = ["よしmitsu", "松下", "アイシテル", "変換器モデル", "♪", "😢", "スライcing", "语"]


def japanese_lines() -> list[str]:
    lines = CORPUS.read_text(encoding="utf-8").splitlines()
    return [line for line in lines if sum("\u3040" <= c <= "\u30ff" for c in line) >= 5]


def magpie_records(
    n: int, seed: int = 0, rare_rate: float = 0.2, response_lines: tuple[int, int] = (4, 9)
) -> list[dict]:
    rng = random.Random(seed)
    lines = japanese_lines()
    rows = []
    for i in range(n):
        instruction = "".join(rng.sample(lines, rng.randint(1, 2)))
        response = "".join(rng.sample(lines, rng.randint(*response_lines)))
        if rng.random() < rare_rate:
            rare = chr(rng.randint(0x4E00, 0x9FFF))
            position = rng.randint(0, len(response))
            response = response[:position] + rare + response[position:]
        fault = rng.random()
        if fault < 0.03:
            response = response[: len(response) // 3] + "".join(rng.sample(CHINESE, 2))
        elif fault < 0.05:
            response = rng.choice(KOREAN) + response[:40]
        elif fault < 0.08:
            response = " ".join(ENGLISH * 2)
        elif fault < 0.11:
            instruction += rng.choice(NG_WORDS)
        elif fault < 0.13:
            response += rng.choice(URLS_AND_CODE)
        elif fault < 0.17:
            response = response[:20] + rng.choice(REPLACE_KEYS) + response[20:]
        elif fault < 0.18:
            response = ""
        elif fault < 0.185:
            response = response[:10] + "\u0001" + response[10:]
        turns = [{"role": "user", "content": instruction}]
        if response:
            turns.append({"role": "assistant", "content": response})
        rows.append({"id": f"r{i:06d}", "conversations": turns})
    return rows


def write_jsonl(rows: list[dict], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=30_000)
    parser.add_argument("--output", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rare-rate", type=float, default=0.2)
    parser.add_argument(
        "--response-lines",
        type=int,
        nargs=2,
        default=(4, 9),
        metavar=("MIN", "MAX"),
        help="corpus lines per response (default 4 9: about 250 characters; 18 30: about 900)",
    )
    args = parser.parse_args()
    write_jsonl(magpie_records(args.records, args.seed, args.rare_rate, tuple(args.response_lines)), args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
