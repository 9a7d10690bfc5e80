"""Prompt formats: Gemma-2 turns, Llama-3.1 instruct headers and the LLM2024 alpaca-ja prompt.

Each chat format exists twice on purpose: as the Jinja `chat_template` a tokenizer carries (what
`tokenizer.apply_chat_template` runs) and as a readable Python renderer. The spec tests hold the two
byte-identical, error messages included, so the Python reads as documentation of the template.

* Gemma-2 (seed 001 §2.1.1; the template of google/gemma-2-9b): ``bos``, then per turn
  ``<start_of_turn>{role}\\n{content.strip()}<end_of_turn>\\n`` with ``assistant`` written ``model``.
  A first ``system`` turn raises "System role not supported"; a ``user`` turn at an odd index, or a
  non-user turn at an even one, raises "Conversation roles must alternate ...".
* Llama-3.1 instruct (the official template): ``<|begin_of_text|>``, a system header that always holds
  ``Cutting Knowledge Date: December 2023`` and ``Today Date: {date}`` (26 Jul 2024 unless given) and
  then the first message's content when it is a system message, each turn as
  ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content.strip()}<|eot_id|>``, tool results as JSON.
* alpaca-ja (seed 001 §2.2.2): ``alpaca_prompt_jp.format(instruction, response)`` + EOS when the
  response is not empty.

Not handled by the Python renderers: Llama's tool definitions and ``tool_calls`` messages (they raise
and point at the Jinja template, which handles them).
"""

from __future__ import annotations

import json
from importlib import resources

from reference.errors import InputError

# The seed assigns the Jinja below inside a Python triple-quoted string, so its literal starts and ends
# with a newline. Rendered as-is, that first newline lands *before* <bos> (see spec/test_formats.py);
# the template attached here is the Jinja body alone, which is google/gemma-2-9b's template.
GEMMA2_CHAT_TEMPLATE_SEED_LITERAL = """
{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}
"""  # noqa: E501 (the seed's template, one line as the seed writes it)
GEMMA2_CHAT_TEMPLATE = GEMMA2_CHAT_TEMPLATE_SEED_LITERAL.strip("\n")

ALPACA_PROMPT_JP = """
あなたは高性能なAIです。質問に対して、適切な回答を書きなさい。
回答に関係のないことは絶対に書かないでください。

### 質問:
{}

### 回答:
{}"""

LLAMA31_DEFAULT_DATE = "26 Jul 2024"
LLAMA31_KNOWLEDGE_CUTOFF = "December 2023"

FORMATS = ("gemma2", "llama3.1", "alpaca-ja")

SYSTEM_NOT_SUPPORTED = "System role not supported"
ROLES_MUST_ALTERNATE = "Conversation roles must alternate user/assistant/user/assistant/..."


class TemplateError(InputError):
    """A conversation the template refuses; the message is the template's own."""


def llama31_chat_template() -> str:
    return resources.files("reference").joinpath("templates/llama-3.1-instruct.jinja").read_text("utf-8")


def _text(content) -> str:
    # Jinja's `trim` turns any value into its string form first, then strips whitespace.
    return str(content).strip()


def _first_role(messages: list[dict]) -> str:
    if not messages:
        raise TemplateError("no messages: a chat template needs at least one message")
    return messages[0].get("role")


def render_gemma2(messages: list[dict], add_generation_prompt: bool = False, bos_token: str = "<bos>") -> str:
    """Gemma-2's turns: <start_of_turn>{user|model}\\n{content}<end_of_turn>\\n, strictly alternating."""
    if _first_role(messages) == "system":
        raise TemplateError(SYSTEM_NOT_SUPPORTED)
    parts = [bos_token]
    for index, message in enumerate(messages):
        if (message.get("role") == "user") != (index % 2 == 0):
            raise TemplateError(ROLES_MUST_ALTERNATE)
        role = "model" if message["role"] == "assistant" else message["role"]
        parts.append(f"<start_of_turn>{role}\n{_text(message['content'])}<end_of_turn>\n")
    if add_generation_prompt:
        parts.append("<start_of_turn>model\n")
    return "".join(parts)


def _tojson(value) -> str:
    # transformers' `tojson` filter: json.dumps without ASCII escaping.
    return json.dumps(value, ensure_ascii=False)


def render_llama31(
    messages: list[dict],
    add_generation_prompt: bool = False,
    bos_token: str = "<|begin_of_text|>",
    date_string: str = LLAMA31_DEFAULT_DATE,
) -> str:
    """Llama-3.1 instruct: a system header with the knowledge cutoff and date, then one header per turn."""
    system_message = ""
    if _first_role(messages) == "system":
        system_message, messages = _text(messages[0]["content"]), messages[1:]
    parts = [
        bos_token,
        "<|start_header_id|>system<|end_header_id|>\n\n",
        f"Cutting Knowledge Date: {LLAMA31_KNOWLEDGE_CUTOFF}\n",
        f"Today Date: {date_string}\n\n",
        system_message,
        "<|eot_id|>",
    ]
    for message in messages:
        if "tool_calls" in message:
            raise TemplateError("tool_calls messages are rendered by the Jinja template only (pass --tokenizer)")
        if message.get("role") in ("tool", "ipython"):
            content = message["content"]
            # In Jinja a string is iterable too, so tool results are always written as JSON.
            body = _tojson(content) if isinstance(content, (str, list, dict, tuple)) else str(content)
            parts.append(f"<|start_header_id|>ipython<|end_header_id|>\n\n{body}<|eot_id|>")
        else:
            header = f"<|start_header_id|>{message['role']}<|end_header_id|>\n\n"
            parts.append(f"{header}{_text(message['content'])}<|eot_id|>")
    if add_generation_prompt:
        parts.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(parts)


def render_alpaca_ja(instruction: str, response: str = "", eos_token: str = "<eos>") -> str:
    """The LLM2024 SFT text: alpaca_prompt_jp with instruction and response, EOS only after a response."""
    text = ALPACA_PROMPT_JP.format(instruction, response)
    return text + eos_token if response else text


def alpaca_fields(messages: list[dict]) -> tuple[str, str]:
    """One user turn (the instruction) and optionally one assistant turn (the response)."""
    roles = [m.get("role") for m in messages]
    if roles not in (["user"], ["user", "assistant"]):
        raise TemplateError(f"alpaca-ja takes one user message and optionally one assistant message, got roles {roles}")
    return messages[0]["content"], messages[1]["content"] if len(messages) == 2 else ""


def render(
    fmt: str,
    messages: list[dict],
    add_generation_prompt: bool = False,
    bos_token: str | None = None,
    eos_token: str | None = None,
    date_string: str | None = None,
) -> str:
    """Render messages in one of FORMATS with the readable renderers (their own BOS/EOS unless given)."""
    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    bos = {"bos_token": bos_token} if bos_token else {}
    if fmt == "gemma2":
        return render_gemma2(messages, add_generation_prompt, **bos)
    if fmt == "llama3.1":
        return render_llama31(messages, add_generation_prompt, date_string=date_string or LLAMA31_DEFAULT_DATE, **bos)
    instruction, response = alpaca_fields(messages)
    return render_alpaca_ja(instruction, response, **({"eos_token": eos_token} if eos_token else {}))


def attach_chat_template(tokenizer, fmt: str = "gemma2") -> bool:
    """Give a tokenizer without a chat_template the format's template (seed 001 borrows gemma-2-9b's).

    Returns True when a template was attached, False when the tokenizer already had one (kept as is).
    """
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = {"gemma2": GEMMA2_CHAT_TEMPLATE, "llama3.1": llama31_chat_template()}[fmt]
    return True


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a rendered prompt with exactly one BOS at the start.

    A chat template already writes the BOS text; tokenizing that with special tokens on would add a
    second one. So the text is encoded without special tokens and BOS is put in front only if missing.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    return ids


def render_with_tokenizer(
    tokenizer, fmt: str, messages: list[dict], add_generation_prompt: bool = False, date_string: str | None = None
) -> str:
    """Render through the tokenizer's own Jinja chat_template (the format's template attached if it has none)."""
    import jinja2

    attach_chat_template(tokenizer, fmt)
    extra = {"date_string": date_string} if date_string else {}
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **extra
        )
    except (jinja2.TemplateError, ValueError) as error:  # ValueError: transformers' own checks (no messages)
        raise TemplateError(str(error)) from None
