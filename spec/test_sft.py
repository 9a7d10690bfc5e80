"""Training data for SFT (reference/sft.py): labels, BOS/EOS, truncation, padding and NEFTune."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reference import sft
from reference.formats import ALPACA_PROMPT_JP
from reference.sft import IGNORE_INDEX, Collator, encode_record

INSTRUCTION = "日本の首都はどこですか。"
RESPONSE = "日本の首都は東京です。"


@pytest.mark.claim("P3", "C11")
def test_instruction_tuning_labels_only_the_response_tokens(gemma_tokenizer):
    """Prompt tokens carry -100; the targets, decoded, are exactly the response followed by <eos>."""
    row = encode_record(gemma_tokenizer, "alpaca-ja", INSTRUCTION, RESPONSE, 2048, loss_on="response")
    targets = [t for t in row["labels"] if t != IGNORE_INDEX]
    assert gemma_tokenizer.decode(targets) == RESPONSE + "<eos>"
    assert gemma_tokenizer.decode(row["input_ids"]) == "<bos>" + ALPACA_PROMPT_JP.format(INSTRUCTION, RESPONSE) + "<eos>"
    first = row["labels"].index(targets[0])
    assert all(t == IGNORE_INDEX for t in row["labels"][:first])


@pytest.mark.claim("P3")
def test_the_loss_is_the_cross_entropy_over_response_tokens_alone(gemma_tokenizer, tiny_gemma2):
    """By hand: log-softmax of the logits at position t-1 scored against token t, averaged over the
    response positions only, equals the model's loss with the -100 labels."""
    row = encode_record(gemma_tokenizer, "alpaca-ja", INSTRUCTION, RESPONSE, 2048)
    ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
    with torch.no_grad():
        output = tiny_gemma2(input_ids=ids, labels=labels)
    log_probs = F.log_softmax(output.logits[0].float(), dim=-1)
    response_positions = [t for t in range(1, ids.shape[1]) if row["labels"][t] != IGNORE_INDEX]
    by_hand = -sum(log_probs[t - 1, ids[0, t]] for t in response_positions) / len(response_positions)
    assert output.loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    everything = -sum(log_probs[t - 1, ids[0, t]] for t in range(1, ids.shape[1])) / (ids.shape[1] - 1)
    assert output.loss.item() != pytest.approx(everything.item(), rel=1e-3)  # the prompt really is left out


@pytest.mark.claim("P1", "P3")
def test_base_model_training_predicts_every_token(gemma_tokenizer):
    """loss_on=all: labels are the inputs (the model shifts them by one), only the first token has no
    predecessor. The fixture tokenizer writes 「…学習させたもの」 as 学習|させ|た|もの, so the token
    「もの」 is a target predicted from 「…学習させた」 (the primer's 「の」 after 「…学習させたも」)."""
    text = "機械学習させたもの"
    row = encode_record(gemma_tokenizer, "alpaca-ja", text, "", 2048, loss_on="all")
    assert row["labels"][0] == IGNORE_INDEX and row["labels"][1:] == row["input_ids"][1:]
    tokens = [gemma_tokenizer.decode([i]) for i in row["input_ids"]]
    at = tokens.index("もの")
    assert tokens[at - 3:at] == ["学習", "させ", "た"] and row["labels"][at] == row["input_ids"][at]


@pytest.mark.claim("P11", "C11")
def test_one_bos_and_eos_only_after_a_non_empty_response(gemma_tokenizer):
    bos, eos = gemma_tokenizer.bos_token_id, gemma_tokenizer.eos_token_id
    with_response = encode_record(gemma_tokenizer, "alpaca-ja", INSTRUCTION, RESPONSE, 2048)
    empty = encode_record(gemma_tokenizer, "alpaca-ja", INSTRUCTION, "", 2048)
    assert with_response["input_ids"].count(bos) == 1 and with_response["input_ids"][0] == bos
    assert with_response["input_ids"][-1] == eos and eos not in empty["input_ids"]
    assert all(t == IGNORE_INDEX for t in empty["labels"])  # nothing to learn from an empty response


@pytest.mark.claim("P11", "P4")
def test_a_chat_format_record_has_one_bos_and_the_response_ends_with_the_turn_end(gemma_tokenizer):
    """gemma2: the rendered text already writes <bos>; encoding it again must not add a second."""
    row = encode_record(gemma_tokenizer, "gemma2", INSTRUCTION, RESPONSE, 2048)
    assert row["input_ids"].count(gemma_tokenizer.bos_token_id) == 1
    targets = gemma_tokenizer.decode([t for t in row["labels"] if t != IGNORE_INDEX])
    assert targets == RESPONSE + "<end_of_turn>\n"


def test_records_are_cut_at_max_seq_length(gemma_tokenizer):
    whole = encode_record(gemma_tokenizer, "alpaca-ja", INSTRUCTION, RESPONSE * 20, 4096)
    cut = encode_record(gemma_tokenizer, "alpaca-ja", INSTRUCTION, RESPONSE * 20, 32)
    assert len(cut["input_ids"]) == 32 < len(whole["input_ids"]) and cut["input_ids"] == whole["input_ids"][:32]
    assert cut["labels"] == whole["labels"][:32]


def test_padding_is_masked_and_never_a_target():
    batch = Collator(pad_token_id=0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5], "labels": [-100]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]


@pytest.mark.claim("C14")
def test_neftune_adds_bounded_uniform_noise_to_embeddings_in_training_only(tiny_gemma2, tmp_path):
    """The Trainer's neftune_noise_alpha=5 hook on the real model's embedding layer: in training mode
    every value moves by at most alpha/sqrt(L*d) = 5/sqrt(16*64) = 0.15625, and the noise fills that
    range (uniform); in eval mode the embeddings are exactly what the layer gives without the hook
    (Gemma's layer scales its rows by sqrt(d)). After training the Trainer removes the hook.
    Learning rate 0 keeps the weights fixed, so every forward pass can be compared with the same clean output."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    assert sft.neftune_bound(5, 16, 64) == 5 / 32
    args = TrainingArguments(output_dir=str(tmp_path), neftune_noise_alpha=5, max_steps=1, report_to="none", learning_rate=0.0,
                             per_device_train_batch_size=1, use_cpu=True, save_strategy="no", disable_tqdm=True)
    ids = torch.randint(3, 2000, (1, 16), generator=torch.Generator().manual_seed(0))
    embedding = tiny_gemma2.get_input_embeddings()
    with torch.no_grad():
        clean = embedding(ids)
    seen = []
    record = lambda module, inputs, output: seen.append((module.training, output.detach().clone()))  # noqa: E731

    class AfterNeftune(TrainerCallback):  # train() adds NEFTune's hook first; ours then sees its output
        def on_train_begin(self, *args, **kwargs):
            self.handle = embedding.register_forward_hook(record)

    trainer = Trainer(model=tiny_gemma2, args=args, train_dataset=[{"input_ids": ids[0], "labels": ids[0]}],
                      callbacks=[AfterNeftune()])
    trainer.train()
    embedding.register_forward_hook(record)
    training, noisy = seen[0]
    bound = sft.neftune_bound(5, 16, 64)
    change = (noisy - clean).abs()
    assert training and 0 < change.max() <= bound + 1e-6 and change.max() > 0.9 * bound
    assert change.mean() == pytest.approx(bound / 2, rel=0.1)  # |U(-b, b)| has mean b/2

    tiny_gemma2.eval()
    seen.clear()
    with torch.no_grad():
        tiny_gemma2(input_ids=ids)
    assert seen[0][0] is False and torch.equal(seen[0][1], clean)
    tiny_gemma2.train()
    seen.clear()
    with torch.no_grad():
        tiny_gemma2(input_ids=ids)
    assert torch.equal(seen[0][1], clean)  # the hook is gone once train() returns
