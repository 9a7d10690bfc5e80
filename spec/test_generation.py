"""Generation with the seed's settings (reference/inference/generation.py) on the tiny Gemma-2."""

from __future__ import annotations

import json

import pytest
import torch

from reference.inference import generation
from reference.inference.generation import seed_generation_config

PROMPTS = [
    "### 質問:\n日本の首都はどこですか。\n\n### 回答:\n",
    "### 質問:\n富士山について教えて。\n\n### 回答:\n",
    "こんにちは",
]

SEED_BAD_WORDS = ("質問", "###", "#", "##", "---", "<h3>", "filepath", "> ")
"""The eight strings seed 001 §2.3 bans, copied from its generate() call."""

LEANINGS = {"#": 1100.0, "\n": 1000.0, "答": 950.0, "<|start_header_id|>": 940.0, "え": 880.0}
"""Biases added to the tiny Llama's next-token logits (its own logits stay under 1 in size)."""

EOS_LEANINGS = {"\n": 1050.0, "<|eot_id|>": 1000.0, "答": 960.0}
"""Biases that make the end of sequence (<|eot_id|>) the tiny Llama's second choice."""


def leaning(leanings: dict[str, float]):
    """The tiny Llama (no logit soft-capping, unlike Gemma-2) with a bias on its LM head that makes it lean
    to the given tokens (special tokens by name, others as the one token their text encodes to). A real
    model with real weights: only its preferences are known in advance."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spec.conftest import FIXTURES

    directory = FIXTURES / "models" / "tiny-llama"
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    model = AutoModelForCausalLM.from_pretrained(str(directory))
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    head.weight = model.lm_head.weight
    with torch.no_grad():
        head.bias.zero_()
        for token, bias in leanings.items():
            special = token.startswith("<|")
            head.bias[tokenizer.convert_tokens_to_ids(token) if special else token_id(tokenizer, token)] = bias
    model.lm_head = head
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def leaning_llama():
    """Leaning to five tokens: the banned '#', a newline, '答', the special token <|start_header_id|> and 'え'."""
    return leaning(LEANINGS)


@pytest.fixture(scope="module")
def eos_leaning_llama():
    return leaning(EOS_LEANINGS)


def token_id(tokenizer, text: str) -> int:
    (only,) = tokenizer.encode(text, add_special_tokens=False)
    return only


@pytest.mark.claim("C20")
@pytest.mark.parametrize("penalty", [1.1, 1.2])
def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens(penalty):
    """Logits (2.0, -1.0, 0.5, -0.3, 1.1) with tokens 0, 1 and 3 already written: by hand they become
    (2/p, -1*p, 0.5, -0.3*p, 1.1); unseen tokens keep theirs. transformers' processor agrees."""
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = torch.tensor([2.0, -1.0, 0.5, -0.3, 1.1])
    seen = [0, 1, 3, 1]
    ours = generation.penalize_repetition(logits, seen, penalty)
    assert ours.tolist() == pytest.approx([2.0 / penalty, -1.0 * penalty, 0.5, -0.3 * penalty, 1.1])
    theirs = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([seen]), logits.unsqueeze(0).clone())[0]
    assert torch.allclose(ours, theirs)


@pytest.mark.claim("C19")
def test_the_defaults_are_the_seeds_generation_settings(gemma_tokenizer):
    """Seed 001 §2.3: model.generate(**inputs, max_new_tokens=1024, repetition_penalty=1.1, use_cache=True,
    bad_words_ids=[tokenizer.encode(word, add_special_tokens=False) for the eight words]); no sampling set."""
    config = seed_generation_config(gemma_tokenizer)
    assert (config.max_new_tokens, config.repetition_penalty) == (1024, 1.1)
    assert (config.use_cache, config.do_sample) == (True, False)
    assert generation.BAD_WORDS == SEED_BAD_WORDS
    ids = generation.bad_words_ids(gemma_tokenizer)
    assert ids == [gemma_tokenizer.encode(w, add_special_tokens=False) for w in SEED_BAD_WORDS]
    assert config.bad_words_ids == ids
    assert all(gemma_tokenizer.bos_token_id not in word for word in ids)


@pytest.mark.claim("C19")
def test_the_settings_record_shows_the_seeds_values_and_the_batch_size(gemma_tokenizer):
    """What `generate` prints and a run keeps: the values set (transformers' defaults left out), readable
    as JSON. The fixture tokenizer's pad token is <pad>, id 0."""
    record = generation.settings_record(seed_generation_config(gemma_tokenizer, max_new_tokens=8), batch_size=4)
    assert record == {
        "max_new_tokens": 8,
        "repetition_penalty": 1.1,
        "do_sample": False,
        "use_cache": True,
        "bad_words_ids": [gemma_tokenizer.encode(w, add_special_tokens=False) for w in SEED_BAD_WORDS],
        "pad_token_id": 0,
        "batch_size": 4,
    }
    assert json.loads(json.dumps(record)) == record


@pytest.mark.claim("C19")
def test_a_banned_word_is_never_generated(gemma_tokenizer, tiny_gemma2):
    """Ban whatever greedy decoding writes first without a ban: with the ban it writes something else."""
    free = seed_generation_config(gemma_tokenizer, max_new_tokens=1, bad_words=())
    inputs = gemma_tokenizer(PROMPTS[0], return_tensors="pt")
    with torch.no_grad():
        first = tiny_gemma2.generate(**inputs, max_new_tokens=1, do_sample=False, repetition_penalty=1.1)[0, -1].item()
    word = gemma_tokenizer.decode([first])
    assert generation.generate(tiny_gemma2, gemma_tokenizer, PROMPTS[:1], free)[0] == word.strip()
    banned = seed_generation_config(gemma_tokenizer, max_new_tokens=1, bad_words=(word,))
    assert gemma_tokenizer.encode(word, add_special_tokens=False) == [first]
    again = gemma_tokenizer(PROMPTS[0], return_tensors="pt")
    with torch.no_grad():
        out = tiny_gemma2.generate(
            **again, max_new_tokens=1, do_sample=False, repetition_penalty=1.1, bad_words_ids=[[first]]
        )
    assert out[0, -1].item() != first
    expected = gemma_tokenizer.decode(out[0, -1:], skip_special_tokens=True).strip()
    assert generation.generate(tiny_gemma2, gemma_tokenizer, PROMPTS[:1], banned)[0] == expected


@pytest.mark.claim("C19")
def test_only_the_new_tokens_are_decoded_and_stripped(gemma_tokenizer, tiny_gemma2):
    config = seed_generation_config(gemma_tokenizer, max_new_tokens=6)
    inputs = gemma_tokenizer(PROMPTS[0], return_tensors="pt")
    with torch.no_grad():
        whole = tiny_gemma2.generate(
            **inputs,
            max_new_tokens=6,
            do_sample=False,
            repetition_penalty=1.1,
            bad_words_ids=generation.bad_words_ids(gemma_tokenizer),
        )
    expected = gemma_tokenizer.decode(whole[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    assert generation.generate(tiny_gemma2, gemma_tokenizer, PROMPTS[:1], config) == [expected]


@pytest.mark.claim("C19")
def test_batched_left_padded_generation_equals_one_by_one(gemma_tokenizer, tiny_gemma2):
    """The seed's loop, one prompt per call, against batches: the three prompts differ in length (14, 19
    and 6 tokens), so a batch sorts them and pads the shorter ones; the outputs come back in the prompts'
    order."""
    config = seed_generation_config(gemma_tokenizer, max_new_tokens=8)
    assert [len(gemma_tokenizer(p)["input_ids"]) for p in PROMPTS] == [14, 19, 6]
    one = [generation.generate(tiny_gemma2, gemma_tokenizer, [prompt], config)[0] for prompt in PROMPTS]
    assert len(set(one)) == 3
    assert generation.generate(tiny_gemma2, gemma_tokenizer, PROMPTS, config, batch_size=3) == one
    assert generation.generate(tiny_gemma2, gemma_tokenizer, PROMPTS, config, batch_size=2) == one


@pytest.mark.claim("C19")
def test_batches_hold_prompts_of_similar_length_the_shortest_first(gemma_tokenizer, tiny_gemma2):
    """Prompts of 14, 19 and 6 tokens at batch 2: sorted (6, 14, 19) the batches are {6, 14}, padded to 14,
    then {19} alone; in the given order they would be {14, 19} padded to 19, then {6}. The hook sees each
    batch's first forward pass (one new token, so no other)."""
    shapes = []
    hook = tiny_gemma2.register_forward_pre_hook(
        lambda _, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    try:
        config = seed_generation_config(gemma_tokenizer, max_new_tokens=1)
        generation.generate(tiny_gemma2, gemma_tokenizer, PROMPTS, config, batch_size=2)
    finally:
        hook.remove()
    assert shapes == [(2, 14), (1, 19)]


@pytest.mark.claim("C19", "C20")
def test_the_repetition_penalty_does_not_count_the_left_padding_as_seen(eos_leaning_llama):
    """Leanings newline 1050, <|eot_id|> (end of sequence) 1000, 答 960; p = 1.1. The short prompt alone:
      step 1: newline 1050 beats eos 1000                     -> newline
      step 2: eos 1000 beats 答 960 and newline 1050/p = 954.5 -> eos: done; "\n" stripped is "".
    Batched beside a longer prompt it is padded with the end of sequence (the tiny Llama has no pad
    token). Were the padding counted as a seen eos (1000/p = 909.1):
      step 2: 答 960 beats newline 954.5 and eos 909.1         -> 答, then newlines; stripped "答".
    transformers' penalty skips the positions the attention mask hides, so the batch answers as each
    prompt alone; without the mask (the padding then seen by the model and the penalty) it would not."""
    model, tokenizer = eos_leaning_llama
    short, long = "こんにちは", "こんにちは、元気ですか。今日はいい天気ですね"
    config = seed_generation_config(tokenizer, max_new_tokens=6)
    eos, newline, answer = tokenizer.eos_token_id, token_id(tokenizer, "\n"), token_id(tokenizer, "答")
    short_ids, long_ids = tokenizer(short)["input_ids"], tokenizer(long)["input_ids"]
    assert tokenizer.pad_token is None and config.pad_token_id == eos
    assert not {eos, newline, answer} & set(short_ids + long_ids)
    with torch.no_grad():  # the padding seen: the derivation's second case
        seen = model.generate(
            torch.tensor([[eos] * (len(long_ids) - len(short_ids)) + short_ids]), generation_config=config
        )
    assert seen[0, len(long_ids) :].tolist() == [newline, answer, newline, newline, newline, newline]
    alone = [generation.generate(model, tokenizer, [prompt], config)[0] for prompt in (short, long)]
    assert alone[0] == ""
    assert generation.generate(model, tokenizer, [short, long], config, batch_size=2) == alone


@pytest.mark.claim("C19")
def test_outputs_are_written_as_utf8_jsonl_with_task_ids(tmp_path):
    generation.write_outputs(tmp_path / "output.jsonl", ["東京です。", "富士山"])
    text = (tmp_path / "output.jsonl").read_text(encoding="utf-8")
    assert text == '{"task_id": 0, "output": "東京です。"}\n{"task_id": 1, "output": "富士山"}\n'
    assert [json.loads(line)["task_id"] for line in text.splitlines()] == [0, 1]


@pytest.mark.claim("C19", "C20")
def test_the_seeds_settings_turn_the_leaning_models_logits_into_the_hand_derived_answer(leaning_llama):
    """Greedy, six new tokens, the defaults otherwise. The banned '#' (1100) never comes. A seen token's
    positive logit is divided by the penalty p once, however often it was seen. With p = 1.1 the leanings
    become newline 1000 -> 909.1, 答 950 -> 863.6, special 940 -> 854.5, え 880 -> 800:
      step 1: newline 1000 beats 答 950                   -> newline
      step 2: 答 950 beats special 940 and newline 909.1    -> 答
      step 3: special 940 beats newline 909.1 and え 880    -> special
      step 4 on: newline 909.1 beats え 880                 -> newline, newline, newline
    Decoded without special tokens "\n答\n\n\n", stripped "答". With p = 1.2 (newline 833.3, 答 791.7,
    special 783.3) step 4 picks え 880 instead ("答え"); with p = 1.0 every step is a newline ("").
    The prompt "こんにちは" holds none of these tokens (the penalty counts the prompt's tokens as seen)."""
    model, tokenizer = leaning_llama
    newline, answer, special, e = (
        token_id(tokenizer, "\n"),
        token_id(tokenizer, "答"),
        tokenizer.convert_tokens_to_ids("<|start_header_id|>"),
        token_id(tokenizer, "え"),
    )
    inputs = tokenizer(PROMPTS[2], return_tensors="pt")
    assert not {newline, answer, special, e} & set(inputs["input_ids"][0].tolist())
    by_penalty = {}
    for penalty in (1.0, 1.1, 1.2):  # the library on this model: the derivation holds and the penalty matters
        with torch.no_grad():
            out = model.generate(
                **inputs,
                max_new_tokens=6,
                do_sample=False,
                repetition_penalty=penalty,
                bad_words_ids=[[token_id(tokenizer, "#")]],
                pad_token_id=tokenizer.eos_token_id,
            )
        by_penalty[penalty] = out[0, inputs["input_ids"].shape[1] :].tolist()
    assert by_penalty == {
        1.0: [newline] * 6,
        1.1: [newline, answer, special, newline, newline, newline],
        1.2: [newline, answer, special, e, newline, newline],
    }
    six = seed_generation_config(tokenizer, max_new_tokens=6)
    assert generation.generate(model, tokenizer, PROMPTS[2:], six) == ["答"]


@pytest.mark.claim("C19")
def test_the_kv_cache_is_on_so_each_step_after_the_prompt_feeds_one_token(leaning_llama):
    """With the cache the model sees the prompt once, then only the newest token per step; without it,
    the whole sequence again at every step."""
    model, tokenizer = leaning_llama
    fed = []
    hook = model.register_forward_pre_hook(
        lambda _, args, kwargs: fed.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        generation.generate(model, tokenizer, PROMPTS[1:2], seed_generation_config(tokenizer, max_new_tokens=4))
    finally:
        hook.remove()
    prompt_length = len(tokenizer(PROMPTS[1])["input_ids"])
    assert fed == [prompt_length, 1, 1, 1]


@pytest.mark.claim("C19")
def test_the_settings_record_names_the_banned_words_and_the_pad_token_as_text(gemma_tokenizer):
    """What `generate` prints: beside the ids, the seed's eight banned words as they are written, and <pad>."""
    config = seed_generation_config(gemma_tokenizer, max_new_tokens=8)
    record = generation.settings_record(config, batch_size=4, tokenizer=gemma_tokenizer)
    assert record["bad_words"] == list(SEED_BAD_WORDS) and record["pad_token"] == "<pad>"
