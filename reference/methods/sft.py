"""Supervised fine-tuning data: records to token ids and labels, the collators that batch them, and NEFTune.

Follows seed 001 §2.2.2 (alpaca_prompt_jp, EOS after a non-empty response, max_seq_length 2048, no
packing) and the primer's base/instruct distinction (seed 004):

* ``loss_on="response"`` (instruction tuning): every token of the prompt carries label -100, so the
  loss is the cross-entropy over the response tokens alone:  L = -(1/|R|) sum_{t in R} log p(x_t | x_<t).
* ``loss_on="all"`` (base-model training, and what the seed's SFTTrainer with a text field does):
  every token after the first is a target.

The text is tokenized once, whole, exactly as it is trained on (so no merge differs from the seed's);
which tokens belong to the prompt is read off the tokenizer's character offsets: a token is a target
when it starts at or after the response's first character. Exactly one BOS starts every sequence
(reference.modeling.formats.encode_prompt); sequences longer than max_seq_length are cut at the end.

Batches (X11). Padded, as trl's SFTTrainer batches (the seed's `packing=False`): each record padded on the
right to the batch's longest, padding masked out and never a target. Padding-free (`[sft] padding_free`):
transformers' DataCollatorWithFlattening lays the batch's records end to end in one row of N = sum of their
lengths, position ids restarting at 0 for each record, no attention mask, and each record's first label -100 (no
record predicts the next one's first token). Only real tokens are computed, to the losses of the padded batch
(spec/test_padding_free.py). Attention must stay within each record: transformers builds that mask from the
position ids, for a model run without a KV cache (`use_cache=False`, as training runs here; with a cache the
records would see each other); reference.methods.padding_free runs it record by record in training steps.

NEFTune (C14) is the Trainer's own `neftune_noise_alpha`: in training mode it adds uniform noise
U(-1, 1) x alpha / sqrt(L x d) to the input embeddings (L positions in a batch row, d hidden size); evaluation
and generation see the embeddings unchanged. `neftune_bound` states that magnitude. A flattened row gets the
very noise its padded batch would get (reference.methods.padding_free).
"""

from __future__ import annotations

import copy
import math

from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

from reference.errors import InputError
from reference.modeling.formats import ALPACA_PROMPT_JP, FORMATS, render

IGNORE_INDEX = -100
LOSS_ON = ("response", "all")


def prompt_and_text(
    fmt: str, instruction: str, response: str, eos_token: str | None, bos_token: str | None = None
) -> tuple[str, str]:
    """(the prompt alone, the whole training text) in the record's format.

    alpaca-ja: the seed's text, EOS appended only after a non-empty response. Chat formats: the
    template's user turn plus the generation prompt, then the assistant turn as the template ends it
    (its end-of-turn token closes the response)."""
    if fmt == "alpaca-ja":
        prompt = ALPACA_PROMPT_JP.format(instruction, "")
        return prompt, render(
            fmt,
            [{"role": "user", "content": instruction}, {"role": "assistant", "content": response}],
            eos_token=eos_token,
        )
    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    user = [{"role": "user", "content": instruction}]
    prompt = render(fmt, user, add_generation_prompt=True, bos_token=bos_token)
    return prompt, render(fmt, user + [{"role": "assistant", "content": response}], bos_token=bos_token)


def encode_record(
    tokenizer, fmt: str, instruction: str, response: str, max_seq_length: int, loss_on: str = "response"
) -> dict[str, list[int]]:
    """input_ids, attention_mask and labels of one record (see the module docstring)."""
    if loss_on not in LOSS_ON:
        raise InputError(f"loss_on {loss_on!r}: choose one of {', '.join(LOSS_ON)}")
    prompt, text = prompt_and_text(fmt, instruction, response, tokenizer.eos_token, tokenizer.bos_token)
    if not text.startswith(prompt):
        raise InputError(f"format {fmt}: the prompt is not a prefix of the training text")
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):  # one BOS, as reference.modeling.formats.encode_prompt
        ids, offsets = [bos, *ids], [(0, 0), *offsets]
    if loss_on == "all":
        labels = list(ids)
        labels[0] = IGNORE_INDEX  # nothing predicts the first token
    else:
        labels = [
            token if start >= len(prompt) and end > start else IGNORE_INDEX
            for token, (start, end) in zip(ids, offsets, strict=True)
        ]
    ids, labels = ids[:max_seq_length], labels[:max_seq_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def collator(tokenizer, padding_free: bool = False) -> DataCollatorForSeq2Seq | DataCollatorWithFlattening:
    """Batches a list of encoded records: padded, or with `padding_free` end to end in one row (transformers'
    DataCollatorWithFlattening, the module docstring).

    Padded: transformers' DataCollatorForSeq2Seq, which pads input_ids with the tokenizer's pad token,
    attention_mask with 0 and labels with IGNORE_INDEX (so padding is masked out and never a target), each batch
    to its longest record.

    Always on the right, as trl's SFTTrainer pads, whatever side the tokenizer was saved with (Gemma-2's
    says left): the collator pads with a copy of the tokenizer set to the right, the caller's keeps its
    side. The tokenizer needs a pad token (training sets its EOS when it has none)."""
    if padding_free:
        return DataCollatorWithFlattening(separator_id=IGNORE_INDEX)
    right_padding = copy.copy(tokenizer)
    right_padding.padding_side = "right"
    return DataCollatorForSeq2Seq(right_padding, label_pad_token_id=IGNORE_INDEX)


def real_tokens(batch) -> int:
    """The tokens of a batch that belong to records: the attention mask's ones in a padded batch, every
    position of a flattened one (it holds no padding, and no mask)."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def neftune_bound(alpha: float, length: int, hidden: int) -> float:
    """The largest change NEFTune makes to one embedding value: alpha / sqrt(L x d)."""
    return alpha / math.sqrt(length * hidden)
