"""The LMSYS 3-class preference classifier (reference/preference.py) on the tiny Gemma-2."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from reference import preference
from reference.errors import InputError
from reference.preference import PreferenceConfig


@pytest.fixture(scope="module")
def classifier():
    from spec.conftest import FIXTURES

    return preference.load_classifier(FIXTURES / "models" / "tiny-gemma2")


@pytest.mark.claim("L1")
def test_labels_are_the_index_of_the_one_hot_winner_column(fixtures_dir, tmp_path):
    rows = preference.read_rows(fixtures_dir / "data" / "lmsys_sample.jsonl")
    raw = [json.loads(line) for line in (fixtures_dir / "data" / "lmsys_sample.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["label"] for r in rows] == [[x["winner_model_a"], x["winner_model_b"], x["winner_tie"]].index(1) for x in raw]
    assert rows[0]["prompt"] == json.loads(raw[0]["prompt"])[0]  # the JSON list of turns, joined
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**raw[0], "winner_tie": 1}) + "\n", encoding="utf-8")
    with pytest.raises(InputError, match="line 1: .*one-hot"):
        preference.read_rows(bad)


@pytest.mark.claim("L1")
def test_the_classifier_is_the_causal_lm_with_a_three_way_head_in_bf16_and_a_pad_token(classifier):
    model, tokenizer = classifier
    assert model.config.num_labels == 3 and model.score.out_features == 3
    assert model.score.weight.dtype == torch.bfloat16 and model.config.pad_token_id == tokenizer.pad_token_id is not None


@pytest.mark.claim("L1")
def test_left_and_right_padding_pool_the_same_last_token(classifier):
    """The head reads the last non-pad token; where the padding sits must not matter."""
    model, tokenizer = classifier
    rows = [tokenizer("短い")["input_ids"], tokenizer("これはもう少し長い入力の文です。")["input_ids"]]
    with torch.no_grad():
        right = model(*preference.pad_batch(rows, tokenizer.pad_token_id, "right")).logits
        left = model(*preference.pad_batch(rows, tokenizer.pad_token_id, "left")).logits
        alone = model(input_ids=torch.tensor([rows[0]])).logits
    assert torch.allclose(right, left, atol=1e-2) and torch.allclose(right[0], alone[0], atol=1e-2)


@pytest.mark.claim("A5")
def test_without_spread_a_long_prompt_crowds_out_the_responses_and_with_spread_each_part_keeps_a_third(gemma_tokenizer):
    """max_length 60. Joined: the text is cut at 60 tokens, so a long prompt leaves no '<response_b>'.
    Spread: each part is cut at 60 // 3 = 20 tokens, and both responses keep their markers."""
    prompt, a, b = "長い質問です。" * 40, "答えA", "答えB"
    joined = preference.encode(gemma_tokenizer, prompt, a, b, PreferenceConfig(max_length=60))
    spread = preference.encode(gemma_tokenizer, prompt, a, b, PreferenceConfig(max_length=60, spread_max_length=True))
    assert len(joined) == 60 and "<response_b>" not in gemma_tokenizer.decode(joined)
    text = gemma_tokenizer.decode(spread)
    assert "<response_a>: 答えA" in text and "<response_b>: 答えB" in text and len(spread) <= 60
    parts = ["<prompt>: " + prompt, "\n\n<response_a>: " + a, "\n\n<response_b>: " + b]
    assert len(spread) == sum(min(20, len(gemma_tokenizer(p)["input_ids"])) for p in parts)


@pytest.mark.claim("A5")
def test_tta_averages_with_the_swapped_scoring_after_swapping_its_a_and_b_back(classifier, fixtures_dir):
    model, tokenizer = classifier
    rows = preference.read_rows(fixtures_dir / "data" / "lmsys_sample.jsonl")[:3]
    plain = preference.predict(model, tokenizer, rows, PreferenceConfig(max_length=128))
    swapped_rows = [{**r, "response_a": r["response_b"], "response_b": r["response_a"]} for r in rows]
    swapped = preference.predict(model, tokenizer, swapped_rows, PreferenceConfig(max_length=128))
    by_hand = (plain + swapped[:, [1, 0, 2]]) / 2
    tta = preference.predict(model, tokenizer, rows, PreferenceConfig(max_length=128, tta=True))
    assert torch.allclose(tta, by_hand) and torch.allclose(tta.sum(-1), torch.ones(3))


@pytest.mark.claim("L1")
def test_log_loss_is_the_competitions_metric():
    """Rows (0.7, 0.2, 0.1) with label 0 and (0.2, 0.5, 0.3) with label 2: (-ln 0.7 - ln 0.3) / 2 = 0.780323."""
    p = torch.tensor([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3]])
    assert preference.log_loss(p, [0, 2]) == pytest.approx((-math.log(0.7) - math.log(0.3)) / 2) == pytest.approx(0.780323, abs=1e-6)


@pytest.mark.claim("L1", "P1")
def test_training_the_classifier_lowers_its_loss_and_reports_held_out_log_loss(fixtures_dir, tmp_path):
    """Classification through the same Trainer loop as SFT (P1): labels given, one per row."""
    result = subprocess.run([sys.executable, "-m", "reference", "preference", "train", "--model", str(fixtures_dir / "models" / "tiny-gemma2"),
                             "--data", str(fixtures_dir / "data" / "lmsys_sample.jsonl"), "--output", str(tmp_path),
                             "--max-length", "64", "--epochs", "8"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    assert summary["train_rows"] == 18 and summary["eval_rows"] == 6
    assert summary["train_loss_last"] < summary["train_loss_first"]
    assert summary["log_loss_after"] == pytest.approx(json.loads((tmp_path / "preference.json").read_text())["log_loss_after"])
    assert (tmp_path / "adapter_model.safetensors").is_file()
