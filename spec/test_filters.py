"""The LLM2024 filter (reference/records/filters.py): each rule of the seed, by hand, and equality with the seed.

Hand-made cases need characters that are *not* rare, so each builds on BASE: forty records of the same
two Japanese sentences (every character of them is counted 40+ times, far above the pass-1 limit of 19).
`filtered` runs our filter and also the seed's algorithm, transcribed literally (reference/records/seed_filter.py),
on the same records, and asserts that both keep the same rows; the test then checks by hand why.

The rules, in the order the seed applies them (seed 001 §2.2.1; spec/SOURCES.md), each with its reject name:
1. pass 1 counts every character over all records (response + " " + instruction) before anything changes; a
   character counted 19 times or fewer joins the NG list, after the note's own NG strings;
2. the replacement dict, key by key in dict order (built from the note's pairs, so a repeated key counts once), on
   response and instruction;
3. a record holding an NG string is dropped: ``ng_string`` (one of the note's) or ``rare_char_pass1``; an
   ``instruct_ng_list`` string in the instruction: ``instruct_ng``;
4. pycld2 must report Japanese (the whitelist) at 60% or more for the instruction, then the response: ``language``
   (``detector_error`` when it fails);
5. pass 2 recounts over the kept records; a character counted fewer than 10 times drops its records:
   ``rare_char_pass2``. A line that is not a record: ``unreadable``.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import pytest

from reference.records.data import Pair, Unreadable, pair_from_row, read_pairs
from reference.records.filters import RULES, FilterConfig, language_ok, output_row, run_filter
from reference.records.seed_filter import seed_filter
from reference.records.synthetic import magpie_records
from reference.settings.recipes import load_recipe

INSTRUCTION = "日本の四季について簡単に説明してください。"
RESPONSE = (
    "日本には春夏秋冬の四つの季節があり、それぞれに美しい景色と行事があります。桜の花や紅葉を楽しむ人も多いです。"
)
ENGLISH = (
    "Sure, here is a detailed explanation of the four seasons in Japan and what people enjoy doing in each of them."
)


@pytest.fixture(scope="module")
def config() -> FilterConfig:
    return FilterConfig.from_recipe(load_recipe("llm2024"))


def base(n: int = 40) -> list[Pair]:
    return [Pair(line=i + 1, instruction=INSTRUCTION, response=RESPONSE) for i in range(n)]


def with_extra(*extra: tuple[str, str], before: list[Pair] | None = None) -> list[Pair]:
    pairs = base() if before is None else before
    return pairs + [Pair(line=len(pairs) + i + 1, instruction=ins, response=res) for i, (ins, res) in enumerate(extra)]


def seed_section(config: FilterConfig) -> dict:
    return {
        "instruct_ng_list": config.instruct_ng_list,
        "whitelist": config.whitelist,
        "threshold": config.threshold,
        "replace_pairs": list(config.replace.items()),
        "ng_list": config.ng_list,
        "pass1_max_count": config.pass1_max_count,
        "pass2_min_count": config.pass2_min_count,
    }


def filtered(pairs: list[Pair], config: FilterConfig, shards: int = 1):
    """Our result, once its kept rows are shown equal to the seed's algorithm's on the same records."""
    result = run_filter(pairs, config, shards=shards)
    assert [output_row(p) for p in result.kept] == seed_filter([output_row(p) for p in pairs], seed_section(config))
    return result


def verdict(result, line: int) -> tuple:
    """(rule, detail) of the rejected row at `line`; (None, None) when it was kept."""
    return next(((r.rule, r.detail) for r in result.rejects if r.line == line), (None, None))


# ---------------------------------------------------------------- C3 magpie extraction


@pytest.mark.claim("C3")
def test_magpie_instruction_and_response_are_the_first_user_and_assistant_turns(fixtures_dir):
    path = fixtures_dir / "data" / "magpie_sample.jsonl"
    rows = {json.loads(line)["id"]: json.loads(line) for line in open(path, encoding="utf-8")}
    pairs = {p.id: p for p in read_pairs(path)}
    system_first = rows["m023"]["conversations"]
    assert system_first[0]["role"] == "system"
    assert pairs["m023"].instruction == next(t["content"] for t in system_first if t["role"] == "user")
    assert pairs["m023"].response == next(t["content"] for t in system_first if t["role"] == "assistant")
    assert pairs["m019"].response == ""  # a user turn only
    assert pairs["m042"].instruction == ""  # an assistant turn only
    assert (pairs["m062"].instruction, pairs["m062"].response) == ("", "")  # no turns
    turns = [("assistant", "A1"), ("user", "U1"), ("assistant", "A2"), ("user", "U2")]  # by role, not by place
    pair = pair_from_row({"id": 3, "conversations": [{"role": r, "content": c} for r, c in turns]}, 1)
    assert (pair.instruction, pair.response, pair.id) == ("U1", "A1", 3)


# ---------------------------------------------------------------- C4 pass 1


@pytest.mark.claim("C4")
def test_a_character_counted_19_times_is_ng_and_20_times_is_not(config):
    """鬱 appears 19 times in one record, 轟 20 times in another: pass 1 drops the first record only."""
    pairs = with_extra((INSTRUCTION, RESPONSE + "鬱" * 19), (INSTRUCTION, RESPONSE + "轟" * 20))
    result = filtered(pairs, config)
    assert verdict(result, 41) == ("rare_char_pass1", "鬱") and verdict(result, 42)[0] is None


@pytest.mark.claim("C4")
def test_pass_1_counts_the_instruction_too(config):
    """轟 stands 10 times in line 41's response and 10 times in line 42's instruction: 10 + 10 = 20 > 19,
    so both are kept (counting one field alone would give 10 and drop them)."""
    result = filtered(with_extra((INSTRUCTION, RESPONSE + "轟" * 10), (INSTRUCTION + "轟" * 10, RESPONSE)), config)
    assert len(result.kept) == 42


@pytest.mark.claim("C4", "C6", "C8")
@pytest.mark.parametrize("records,notes", [(10, 0), (19, 11)])
def test_the_space_between_response_and_instruction_is_counted_but_lies_in_no_field(config, records, notes):
    """Records of each sentence twice (every character counted 20+ times); the " " joining response and
    instruction is counted once per record. Ten records, no other space: counted 10 times, the space is a
    rare (NG) character, yet no field holds it: all ten are kept. Nineteen records, the first with one
    space in its response, eleven ending in ♪ (removed by replacement): the space counts 19 + 1 = 20 in
    pass 1 (not NG) and 20 in pass 2, the replaced records' joining spaces included (not < 10): all kept."""
    pairs = [Pair(i + 1, INSTRUCTION * 2, RESPONSE * 2 + "♪" * (i < notes)) for i in range(records)]
    if notes:
        pairs[0].response = pairs[0].response.replace("。", "。 ", 1)  # the one space inside a field
    assert len(filtered(pairs, config).kept) == records


@pytest.mark.claim("C4", "C6")
def test_several_rare_characters_report_the_first_in_most_common_order(config):
    """Line 41 holds 蠢 (5 times) before 鬱 (19 times). The NG list appends rare characters in
    Counter.most_common() order, by count: 鬱 (19) before 蠢 (5), so 鬱 is reported, though 蠢 comes first
    in the text and in code point order (U+8822 < U+9B31)."""
    result = filtered(with_extra((INSTRUCTION, RESPONSE + "蠢" * 5 + "鬱" * 19)), config)
    assert verdict(result, 41) == ("rare_char_pass1", "鬱")


@pytest.mark.claim("C4", "C5", "C8")
@pytest.mark.parametrize("copies,rule", [(10, None), (9, "rare_char_pass2")])
def test_pass_1_counts_before_replacement_and_pass_2_after(config, copies, rule):
    """アイシテル becomes 愛してる. Pass 1 counts first: 愛 and る are counted 0 times, ア イ シ テ ル `copies`
    times (<= 19: NG), but the NG check reads the replaced text, which no longer holds them: nothing drops
    there. Pass 2 counts the replaced text: 愛 and る `copies` times (し and て stand in BASE). With 10 copies
    10 is not < 10: all kept. With 9, 愛 (first of the two in the text, same count) drops the nine."""
    result = filtered(with_extra(*[(INSTRUCTION, RESPONSE + "アイシテル")] * copies), config)
    assert [verdict(result, 41 + i)[0] for i in range(copies)] == [rule] * copies
    assert [p.response for p in result.kept[40:]] == ([] if rule else [RESPONSE + "愛してる"] * copies)
    assert verdict(result, 41) == ((rule, "愛") if rule else (None, None))


# ---------------------------------------------------------------- C5 replacements


@pytest.mark.claim("C5")
def test_replace_dict_keeps_the_repeated_key_once_with_python_dict_semantics(config):
    pairs = load_recipe("llm2024").filter["replace_pairs"]
    assert len(pairs) == 29 and len(config.replace) == 28
    assert list(config.replace)[3] == "「月日は百 السنين كالساعة」"
    assert list(config.replace).index("松下") < list(config.replace).index("(Regular Expressions)")


@pytest.mark.claim("C5")
def test_replacements_apply_in_order_to_response_and_instruction(config):
    result = filtered(with_extra(*[(INSTRUCTION + "松下", RESPONSE + "変換器モデル♪")] * 20), config)
    replaced = result.kept[-1]
    assert replaced.instruction.endswith("三菱") and replaced.response.endswith("トランスフォーマー")


@pytest.mark.claim("C5")
def test_a_later_replacement_does_not_feed_an_earlier_key(config):
    """Both fields end in 松(Regular Expressions)下 (10 records: each of its characters counted 20 times).
    In dict order "松下" -> "三菱" comes first and finds no 松下; then "(Regular Expressions)" -> "" leaves
    松下, which stays. (Applied in reverse, the removal would make 松下 and then 三菱.)"""
    odd = "松(Regular Expressions)下"
    result = filtered(with_extra(*[(INSTRUCTION + odd, RESPONSE + odd)] * 10), config)
    assert len(result.kept) == 50
    assert all(p.instruction == INSTRUCTION + "松下" and p.response == RESPONSE + "松下" for p in result.kept[40:])


# ---------------------------------------------------------------- C6 NG strings


@pytest.mark.claim("C6")
@pytest.mark.parametrize("field", ["instruction", "response"])
@pytest.mark.parametrize("note", ["", "♪"])  # "♪" -> "" in the other field: a replaced record, checked on its own
def test_an_ng_string_in_either_field_drops_the_record(config, field, note):
    extra = (
        (INSTRUCTION + "翻訳", RESPONSE + note) if field == "instruction" else (INSTRUCTION + note, RESPONSE + "翻訳")
    )
    result = filtered(with_extra(*[extra] * 20), config)
    assert [r.rule for r in result.rejects] == ["ng_string"] * 20
    assert result.rejects[0].detail == "翻訳"


@pytest.mark.claim("C6")
@pytest.mark.parametrize(
    "text,first",
    [
        ("英訳と翻訳", "翻訳"),  # NG list: 翻訳 (0) before 英訳 (1), whatever the text's order
        ("实と宾", "宾"),  # 宾 (5) before 实 (6)
        ("宾と翻訳", "翻訳"),  # a longer string (0) before a single character (5)
        ("https://と宾", "宾"),  # a single character (5) before a longer string (296)
        ("ㄏと饱", "饱"),  # 饱 stands at 80, 81 and 84, ㄏ at 82: its first place counts
    ],
)
@pytest.mark.parametrize("note", ["", "♪"])  # "♪" -> "": a replaced record, checked on its own
def test_the_first_ng_string_in_list_order_is_reported(config, text, first, note):
    result = filtered(with_extra((INSTRUCTION, RESPONSE + text + note)), config)
    assert verdict(result, 41) == ("ng_string", first)


@pytest.mark.claim("C5", "C6")
def test_ng_strings_are_looked_for_after_replacement(config):
    """Lines 41-50 hold 语, an NG string that "语" -> "語" removes: kept as 日本語 (語 counted 0 times
    in pass 1, 10 in pass 2). Line 51 holds 翻♪訳; "♪" -> "" makes the NG string 翻訳: dropped for it."""
    result = filtered(with_extra(*[(INSTRUCTION, RESPONSE + "日本语")] * 10, (INSTRUCTION, RESPONSE + "翻♪訳")), config)
    assert len(result.kept) == 50 and all(p.response.endswith("日本語") for p in result.kept[40:])
    assert verdict(result, 51) == ("ng_string", "翻訳")


@pytest.mark.claim("C6")
def test_instruct_ng_list_is_checked_in_the_instruction_only(config):
    """RESPONSE holds 季節; with instruct_ng_list = (季節,) only instructions holding it drop, replaced
    records (♪ removed, lines 42-43) included."""
    strict = replace(config, instruct_ng_list=("季節",))
    result = filtered(
        with_extra((INSTRUCTION + "季節", RESPONSE), (INSTRUCTION + "季節♪", RESPONSE), (INSTRUCTION, RESPONSE + "♪")),
        strict,
    )
    assert [verdict(result, line) for line in (41, 42)] == [("instruct_ng", "季節")] * 2
    assert len(result.kept) == 41  # RESPONSE holds 季節 too, and those records stay


@pytest.mark.claim("C6")
def test_a_string_split_across_fields_or_records_is_not_an_ng_hit(config):
    """The seed checks each field on its own; the fast path searches one array of code points in which a
    record is laid out as response + " " + instruction and records follow each other with no gap.

    "AI assistant" (a seed NG string) spans line 61's response "...AI" and instruction "assistant...";
    "翻訳" spans line 62's instruction "...翻" and line 63's response "訳..."; " - Konnichiwa " spans the
    joining space and line 65's instruction "- Konnichiwa ..."; "Ich " spans line 66's response "...Ich"
    and the joining space. No field holds any of them, so by hand these records pass the NG rule; line 64
    holds "翻訳" whole and fails. Lines 41-60 make these characters common (20 records each)."""
    filler = [(INSTRUCTION, f"{RESPONSE}訳す。翻す。AIとassistant、-とKonnichiwa")] * 20
    pairs = with_extra(
        *filler,
        (f"assistant{INSTRUCTION}", f"{RESPONSE}AI"),
        (f"{INSTRUCTION}翻", RESPONSE),
        (INSTRUCTION, f"訳{RESPONSE}"),
        (INSTRUCTION, f"{RESPONSE}翻訳"),
        (f"- Konnichiwa {INSTRUCTION}", RESPONSE),
        (INSTRUCTION, f"{RESPONSE}Ich"),
    )
    relaxed = replace(config, threshold=0)  # keep the English bits past the language rule
    result = filtered(pairs, relaxed)
    assert [verdict(result, line)[0] for line in (61, 62, 63, 65, 66)] == [None] * 5
    assert verdict(result, 64)[0] == "ng_string"


@pytest.mark.claim("C6", "C7")
def test_the_seeds_filter_drops_korean_before_it_ever_asks_the_language_detector(config):
    """README: the NG list holds dozens of Hangul syllables. 안녕하세요 holds 안 (128), 녕 (129), 세 (132)
    and 요 (133): dropped as ng_string for 안. Korean that avoids them reaches pycld2: language, ko."""
    caught, avoiding = (
        "안녕하세요. 오늘은 날씨가 정말 좋네요.",
        "감사합니다. 한국어로 된 문장을 쓰고 있습니다. 날씨가 맑습니다.",
    )
    result = filtered(with_extra(*[(INSTRUCTION, caught)] * 20, *[(INSTRUCTION, avoiding)] * 20), config)
    assert {(r.rule, r.detail if r.rule == "ng_string" else r.detail["detected"][0][1]) for r in result.rejects} == {
        ("ng_string", "안"),
        ("language", "ko"),
    }
    assert 0xAC00 <= ord(verdict(result, 41)[1]) <= 0xD7A3 and len(result.rejects) == 40


# ---------------------------------------------------------------- C7 language


@pytest.mark.claim("C7")
@pytest.mark.parametrize(
    "instruction,response,field,codes",
    [
        (INSTRUCTION, ENGLISH, "response", {"en"}),
        # (Korean would be caught earlier: the seed's NG list holds many Hangul syllables)
        (
            INSTRUCTION,
            "Selamat pagi, hari ini cuacanya sangat bagus dan saya ingin berjalan di taman bersama keluarga.",
            "response",
            {"id", "ms"},
        ),
        ("Please explain the four seasons of Japan in a few simple sentences.", RESPONSE, "instruction", {"en"}),
    ],
)
def test_a_field_not_detected_as_japanese_at_60_percent_is_dropped_with_the_figures(
    config, instruction, response, field, codes
):
    result = filtered(with_extra(*[(instruction, response)] * 25), config)
    rejected = [r for r in result.rejects if r.rule == "language"]
    assert len(rejected) == 25 and rejected[0].detail["field"] == field
    assert rejected[0].detail["detected"][0][1] in codes


@pytest.mark.claim("C7")
def test_the_language_threshold_is_60_percent_inclusive_on_real_pycld2_figures(config):
    """pycld2 gives RESPONSE + " " + the first 100 characters of ENGLISH 60 % Japanese (kept: 60 >= 60),
    and with 104 characters 59 % (dropped, with the figures)."""
    import pycld2

    at_60, at_59 = RESPONSE + " " + ENGLISH[:100], RESPONSE + " " + ENGLISH[:104]
    assert [pycld2.detect(t)[2][0][1:3] for t in (at_60, at_59)] == [("ja", 60), ("ja", 59)]
    result = filtered(with_extra(*[(INSTRUCTION, at_60)] * 20, *[(INSTRUCTION, at_59)] * 20), config)
    assert [verdict(result, line)[0] for line in (41, 60, 61, 80)] == [None, None, "language", "language"]
    assert verdict(result, 61)[1]["detected"][0] == ["Japanese", "ja", 59]


@pytest.mark.claim("C7")
@pytest.mark.parametrize(
    "details,ok",
    [
        ((("Japanese", "ja", 60, 1.0),), True),
        ((("Japanese", "ja", 59, 1.0),), False),
        ((("ENGLISH", "en", 70, 1.0), ("Japanese", "ja", 60, 1.0)), True),  # any listed entry, not only the first
        ((("ENGLISH", "en", 99, 1.0), ("Unknown", "un", 0, 0.0)), False),
        ((("Chinese", "zh", 100, 1.0),), False),  # the whitelist is {"ja"} alone
    ],
)
def test_a_field_passes_when_any_detected_entry_is_whitelisted_at_60_percent_or_more(config, details, ok):
    assert language_ok(details, config.whitelist, config.threshold) is ok


@pytest.mark.claim("C7")
def test_a_detector_error_drops_that_record_with_its_reason_and_the_run_goes_on(config):
    result = filtered(with_extra(*[(INSTRUCTION, RESPONSE[:10] + "\u0001" + RESPONSE[10:])] * 20), config)
    errors = [r for r in result.rejects if r.rule == "detector_error"]
    assert len(errors) == 20 and "invalid UTF-8" in errors[0].detail
    assert len(result.kept) == 40


# ---------------------------------------------------------------- C8 pass 2

SAKURA_EN = "Sakura mochi is a sweet eaten in spring, wrapped in a salted cherry leaf. 桜餅"


@pytest.mark.claim("C8")
@pytest.mark.parametrize("kept,rule", [(9, "rare_char_pass2"), (10, None)])
def test_pass_2_recounts_over_kept_records_and_drops_characters_under_10(config, kept, rule):
    """桜餅 appears in 20 records (count 20: survives pass 1); 20 - `kept` of them are English and drop at
    the language stage. Over the kept records 餅 counts `kept`: 9 < 10 drops those nine, 10 keeps all ten."""
    extra = [(INSTRUCTION, RESPONSE + "桜餅")] * kept + [(INSTRUCTION, SAKURA_EN)] * (20 - kept)
    result = filtered(with_extra(*extra), config)
    assert [verdict(result, 41 + i)[0] for i in range(kept)] == [rule] * kept
    assert len(result.kept) == 40 + (rule is None) * kept
    assert rule is None or result.rejects[0].detail == "餅"


@pytest.mark.claim("C8")
def test_pass_2_reports_the_first_rare_character_in_most_common_order(config):
    """Eleven English records hold 柏柏 (22) and line 41 holds 柏 before 桜餅: 23 in pass 1. Over the nine
    kept records 餅 counts 9 and 柏 1, so most_common() lists 餅 first: line 41 is dropped for 餅."""
    extra = [(INSTRUCTION, RESPONSE + "柏桜餅")] + [(INSTRUCTION, RESPONSE + "桜餅")] * 8
    extra += [(INSTRUCTION, SAKURA_EN + "柏柏")] * 11
    result = filtered(with_extra(*extra), config)
    assert verdict(result, 41) == ("rare_char_pass2", "餅")


# ---------------------------------------------------------------- C9 output, rejects, equality with the seed


@pytest.fixture(scope="module")
def sample(fixtures_dir, config):
    items = list(read_pairs(fixtures_dir / "data" / "magpie_sample.jsonl"))
    return items, run_filter(items + [Unreadable(999, "broken", "{")], config)


@pytest.mark.claim("C9")
def test_every_input_row_is_kept_or_rejected_with_a_rule(sample, fixtures_dir):
    """The fixture's 80 lines (counted here from the file) and one unreadable row: 81 in, and every one of them is
    either kept or rejected under exactly one rule, counted by the rows each list holds."""
    lines = (fixtures_dir / "data" / "magpie_sample.jsonl").read_text(encoding="utf-8").splitlines()
    counts, result = sample[1].counts, sample[1]
    assert counts["input_rows"] == len(lines) + 1 == 81 and counts["unreadable"] == 1
    assert len(result.kept) + len(result.rejects) == 81
    assert counts["kept"] == len(result.kept)
    assert {r: counts[r] for r in RULES} == {r: sum(x.rule == r for x in result.rejects) for r in RULES}
    assert sorted(r.line for r in sample[1].rejects) == sorted({r.line for r in sample[1].rejects})


@pytest.mark.claim("C4", "C9")
def test_the_seeds_filter_keeps_nothing_of_the_80_record_fault_sample(sample, config):
    """README: over 90 % of the sample's distinct characters are counted 19 times or fewer, and every
    record is dropped, by the seed's algorithm as by ours."""
    items, result = sample
    counts = Counter("".join(p.response + " " + p.instruction for p in items))
    assert sum(c <= 19 for c in counts.values()) > 0.9 * len(counts)
    assert result.kept == [] == seed_filter([output_row(p) for p in items], seed_section(config))
    assert len(result.rejects) == 81


@pytest.mark.claim("C9")
@pytest.mark.parametrize("shards", [1, 2])
def test_the_character_table_is_counter_most_common_of_the_kept_text_ties_by_first_appearance(config, shards):
    """Lines 1-20 drop (9 at pass 2, 11 at language); 21-40 end in 甲, 51-70 begin with 乙. 甲 and 乙 are
    both counted 20 times; 甲 appears first, so it leads though its code point is higher (U+7532 >
    U+4E59) and though, in two shards, 乙 is the first character of the second one."""
    pairs = with_extra(*[(INSTRUCTION, RESPONSE + "桜餅")] * 9, *[(INSTRUCTION, SAKURA_EN)] * 11, before=[])
    pairs = with_extra(*[(INSTRUCTION, RESPONSE + "甲")] * 20, *[(INSTRUCTION, RESPONSE)] * 10, before=pairs)
    pairs = with_extra(*[(INSTRUCTION, "乙" + RESPONSE)] * 20, *[(INSTRUCTION, RESPONSE)] * 30, before=pairs)
    result = filtered(pairs, config, shards=shards)
    seed_kept = seed_filter([output_row(p) for p in pairs], seed_section(config))
    tot_text = "".join(r["response"] + " " + r["instruction"] for r in seed_kept)
    assert result.char_table == Counter(tot_text).most_common()
    assert [entry for entry in result.char_table if entry[1] == 20] == [("甲", 20), ("乙", 20)]
    assert "餅" not in dict(result.char_table)


@pytest.mark.claim("C9", "C4", "C5", "C6", "C7", "C8")
@pytest.mark.parametrize("seed", range(3))
def test_output_equals_the_seeds_algorithm_on_generated_corpora(config, seed):
    """Kept rows as the seed's, and the character table as Counter(tot_text).most_common() over them."""
    pairs = [pair_from_row(row, i + 1) for i, row in enumerate(magpie_records(2500, seed=seed, rare_rate=0.3))]
    result = filtered(pairs, config)
    assert 0 < len(result.kept) < len(pairs)
    assert result.char_table == Counter("".join(p.response + " " + p.instruction for p in result.kept)).most_common()


@pytest.mark.claim("C4", "C6")
def test_the_recipe_holds_the_seeds_filter_constants(config):
    """306 NG strings with the seed's repeats (饱 three times), whitelist {ja}, threshold 60, 19 and 10."""
    assert len(config.ng_list) == 306 and config.ng_list.count("饱") == 3
    assert config.ng_list[:4] == ("翻訳", "英訳", "（ストroma）", ".com") and config.ng_list[-1] == "私は「Claude」"
    constants = (config.whitelist, config.threshold, config.pass1_max_count, config.pass2_min_count)
    assert constants == (frozenset({"ja"}), 60, 19, 10)
    assert config.instruct_ng_list == ()


@pytest.mark.claim("C4", "C5", "C6", "C7")
def test_the_recipe_constants_equal_the_seed_file(config, fixtures_dir):
    """Seed 001's replace_dict pairs and ng_list, in order, whitelist and threshold, as fixtures/sources/extract.py
    parsed them out of the note's code with ast (not retyped) into fixtures/sources/seed-001.json (spec/SOURCES.md
    says what the note is)."""
    seed = json.loads((fixtures_dir / "sources" / "seed-001.json").read_text(encoding="utf-8"))
    assert load_recipe("llm2024").filter["replace_pairs"] == seed["replace_pairs"]
    assert list(config.ng_list) == seed["ng_list"]
    assert sorted(config.whitelist) == seed["whitelist"]
    assert config.threshold == seed["threshold"]


@pytest.mark.claim("C9")
def test_cutting_the_input_into_shards_changes_nothing(config):
    """Shards meet only through per-character counts; the result must not depend on where they are cut."""
    pairs = [pair_from_row(row, i + 1) for i, row in enumerate(magpie_records(2500, seed=11, rare_rate=0.3))]
    whole, cut = run_filter(pairs, config, shards=1), run_filter(pairs, config, shards=4)
    assert [output_row(p) for p in cut.kept] == [output_row(p) for p in whole.kept]
    assert [r.to_row() for r in cut.rejects] == [r.to_row() for r in whole.rejects]
    assert cut.char_table == whole.char_table and cut.ng_list_size == whole.ng_list_size


@pytest.mark.claim("C9")
def test_rows_are_written_as_json_dumps_would_write_them():
    """The writers build each line without a dict; json.dumps(row, ensure_ascii=False) is the reference."""
    from reference.records.filter_workers import output_line, reject_line
    from reference.records.filters import Reject

    odd = 'quote " backslash \\ tab \t newline \n control \x01 ' + "日本 \u2028 😢"
    pairs = [
        Pair(1, odd, odd),
        Pair(2, "a", "b", id=7),
        Pair(3, "a", "b", id={"k": [1, 'x"']}),
        Pair(4, "", "", id="r1"),
    ]
    for pair in pairs:
        assert output_line(pair) == json.dumps(output_row(pair), ensure_ascii=False) + "\n"
    rejects = [
        Reject(2, "language", {"field": "response", "detected": [["JAPANESE", "ja", 59]]}, pairs[1]),
        Reject(1, "ng_string", odd, pairs[0]),
        Reject(9, "unreadable", "not UTF-8", Unreadable(9, "e", odd)),
    ]
    for reject in rejects:
        assert reject_line(reject) == json.dumps(reject.to_row(), ensure_ascii=False) + "\n"
