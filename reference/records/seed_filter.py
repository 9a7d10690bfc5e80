"""The seed's filter algorithm (seed 001 §2.2.1) transcribed literally, loops and all: the definition.

    python -m reference.records.seed_filter --input FILE --output FILE [--recipe llm2024|FILE]

Same constants as the project's filter (the recipe's [filter] section), same input reading and output
format; the algorithm between them is the seed's, line for line: string concatenation into tot_text,
every NG string tested against every record, the exception print. reference/records/filters.py must keep the
same records, byte for byte (the spec compares the two); benchmarks/bench_filter.py times both.

Not handled: rows the project reads as unreadable (the seed cannot read them; they are left out), rejects.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

from reference.records.data import Pair, read_pairs
from reference.records.filters import output_row
from reference.settings.recipes import load_recipe


def seed_filter(records: list[dict], section: dict) -> list[dict]:
    """The seed's loops over {"instruction", "response", ...} dicts; returns the kept dicts in order."""
    import pycld2 as cld2

    instruct_ng_list = list(section["instruct_ng_list"])
    whitelist = set(section["whitelist"])
    threshold = section["threshold"]
    replace_dict = dict(section["replace_pairs"])
    ng_list = list(section["ng_list"])

    tot_text = ""
    for text in records:
        tot_text += text["response"] + " " + text["instruction"]
    char_counts = Counter(tot_text)
    for char, count in char_counts.most_common():
        if count <= section["pass1_max_count"]:
            ng_list.append(str(char))
    print(f"ng:{len(ng_list)}")

    filtered_dataset = []
    for original in records:
        text = dict(original)  # iterating a datasets.Dataset yields a fresh dict per row
        for key, value in replace_dict.items():
            if key in text["response"]:
                text["response"] = text["response"].replace(key, value)
            if key in text["instruction"]:
                text["instruction"] = text["instruction"].replace(key, value)

        remove = False
        for ng_word in ng_list:
            if ng_word in text["response"] or ng_word in text["instruction"]:
                remove = True
                continue
        for ng_word in instruct_ng_list:
            if ng_word in text["instruction"]:
                remove = True
                continue
        if remove:
            continue

        flag1 = False
        flag2 = False
        try:
            is_reliable, text_bytes_found, details = cld2.detect(text["instruction"])
            for lang in details:
                lang_name, lang_code, lang_percent, _ = lang
                if lang_code in whitelist and lang_percent >= threshold:
                    flag1 = True
                    break
            is_reliable, text_bytes_found, details = cld2.detect(text["response"])
            for lang in details:
                lang_name, lang_code, lang_percent, _ = lang
                if lang_code in whitelist and lang_percent >= threshold:
                    flag2 = True
                    break
            if flag1 and flag2:
                filtered_dataset.append(text)
        except Exception as e:
            print(f"Error processing text: {text}, Error: {e}")

    tot_text = ""
    for text in filtered_dataset:
        tot_text += text["response"] + " " + text["instruction"]
    char_counts = Counter(tot_text)
    ng_list = []
    for char, count in char_counts.most_common():
        if count < section["pass2_min_count"]:
            ng_list.append(str(char))
    print(f"ng:{len(ng_list)}")

    filtered_dataset = [
        text
        for text in filtered_dataset
        if not any(ng_word in text["response"] or ng_word in text["instruction"] for ng_word in ng_list)
    ]

    tot_text = ""
    for text in filtered_dataset:
        tot_text += text["response"] + " " + text["instruction"]
    char_counts = Counter(tot_text)
    print(len(filtered_dataset))
    for char, count in char_counts.most_common():
        print(f"{char}: {count}")
    return filtered_dataset


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--recipe", default="llm2024")
    args = parser.parse_args()
    section = load_recipe(args.recipe).filter
    pairs = [item for item in read_pairs(args.input) if isinstance(item, Pair)]  # the seed cannot read the others
    records = [output_row(pair) for pair in pairs]
    kept = seed_filter(records, section)
    with open(args.output, "w", encoding="utf-8") as f:
        for data in kept:
            json.dump(data, f, ensure_ascii=False)
            f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
