"""The LLM2024 filter (reference/filters.py): each rule of the seed, by hand, and equality with the seed.

Hand-made cases need characters that are *not* rare, so each builds on BASE: forty records of the same
two Japanese sentences (every character of them is counted 40+ times, far above the pass-1 limit of 19).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmarks.seed_filter import seed_filter
from reference.data import Pair, Unreadable, read_pairs
from reference.filters import FilterConfig, output_row, run_filter
from reference.recipes import load_recipe
from reference.synthetic import magpie_records, write_jsonl

INSTRUCTION = "日本の四季について簡単に説明してください。"
RESPONSE = "日本には春夏秋冬の四つの季節があり、それぞれに美しい景色と行事があります。桜の花や紅葉を楽しむ人も多いです。"


@pytest.fixture(scope="module")
def config() -> FilterConfig:
    return FilterConfig.from_recipe(load_recipe("llm2024"))


def base(n: int = 40) -> list[Pair]:
    return [Pair(line=i + 1, instruction=INSTRUCTION, response=RESPONSE) for i in range(n)]


def with_extra(*extra: tuple[str, str]) -> list[Pair]:
    pairs = base()
    pairs += [Pair(line=len(pairs) + i + 1, instruction=ins, response=res) for i, (ins, res) in enumerate(extra)]
    return pairs


def rule_of(result, line: int) -> str | None:
    return next((r.rule for r in result.rejects if r.line == line), None)


# ---------------------------------------------------------------- C3 magpie extraction

@pytest.mark.claim("C3")
def test_magpie_instruction_and_response_are_the_first_user_and_assistant_turns(fixtures_dir):
    rows = {json.loads(line)["id"]: json.loads(line) for line in open(fixtures_dir / "data" / "magpie_sample.jsonl", encoding="utf-8")}
    pairs = {p.id: p for p in read_pairs(fixtures_dir / "data" / "magpie_sample.jsonl")}
    system_first = rows["m023"]["conversations"]
    assert system_first[0]["role"] == "system"
    assert pairs["m023"].instruction == next(t["content"] for t in system_first if t["role"] == "user")
    assert pairs["m023"].response == next(t["content"] for t in system_first if t["role"] == "assistant")
    assert pairs["m019"].response == ""      # a user turn only
    assert pairs["m042"].instruction == ""   # an assistant turn only
    assert (pairs["m062"].instruction, pairs["m062"].response) == ("", "")  # no turns


# ---------------------------------------------------------------- C4 pass 1

@pytest.mark.claim("C4")
def test_a_character_counted_19_times_is_ng_and_20_times_is_not(config):
    """鬱 appears 19 times in one record, 轟 20 times in another: pass 1 drops the first record only."""
    pairs = with_extra((INSTRUCTION, RESPONSE + "鬱" * 19), (INSTRUCTION, RESPONSE + "轟" * 20))
    result = run_filter(pairs, config)
    assert rule_of(result, 41) == "rare_char_pass1"
    assert rule_of(result, 42) is None


@pytest.mark.claim("C4", "C5")
def test_pass_1_counts_before_replacement(config):
    """アイシテル becomes 愛してる, but counting happens first: 愛 is counted 0 times before replacement, so it
    is not in the NG list, and the replaced record survives (the seed behaves the same)."""
    pairs = with_extra(*[(INSTRUCTION, RESPONSE + "アイシテル")] * 20)
    result = run_filter(pairs, config)
    assert len(result.kept) == 60
    assert all("愛してる" in p.response for p in result.kept[40:])


# ---------------------------------------------------------------- C5 replacements

@pytest.mark.claim("C5")
def test_replace_dict_keeps_the_repeated_key_once_with_python_dict_semantics(config):
    pairs = load_recipe("llm2024").filter["replace_pairs"]
    assert len(pairs) == 29 and len(config.replace) == 28
    assert list(config.replace)[3] == "「月日は百 السنين كالساعة」"


@pytest.mark.claim("C5")
def test_replacements_apply_in_order_to_response_and_instruction(config):
    pairs = with_extra(*[(INSTRUCTION + "松下", RESPONSE + "変換器モデル♪")] * 20)
    result = run_filter(pairs, config)
    replaced = result.kept[-1]
    assert replaced.instruction.endswith("三菱") and replaced.response.endswith("トランスフォーマー")


# ---------------------------------------------------------------- C6 NG strings

@pytest.mark.claim("C6")
@pytest.mark.parametrize("field", ["instruction", "response"])
def test_an_ng_string_in_either_field_drops_the_record(config, field):
    extra = [(INSTRUCTION + "翻訳", RESPONSE)] * 20 if field == "instruction" else [(INSTRUCTION, RESPONSE + "翻訳")] * 20
    result = run_filter(with_extra(*extra), config)
    assert [r.rule for r in result.rejects] == ["ng_string"] * 20
    assert result.rejects[0].detail == "翻訳"


@pytest.mark.claim("C6")
def test_instruct_ng_list_is_checked_in_the_instruction_only(config):
    from dataclasses import replace

    strict = replace(config, instruct_ng_list=("季節",))
    result = run_filter(with_extra((INSTRUCTION + "季節", RESPONSE)), strict)
    assert rule_of(result, 41) == "instruct_ng"
    assert len(result.kept) == 40  # RESPONSE holds 季節 too, and those records stay


# ---------------------------------------------------------------- C7 language

@pytest.mark.claim("C7")
@pytest.mark.parametrize("response,field", [
    ("Sure, here is a detailed explanation of the four seasons in Japan and what people enjoy.", "response"),
    # (Korean would be caught earlier: the seed's NG list holds many Hangul syllables)
    ("Selamat pagi, hari ini cuacanya sangat bagus dan saya ingin berjalan di taman bersama keluarga.", "response"),
])
def test_a_field_not_detected_as_japanese_at_60_percent_is_dropped_with_the_figures(config, response, field):
    result = run_filter(with_extra(*[(INSTRUCTION, response)] * 25), config)
    rejected = [r for r in result.rejects if r.rule == "language"]
    assert len(rejected) == 25 and rejected[0].detail["field"] == field
    assert rejected[0].detail["detected"][0][1] in ("en", "id", "ms")


@pytest.mark.claim("C7")
def test_a_detector_error_drops_that_record_with_its_reason_and_the_run_goes_on(config):
    result = run_filter(with_extra(*[(INSTRUCTION, RESPONSE[:10] + "\u0001" + RESPONSE[10:])] * 20), config)
    errors = [r for r in result.rejects if r.rule == "detector_error"]
    assert len(errors) == 20 and "invalid UTF-8" in errors[0].detail
    assert len(result.kept) == 40


# ---------------------------------------------------------------- C8 pass 2

@pytest.mark.claim("C8")
def test_pass_2_recounts_over_kept_records_and_drops_characters_under_10(config):
    """桜餅 appears in 20 records (count 20: survives pass 1). 11 of them are English-language responses
    and drop at the language stage, leaving 9 kept records with 桜餅 - 餅 now counts 9 < 10."""
    english = "Sakura mochi is a sweet eaten in spring, wrapped in a salted cherry leaf. 桜餅"
    extra = [(INSTRUCTION, RESPONSE + "桜餅")] * 9 + [(INSTRUCTION, english)] * 11
    result = run_filter(with_extra(*extra), config)
    assert [rule_of(result, 41 + i) for i in range(9)] == ["rare_char_pass2"] * 9
    assert result.rejects[0].detail == "餅"
    assert len(result.kept) == 40


# ---------------------------------------------------------------- C9 output, rejects, equality with the seed

@pytest.mark.claim("C9")
def test_every_input_row_is_kept_or_rejected_with_a_rule(config, fixtures_dir):
    items = list(read_pairs(fixtures_dir / "data" / "magpie_sample.jsonl")) + [Unreadable(999, "broken", "{")]
    result = run_filter(items, config)
    counts = result.counts()
    assert counts["input_rows"] == 81 == counts["kept"] + sum(counts[r] for r in counts if r not in ("input_rows", "kept"))
    assert sorted(r.line for r in result.rejects) + [] == sorted({r.line for r in result.rejects})


@pytest.mark.claim("C9", "C4", "C5", "C6", "C7", "C8")
@pytest.mark.parametrize("seed", range(3))
def test_output_equals_the_seeds_algorithm_on_generated_corpora(config, seed, capsys):
    rows = magpie_records(2500, seed=seed, rare_rate=0.3)
    pairs = list(read_pairs_from_rows(rows))
    ours = [output_row(p) for p in run_filter(pairs, config).kept]
    theirs = seed_filter([output_row(p) for p in pairs], load_recipe("llm2024").filter)
    capsys.readouterr()
    assert ours == theirs
    assert 0 < len(ours) < len(rows)


def read_pairs_from_rows(rows):
    from reference.data import pair_from_row

    return (pair_from_row(row, i + 1) for i, row in enumerate(rows))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reference", "filter", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.claim("C9")
def test_filter_command_output_is_byte_identical_to_the_seeds_and_unescaped_utf8(tmp_path, fixtures_dir):
    rows = magpie_records(3000, seed=7)
    source = tmp_path / "magpie.jsonl"
    write_jsonl(rows, source)
    with open(source, "a", encoding="utf-8") as f:
        f.write(open(fixtures_dir / "data" / "magpie_sample.jsonl", encoding="utf-8").read() + "{broken\n")
    ours, rejects, theirs = tmp_path / "ours.jsonl", tmp_path / "rejects.jsonl", tmp_path / "seed.jsonl"
    result = run_cli("--input", str(source), "--output", str(ours), "--rejects", str(rejects), "--json")
    assert result.returncode == 0, result.stderr
    seed = subprocess.run([sys.executable, "benchmarks/seed_filter.py", "--input", str(source), "--output", str(theirs)],
                          capture_output=True, text=True, timeout=600)
    assert seed.returncode == 0, seed.stderr
    assert ours.read_bytes() == theirs.read_bytes()
    text = ours.read_text(encoding="utf-8")
    assert "\\u" not in text and "の" in text
    summary = json.loads(result.stdout)
    rejected = [json.loads(line) for line in rejects.read_text(encoding="utf-8").splitlines()]
    assert summary["counts"]["input_rows"] == 3081 == summary["counts"]["kept"] + len(rejected)
    assert {"line": 3081, "rule": "unreadable"}.items() <= rejected[-1].items()
    assert summary["char_table"][0][1] >= summary["char_table"][-1][1]


@pytest.mark.claim("C9")
def test_filter_strict_makes_an_unreadable_line_an_error_naming_it(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"instruction": "a", "response": "b"}\n{"instruction": 1}\n', encoding="utf-8")
    result = run_cli("--input", str(source), "--output", str(tmp_path / "o"), "--rejects", str(tmp_path / "r"), "--strict")
    assert result.returncode == 2 and f"{source}, line 2" in result.stderr and "Traceback" not in result.stderr


def test_filter_refuses_a_missing_input_with_exit_2(tmp_path):
    result = run_cli("--input", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "o"), "--rejects", str(tmp_path / "r"))
    assert result.returncode == 2 and "nope.jsonl" in result.stderr


def test_filter_refuses_one_file_for_both_output_and_rejects_with_exit_2(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"instruction": "日本", "response": "東京"}\n', encoding="utf-8")
    result = run_cli("--input", str(source), "--output", str(tmp_path / "o"), "--rejects", str(tmp_path / "o"))
    assert result.returncode == 2 and "same file" in result.stderr and "Traceback" not in result.stderr


def test_filter_command_imports_neither_torch_nor_transformers(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"instruction": "日本", "response": "東京"}\n', encoding="utf-8")
    code = ("import sys; from reference.cli import main; "
            f"main(['filter','--input',{str(source)!r},'--output',{str(tmp_path / 'o')!r},'--rejects',{str(tmp_path / 'r')!r}]); "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip().endswith("False False"), result.stdout + result.stderr


@pytest.mark.claim("C4", "C6")
def test_the_recipe_holds_the_seeds_filter_constants(config):
    """306 NG strings with the seed's repeats (饱 three times), whitelist {ja}, threshold 60, 19 and 10."""
    assert len(config.ng_list) == 306 and config.ng_list.count("饱") == 3
    assert config.ng_list[:4] == ("翻訳", "英訳", "（ストroma）", ".com") and config.ng_list[-1] == "私は「Claude」"
    assert (config.whitelist, config.threshold, config.pass1_max_count, config.pass2_min_count) == (frozenset({"ja"}), 60, 19, 10)
    assert config.instruct_ng_list == ()


@pytest.mark.claim("C4", "C5", "C6", "C7")
def test_the_recipe_constants_equal_the_seed_file(config, fixtures_dir):
    """Parsed out of seed 001's code with ast (not retyped): replace_dict pairs and ng_list, in order."""
    import ast
    import re

    seed = fixtures_dir.parent.parent / "shared" / "seeds" / "001_64dfb1311dccf466.md"
    if not seed.is_file():
        pytest.skip("../shared/seeds is not beside this checkout")
    code = next(b for b in re.findall(r"^```python\n(.*?)^```\s*$", seed.read_text(encoding="utf-8"), re.S | re.M)
                if "replace_dict" in b)
    first = {}
    for node in ast.parse(code).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            first.setdefault(node.targets[0].id, node.value)
    replace = first["replace_dict"]
    pairs = [[ast.literal_eval(k), ast.literal_eval(v)] for k, v in zip(replace.keys, replace.values, strict=True)]
    assert load_recipe("llm2024").filter["replace_pairs"] == pairs
    assert list(config.ng_list) == ast.literal_eval(first["ng_list"])
    assert set(config.whitelist) == ast.literal_eval(first["whitelist"]) and config.threshold == ast.literal_eval(first["threshold"])


@pytest.mark.claim("C9")
def test_cutting_the_input_into_shards_changes_nothing(config):
    """Shards meet only through per-character counts; the result must not depend on where they are cut."""
    pairs = list(read_pairs_from_rows(magpie_records(2500, seed=11, rare_rate=0.3)))
    whole, cut = run_filter(pairs, config, shards=1), run_filter(pairs, config, shards=4)
    assert [output_row(p) for p in cut.kept] == [output_row(p) for p in whole.kept]
    assert [r.to_row() for r in cut.rejects] == [r.to_row() for r in whole.rejects]
    assert cut.char_table == whole.char_table and cut.ng_list_size == whole.ng_list_size


@pytest.mark.claim("C9")
def test_forked_workers_write_the_same_bytes_as_one_process(tmp_path):
    source = tmp_path / "magpie.jsonl"
    write_jsonl(magpie_records(3000, seed=5), source)
    with open(source, "ab") as f:
        f.write(b'{"instruction": "\xff\xfe", "response": "x"}\n')  # not UTF-8: a reject, not a crash
    runs = {}
    for workers in ("1", "3"):
        out, rej = tmp_path / f"o{workers}", tmp_path / f"r{workers}"
        result = run_cli("--input", str(source), "--output", str(out), "--rejects", str(rej), "--workers", workers, "--json")
        assert result.returncode == 0, result.stderr
        summary = {k: v for k, v in json.loads(result.stdout).items() if k not in ("output", "rejects")}
        runs[workers] = (out.read_bytes(), rej.read_bytes(), summary)
    assert runs["1"] == runs["3"]
    last = json.loads(runs["3"][1].decode("utf-8").splitlines()[-1])
    assert (last["line"], last["rule"]) == (3001, "unreadable") and "not UTF-8" in last["detail"]
    strict = run_cli("--input", str(source), "--output", str(tmp_path / "s"), "--rejects", str(tmp_path / "t"),
                     "--workers", "3", "--strict")
    assert strict.returncode == 2 and f"{source}, line 3001: not UTF-8" in strict.stderr


@pytest.mark.claim("C6")
def test_a_string_split_across_fields_or_records_is_not_an_ng_hit(config):
    """The seed checks each field on its own; the fast path searches one array of code points in which a
    record is laid out as response + " " + instruction and records follow each other with no gap.

    "AI assistant" (a seed NG string) spans line 61's response "...AI" and instruction "assistant...";
    "翻訳" spans line 62's instruction "...翻" and line 63's response "訳...". Neither field holds
    either string, so by hand all three records pass the NG rule; line 64 holds "翻訳" whole and fails.
    Lines 41-60 make these characters common (20 records each), so pass 1 does not drop them."""
    filler = [(INSTRUCTION, f"{RESPONSE}訳す。翻す。AIとassistant")] * 20
    pairs = with_extra(*filler, (f"assistant{INSTRUCTION}", f"{RESPONSE}AI"), (f"{INSTRUCTION}翻", RESPONSE),
                       (INSTRUCTION, f"訳{RESPONSE}"), (INSTRUCTION, f"{RESPONSE}翻訳"))
    relaxed = FilterConfig(**{**config.__dict__, "threshold": 0})  # keep the English bits past the language rule
    result = run_filter(pairs, relaxed)
    assert [rule_of(result, line) for line in (61, 62, 63)] == [None, None, None]
    assert rule_of(result, 64) == "ng_string"


@pytest.mark.claim("C9")
def test_rows_are_written_as_json_dumps_would_write_them():
    """The writers build each line without a dict; json.dumps(row, ensure_ascii=False) is the reference."""
    from reference.filters import Reject, output_line

    odd = 'quote " backslash \\ tab \t newline \n control \x01 ' + "日本 \u2028 😢"
    pairs = [Pair(1, odd, odd), Pair(2, "a", "b", id=7), Pair(3, "a", "b", id={"k": [1, "x\""]}), Pair(4, "", "", id="r1")]
    for pair in pairs:
        assert output_line(pair) == json.dumps(output_row(pair), ensure_ascii=False) + "\n"
    rejects = [Reject(2, "language", {"field": "response", "detected": [["JAPANESE", "ja", 59]]}, pairs[1]),
               Reject(1, "ng_string", odd, pairs[0]), Reject(9, "unreadable", "not UTF-8", Unreadable(9, "e", odd))]
    for reject in rejects:
        assert reject.to_line() == json.dumps(reject.to_row(), ensure_ascii=False) + "\n"
