"""What a padding-free training step needs beyond its collator (X11): attention record by record, and the NEFTune
noise the padded batch would get.

A padding-free batch is one row of N tokens, its records laid end to end with position ids restarting at 0 for
each and no attention mask (reference.methods.sft.collator). Flash-attention runs such a row as variable-length
sequences (transformers passes it the records' bounds); eager and sdpa attention, the CPU's, score the whole row against
itself, N x N, behind a mask that cuts what crosses a record's edge (masking_utils.find_packed_sequence_indices):
their cost grows with N^2 where the records need only the sum of their own squares, 4x on a batch of 4 records of
equal length, so most of what leaving out the padding saves is spent again. `attention` lays the row's records out
as a (records x longest) grid for attention alone (an index gather, no copy of the row's other tensors), runs the
model's own eager attention once over the grid (Gemma-2's logit soft-capping included) behind each record's causal
mask, its padding cut off and Gemma-2's sliding window counted from its first token, and gathers the real
positions back into the row; the projections, MLPs and loss still run on the row's N real tokens. It gives each
record what its padded batch gives it, to fp32 rounding. One call per layer, not one per record: the record loop
this replaces spent more in per-operation overhead than it saved. On the fixture model's batches (`bench`: 18% of a
padded batch is padding) the loop ran at 0.81x the padded step's real tokens/s in bf16 and 0.94x with bf16=false,
the grid at 0.93x and 1.03x; the more padding a batch holds, the more the grid gains. Grid and mask are made once per
row and reused by every layer.

NEFTune (C14): the Trainer's hook draws U(-1, 1) x alpha / sqrt(L x d) for every position of the batch's rows, L
their length: the longest record in a padded batch, N in a flattened row, so a flattened row would get other
noise, and less of it. For a flattened row `padded_noise` draws the padded batch's noise instead (records x
longest x d, in the same order from the same generator) and adds each record's part to its tokens: the same
numbers the padded batch's real tokens get, so padded and padding-free steps stay equal with NEFTune on.

`flattened_step` does both for one training step (reference.methods.train.StepTrainer). Not handled: a KV cache (the
records are found from position ids, so generation never runs this way), attention-weight outputs, and the same
dropout draws as the padded batch (attention dropout is 0 in the models here).
"""

from __future__ import annotations

import functools
import sys
from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.integrations.neftune import neftune_post_forward_hook
from transformers.masking_utils import AttentionMaskInterface

NAME = "record_by_record"
VARIABLE_LENGTH = ("flash_attention_2", "flash_attention_3", "flash_attention_4")
"""Attention implementations that already run a flattened row record by record."""


def record_bounds(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each record in a flattened row: a record starts where its position id is 0."""
    starts = (position_ids.flatten() == 0).nonzero().flatten().tolist()
    return list(zip(starts, starts[1:] + [position_ids.numel()], strict=True))


def padded_noise(alpha: float, bounds: list[tuple[int, int]]):
    """A forward hook for the input embeddings of a flattened row: in training, each record's tokens get the NEFTune
    noise they would get in the padded batch (the Trainer's hook, neftune_post_forward_hook, on records x longest)."""
    longest = max(end - start for start, end in bounds)

    def hook(module, args, output):
        if not module.training:
            return output
        bound = alpha / torch.sqrt(torch.tensor(longest * output.size(2)))  # as the Trainer's hook computes it
        noise = torch.zeros(len(bounds), longest, output.size(2), dtype=output.dtype, device=output.device)
        noise.uniform_(-bound, bound)
        return output + torch.cat([noise[i, : end - start] for i, (start, end) in enumerate(bounds)])[None]

    return hook


@functools.lru_cache(maxsize=16)
def layout(bounds: tuple[tuple[int, int], ...], sliding_window: int | None, dtype: torch.dtype, device):
    """(gather, scatter, mask, longest) for a flattened row with records at `bounds`: row position gather[i] fills
    cell i of the (records x longest) grid, grid cell scatter[j] holds the row's j-th token, and mask is the grid's
    additive mask (1, 1, longest, longest): query q sees key k when k <= q (and q - k < sliding_window). A record's
    padding cells (filled from position 0) come after its tokens, so no real token sees them, and their outputs are
    never gathered back."""
    longest = max(end - start for start, end in bounds)
    column = torch.arange(longest, device=device)
    lengths = torch.tensor([end - start for start, end in bounds], device=device)
    starts = torch.tensor([start for start, _ in bounds], device=device)
    real = column[None, :] < lengths[:, None]
    gather = torch.where(real, starts[:, None] + column[None, :], 0).flatten()
    scatter = real.flatten().nonzero().flatten()
    q, k = column[:, None], column[None, :]
    seen = (k <= q) if sliding_window is None else (k <= q) & (q - k < sliding_window)
    mask = torch.zeros(seen.shape, dtype=dtype, device=device).masked_fill(~seen, torch.finfo(dtype).min)
    return gather, scatter, mask[None, None], longest


def attention(module, query, key, value, attention_mask, position_ids=None, sliding_window=None, **kwargs):
    """An attention function (transformers' AttentionInterface) for one flattened row: query, key and value are
    (1, heads, N, head_dim); the model's eager attention runs once over the records' grid (the module docstring)."""
    if position_ids is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        raise ValueError(f"{NAME} attention runs one flattened row with its position ids and no cache")
    eager = sys.modules[type(module).__module__].eager_attention_forward  # the model's own (Gemma-2's soft-caps)
    bounds = tuple(record_bounds(position_ids))
    gather, scatter, mask, longest = layout(bounds, sliding_window, query.dtype, query.device)
    grid = [
        states[0].index_select(1, gather).unflatten(1, (len(bounds), longest)).transpose(0, 1)  # (records, heads, ...)
        for states in (query, key, value)
    ]
    output = eager(module, *grid, mask, **kwargs)[0]  # (records, longest, heads, head_dim)
    return output.flatten(0, 1).index_select(0, scatter)[None], None  # (1, N, heads, head_dim), as eager returns it


AttentionInterface.register(NAME, attention)
AttentionMaskInterface.register(NAME, lambda *args, **kwargs: None)  # each record's mask is made in `attention`


@contextmanager
def record_by_record(model):
    """The model's attention record by record for the with-block, unless it already runs variable lengths."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a peft wrapper
    original = base.config._attn_implementation
    if original not in VARIABLE_LENGTH:
        base.set_attn_implementation(NAME)
    try:
        yield
    finally:
        base.set_attn_implementation(original)


@contextmanager
def padded_neftune(trainer, embeddings, bounds: list[tuple[int, int]]):
    """The padded batch's NEFTune noise on `embeddings` for the with-block, in place of the Trainer's hook
    (`trainer.neftune_hook_handle`, put back afterwards: the Trainer removes it when training ends); nothing when
    NEFTune is off."""
    if trainer.neftune_noise_alpha is None:
        yield
        return
    trainer.neftune_hook_handle.remove()
    noise = embeddings.register_forward_hook(padded_noise(trainer.neftune_noise_alpha, bounds))
    try:
        yield
    finally:
        noise.remove()
        trainer.neftune_hook_handle = embeddings.register_forward_hook(neftune_post_forward_hook)


@contextmanager
def flattened_step(trainer, model, position_ids: torch.Tensor):
    """One training step of `trainer` on a flattened row: attention record by record, the padded batch's noise."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a peft wrapper
    with record_by_record(base), padded_neftune(trainer, base.get_input_embeddings(), record_bounds(position_ids)):
        yield
