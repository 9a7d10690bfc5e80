"""DPO (reference/methods/dpo.py): the loss by hand, the answer tokens scored, a few steps on the tiny Gemma-2 raise the
reward margin, and the reference is the adapter DPO starts from, frozen (pi_ref = pi_SFT; trl's rule, X9).

The comparisons with trl's DPOTrainer itself are in spec/test_trl.py."""

from __future__ import annotations

import json
import math

import pytest
import torch

from reference.errors import InputError
from reference.methods import dpo
from reference.modeling import models
from reference.settings.recipes import apply_overrides, load_recipe
from spec.cli_runner import run_cli, run_main
from spec.observe import Observed


@pytest.mark.claim("D3")
def test_the_dpo_loss_equals_the_formula_worked_by_hand():
    """beta 0.1; pair 1: policy log-probs (-1, -2), reference (-1.5, -1.5): r_w = 0.1 * 0.5 = 0.05,
    r_l = 0.1 * -0.5 = -0.05, margin 0.1, loss log(1 + e^-0.1) = 0.644397. Pair 2: policy (-3, -1),
    reference (-2, -2): r_w = -0.1, r_l = 0.1, margin -0.2, loss log(1 + e^0.2) = 0.798139.
    Mean = 0.721268."""
    loss, r_w, r_l = dpo.dpo_loss(
        torch.tensor([-1.0, -3.0]),
        torch.tensor([-2.0, -1.0]),
        torch.tensor([-1.5, -2.0]),
        torch.tensor([-1.5, -2.0]),
        beta=0.1,
    )
    assert r_w.tolist() == pytest.approx([0.05, -0.1]) and r_l.tolist() == pytest.approx([-0.05, 0.1])
    by_hand = (math.log1p(math.exp(-0.1)) + math.log1p(math.exp(0.2))) / 2
    assert loss.item() == pytest.approx(by_hand, rel=1e-6) == pytest.approx(0.721268, abs=1e-6)


@pytest.mark.claim("D3")
def test_sequence_log_probability_scores_the_answer_tokens_only(gemma_tokenizer, tiny_gemma2):
    """By hand: log-softmax at each position, summed over the answer's tokens (and its EOS) only."""
    pair = dpo.PreferencePair("質問：", "東京です。", "大阪です。")
    (ids, labels), _ = dpo.encode_pair(gemma_tokenizer, pair, 64)
    with torch.no_grad():
        ours = dpo.sequence_logprobs(tiny_gemma2, [(ids, labels)], gemma_tokenizer)[0]
        log_probs = torch.log_softmax(tiny_gemma2(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    scored = [t for t in range(1, len(ids)) if labels[t] != -100]
    assert gemma_tokenizer.decode([ids[t] for t in scored]) == "東京です。<eos>"
    assert ours.item() == pytest.approx(sum(log_probs[t - 1, ids[t]].item() for t in scored), rel=1e-5)


ALL_PAIRS_AT_ONCE = ["per_device_train_batch_size=12", "learning_rate=5e-3", "save_strategy=no"]
"""The dpo recipe with the 12 fixture pairs in one batch: every step sees every pair."""


def dpo_run(model_dir, data, output, *overrides, adapter=None, callbacks=()):
    recipe = apply_overrides(load_recipe("dpo"), [*ALL_PAIRS_AT_ONCE, *overrides])
    return dpo.run(recipe, model_dir, data, output, adapter=adapter, say=lambda _: None, callbacks=callbacks)


@pytest.mark.slow
@pytest.mark.claim("D3")
def test_a_few_dpo_steps_on_a_lora_policy_raise_the_reward_margin(fixtures_dir, tiny_gemma2_dir, tmp_path):
    """The policy is the tiny Gemma-2 with the recipe's fresh LoRA adapter; the reference its frozen copy, which
    adds exactly nothing (B = 0), so pi_ref is the base: its log-probs are the bare model's, every step. At step
    1 the policy is the reference too, so the loss is exactly log 2 and the margin 0; ten steps raise the
    margin; the base weights and the reference adapter do not move, the policy adapter does."""
    from transformers import AutoTokenizer

    data = fixtures_dir / "data" / "preference_pairs.jsonl"
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_gemma2_dir))
    model, _ = models.load_causal_lm(tiny_gemma2_dir)
    chosen, rejected, _ = dpo.encode_pairs(tokenizer, dpo.read_pairs(data), 256)
    with torch.no_grad():
        base = [dpo.sequence_logprobs(model, s, tokenizer).mean().item() for s in (chosen, rejected)]
    observed = Observed()
    record = dpo_run(tiny_gemma2_dir, data, tmp_path, "max_steps=10", callbacks=[observed])
    losses, margins = [s["loss"] for s in record.steps], [s["metrics"]["reward_margin"] for s in record.steps]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6) and margins[0] == pytest.approx(0, abs=1e-6)
    assert margins[-1] > margins[0] + 0.05 and losses[-1] < losses[0]
    for step in record.steps:
        logps = [step["metrics"]["reference_chosen_logp"], step["metrics"]["reference_rejected_logp"]]
        assert logps == pytest.approx(base, rel=1e-5)
    for name, param in observed.model.named_parameters():
        assert torch.equal(param, observed.before[name]) != param.requires_grad, name
        assert param.requires_grad == (".default." in name and "lora_" in name), name


@pytest.mark.slow
@pytest.mark.claim("D3", "X12")
def test_accumulating_two_micro_batches_takes_the_steps_of_one_batch_of_both(fixtures_dir, tiny_gemma2_dir, tmp_path):
    """The DPO loss is a mean over pairs, so the Trainer divides each micro-batch's by the accumulation window:
    2 micro-batches of 6 pairs make the step one batch of 12 makes. The first loss is log 2, not 2 log 2, and
    the next steps agree (to float rounding: the sums run in another order)."""
    data = fixtures_dir / "data" / "preference_pairs.jsonl"
    whole = dpo_run(tiny_gemma2_dir, data, tmp_path / "whole", "max_steps=3")
    halves = dpo_run(
        tiny_gemma2_dir,
        data,
        tmp_path / "halves",
        "max_steps=3",
        "per_device_train_batch_size=6",
        "gradient_accumulation_steps=2",
    )
    assert halves.steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert [s["loss"] for s in halves.steps] == pytest.approx([s["loss"] for s in whole.steps], abs=1e-5)


def test_preference_pairs_with_a_missing_field_are_named(tmp_path):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text(
        '{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n', encoding="utf-8"
    )
    with pytest.raises(InputError, match=r"pairs.jsonl, line 2: needs non-empty text in rejected"):
        dpo.read_pairs(bad)


def pairs_file(path, same_lines: set[int], lines: int = 5):
    """A pairs file of `lines` lines whose chosen answer is the rejected one on `same_lines`."""
    rows = [
        {"prompt": f"質問{n}：", "chosen": "東京です。", "rejected": "東京です。" if n in same_lines else "大阪です。"}
        for n in range(1, lines + 1)
    ]
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.mark.claim("D3")
def test_pairs_whose_chosen_answer_is_the_rejected_one_are_named_by_line_and_refused(tmp_path):
    """Such a pair has no preference to learn: r_w = r_l whatever the policy, so its loss stays log 2 with a zero
    gradient (shown on the tiny numbers below), and a file of them trained to nothing and saved an adapter.
    Every such line is named; a file with none reads as before."""
    loss, r_w, r_l = dpo.dpo_loss(
        torch.tensor([-2.0]), torch.tensor([-2.0]), torch.tensor([-1.0]), torch.tensor([-1.0]), 0.1
    )
    assert loss.item() == pytest.approx(math.log(2)) and torch.equal(r_w, r_l)
    with pytest.raises(InputError) as refused:
        dpo.read_pairs(pairs_file(tmp_path / "pairs.jsonl", {2, 4}))
    assert str(refused.value) == (
        f"{tmp_path / 'pairs.jsonl'}: 2 of 5 pair(s) have the same text as chosen and as rejected, so there is no "
        "preference to learn (the loss stays log 2): line(s) 2, 4; give each pair two different answers"
    )
    assert len(dpo.read_pairs(pairs_file(tmp_path / "fine.jsonl", set()))) == 5


@pytest.mark.claim("D3")
def test_the_dpo_command_refuses_pairs_with_nothing_to_prefer_before_any_model_loads(
    tmp_path, tiny_gemma2_dir, monkeypatch
):
    """Exit 2 naming the lines; no model was loaded (the loader is watched) and no output written."""
    loaded = []

    def load_causal_lm(*args, **kwargs):
        loaded.append(args)
        raise AssertionError(f"a model was loaded: {args}")

    monkeypatch.setattr(models, "load_causal_lm", load_causal_lm)
    data = pairs_file(tmp_path / "pairs.jsonl", {1, 2, 3, 4, 5})
    code, _, err = run_main("dpo", "--model", tiny_gemma2_dir, "--data", data, "--output", tmp_path / "out")
    assert code == 2 and "5 of 5 pair(s) have the same text" in err and "line(s) 1, 2, 3, 4, 5;" in err
    assert loaded == [] and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_dpo_command_trains_and_saves_the_policy_adapter_with_the_runs_manifest(
    tmp_path, tiny_gemma2_dir, fixtures_dir
):
    on = ["--model", tiny_gemma2_dir, "--data", fixtures_dir / "data" / "preference_pairs.jsonl"]
    result = run_cli("dpo", *on, "--output", tmp_path, "max_steps=3")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["method"] == "dpo" and summary["steps"] == 3
    assert summary["first_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "manifest.json").is_file()
    assert not (tmp_path / dpo.REFERENCE_ADAPTER).exists()  # the policy alone is saved


@pytest.mark.slow
@pytest.mark.claim("D3")
def test_dpo_runs_from_python_on_a_model_whose_tokenizer_has_no_pad_token(tmp_path, tiny_llama_dir, fixtures_dir):
    """dpo.run, the function the command calls, on the tiny Llama: its tokenizer has no pad token (checked
    first), so the pairs are padded with its EOS, <|eot_id|>, as SFT pads; one step from a fresh adapter gives
    exactly log 2. The adapter, the tokenizer (padding with EOS) and the manifest, the returned record, are saved."""
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(tiny_llama_dir)).pad_token is None
    record = dpo_run(tiny_llama_dir, fixtures_dir / "data" / "preference_pairs.jsonl", tmp_path, "max_steps=1")
    assert [s["loss"] for s in record.steps] == [pytest.approx(math.log(2), abs=1e-6)]
    assert record.adapter["mode"] == "created"
    assert json.loads((tmp_path / "manifest.json").read_text(encoding="utf-8"))["steps"] == record.steps
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert AutoTokenizer.from_pretrained(str(tmp_path)).pad_token == "<|eot_id|>"


def saved_adapter(directory, fixtures_dir):
    """A saved LoRA adapter that is not the identity (peft's init_lora_weights=False: B != 0), with the
    tokenizer, as the SFT command leaves one."""
    import peft
    from transformers import AutoTokenizer

    model, _ = models.load_causal_lm(fixtures_dir / "models" / "tiny-gemma2")
    torch.manual_seed(1)
    config = peft.LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    peft.get_peft_model(model, config).save_pretrained(directory)
    AutoTokenizer.from_pretrained(str(fixtures_dir / "models" / "tiny-gemma2")).save_pretrained(directory)
    return directory


@pytest.mark.slow
@pytest.mark.claim("X9", "D3")
def test_dpo_command_from_a_saved_adapter_keeps_it_frozen_as_the_reference(tmp_path, tiny_gemma2_dir, fixtures_dir):
    """`dpo --adapter`: the saved adapter is both the starting policy and, frozen, the reference (pi_ref =
    pi_SFT, trl's "ref" adapter). So the first loss is exactly log 2 though the adapter is not zero (with the
    base as reference it would not be: about 0.70); the reference log-probs are the same every step; the
    saved adapter's files are untouched; the adapter written is the trained policy alone, and it moved."""
    from safetensors.torch import load_file

    from reference.hashing import sha256_of

    start = saved_adapter(tmp_path / "sft", fixtures_dir)
    digest = sha256_of(start)
    out = tmp_path / "dpo"
    on = ["--model", tiny_gemma2_dir, "--data", fixtures_dir / "data" / "preference_pairs.jsonl"]
    result = run_cli("dpo", *on, "--output", out, "--adapter", start, "max_steps=3", *ALL_PAIRS_AT_ONCE)
    assert result.returncode == 0, result.stderr
    steps = json.loads((out / "manifest.json").read_text(encoding="utf-8"))["steps"]
    losses, metrics = [s["loss"] for s in steps], [s["metrics"] for s in steps]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert metrics[0]["reward_margin"] == pytest.approx(0, abs=1e-6) and losses[-1] < losses[0]
    reference = [[m["reference_chosen_logp"], m["reference_rejected_logp"]] for m in metrics]
    assert reference == [pytest.approx(reference[0], rel=1e-6)] * 3  # each step sums the pairs in its own order
    assert sha256_of(start) == digest
    saved = load_file(str(start / "adapter_model.safetensors"))
    trained = load_file(str(out / "adapter_model.safetensors"))
    assert trained.keys() == saved.keys() and all(not torch.equal(trained[k], saved[k]) for k in saved)
    assert not (out / dpo.REFERENCE_ADAPTER).exists()


@pytest.mark.claim("D3", "P2")
def test_pairs_under_other_column_names_are_read_through_columns(tmp_path, fixtures_dir):
    """`dpo --columns prompt=question,chosen=good,rejected=bad`: the same pairs as the fixture's own columns; a
    map that leaves one out is refused, naming what it expects."""
    from reference.records import data

    source = fixtures_dir / "data" / "preference_pairs.jsonl"
    rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines()]
    renamed = tmp_path / "pairs.jsonl"
    renamed.write_text(
        "".join(
            json.dumps({"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]}, ensure_ascii=False) + "\n"
            for r in rows
        ),
        encoding="utf-8",
    )
    columns = data.parse_columns("prompt=question,chosen=good,rejected=bad", dpo.COLUMNS)
    assert dpo.read_pairs(renamed, columns) == dpo.read_pairs(source)
    with pytest.raises(InputError, match="expected prompt=COLUMN,chosen=COLUMN,rejected=COLUMN"):
        data.parse_columns("prompt=question,chosen=good", dpo.COLUMNS)


@pytest.mark.slow
@pytest.mark.claim("D3", "X12")
def test_dpo_trains_on_a_4_bit_base_with_checkpointing_and_accumulation_from_its_recipe(
    fixtures_dir, tiny_gemma2_dir, tmp_path
):
    """The recipe's settings reach the DPO Trainer as they reach SFT's: an NF4 base, activation checkpointing on
    at every step, 2 micro-batches of 4 pairs per step. The 12 pairs make 3 micro-batches an epoch, so steps of 2, 1
    (the epoch's last window), then 2; each micro-batch is run twice, the frozen reference's pass then the
    policy's: 4, 2, 4 forward passes. The loss starts at log 2 and falls; the policy adapter moves, the base's 4-bit
    values and the frozen reference do not (spec/observe.assert_trained)."""
    from spec.observe import assert_trained

    observed = Observed()
    settings = ["max_steps=3", "per_device_train_batch_size=4", "gradient_accumulation_steps=2"]
    settings += ["quantization.load_in_4bit=true", "quantization.bnb_4bit_compute_dtype=float32"]
    recipe = apply_overrides(load_recipe("dpo"), [*settings, "gradient_checkpointing=true", "learning_rate=5e-3"])
    data = fixtures_dir / "data" / "preference_pairs.jsonl"
    record = dpo.run(recipe, tiny_gemma2_dir, data, tmp_path, say=observed.lines.append, callbacks=[observed])
    assert record.model["quantization"] == "nf4" and record.step_plan["effective_batch_size"] == 8
    assert observed.checkpointing == [True] * 3 and [len(t) for t in observed.step_tokens] == [4, 2, 4]
    assert record.steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert_trained(record, observed)
