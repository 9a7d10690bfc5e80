"""Prompt formats (reference/modeling/formats.py): the readable renderers equal the Jinja chat templates.

Nothing expected here comes from reference/modeling/formats.py. The references are:

* the real Jinja engine (`tokenizer.apply_chat_template`) running templates held outside the code under
  test: GEMMA2_TEMPLATE below (google/gemma-2-9b's template, as seed 001 borrows it; a test checks it
  against the seed file) and the official Llama-3.1 template committed in fixtures/tokenizer-llama3;
* the constants as seed 001 writes them, parsed out of the note's code with `ast` by fixtures/sources/extract.py
  into fixtures/sources/seed-001.json (spec/SOURCES.md says what the note is);
* strings written out by hand from the formats' model cards.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest

from reference import cli
from reference.errors import InputError
from reference.modeling import formats
from reference.modeling.formats import (
    ALPACA_PROMPT_JP,
    GEMMA2_CHAT_TEMPLATE,
    GEMMA2_CHAT_TEMPLATE_SEED_LITERAL,
    TemplateError,
    attach_chat_template,
    encode_prompt,
    render,
    render_alpaca_ja,
    render_gemma2,
    render_llama31,
    render_with_tokenizer,
)
from spec.cli_runner import run_cli

SEED_001 = Path(__file__).resolve().parent.parent / "fixtures" / "sources" / "seed-001.json"
"""Seed 001's facts as fixtures/sources/extract.py took them out of the note's code (spec/SOURCES.md)."""

# google/gemma-2-9b's chat template, as seed 001 §2.1.1 assigns it (its '\n' are real newlines there too).
GEMMA2_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

# seed 001 §2.2.2, written out: a leading newline, two instruction lines, a blank line, question and answer.
ALPACA_PROMPT_BY_HAND = (
    "\nあなたは高性能なAIです。質問に対して、適切な回答を書きなさい。\n"
    "回答に関係のないことは絶対に書かないでください。\n\n"
    "### 質問:\n{}\n\n### 回答:\n{}"
)

SYSTEM_NOT_SUPPORTED = "System role not supported"
ROLES_MUST_ALTERNATE = "Conversation roles must alternate user/assistant/user/assistant/..."

CONVERSATIONS = {
    "one_user_turn": [{"role": "user", "content": "日本の首都はどこですか？"}],
    "two_turns": [
        {"role": "user", "content": "こんにちは"},
        {"role": "assistant", "content": "こんにちは！ご用件は？"},
    ],
    "three_turns_with_whitespace": [
        {"role": "user", "content": "  \n 学習率とは？\n"},
        {"role": "assistant", "content": "\tステップの幅です。 "},
        {"role": "user", "content": "ありがとう  "},
    ],
    "english_and_symbols": [{"role": "user", "content": "What is 2 + 2? <b>bold</b> {braces} 'quotes'"}],
    "empty_content": [{"role": "user", "content": ""}],
    "number_content": [{"role": "user", "content": 42}],
}


def seed_001_literals() -> dict[str, list[str]]:
    """Every string seed 001's Python blocks assign to alpaca_prompt_jp and to tokenizer.chat_template, in order."""
    seed = json.loads(SEED_001.read_text(encoding="utf-8"))
    return {"alpaca_prompt_jp": seed["alpaca_prompt_jp"], "tokenizer.chat_template": seed["chat_template"]}


def jinja(tokenizer, messages, add_generation_prompt=False, **kwargs) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
    )


def jinja_ids(tokenizer, messages, add_generation_prompt=False, **kwargs) -> list[int]:
    return tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=False, add_generation_prompt=add_generation_prompt, **kwargs
    )


@pytest.fixture
def gemma_jinja(gemma_tokenizer):
    """The fixture tokenizer running the Gemma-2 template held by this test file."""
    gemma_tokenizer.chat_template = GEMMA2_TEMPLATE
    return gemma_tokenizer


# ---------------------------------------------------------------- the seed's constants


@pytest.mark.claim("C2")
def test_this_files_gemma2_template_is_the_one_seed_001_borrows():
    """Seed 001 assigns the template three times (training and inference), always the same text: a newline,
    the template, a newline (a triple-quoted string starting and ending on its own line)."""
    literals = seed_001_literals()["tokenizer.chat_template"]
    assert len(literals) == 3 and set(literals) == {"\n" + GEMMA2_TEMPLATE + "\n"}
    assert GEMMA2_CHAT_TEMPLATE_SEED_LITERAL == literals[0]


@pytest.mark.claim("C11")
def test_alpaca_prompt_jp_is_the_seeds_text_exactly():
    assert seed_001_literals()["alpaca_prompt_jp"] == [ALPACA_PROMPT_BY_HAND]
    assert ALPACA_PROMPT_JP == ALPACA_PROMPT_BY_HAND


@pytest.mark.claim("C11")
def test_alpaca_prompt_jp_by_hand_starts_with_a_newline():
    """Leading newline, two instruction lines, a blank line, the question and answer headers."""
    assert ALPACA_PROMPT_JP == ALPACA_PROMPT_BY_HAND
    assert render_alpaca_ja("指示", "応答", eos_token="<eos>").startswith("\nあなたは高性能なAIです。")


# ---------------------------------------------------------------- Gemma-2


@pytest.mark.claim("C2")
def test_a_tokenizer_without_a_chat_template_gets_gemma2s(gemma_tokenizer):
    assert gemma_tokenizer.chat_template is None
    assert attach_chat_template(gemma_tokenizer, "gemma2") is True
    assert gemma_tokenizer.chat_template == GEMMA2_TEMPLATE
    assert attach_chat_template(gemma_tokenizer) is False  # the default format is gemma2; one attached is kept


@pytest.mark.claim("C2")
def test_a_tokenizer_that_has_a_chat_template_keeps_it(llama_tokenizer):
    official = llama_tokenizer.chat_template
    assert attach_chat_template(llama_tokenizer, "gemma2") is False
    assert llama_tokenizer.chat_template == official


@pytest.mark.claim("C2")
def test_gemma2_turns_by_hand(gemma_jinja):
    """BOS first; assistant written as `model`; content trimmed; each turn
    <start_of_turn>{role}\\n{content}<end_of_turn>\\n; the generation prompt opens a model turn."""
    messages = CONVERSATIONS["three_turns_with_whitespace"]
    turns = (
        "<bos><start_of_turn>user\n学習率とは？<end_of_turn>\n"
        "<start_of_turn>model\nステップの幅です。<end_of_turn>\n"
        "<start_of_turn>user\nありがとう<end_of_turn>\n"
    )
    assert jinja(gemma_jinja, messages) == render_gemma2(messages) == turns
    with_prompt = turns + "<start_of_turn>model\n"
    assert jinja(gemma_jinja, messages, add_generation_prompt=True) == with_prompt
    assert render_gemma2(messages, add_generation_prompt=True) == with_prompt


@pytest.mark.claim("P4", "C2")
@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_gemma2_python_renderer_equals_the_jinja_template(gemma_jinja, name, add_generation_prompt):
    """Byte-identical text, and encode_prompt's ids equal the ids apply_chat_template tokenizes."""
    messages = CONVERSATIONS[name]
    text = render_gemma2(messages, add_generation_prompt)
    assert text == jinja(gemma_jinja, messages, add_generation_prompt)
    assert encode_prompt(gemma_jinja, text) == jinja_ids(gemma_jinja, messages, add_generation_prompt)


@pytest.mark.claim("P4", "C2")
def test_the_attached_gemma2_template_renders_as_the_seeds(gemma_tokenizer, gemma_jinja):
    """render_with_tokenizer on a tokenizer without a template (the seed's 4-bit copy) attaches and runs it."""
    from transformers import AutoTokenizer

    bare = AutoTokenizer.from_pretrained(gemma_tokenizer.name_or_path)
    messages = CONVERSATIONS["three_turns_with_whitespace"]
    assert render_with_tokenizer(bare, "gemma2", messages, True) == jinja(gemma_jinja, messages, True)


@pytest.mark.claim("C2")
@pytest.mark.parametrize(
    "messages,message",
    [
        ([{"role": "system", "content": "You are kind."}, {"role": "user", "content": "hi"}], SYSTEM_NOT_SUPPORTED),
        ([{"role": "assistant", "content": "hi"}], ROLES_MUST_ALTERNATE),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], ROLES_MUST_ALTERNATE),
        (
            [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "assistant", "content": "c"},
            ],
            ROLES_MUST_ALTERNATE,
        ),
        (
            [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "model", "content": "c"},
            ],
            ROLES_MUST_ALTERNATE,
        ),
    ],
)
def test_gemma2_refuses_the_same_conversations_with_the_same_message(gemma_jinja, messages, message):
    with pytest.raises(jinja2.TemplateError) as from_jinja:
        jinja(gemma_jinja, messages)
    with pytest.raises(TemplateError) as from_python:
        render_gemma2(messages)
    assert str(from_jinja.value) == str(from_python.value) == message


@pytest.mark.claim("C2")
def test_gemma2_renders_a_non_user_role_at_an_odd_position_under_its_own_name(gemma_jinja):
    """The template only checks that user turns sit at even positions: a `system` turn second is rendered."""
    messages = [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]
    assert render_gemma2(messages) == jinja(gemma_jinja, messages)
    assert render_gemma2(messages) == (
        "<bos><start_of_turn>user\na<end_of_turn>\n<start_of_turn>system\nb<end_of_turn>\n"
    )


@pytest.mark.claim("C2")
def test_the_seeds_template_literal_as_written_puts_a_newline_before_bos(gemma_tokenizer):
    """Seed 001 assigns the Jinja in a triple-quoted string that starts with a newline. Jinja keeps that
    newline, so the rendered prompt starts "\\n<bos>"; the project attaches the body without it."""
    gemma_tokenizer.chat_template = "\n" + GEMMA2_TEMPLATE + "\n"  # the seed's literal (see the seed test above)
    messages = CONVERSATIONS["one_user_turn"]
    assert jinja(gemma_tokenizer, messages).startswith("\n<bos><start_of_turn>user\n")
    assert GEMMA2_CHAT_TEMPLATE == GEMMA2_TEMPLATE
    assert render_gemma2(messages).startswith("<bos><start_of_turn>user\n")


# ---------------------------------------------------------------- Llama-3.1

LLAMA_CONVERSATIONS = {
    **CONVERSATIONS,
    "system_first": [
        {"role": "system", "content": "  あなたは親切なアシスタントです。 "},
        {"role": "user", "content": "自己紹介して"},
    ],
    "system_only": [{"role": "system", "content": "Be brief."}],
    "tool_result_string": [{"role": "user", "content": "天気は？"}, {"role": "tool", "content": "晴れ"}],
    "tool_result_object": [{"role": "user", "content": "weather?"}, {"role": "ipython", "content": {"temp": 21}}],
    "tool_result_number": [{"role": "user", "content": "2+2?"}, {"role": "tool", "content": 4}],
    "second_system_message_is_a_turn": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
}


@pytest.mark.claim("P4")
def test_llama31_by_hand(llama_tokenizer):
    """BOS, the system header with the knowledge cutoff and today's date and the system message moved into
    it, each turn <|start_header_id|>{role}<|end_header_id|>\\n\\n{trimmed}<|eot_id|>, then the assistant header."""
    messages = LLAMA_CONVERSATIONS["system_first"]
    expected = (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
        "あなたは親切なアシスタントです。<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n自己紹介して<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert jinja(llama_tokenizer, messages, add_generation_prompt=True) == expected
    assert render_llama31(messages, add_generation_prompt=True) == expected
    assert render("llama3.1", messages, add_generation_prompt=True) == expected


@pytest.mark.claim("P4")
@pytest.mark.parametrize("name", list(LLAMA_CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_llama31_python_renderer_equals_the_official_template(llama_tokenizer, name, add_generation_prompt):
    messages = LLAMA_CONVERSATIONS[name]
    text = render_llama31(messages, add_generation_prompt)
    assert text == jinja(llama_tokenizer, messages, add_generation_prompt)
    assert encode_prompt(llama_tokenizer, text) == jinja_ids(llama_tokenizer, messages, add_generation_prompt)


@pytest.mark.claim("P4")
def test_llama31_date_can_be_given(llama_tokenizer):
    messages = CONVERSATIONS["one_user_turn"]
    text = render_llama31(messages, date_string="21 Nov 2026")
    assert "Today Date: 21 Nov 2026\n\n" in text
    assert text == jinja(llama_tokenizer, messages, date_string="21 Nov 2026")
    assert render("llama3.1", messages, date_string="21 Nov 2026") == text
    assert render_with_tokenizer(llama_tokenizer, "llama3.1", messages, date_string="21 Nov 2026") == text


@pytest.mark.claim("P4")
def test_the_attached_llama31_template_is_the_official_one(gemma_tokenizer, fixtures_dir):
    official = (fixtures_dir / "tokenizer-llama3" / "chat_template.jinja").read_text(encoding="utf-8")
    assert attach_chat_template(gemma_tokenizer, "llama3.1") is True
    assert gemma_tokenizer.chat_template == official


def test_llama31_template_and_renderer_both_fail_on_no_messages(llama_tokenizer):
    with pytest.raises(ValueError, match="empty conversation"):  # transformers refuses before the template runs
        jinja(llama_tokenizer, [])
    with pytest.raises(TemplateError, match="no messages"):
        render_llama31([])


def test_tool_calls_are_left_to_the_jinja_template():
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [], "content": ""}]
    with pytest.raises(TemplateError, match="Jinja template only"):
        render_llama31(messages)


# ---------------------------------------------------------------- alpaca-ja and BOS/EOS


@pytest.mark.claim("C11", "P11")
def test_alpaca_text_ends_in_eos_only_when_the_response_is_not_empty():
    """A non-empty response gets exactly one EOS after it; an empty response (a prompt) gets none."""
    with_response = render_alpaca_ja("質問です", "回答です", eos_token="<eos>")
    assert with_response == ALPACA_PROMPT_BY_HAND.format("質問です", "回答です") + "<eos>"
    assert with_response.count("<eos>") == 1
    empty = render_alpaca_ja("質問です", "", eos_token="<eos>")
    assert empty == ALPACA_PROMPT_BY_HAND.format("質問です", "") and "<eos>" not in empty


@pytest.mark.claim("C11")
def test_render_alpaca_ja_takes_one_user_turn_and_an_optional_assistant_turn():
    user = {"role": "user", "content": "指示"}
    assert (
        render("alpaca-ja", [user, {"role": "assistant", "content": "応答"}])
        == ALPACA_PROMPT_BY_HAND.format("指示", "応答") + "<eos>"
    )
    assert render("alpaca-ja", [user]) == ALPACA_PROMPT_BY_HAND.format("指示", "")
    assert render("alpaca-ja", [user, {"role": "assistant", "content": "応答"}], eos_token="</s>").endswith("応答</s>")
    with pytest.raises(TemplateError, match="one user message"):
        render("alpaca-ja", [{"role": "assistant", "content": "応答"}])


@pytest.mark.claim("P11")
def test_render_writes_the_bos_it_is_given(gemma_jinja):
    """The Jinja templates write the tokenizer's own bos_token; render() takes it the same way (default:
    the format's <bos> / <|begin_of_text|>)."""
    messages = CONVERSATIONS["one_user_turn"]
    gemma_jinja.bos_token = "<unk>"  # any token the tokenizer knows
    assert render("gemma2", messages, bos_token="<unk>") == jinja(gemma_jinja, messages)
    assert render("gemma2", messages).startswith("<bos><start_of_turn>user\n")
    assert render("llama3.1", messages, bos_token="<unk>").startswith("<unk><|start_header_id|>system")
    assert render("llama3.1", messages).startswith("<|begin_of_text|><|start_header_id|>system")


def test_an_unknown_format_is_an_input_error():
    with pytest.raises(InputError, match="unknown format 'chatml'"):
        render("chatml", CONVERSATIONS["one_user_turn"])


@pytest.mark.claim("P11")
def test_a_rendered_chat_prompt_tokenized_naively_gets_two_bos_and_encode_prompt_gives_one(gemma_tokenizer):
    """The template writes "<bos>" as text; tokenizer(text) adds another. encode_prompt keeps one."""
    text = render_gemma2(CONVERSATIONS["one_user_turn"])
    bos = gemma_tokenizer.bos_token_id
    naive = gemma_tokenizer(text)["input_ids"]
    assert naive[:2] == [bos, bos]
    ids = encode_prompt(gemma_tokenizer, text)
    assert ids == naive[1:] and ids[0] == bos and ids.count(bos) == 1


@pytest.mark.claim("P11")
def test_alpaca_text_gets_exactly_one_bos_and_ends_with_the_eos_id(gemma_tokenizer):
    """The alpaca text holds no BOS, so encode_prompt puts one in front; its <eos> text is the EOS id."""
    text = render_alpaca_ja("日本の首都は？", "東京です。", eos_token=gemma_tokenizer.eos_token)
    ids = encode_prompt(gemma_tokenizer, text)
    assert ids == [gemma_tokenizer.bos_token_id, *gemma_tokenizer(text, add_special_tokens=False)["input_ids"]]
    assert ids.count(gemma_tokenizer.bos_token_id) == 1
    assert ids[-1] == gemma_tokenizer.eos_token_id and ids.count(gemma_tokenizer.eos_token_id) == 1
    assert encode_prompt(gemma_tokenizer, "") == [gemma_tokenizer.bos_token_id]


# ---------------------------------------------------------------- the render command

TOKENIZER = str(Path(__file__).resolve().parent.parent / "fixtures" / "tokenizer")
LLAMA_TOKENIZER = str(Path(__file__).resolve().parent.parent / "fixtures" / "tokenizer-llama3")
ALPACA_TURNS = [{"role": "user", "content": "指示"}, {"role": "assistant", "content": "応答"}]


def write_messages(tmp_path, messages) -> str:
    path = tmp_path / "messages.json"
    path.write_text(json.dumps(messages, ensure_ascii=False), encoding="utf-8")
    return str(path)


@pytest.fixture
def ftref_render(capsys, monkeypatch, tmp_path):
    """`ftref render --format FMT --messages M ...` in this process (transformers is already imported here).
    M is a list of messages (written to a file), a path, or "-" with `stdin`. Returns (exit code, stdout, stderr)."""

    def run(fmt: str, messages, *args: str, stdin: str = "") -> tuple[int, str, str]:
        source = messages if isinstance(messages, str) else write_messages(tmp_path, messages)
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        code = cli.main(["render", "--format", fmt, "--messages", source, *args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.mark.claim("P4", "C2")
def test_render_prints_exactly_the_gemma2_prompt(tmp_path, gemma_jinja):
    messages = CONVERSATIONS["two_turns"]
    result = run_cli(
        "render", "--format", "gemma2", "--messages", write_messages(tmp_path, messages), "--add-generation-prompt"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == jinja(gemma_jinja, messages, add_generation_prompt=True)


@pytest.mark.claim("P4")
def test_render_reads_messages_from_stdin_for_llama31(ftref_render, llama_tokenizer):
    messages = LLAMA_CONVERSATIONS["system_first"]
    code, out, _ = ftref_render("llama3.1", "-", stdin=json.dumps(messages))
    assert code == 0 and out == jinja(llama_tokenizer, messages)
    code, out, _ = ftref_render("llama3.1", "-", "--date", "1 Jan 2025", stdin=json.dumps({"messages": messages}))
    assert code == 0 and out == jinja(llama_tokenizer, messages, date_string="1 Jan 2025")


@pytest.mark.claim("C11")
def test_render_alpaca_ja_from_a_user_and_an_assistant_turn(ftref_render):
    code, out, _ = ftref_render("alpaca-ja", ALPACA_TURNS)
    assert code == 0 and out == ALPACA_PROMPT_BY_HAND.format("指示", "応答") + "<eos>"


@pytest.mark.claim("P4", "P11")
def test_render_with_a_tokenizer_gives_the_templates_ids(ftref_render, llama_tokenizer):
    messages = LLAMA_CONVERSATIONS["two_turns"]
    code, out, err = ftref_render(
        "llama3.1", messages, "--tokenizer", LLAMA_TOKENIZER, "--json", "--add-generation-prompt"
    )
    assert code == 0, err
    data = json.loads(out)
    assert data["text"] == jinja(llama_tokenizer, messages, add_generation_prompt=True)
    assert data["input_ids"] == jinja_ids(llama_tokenizer, messages, add_generation_prompt=True)
    assert data["tokens"] == llama_tokenizer.convert_ids_to_tokens(data["input_ids"])
    assert data["pieces"] == [llama_tokenizer.decode([i]) for i in data["input_ids"]]


@pytest.mark.claim("P4", "P11", "C2")
def test_render_with_a_tokenizer_without_a_template_borrows_gemma2s(ftref_render, gemma_jinja):
    """Text on stdout, ids on stderr; one BOS even though the template writes <bos> as text."""
    messages = CONVERSATIONS["two_turns"]
    code, out, err = ftref_render("gemma2", messages, "--tokenizer", TOKENIZER)
    assert code == 0, err
    assert out == jinja(gemma_jinja, messages)
    ids = jinja_ids(gemma_jinja, messages)
    assert err.strip() == f"input_ids ({len(ids)}): {json.dumps(ids)}"
    assert ids.count(gemma_jinja.bos_token_id) == 1


@pytest.mark.claim("C11", "P11")
def test_render_alpaca_ja_with_a_tokenizer_uses_its_eos_and_one_bos(ftref_render, llama_tokenizer):
    """The Llama-3.1 tokenizer's EOS is <|eot_id|> (not the renderer's default <eos>) and its BOS <|begin_of_text|>."""
    code, out, err = ftref_render("alpaca-ja", ALPACA_TURNS, "--tokenizer", LLAMA_TOKENIZER, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["text"] == ALPACA_PROMPT_BY_HAND.format("指示", "応答") + "<|eot_id|>"
    bos, eos = llama_tokenizer.convert_tokens_to_ids(["<|begin_of_text|>", "<|eot_id|>"])
    assert data["input_ids"][0] == bos and data["input_ids"].count(bos) == 1
    assert data["input_ids"][-1] == eos and data["input_ids"].count(eos) == 1


@pytest.mark.claim("C2")
def test_render_exits_2_with_the_templates_message(tmp_path):
    messages = [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]
    result = run_cli("render", "--format", "gemma2", "--messages", write_messages(tmp_path, messages))
    assert result.returncode == 2
    assert "System role not supported" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.claim("C2")
def test_render_with_a_tokenizer_exits_2_with_the_templates_message(ftref_render):
    messages = [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]
    code, _, err = ftref_render("gemma2", messages, "--tokenizer", TOKENIZER)
    assert code == 2 and ROLES_MUST_ALTERNATE in err


def test_render_refuses_a_tokenizer_that_is_not_a_local_directory(ftref_render):
    code, _, err = ftref_render("gemma2", CONVERSATIONS["one_user_turn"], "--tokenizer", "/no/such/tokenizer")
    assert code == 2 and "/no/such/tokenizer" in err and "not a local directory" in err


@pytest.mark.parametrize(
    "content,named",
    [
        ("not json", "not JSON"),
        ('{"a": 1}', "JSON list"),
        ('[{"role": "user"}]', "message 0"),
        ('[{"role": "user", "content": null}]', "message 0: content is null"),
        (b"\xff\xfe[]", "not UTF-8"),
    ],
)
def test_render_rejects_malformed_messages_naming_the_problem(ftref_render, tmp_path, content, named):
    """A null content would render as the word None (Jinja's trim of None), so it is refused instead."""
    path = tmp_path / "bad.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    code, _, err = ftref_render("gemma2", str(path))
    assert code == 2 and named in err and str(path) in err


def test_render_alpaca_refuses_a_multi_turn_conversation(ftref_render):
    code, _, err = ftref_render("alpaca-ja", CONVERSATIONS["three_turns_with_whitespace"])
    assert code == 2 and "alpaca-ja takes one user message" in err


def test_render_command_does_not_import_torch():
    code = (
        "import sys, reference.cli as c; c.main(['render', '--format', 'gemma2', '--messages', '-']); "
        "print('torch' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        input='[{"role":"user","content":"x"}]',
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stdout == "<bos><start_of_turn>user\nx<end_of_turn>\nFalse\n"


def test_formats_lists_the_three_formats():
    assert formats.FORMATS == ("gemma2", "llama3.1", "alpaca-ja")
