"""Prompt formats (reference/formats.py): the readable renderers equal the Jinja chat templates.

The reference for every chat rendering is the real `tokenizer.apply_chat_template` running the Jinja
template (seed 001's Gemma-2 template, the official Llama-3.1 template); the expected strings written
out by hand below are the formats as their model cards describe them.
"""

from __future__ import annotations

import json
import subprocess
import sys

import jinja2
import pytest

from reference import formats
from reference.formats import (
    ALPACA_PROMPT_JP,
    GEMMA2_CHAT_TEMPLATE,
    GEMMA2_CHAT_TEMPLATE_SEED_LITERAL,
    TemplateError,
    attach_chat_template,
    encode_prompt,
    render_alpaca_ja,
    render_gemma2,
    render_llama31,
)

CONVERSATIONS = {
    "one_user_turn": [{"role": "user", "content": "日本の首都はどこですか？"}],
    "two_turns": [{"role": "user", "content": "こんにちは"}, {"role": "assistant", "content": "こんにちは！ご用件は？"}],
    "three_turns_with_whitespace": [
        {"role": "user", "content": "  \n 学習率とは？\n"},
        {"role": "assistant", "content": "\tステップの幅です。 "},
        {"role": "user", "content": "ありがとう  "},
    ],
    "english_and_symbols": [{"role": "user", "content": "What is 2 + 2? <b>bold</b> {braces} 'quotes'"}],
    "empty_content": [{"role": "user", "content": ""}],
}


def jinja(tokenizer, messages, add_generation_prompt=False, **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs)


def jinja_ids(tokenizer, messages, add_generation_prompt=False, **kwargs) -> list[int]:
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False,
                                         add_generation_prompt=add_generation_prompt, **kwargs)


# ---------------------------------------------------------------- Gemma-2

@pytest.mark.claim("C2")
def test_a_tokenizer_without_a_chat_template_gets_gemma2s(gemma_tokenizer):
    assert gemma_tokenizer.chat_template is None
    assert attach_chat_template(gemma_tokenizer, "gemma2") is True
    assert gemma_tokenizer.chat_template == GEMMA2_CHAT_TEMPLATE
    assert attach_chat_template(gemma_tokenizer, "gemma2") is False  # one already there is kept


@pytest.mark.claim("C2")
def test_gemma2_turns_by_hand(gemma_tokenizer):
    """BOS first; assistant written as `model`; content trimmed; each turn
    <start_of_turn>{role}\\n{content}<end_of_turn>\\n; the generation prompt opens a model turn."""
    attach_chat_template(gemma_tokenizer)
    messages = CONVERSATIONS["three_turns_with_whitespace"]
    expected = ("<bos><start_of_turn>user\n学習率とは？<end_of_turn>\n"
                "<start_of_turn>model\nステップの幅です。<end_of_turn>\n"
                "<start_of_turn>user\nありがとう<end_of_turn>\n"
                "<start_of_turn>model\n")
    assert jinja(gemma_tokenizer, messages, add_generation_prompt=True) == expected
    assert render_gemma2(messages, add_generation_prompt=True) == expected


@pytest.mark.claim("P4", "C2")
@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_gemma2_python_renderer_equals_the_jinja_template(gemma_tokenizer, name, add_generation_prompt):
    attach_chat_template(gemma_tokenizer)
    messages = CONVERSATIONS[name]
    text = render_gemma2(messages, add_generation_prompt)
    assert text == jinja(gemma_tokenizer, messages, add_generation_prompt)
    assert encode_prompt(gemma_tokenizer, text) == jinja_ids(gemma_tokenizer, messages, add_generation_prompt)


@pytest.mark.claim("C2")
@pytest.mark.parametrize("messages,message", [
    ([{"role": "system", "content": "You are kind."}, {"role": "user", "content": "hi"}], "System role not supported"),
    ([{"role": "assistant", "content": "hi"}], "Conversation roles must alternate user/assistant/user/assistant/..."),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
     "Conversation roles must alternate user/assistant/user/assistant/..."),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "assistant", "content": "c"}],
     "Conversation roles must alternate user/assistant/user/assistant/..."),
])
def test_gemma2_refuses_the_same_conversations_with_the_same_message(gemma_tokenizer, messages, message):
    attach_chat_template(gemma_tokenizer)
    with pytest.raises(jinja2.TemplateError) as from_jinja:
        jinja(gemma_tokenizer, messages)
    with pytest.raises(TemplateError) as from_python:
        render_gemma2(messages)
    assert str(from_jinja.value) == str(from_python.value) == message


@pytest.mark.claim("C2")
def test_gemma2_renders_a_non_user_role_at_an_odd_position_under_its_own_name(gemma_tokenizer):
    """The template only checks that user turns sit at even positions: a `system` turn second is rendered."""
    attach_chat_template(gemma_tokenizer)
    messages = [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]
    assert render_gemma2(messages) == jinja(gemma_tokenizer, messages)
    assert "<start_of_turn>system\nb<end_of_turn>\n" in render_gemma2(messages)


@pytest.mark.claim("C2")
def test_the_seeds_template_literal_as_written_puts_a_newline_before_bos(gemma_tokenizer):
    """Seed 001 assigns the Jinja in a triple-quoted string that starts with a newline. Jinja keeps that
    newline, so the rendered prompt starts "\\n<bos>"; the project attaches the body without it."""
    gemma_tokenizer.chat_template = GEMMA2_CHAT_TEMPLATE_SEED_LITERAL
    assert jinja(gemma_tokenizer, CONVERSATIONS["one_user_turn"]).startswith("\n<bos><start_of_turn>user\n")
    assert GEMMA2_CHAT_TEMPLATE == GEMMA2_CHAT_TEMPLATE_SEED_LITERAL[1:-1]
    assert render_gemma2(CONVERSATIONS["one_user_turn"]).startswith("<bos>")


# ---------------------------------------------------------------- Llama-3.1

LLAMA_CONVERSATIONS = {
    **CONVERSATIONS,
    "system_first": [{"role": "system", "content": "  あなたは親切なアシスタントです。 "},
                     {"role": "user", "content": "自己紹介して"}],
    "system_only": [{"role": "system", "content": "Be brief."}],
    "tool_result_string": [{"role": "user", "content": "天気は？"}, {"role": "tool", "content": "晴れ"}],
    "tool_result_object": [{"role": "user", "content": "weather?"}, {"role": "ipython", "content": {"temp": 21}}],
    "second_system_message_is_a_turn": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
}


@pytest.mark.claim("P4")
def test_llama31_by_hand(llama_tokenizer):
    """BOS, the system header with the knowledge cutoff and today's date and the system message moved into
    it, each turn <|start_header_id|>{role}<|end_header_id|>\\n\\n{trimmed}<|eot_id|>, then the assistant header."""
    messages = LLAMA_CONVERSATIONS["system_first"]
    expected = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
                "あなたは親切なアシスタントです。<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\n自己紹介して<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert jinja(llama_tokenizer, messages, add_generation_prompt=True) == expected
    assert render_llama31(messages, add_generation_prompt=True) == expected


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


def test_llama31_template_and_renderer_both_fail_on_no_messages(llama_tokenizer):
    with pytest.raises(ValueError, match="empty conversation"):  # transformers refuses before the template runs
        jinja(llama_tokenizer, [])
    with pytest.raises(TemplateError):
        render_llama31([])


# ---------------------------------------------------------------- alpaca-ja and BOS/EOS

@pytest.mark.claim("C11")
def test_alpaca_prompt_jp_is_the_seeds_prompt_exactly():
    """Leading newline, two instruction lines, a blank line, the question and answer headers."""
    assert ALPACA_PROMPT_JP == ("\nあなたは高性能なAIです。質問に対して、適切な回答を書きなさい。\n"
                                "回答に関係のないことは絶対に書かないでください。\n\n"
                                "### 質問:\n{}\n\n### 回答:\n{}")


@pytest.mark.claim("C11", "P11")
def test_alpaca_text_ends_in_eos_only_when_the_response_is_not_empty():
    with_response = render_alpaca_ja("質問です", "回答です", eos_token="<eos>")
    assert with_response.endswith("### 回答:\n回答です<eos>")
    assert render_alpaca_ja("質問です", "", eos_token="<eos>").endswith("### 回答:\n")


@pytest.mark.claim("P11")
def test_a_rendered_chat_prompt_tokenized_naively_gets_two_bos_and_encode_prompt_gives_one(gemma_tokenizer):
    """The template writes "<bos>" as text; tokenizer(text) adds another. encode_prompt keeps one."""
    text = render_gemma2(CONVERSATIONS["one_user_turn"])
    bos = gemma_tokenizer.bos_token_id
    naive = gemma_tokenizer(text)["input_ids"]
    assert naive[:2] == [bos, bos]
    ids = encode_prompt(gemma_tokenizer, text)
    assert ids[0] == bos and ids.count(bos) == 1


@pytest.mark.claim("P11")
def test_alpaca_text_gets_exactly_one_bos_and_ends_with_the_eos_id(gemma_tokenizer):
    text = render_alpaca_ja("日本の首都は？", "東京です。", eos_token=gemma_tokenizer.eos_token)
    ids = encode_prompt(gemma_tokenizer, text)
    assert ids[0] == gemma_tokenizer.bos_token_id and ids.count(gemma_tokenizer.bos_token_id) == 1
    assert ids[-1] == gemma_tokenizer.eos_token_id and ids.count(gemma_tokenizer.eos_token_id) == 1


# ---------------------------------------------------------------- the render command

def run_render(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reference", "render", *args], input=stdin,
                          capture_output=True, text=True, timeout=120)


def write_messages(tmp_path, messages) -> str:
    path = tmp_path / "messages.json"
    path.write_text(json.dumps(messages, ensure_ascii=False), encoding="utf-8")
    return str(path)


@pytest.mark.claim("P4", "C2")
def test_render_prints_exactly_the_gemma2_prompt(tmp_path, gemma_tokenizer):
    messages = CONVERSATIONS["two_turns"]
    result = run_render("--format", "gemma2", "--messages", write_messages(tmp_path, messages), "--add-generation-prompt")
    assert result.returncode == 0, result.stderr
    attach_chat_template(gemma_tokenizer)
    assert result.stdout == jinja(gemma_tokenizer, messages, add_generation_prompt=True)


@pytest.mark.claim("P4")
def test_render_reads_messages_from_stdin_for_llama31(llama_tokenizer):
    messages = LLAMA_CONVERSATIONS["system_first"]
    result = run_render("--format", "llama3.1", "--messages", "-", stdin=json.dumps(messages))
    assert result.returncode == 0, result.stderr
    assert result.stdout == jinja(llama_tokenizer, messages)


@pytest.mark.claim("C11")
def test_render_alpaca_ja_from_a_user_and_an_assistant_turn(tmp_path):
    messages = [{"role": "user", "content": "指示"}, {"role": "assistant", "content": "応答"}]
    result = run_render("--format", "alpaca-ja", "--messages", write_messages(tmp_path, messages))
    assert result.stdout == ALPACA_PROMPT_JP.format("指示", "応答") + "<eos>"


@pytest.mark.claim("P4", "P11")
def test_render_with_a_tokenizer_gives_the_templates_ids(tmp_path, fixtures_dir, llama_tokenizer):
    messages = LLAMA_CONVERSATIONS["two_turns"]
    result = run_render("--format", "llama3.1", "--messages", write_messages(tmp_path, messages),
                        "--tokenizer", str(fixtures_dir / "tokenizer-llama3"), "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["text"] == jinja(llama_tokenizer, messages)
    assert data["input_ids"] == jinja_ids(llama_tokenizer, messages)


@pytest.mark.claim("C2")
@pytest.mark.parametrize("engine_args", [[], ["--tokenizer", "fixtures/tokenizer"]])
def test_render_exits_2_with_the_templates_message(tmp_path, engine_args, fixtures_dir):
    messages = [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]
    args = [a.replace("fixtures", str(fixtures_dir)) if a.startswith("fixtures") else a for a in engine_args]
    result = run_render("--format", "gemma2", "--messages", write_messages(tmp_path, messages), *args)
    assert result.returncode == 2
    assert "System role not supported" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("content,named", [("not json", "not JSON"), ('{"a": 1}', "JSON list"),
                                           ('[{"role": "user"}]', "message 0")])
def test_render_rejects_malformed_messages_naming_the_problem(tmp_path, content, named):
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    result = run_render("--format", "gemma2", "--messages", str(path))
    assert result.returncode == 2 and named in result.stderr and str(path) in result.stderr


def test_render_alpaca_refuses_a_multi_turn_conversation(tmp_path):
    result = run_render("--format", "alpaca-ja", "--messages", write_messages(tmp_path, CONVERSATIONS["three_turns_with_whitespace"]))
    assert result.returncode == 2 and "alpaca-ja takes one user message" in result.stderr


def test_render_command_does_not_import_torch():
    code = "import sys, reference.cli as c; c.main(['render','--format','gemma2','--messages','-']); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], input='[{"role":"user","content":"x"}]',
                            capture_output=True, text=True, timeout=60)
    assert result.stdout.endswith("False\n")


def test_formats_lists_the_three_formats():
    assert formats.FORMATS == ("gemma2", "llama3.1", "alpaca-ja")
