"""Vocabulary: training a tokenizer, loading one from a directory, registering special tokens.

The primer (seed 004 §4) says the tokenizer is trained before the model and fixes the vocabulary, and
that a new marker such as ``<user_name>`` must be registered or the tokenizer splits it into pieces.
Registering a token adds one id; the model's embedding matrix (and a tied LM head, which is the same
tensor) then grows by one row per new token, each new row set to the mean of the old rows so the new
token starts at the "average" token rather than at noise (Hewitt, 2021).

The fixture tokenizer is byte-level BPE (as Llama-3's; Gemma's is SentencePiece BPE with byte fallback):
every string encodes without an unknown token. Training is deterministic for a fixed corpus.
"""

from __future__ import annotations

from pathlib import Path

from reference.errors import InputError
from reference.paths import complete_directory

GEMMA2_SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]


def train_bpe(corpus_files: list[str | Path], vocab_size: int):
    """Train a byte-level BPE `tokenizers.Tokenizer` whose first ids are the Gemma-2 then Llama-3 specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=GEMMA2_SPECIAL_TOKENS + LLAMA3_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(f) for f in corpus_files], trainer)
    return tokenizer


def pad_with_eos(tokenizer):
    """The tokenizer, padding with its EOS token when it has no pad token (as the seed and trl do: Llama-3.1's has
    none); returned for chaining. Padding positions are masked out, so which token pads does not change a result."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(path: str | Path):
    """A tokenizer from a local directory; never from a hub, never running remote code."""
    directory = Path(path)
    if not directory.is_dir():
        raise InputError(f"tokenizer {path!s}: not a local directory (no model hub is used; download it first)")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise InputError(f"tokenizer {path!s}: cannot be loaded: {error}") from None


def pieces(tokenizer, text: str) -> list[str]:
    """How the tokenizer splits text, without special tokens added around it."""
    return tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False)["input_ids"])


def register_tokens(tokenizer, model, tokens: list[str]) -> dict:
    """Add `tokens` as special tokens and grow the model's embeddings, new rows = mean of the old rows.

    Returns what changed: the new ids, how each token split before, and the vocabulary sizes.
    """
    import torch

    before = {token: pieces(tokenizer, token) for token in tokens}
    old_len = len(tokenizer)
    added = tokenizer.add_tokens(tokens, special_tokens=True)
    new_ids = {token: tokenizer.convert_tokens_to_ids(token) for token in tokens}
    fresh = sorted({i for i in new_ids.values() if i >= old_len})

    embeddings = model.get_input_embeddings()
    old_rows = embeddings.weight.shape[0]
    rows = max(old_rows, len(tokenizer))
    if fresh:
        old_mean = embeddings.weight.detach()[:old_len].mean(dim=0)
        head = model.get_output_embeddings()
        tied = head is not None and head.weight is embeddings.weight
        head_mean = None if head is None or tied else head.weight.detach()[:old_len].mean(dim=0)
        model.resize_token_embeddings(rows, mean_resizing=False)
        with torch.no_grad():
            model.get_input_embeddings().weight[fresh] = old_mean
            if head_mean is not None:
                model.get_output_embeddings().weight[fresh] = head_mean
    head = model.get_output_embeddings()
    return {
        "added": added,
        "token_ids": new_ids,
        "pieces_before": before,
        "tokenizer_size": {"before": old_len, "after": len(tokenizer)},
        "embedding_rows": {"before": old_rows, "after": model.get_input_embeddings().weight.shape[0]},
        "tied_lm_head": head is not None and head.weight is model.get_input_embeddings().weight,
    }


def add_special_tokens(model_dir: str, tokens: list[str], output_dir: str) -> dict:
    """CLI `add-tokens`: register tokens in a local model + tokenizer and save both (safetensors)."""
    from reference.modeling.models import load_causal_lm, require_model_dir

    require_model_dir(model_dir)
    for token in tokens:
        if not token or token != token.strip():
            raise InputError(f"--tokens: {token!r} is empty or has surrounding whitespace")
    tokenizer = load_tokenizer(model_dir)
    model, _ = load_causal_lm(model_dir)
    report = register_tokens(tokenizer, model, tokens)
    out = Path(output_dir)
    with complete_directory(out) as partial:
        model.save_pretrained(partial, safe_serialization=True)
        tokenizer.save_pretrained(partial)
    report["output"] = str(out)
    return report
