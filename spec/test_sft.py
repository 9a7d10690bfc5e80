"""Training data for SFT (reference/methods/sft.py): labels, BOS/EOS, truncation, padding and NEFTune.

Expected values come from outside reference/: the alpaca text written out by hand (seed 001 §2.2.2), the
model's own loss against a cross-entropy summed by hand, the Trainer's NEFTune hook, trl's collator, padded
batches worked out by hand.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reference.errors import InputError
from reference.methods import sft
from reference.methods.sft import encode_record
from reference.settings.recipes import load_recipe

INSTRUCTION = "日本の首都はどこですか。"
RESPONSE = "日本の首都は東京です。"
IGNORED = -100  # the label torch's cross-entropy (and so every transformers loss) skips

ALPACA_PROMPT_BY_HAND = (
    "\nあなたは高性能なAIです。質問に対して、適切な回答を書きなさい。\n"
    "回答に関係のないことは絶対に書かないでください。\n\n"
    "### 質問:\n{}\n\n### 回答:\n{}"
)


def targets(row) -> list[int]:
    return [t for t in row["labels"] if t != IGNORED]


def loss_by_hand(model, ids: list[int], positions: list[int]) -> float:
    """-(1/|T|) sum_{t in T} log softmax(logits[t-1])[ids[t]]: each token scored by the logits one step before it."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    log_probs = F.log_softmax(logits, dim=-1)
    return (-sum(log_probs[t - 1, ids[t]] for t in positions) / len(positions)).item()


def model_loss(model, row) -> float:
    with torch.no_grad():
        return model(input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]])).loss.item()


def test_the_ignored_label_is_the_one_the_loss_skips():
    assert sft.IGNORE_INDEX == IGNORED == torch.nn.CrossEntropyLoss().ignore_index


@pytest.mark.claim("P3", "C11")
def test_instruction_tuning_labels_only_the_response_tokens(gemma_tokenizer):
    """The input is <bos> + the seed's text + <eos>; prompt tokens carry -100 and the targets, decoded,
    are exactly the response followed by <eos>; every label from the first target on is the input token."""
    row = encode_record(gemma_tokenizer, "alpaca-ja", INSTRUCTION, RESPONSE, 2048, loss_on="response")
    text = ALPACA_PROMPT_BY_HAND.format(INSTRUCTION, RESPONSE)
    assert gemma_tokenizer.decode(row["input_ids"]) == "<bos>" + text + "<eos>"
    assert gemma_tokenizer.decode(targets(row)) == RESPONSE + "<eos>"
    prompt = ALPACA_PROMPT_BY_HAND.format(INSTRUCTION, "")
    prompt_length = len(gemma_tokenizer(prompt, add_special_tokens=False)["input_ids"])
    first = prompt_length + 1  # after <bos> and the prompt (the prompt ends in "\n", which no merge crosses here)
    assert row["labels"][:first] == [IGNORED] * first
    assert row["labels"][first:] == row["input_ids"][first:]
    assert row["attention_mask"] == [1] * len(row["input_ids"])


@pytest.mark.claim("P3")
def test_the_loss_is_the_cross_entropy_over_response_tokens_alone(gemma_tokenizer, tiny_gemma2):
    """By hand: log-softmax of the logits at position t-1 scored against token t, averaged over the
    response positions only, equals the model's loss with the -100 labels; averaging over every position
    gives another number (the prompt really is left out)."""
    row = encode_record(gemma_tokenizer, "alpaca-ja", INSTRUCTION, RESPONSE, 2048)
    ids = row["input_ids"]
    response_positions = [t for t in range(len(ids)) if row["labels"][t] != IGNORED]
    assert len(response_positions) == len(gemma_tokenizer(RESPONSE + "<eos>", add_special_tokens=False)["input_ids"])
    loss = model_loss(tiny_gemma2, row)
    assert loss == pytest.approx(loss_by_hand(tiny_gemma2, ids, response_positions), rel=1e-5)
    assert loss != pytest.approx(loss_by_hand(tiny_gemma2, ids, list(range(1, len(ids)))), rel=1e-3)


@pytest.mark.claim("P1", "P3")
def test_base_model_training_predicts_every_token(gemma_tokenizer):
    """loss_on=all: labels are the inputs (the model shifts them by one), only the first token has no
    predecessor. The fixture tokenizer writes 「…学習させたもの」 as 学習|させ|た|もの, so the token
    「もの」 is a target predicted from 「…学習させた」 (the primer's 「の」 after 「…学習させたも」)."""
    text = "機械学習させたもの"
    row = encode_record(gemma_tokenizer, "alpaca-ja", text, "", 2048, loss_on="all")
    assert row["labels"] == [IGNORED, *row["input_ids"][1:]]
    tokens = [gemma_tokenizer.decode([i]) for i in row["input_ids"]]
    at = tokens.index("もの")
    assert tokens[at - 3 : at] == ["学習", "させ", "た"] and row["labels"][at] == row["input_ids"][at]


@pytest.mark.claim("P1")
def test_next_token_labels_are_scored_one_position_later(gemma_tokenizer, tiny_gemma2):
    """Labels are not shifted in the data: the model scores label t with the logits at t-1. By hand,
    L = -(1/(n-1)) sum_{t=1}^{n-1} log p(x_t | x_<t) over every token of the primer's sentence (so the
    term for 「もの」 is read off the logits at 「…学習させた」), equal to the model's own loss."""
    row = encode_record(
        gemma_tokenizer, "alpaca-ja", "ベースモデルはひたすら次トークン予測で学習させたもの", "", 2048, loss_on="all"
    )
    ids = row["input_ids"]
    every_position = list(range(1, len(ids)))
    assert model_loss(tiny_gemma2, row) == pytest.approx(loss_by_hand(tiny_gemma2, ids, every_position), rel=1e-5)


@pytest.mark.claim("P3")
def test_the_seeds_sft_trains_on_the_prompt_too(gemma_tokenizer):
    """README: the seed's SFTTrainer reads a text field with no completion-only collator, so every token of
    the text is a target; the llm2024 recipe says so with loss_on = "all" (labels = the input ids, the first
    having nothing before it); loss_on = "response" masks the prompt, leaving the response and <eos>."""
    recipe = load_recipe("llm2024").sft
    assert (recipe["loss_on"], recipe["dataset_text_field"], recipe["packing"]) == ("all", "text", False)
    everything = encode_record(gemma_tokenizer, "alpaca-ja", INSTRUCTION, RESPONSE, 2048, loss_on=recipe["loss_on"])
    masked = encode_record(gemma_tokenizer, "alpaca-ja", INSTRUCTION, RESPONSE, 2048, loss_on="response")
    assert everything["labels"] == [IGNORED, *everything["input_ids"][1:]]
    assert gemma_tokenizer.decode(targets(everything)) == ALPACA_PROMPT_BY_HAND.format(INSTRUCTION, RESPONSE) + "<eos>"
    assert gemma_tokenizer.decode(targets(masked)) == RESPONSE + "<eos>"


@pytest.mark.slow
@pytest.mark.claim("P3")
def test_trls_text_field_collator_scores_every_token_as_loss_on_all(gemma_tokenizer, tiny_gemma2):
    """trl's own collator (what SFTTrainer uses on a text field) turns the seed's text into labels = input
    ids; loss_on = "all" gives the model the same loss (the first label is never scored); "response" does not."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    everything = encode_record(gemma_tokenizer, "alpaca-ja", INSTRUCTION, RESPONSE, 2048, loss_on="all")
    masked = encode_record(gemma_tokenizer, "alpaca-ja", INSTRUCTION, RESPONSE, 2048, loss_on="response")
    trl_batch = DataCollatorForLanguageModeling(pad_token_id=gemma_tokenizer.pad_token_id)(
        [{"input_ids": everything["input_ids"]}]
    )
    assert trl_batch["labels"][0].tolist() == everything["input_ids"]
    with torch.no_grad():
        trl_loss = tiny_gemma2(input_ids=trl_batch["input_ids"], labels=trl_batch["labels"]).loss.item()
    assert model_loss(tiny_gemma2, everything) == pytest.approx(trl_loss, rel=1e-6)
    assert model_loss(tiny_gemma2, masked) != pytest.approx(trl_loss, rel=1e-3)


@pytest.mark.claim("P11", "C11")
def test_one_bos_and_eos_only_after_a_non_empty_response(gemma_tokenizer):
    """A non-empty response: exactly one <bos> (first) and exactly one <eos> (last). An empty response (the
    seed's `if output:`): no <eos> at all, and nothing to learn."""
    bos, eos = gemma_tokenizer.bos_token_id, gemma_tokenizer.eos_token_id
    with_response = encode_record(gemma_tokenizer, "alpaca-ja", INSTRUCTION, RESPONSE, 2048)["input_ids"]
    empty = encode_record(gemma_tokenizer, "alpaca-ja", INSTRUCTION, "", 2048)
    assert with_response[0] == bos and with_response.count(bos) == 1
    assert with_response[-1] == eos and with_response.count(eos) == 1
    assert empty["input_ids"][0] == bos and empty["input_ids"].count(bos) == 1 and eos not in empty["input_ids"]
    assert gemma_tokenizer.decode(empty["input_ids"]) == "<bos>" + ALPACA_PROMPT_BY_HAND.format(INSTRUCTION, "")
    assert targets(empty) == []


@pytest.mark.claim("P11", "C11")
def test_the_eos_after_the_response_is_the_tokenizers_own(llama_tokenizer):
    """The seed appends tokenizer.eos_token: with the Llama-3.1 tokenizer that is <|eot_id|>, not <eos>."""
    row = encode_record(llama_tokenizer, "alpaca-ja", INSTRUCTION, RESPONSE, 2048)
    eot = llama_tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert row["input_ids"][-1] == eot and row["input_ids"].count(eot) == 1
    assert llama_tokenizer.decode(targets(row)) == RESPONSE + "<|eot_id|>"


@pytest.mark.claim("P11", "P4")
def test_a_gemma2_record_has_one_bos_and_the_response_ends_with_the_turn_end(gemma_tokenizer):
    """gemma2: the rendered text already writes <bos>; tokenizing it naively adds a second (README), the
    record keeps one."""
    text = f"<bos><start_of_turn>user\n{INSTRUCTION}<end_of_turn>\n<start_of_turn>model\n{RESPONSE}<end_of_turn>\n"
    bos = gemma_tokenizer.bos_token_id
    naive = gemma_tokenizer(text)["input_ids"]
    assert naive[:2] == [bos, bos]
    row = encode_record(gemma_tokenizer, "gemma2", INSTRUCTION, RESPONSE, 2048)
    assert row["input_ids"] == naive[1:] and row["input_ids"].count(bos) == 1
    assert gemma_tokenizer.decode(targets(row)) == RESPONSE + "<end_of_turn>\n"


@pytest.mark.claim("P11", "P4")
def test_a_llama31_record_has_one_bos_and_the_response_ends_with_eot(llama_tokenizer):
    row = encode_record(llama_tokenizer, "llama3.1", INSTRUCTION, RESPONSE, 2048)
    bos = llama_tokenizer.bos_token_id
    assert row["input_ids"][0] == bos and row["input_ids"].count(bos) == 1
    assert llama_tokenizer.decode(targets(row)) == RESPONSE + "<|eot_id|>"


def test_loss_on_and_format_must_be_known(gemma_tokenizer):
    with pytest.raises(InputError, match="loss_on 'prompt'"):
        encode_record(gemma_tokenizer, "alpaca-ja", INSTRUCTION, RESPONSE, 2048, loss_on="prompt")
    with pytest.raises(InputError, match="unknown format 'chatml'"):
        encode_record(gemma_tokenizer, "chatml", INSTRUCTION, RESPONSE, 2048)


def test_records_are_cut_at_max_seq_length(gemma_tokenizer):
    whole = encode_record(gemma_tokenizer, "alpaca-ja", INSTRUCTION, RESPONSE * 20, 4096)
    cut = encode_record(gemma_tokenizer, "alpaca-ja", INSTRUCTION, RESPONSE * 20, 32)
    assert len(cut["input_ids"]) == 32 < len(whole["input_ids"]) and cut["input_ids"] == whole["input_ids"][:32]
    assert cut["labels"] == whole["labels"][:32] and cut["attention_mask"] == [1] * 32


def records_of_3_and_1_tokens() -> list[dict]:
    return [
        {"input_ids": [2, 6, 7], "attention_mask": [1, 1, 1], "labels": [IGNORED, 6, 7]},
        {"input_ids": [2], "attention_mask": [1], "labels": [IGNORED]},
    ]


def test_padded_labels_are_minus_100_so_padding_is_masked_and_never_a_target(gemma_tokenizer):
    """transformers' DataCollatorForSeq2Seq, by hand: the short record gets two <pad> (id 0) in input_ids,
    two 0 in attention_mask and two -100 in labels; the batch is as wide as its longest record."""
    assert gemma_tokenizer.pad_token_id == 0
    batch = sft.collator(gemma_tokenizer)(records_of_3_and_1_tokens())
    assert batch["input_ids"].tolist() == [[2, 6, 7], [2, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORED, 6, 7], [IGNORED, IGNORED, IGNORED]]


def test_batches_are_padded_on_the_right_even_when_the_tokenizer_pads_left(gemma_tokenizer):
    """Gemma-2's own tokenizer is saved with padding_side "left"; SFT batches still pad on the right (as
    trl's SFTTrainer does), and the caller's tokenizer keeps its side."""
    gemma_tokenizer.padding_side = "left"
    batch = sft.collator(gemma_tokenizer)(records_of_3_and_1_tokens())
    assert batch["input_ids"].tolist()[1] == [2, 0, 0] and batch["labels"].tolist()[1] == [IGNORED, IGNORED, IGNORED]
    assert gemma_tokenizer.padding_side == "left"


@pytest.mark.claim("C14")
def test_neftune_bound_by_hand():
    """alpha / sqrt(L * d): 5 / sqrt(16 * 64) = 5 / 32; 5 / sqrt(2048 * 4608) for gemma-2-27b at full length."""
    assert sft.neftune_bound(5, 16, 64) == 5 / 32
    assert sft.neftune_bound(5, 2048, 4608) == pytest.approx(5 / 3072, rel=1e-12)


@pytest.mark.claim("C14")
@pytest.mark.library("transformers")
def test_neftune_adds_bounded_uniform_noise_to_embeddings_in_training_only(tiny_gemma2, tmp_path):
    """The Trainer's neftune_noise_alpha hook, with the llm2024 recipe's alpha (5), on the real model's
    embedding layer. In training mode every value moves by at most alpha/sqrt(L*d) = 5/sqrt(16*64) = 0.15625
    and the noise fills that range (uniform: its largest |value| over 1024 draws is above 0.9 of the bound,
    its mean |value| is half the bound; a scale of 5/sqrt(16) or an alpha of 1 fails both). In eval mode the
    embeddings are exactly what the layer gives without the hook (Gemma's layer scales its rows by sqrt(d)).
    After training the Trainer removes the hook. Learning rate 0 keeps the weights fixed, so every forward
    pass can be compared with the same clean output."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    alpha = load_recipe("llm2024").training_arguments["neftune_noise_alpha"]
    bound = 5 / 32
    args = TrainingArguments(
        output_dir=str(tmp_path),
        neftune_noise_alpha=alpha,
        max_steps=1,
        report_to="none",
        learning_rate=0.0,
        per_device_train_batch_size=1,
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    ids = torch.randint(3, 2000, (1, 16), generator=torch.Generator().manual_seed(0))
    embedding = tiny_gemma2.get_input_embeddings()
    with torch.no_grad():
        clean = embedding(ids)
    seen = []
    record = lambda module, inputs, output: seen.append((module.training, output.detach().clone()))  # noqa: E731

    class AfterNeftune(TrainerCallback):  # train() adds NEFTune's hook first; ours then sees its output
        def on_train_begin(self, *args, **kwargs):
            self.handle = embedding.register_forward_hook(record)

    trainer = Trainer(
        model=tiny_gemma2,
        args=args,
        train_dataset=[{"input_ids": ids[0], "labels": ids[0]}],
        callbacks=[AfterNeftune()],
    )
    trainer.train()
    embedding.register_forward_hook(record)
    training, noisy = seen[0]
    change = (noisy - clean).abs()
    assert training and 0.9 * bound < change.max() <= bound + 1e-6
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
