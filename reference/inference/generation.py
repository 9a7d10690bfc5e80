"""Answering tasks as seed 001 §2.3 does: a model (with its adapter) loaded for inference, retrieved
few-shot prompts (reference/inference/retrieval.py), then greedy decoding with a repetition penalty and banned words.

The seed's decoding, as transformers' `GenerationConfig` (`seed_generation_config`): at most 1024 new
tokens, repetition_penalty 1.1 (1.2 made its leaderboard score unstable), greedy, the KV cache on, and
eight strings the model may not write (the ids of each, encoded without special tokens, go to
`bad_words_ids`). Only the new tokens are decoded, without special tokens, and stripped; results are
written as JSONL {"task_id", "output"} in UTF-8.

The repetition penalty (Keskar et al., 2019, as transformers implements it): for every token already
in the sequence, its logit l becomes l / p when l > 0 and l * p when l <= 0, so a seen token always
loses probability (`penalize_repetition` states it on a logits vector).

Batched generation (`batch_size` > 1; the seed answers one task at a time) sorts the prompts by length,
so a batch holds prompts of similar length, and pads them on the left, so every prompt's last token sits
at the same position and the new tokens line up. The attention mask hides the padding from the model,
and transformers' repetition penalty skips it too (it would otherwise count a pad token, the end of
sequence when the tokenizer has no pad token of its own, as seen). Greedy outputs then equal one-by-one
generation's, in the prompts' order.

The tokenizer for an adapter is the adapter's own when its directory holds one (train saves it there,
with any tokens it added), else the base model's (the rule lives in reference/modeling/lora.py).

torch, transformers and the modules that load them are imported inside the functions: the command line
reads MAX_NEW_TOKENS here while it builds its parser, and `steps`, `render` and `filter` never load torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from reference.errors import InputError
from reference.inference import retrieval
from reference.modeling import vocab
from reference.paths import write_text_atomic

if TYPE_CHECKING:
    from transformers import GenerationConfig

BAD_WORDS = ("質問", "###", "#", "##", "---", "<h3>", "filepath", "> ")
MAX_NEW_TOKENS = 1024
REPETITION_PENALTY = 1.1


def seed_generation_config(tokenizer, max_new_tokens: int = MAX_NEW_TOKENS, bad_words=BAD_WORDS) -> GenerationConfig:
    """The seed's settings for `tokenizer`: greedy, repetition penalty 1.1, KV cache, the banned words' ids.

    Finished rows of a batch are filled with the pad token (the end-of-sequence token when there is none)."""
    from transformers import GenerationConfig

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        repetition_penalty=REPETITION_PENALTY,
        do_sample=False,
        use_cache=True,
        bad_words_ids=bad_words_ids(tokenizer, bad_words) or None,
        pad_token_id=pad,
    )


def bad_words_ids(tokenizer, words=BAD_WORDS) -> list[list[int]]:
    """Each word's ids without special tokens, as the seed passes them to generate()."""
    return [tokenizer.encode(word, add_special_tokens=False) for word in words]


def settings_record(config: GenerationConfig, batch_size: int = 1, tokenizer=None) -> dict:
    """What a run used, for its report: the settings that differ from transformers' defaults, and the batch size;
    with the tokenizer, the banned words and the pad token as text beside their ids."""
    settings = {k: v for k, v in config.to_diff_dict().items() if k != "transformers_version"}
    if tokenizer is not None:
        words = [tokenizer.decode(ids) for ids in settings.get("bad_words_ids") or []]
        settings.update(bad_words=words, pad_token=tokenizer.convert_ids_to_tokens(config.pad_token_id))
    return {**settings, "batch_size": batch_size}


def penalize_repetition(logits, seen_ids, penalty: float):
    """The repetition penalty on one logits vector: seen tokens' logits / p if positive, * p otherwise."""
    import torch

    out = logits.clone()
    seen = torch.as_tensor(sorted(set(int(i) for i in seen_ids)), dtype=torch.long)
    values = out[seen]
    out[seen] = torch.where(values > 0, values / penalty, values * penalty)
    return out


def load_for_inference(
    model_dir: str | Path,
    adapter_dir: str | Path | None = None,
    dtype: str = "float32",
    quantization: str = "none",
    quantization_section: dict | None = None,
):
    """(model, tokenizer) for generation: the base from a local directory (reference/modeling/models.py), the
    adapter on it frozen (peft's is_trainable=False), the model in eval mode, and the tokenizer
    `lora.load_tokenizer` chooses (the adapter's own when it saved one, else the base's). The tokenizer and the
    adapter's files are checked before the model loads: a tokenizer larger than the embeddings, or an adapter
    file cut short, is named at once."""
    from reference.modeling import lora, models

    models.require_model_dir(model_dir)  # first: a missing model is named as such
    tokenizer = lora.load_tokenizer(model_dir, adapter_dir)
    lora.check_adapter_files(adapter_dir)
    model, _ = models.load_causal_lm(
        model_dir, dtype=dtype, quantization=quantization, quantization_section=quantization_section
    )
    if adapter_dir is not None:
        model = lora.load_adapter(model, adapter_dir, trainable=False)
    return model.eval(), tokenizer


def generate(model, tokenizer, prompts: list[str], config=None, batch_size: int = 1, progress=None) -> list[str]:
    """The new text for each prompt (decoded without special tokens, stripped), in the prompts' order.

    `config` defaults to `seed_generation_config(tokenizer)`; `progress`, if given, is called with the
    number of prompts each batch finished."""
    import torch

    config = config or seed_generation_config(tokenizer)
    vocab.pad_with_eos(tokenizer)
    device = next(model.parameters()).device
    encoded = [tokenizer(prompt)["input_ids"] for prompt in prompts]  # BOS added, as the seed's call
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    outputs = [""] * len(prompts)
    model.eval()
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = tokenizer.pad({"input_ids": [encoded[i] for i in rows]}, padding_side="left", return_tensors="pt")
        with torch.no_grad():
            generated = model.generate(**batch.to(device), generation_config=config)
        new = generated[:, batch["input_ids"].shape[1] :]
        for i, row in zip(rows, new, strict=True):
            outputs[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
        if progress is not None:
            progress(len(rows))
    return outputs


def read_tasks(path: str | Path, with_lines: bool = False, columns: dict | None = None) -> list:
    """Tasks: JSONL rows with a non-empty 'input' and, optionally, a 'task_id'; with `with_lines`, (line
    number, row) pairs, so that a message can name the line of a task (`task_names`). `columns` names the file's
    columns for input and task_id (reference.records.data.parse_columns)."""
    from reference.records.data import read_text_rows

    columns = columns or {}
    rows = read_text_rows(path, ("input",), with_lines=True, columns={"input": columns.get("input", "input")})
    id_column = columns.get("task_id")
    for _, row in rows if id_column else ():  # the named column is the task's id, and no other is
        row.pop("task_id", None)
        if id_column in row:
            row["task_id"] = row[id_column]
    return rows if with_lines else [row for _, row in rows]


def task_names(tasks: list[dict], path: str | Path | None = None, lines: list[int] | None = None) -> list[str]:
    """How messages name each task: its task_id (its position from 0 when it has none) and where it is,
    the file and line when read from one (`read_tasks(..., with_lines=True)`), else its place in the list."""
    names = []
    for number, task in enumerate(tasks):
        where = f"{path}, line {lines[number]}" if path is not None and lines is not None else f"number {number}"
        names.append(
            f"task_id {task['task_id']!r} ({where})" if "task_id" in task else f"task {number} (no task_id; {where})"
        )
    return names


def context_length(model) -> int | None:
    """The longest sequence the model was made for (its config's max_position_embeddings), if it says."""
    length = getattr(model.config, "max_position_embeddings", None)
    return length if isinstance(length, int) and length > 0 else None


def prompt_room(model, config) -> int | None:
    """Tokens a prompt may take so that its answer (up to config.max_new_tokens) still fits the model's context;
    None when the model states no context. An answer as long as the whole context is an error."""
    context = context_length(model)
    if context is None:
        return None
    room = context - (config.max_new_tokens or 0)
    if room <= 0:
        raise InputError(
            f"--max-new-tokens {config.max_new_tokens}: the answer alone would fill the model's context of "
            f"{context} tokens (its max_position_embeddings), leaving no room for a prompt"
        )
    return room


@dataclass
class Answers:
    """The tasks answered, in the tasks' order."""

    task_ids: list
    """Each task's task_id, or its position (from 0) when it has none."""
    outputs: list[str]
    prompt_tokens: list[int]
    """Tokens of each task's prompt, BOS included, after the least similar shots that did not fit were dropped."""


def answer_tasks(
    model,
    tokenizer,
    tasks: list[dict],
    shots: list[tuple[str, str]],
    embedder: str | Path,
    config=None,
    k: int = retrieval.DEFAULT_K,
    window: int = retrieval.DEFAULT_WINDOW,
    batch_size: int = 1,
    say=print,
    progress=None,
    names: list[str] | None = None,
) -> Answers:
    """Seed 001 §2.3 over `tasks` (rows with 'input', optionally 'task_id'; `read_tasks`): each task's k
    examples of `shots` ((input, output) pairs; `retrieval.read_shots`; none: zero-shot, the seed's prompt with no
    examples and no embedder) whose inputs are the most similar,
    embedded with the local sentence-transformers model `embedder`, make its prompt, fitted to `window`
    tokens and to what the model's context leaves beside the answer (`prompt_room`) when that is shorter (a
    task that lost shots is reported through `say`); then `generate` with `config` (default: the seed's
    settings), `batch_size` prompts at a time. A task that does not fit alone is refused before anything is
    generated, named by `names` (default `task_names(tasks)`: its task_id and place), with its length and the limit
    it passes."""
    names = names if names is not None else task_names(tasks)
    config = config or seed_generation_config(tokenizer)
    room = prompt_room(model, config)
    inputs = [t["input"] for t in tasks]
    if shots:
        pool = retrieval.ShotPool(shots, retrieval.load_embedder(embedder))
        fitted = retrieval.fitted_prompts(inputs, pool, tokenizer, k, window, say, names, room)
    else:  # zero-shot: the seed's prompt with no examples
        fitted = [
            retrieval.fit([], task, tokenizer, window, name, room) for task, name in zip(inputs, names, strict=True)
        ]
    outputs = generate(model, tokenizer, [f.prompt for f in fitted], config, batch_size, progress)
    task_ids = [task.get("task_id", number) for number, task in enumerate(tasks)]
    return Answers(task_ids, outputs, [f.tokens for f in fitted])


def write_outputs(path: str | Path, outputs: list[str], task_ids: list | None = None) -> None:
    """JSONL {"task_id": i, "output": text}, UTF-8 and not ASCII-escaped (the seed's output.jsonl)."""
    rows = [{"task_id": task_ids[i] if task_ids else i, "output": text} for i, text in enumerate(outputs)]
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
