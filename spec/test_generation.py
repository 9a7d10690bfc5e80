"""Generation with the seed's settings (reference/generation.py) on the tiny Gemma-2."""

from __future__ import annotations

import json

import pytest
import torch

from reference import generation
from reference.generation import GenerationSettings

PROMPTS = ["### 質問:\n日本の首都はどこですか。\n\n### 回答:\n", "### 質問:\n富士山について教えて。\n\n### 回答:\n",
           "こんにちは"]


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
    settings = GenerationSettings()
    assert (settings.max_new_tokens, settings.repetition_penalty, settings.use_cache, settings.do_sample) == (1024, 1.1, True, False)
    assert settings.bad_words == ("質問", "###", "#", "##", "---", "<h3>", "filepath", "> ")
    ids = generation.bad_words_ids(gemma_tokenizer)
    assert ids == [gemma_tokenizer.encode(w, add_special_tokens=False) for w in settings.bad_words]
    assert all(gemma_tokenizer.bos_token_id not in word for word in ids)


@pytest.mark.claim("C19")
def test_a_banned_word_is_never_generated(gemma_tokenizer, tiny_gemma2):
    """Ban whatever greedy decoding writes first without a ban: with the ban it writes something else."""
    free = GenerationSettings(max_new_tokens=1, bad_words=())
    inputs = gemma_tokenizer(PROMPTS[0], return_tensors="pt")
    with torch.no_grad():
        first = tiny_gemma2.generate(**inputs, max_new_tokens=1, do_sample=False, repetition_penalty=1.1)[0, -1].item()
    word = gemma_tokenizer.decode([first])
    assert generation.generate(tiny_gemma2, gemma_tokenizer, PROMPTS[:1], free)[0] == word.strip()
    banned = GenerationSettings(max_new_tokens=1, bad_words=(word,))
    assert gemma_tokenizer.encode(word, add_special_tokens=False) == [first]
    again = gemma_tokenizer(PROMPTS[0], return_tensors="pt")
    with torch.no_grad():
        out = tiny_gemma2.generate(**again, max_new_tokens=1, do_sample=False, repetition_penalty=1.1, bad_words_ids=[[first]])
    assert out[0, -1].item() != first
    assert generation.generate(tiny_gemma2, gemma_tokenizer, PROMPTS[:1], banned)[0] == gemma_tokenizer.decode(out[0, -1:], skip_special_tokens=True).strip()


@pytest.mark.claim("C19")
def test_only_the_new_tokens_are_decoded_and_stripped(gemma_tokenizer, tiny_gemma2):
    settings = GenerationSettings(max_new_tokens=6)
    inputs = gemma_tokenizer(PROMPTS[0], return_tensors="pt")
    with torch.no_grad():
        whole = tiny_gemma2.generate(**inputs, max_new_tokens=6, do_sample=False, repetition_penalty=1.1,
                                     bad_words_ids=generation.bad_words_ids(gemma_tokenizer))
    expected = gemma_tokenizer.decode(whole[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert generation.generate(tiny_gemma2, gemma_tokenizer, PROMPTS[:1], settings) == [expected]


@pytest.mark.claim("C19")
def test_batched_left_padded_generation_equals_one_by_one(gemma_tokenizer, tiny_gemma2):
    one = generation.generate(tiny_gemma2, gemma_tokenizer, PROMPTS, GenerationSettings(max_new_tokens=8))
    batched = generation.generate(tiny_gemma2, gemma_tokenizer, PROMPTS, GenerationSettings(max_new_tokens=8, batch_size=3))
    assert batched == one


@pytest.mark.claim("C19")
def test_outputs_are_written_as_utf8_jsonl_with_task_ids(tmp_path):
    generation.write_outputs(tmp_path / "output.jsonl", ["東京です。", "富士山"])
    text = (tmp_path / "output.jsonl").read_text(encoding="utf-8")
    assert text == '{"task_id": 0, "output": "東京です。"}\n{"task_id": 1, "output": "富士山"}\n'
    assert [json.loads(line)["task_id"] for line in text.splitlines()] == [0, 1]
