"""Generation as seed 001 §2.3 runs it: greedy decoding with a repetition penalty and banned words.

The seed's settings, the defaults here: at most 1024 new tokens, repetition_penalty 1.1 (1.2 made its
leaderboard score unstable), the KV cache on, and eight strings the model may not write (the ids of
each, encoded without special tokens, go to `bad_words_ids`). Only the new tokens are decoded,
without special tokens, and stripped; results are written as JSONL {"task_id", "output"} in UTF-8.

The repetition penalty (Keskar et al., 2019, as transformers implements it): for every token already
in the sequence, its logit l becomes l / p when l > 0 and l * p when l <= 0, so a seen token always
loses probability (`penalize_repetition` states it on a logits vector).

Batched generation pads on the left, so every prompt's last token sits at the same position and the
new tokens line up; greedy outputs then equal one-by-one generation's.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

BAD_WORDS = ("質問", "###", "#", "##", "---", "<h3>", "filepath", "> ")


@dataclass
class GenerationSettings:
    max_new_tokens: int = 1024
    """New tokens at most (seed: 1024)."""
    repetition_penalty: float = 1.1
    """Divide (positive) or multiply (negative) the logits of tokens already present (seed: 1.1)."""
    use_cache: bool = True
    """Reuse the keys and values of earlier positions (seed: True)."""
    do_sample: bool = False
    """Greedy decoding, as the seed (it sets no sampling)."""
    bad_words: tuple = field(default=BAD_WORDS)
    """Strings whose token sequences may not be generated (seed: eight)."""
    batch_size: int = 1
    """Prompts per generate call; above 1 they are left-padded."""


def penalize_repetition(logits, seen_ids, penalty: float):
    """The repetition penalty on one logits vector: seen tokens' logits / p if positive, * p otherwise."""
    import torch

    out = logits.clone()
    seen = torch.as_tensor(sorted(set(int(i) for i in seen_ids)), dtype=torch.long)
    values = out[seen]
    out[seen] = torch.where(values > 0, values / penalty, values * penalty)
    return out


def bad_words_ids(tokenizer, words=BAD_WORDS) -> list[list[int]]:
    """Each word's ids without special tokens, as the seed passes them to generate()."""
    return [tokenizer.encode(word, add_special_tokens=False) for word in words]


def generate(model, tokenizer, prompts: list[str], settings: GenerationSettings, progress=None) -> list[str]:
    """The new text for each prompt (decoded without special tokens, stripped), in order."""
    import torch

    device = next(model.parameters()).device
    banned = bad_words_ids(tokenizer, settings.bad_words)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    outputs = []
    model.eval()
    for start in range(0, len(prompts), settings.batch_size):
        chunk = prompts[start : start + settings.batch_size]
        tokenizer.padding_side = "left"
        inputs = tokenizer(chunk, return_tensors="pt", padding=True).to(device)  # BOS added, as the seed's call
        with torch.no_grad():
            generated = model.generate(
                **inputs,
                max_new_tokens=settings.max_new_tokens,
                repetition_penalty=settings.repetition_penalty,
                use_cache=settings.use_cache,
                do_sample=settings.do_sample,
                bad_words_ids=banned or None,
                pad_token_id=tokenizer.pad_token_id,
            )
        new = generated[:, inputs["input_ids"].shape[1] :]
        outputs += [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]
        if progress is not None:
            progress(len(chunk))
    return outputs


def write_outputs(path: str | Path, outputs: list[str], task_ids: list | None = None) -> None:
    """JSONL {"task_id": i, "output": text}, UTF-8 and not ASCII-escaped (the seed's output.jsonl)."""
    from reference.paths import write_text_atomic

    rows = [{"task_id": task_ids[i] if task_ids else i, "output": text} for i, text in enumerate(outputs)]
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def settings_record(settings: GenerationSettings) -> dict:
    return asdict(settings)
