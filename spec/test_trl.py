"""X9: the project equals the seed's own library, trl (1.16.0), run here beside it on the fixtures.

SFT (seed 001 §2.2.2). The seed writes each record as `alpaca_prompt_jp.format(instruction, response)`,
appends EOS when the response is not empty, and hands that `text` field to trl's SFTTrainer
(dataset_text_field="text", max_seq_length 2048, packing False). trl 1.16 appends EOS to a text that does
not end with it, tokenizes the text with the tokenizer's special tokens (one BOS first), keeps the first
max_length tokens and trains on every token: labels = input_ids, and the model shifts them, so position 0
is never a target (ours carries -100 there; both losses skip it). reference.methods.sft with loss_on="all" must
give the same token ids and targets, and reference.methods.train the same per-step losses from the same LoRA start.

DPO (trl's DPOTrainer, loss "sigmoid"): log pi(y|x) is the sum of the per-token log-probabilities over the
completion (answer + EOS; the prompt is where tokenize(prompt) and tokenize(prompt + answer) first differ);
loss = mean of -log sigmoid(beta * ((log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)))).
Given a PeftModel it copies the adapter into a frozen "ref" adapter: the reference is the starting adapter.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import trl  # a test dependency (trl==1.16.0): without it these tests fail rather than skip

from reference.methods import dpo, sft, train
from reference.settings.recipes import apply_overrides, load_recipe
from spec.conftest import FIXTURES
from spec.observe import QA_COLUMNS, Observed, WhenBuilt, assert_trained

MODEL = FIXTURES / "models" / "tiny-gemma2"
QA111 = FIXTURES / "data" / "qa111_sample.jsonl"
PAIRS = FIXTURES / "data" / "preference_pairs.jsonl"

# Seed 001 §2.2.2, literally (not reference.modeling.formats' copy, so a change there is caught here).
SEED_ALPACA_PROMPT_JP = """
あなたは高性能なAIです。質問に対して、適切な回答を書きなさい。
回答に関係のないことは絶対に書かないでください。

### 質問:
{}

### 回答:
{}"""

SEVEN_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def seed_text(instruction: str, response: str, eos_token: str) -> str:
    """The seed's tokenize_function, literally: the alpaca text, EOS only after a non-empty response."""
    text = SEED_ALPACA_PROMPT_JP.format(instruction, response)
    if response:
        text += eos_token
    return text


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def llm2024_records() -> list[dict]:
    """QA111 (input -> instruction, output -> response), three magpie conversations and an empty response."""
    records = [{"instruction": r["input"], "response": r["output"]} for r in read_jsonl(QA111)]
    for row in read_jsonl(FIXTURES / "data" / "magpie_sample.jsonl")[:3]:
        user, assistant = row["conversations"][0], row["conversations"][1]
        records.append({"instruction": user["content"], "response": assistant["content"]})
    records.append({"instruction": "次の質問には答えないでください。", "response": ""})
    return records


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(MODEL))


def base_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(MODEL), dtype=torch.float32)


def trl_sft_encoding(records: list[dict], max_length: int) -> list[dict]:
    """What trl's SFTTrainer trains on: its prepared train_dataset for the seed's `text` field."""
    import datasets

    tok = tokenizer()
    rows = [{"text": seed_text(r["instruction"], r["response"], tok.eos_token)} for r in records]
    texts = datasets.Dataset.from_list(rows)
    config = trl.SFTConfig(
        output_dir="unused",
        dataset_text_field="text",
        max_length=max_length,
        packing=False,
        bf16=False,
        use_cpu=True,
        report_to="none",
    )
    trainer = trl.SFTTrainer(model=base_model(), args=config, train_dataset=texts, processing_class=tok)
    return list(trainer.train_dataset)


@pytest.fixture(scope="module")
def encodings():
    """(records, trl's encodings, ours) at the seed's max_seq_length 2048."""
    records, tok = llm2024_records(), tokenizer()
    ours = [sft.encode_record(tok, "alpaca-ja", r["instruction"], r["response"], 2048, loss_on="all") for r in records]
    return records, trl_sft_encoding(records, 2048), ours


@pytest.mark.claim("X9")
def test_every_llm2024_record_is_encoded_token_for_token_as_trls_sft_trainer_encodes_the_seeds_text(encodings):
    """Every record with a response: the same input ids, and the same targets (labels after position 0;
    trl's labels equal its input ids, every token trained on, as loss_on="all")."""
    records, theirs, ours = encodings
    answered = [i for i, r in enumerate(records) if r["response"]]
    assert len(answered) == len(records) - 1 == 27
    for i in answered:
        assert theirs[i]["labels"] == theirs[i]["input_ids"]
        assert ours[i]["input_ids"] == theirs[i]["input_ids"], records[i]["instruction"][:20]
        assert ours[i]["labels"][1:] == theirs[i]["labels"][1:]
        assert ours[i]["attention_mask"] == [1] * len(ours[i]["input_ids"])
    tok = tokenizer()
    first = ours[answered[0]]["input_ids"]
    assert first[0] == tok.bos_token_id and first[-1] == tok.eos_token_id


@pytest.mark.claim("X9", "C11")
def test_an_empty_response_gets_no_eos_as_in_the_seed_where_trl_1_16_appends_one(encodings):
    """Departure: the seed's formatting adds EOS only after a non-empty response, and the SFTTrainer of its
    day tokenized the text as it was. trl 1.16 appends EOS to any text not ending with it, so it trains the
    empty-response record on one more token, <eos>. The project takes the seed's side: the seed's text,
    tokenized as it is, with no EOS."""
    records, theirs, ours = encodings
    empty = next(i for i, r in enumerate(records) if not r["response"])
    tok = tokenizer()
    the_seeds = tok(seed_text(records[empty]["instruction"], "", tok.eos_token))["input_ids"]
    assert ours[empty]["input_ids"] == the_seeds and the_seeds[-1] != tok.eos_token_id
    assert theirs[empty]["input_ids"] == the_seeds + [tok.eos_token_id]
    assert ours[empty]["labels"][1:] == the_seeds[1:]


@pytest.mark.claim("X9")
def test_a_record_longer_than_max_seq_length_keeps_its_first_tokens_as_trl_does():
    """trl's truncation_mode "keep_start": the first max_length tokens (BOS included) stay, the end goes.
    At 24 tokens every record is cut (the alpaca prompt alone is longer), so the EOS is cut away too."""
    records, tok = llm2024_records(), tokenizer()
    theirs = trl_sft_encoding(records, 24)
    ours = [sft.encode_record(tok, "alpaca-ja", r["instruction"], r["response"], 24, loss_on="all") for r in records]
    assert [len(t["input_ids"]) for t in theirs] == [24] * len(records)
    assert [o["input_ids"] for o in ours] == [t["input_ids"] for t in theirs]
    assert [o["labels"][1:] for o in ours] == [t["labels"][1:] for t in theirs]


# ---- four optimizer steps: reference.methods.train against trl's SFTTrainer ------------------------------------------

STEPS, BATCH, ACCUMULATION, LEARNING_RATE, MAX_LENGTH = 4, 2, 2, 2e-3, 160
"""At 160 tokens half the QA111 records (101 to 299 tokens) are cut and half are padded in their batch."""
LOSS_TOLERANCE = 1e-5
"""fp32 on the CPU; the two compute the same sums in a different order (trl's fused, chunked log-softmax
against the model's logits + cross-entropy), ~1e-7 apart; Adam's normalised steps keep that small."""
WEIGHT_TOLERANCE = 1e-2
"""Trained adapter weights: |ours - trl's| within 1% of how far trl's moved from the start (about 3e-4 seen;
Adam turns a near-zero gradient's rounding into a whole +-lr step, so single elements can differ more)."""


def optimizer_settings(trainer) -> list[tuple]:
    """What the optimizer applies to each parameter group, the step size aside (the schedule sets it):
    weight decay (0.01 for the LoRA weights; too small to show in four steps' losses), betas, eps."""
    groups = trainer.optimizer.param_groups
    return sorted((len(g["params"]), g["weight_decay"], tuple(g["betas"]), g["eps"]) for g in groups if g["params"])


def assert_moved_alike(ours: dict, theirs: dict, start: dict) -> None:
    """Each trained weight tensor: ||ours - theirs|| <= WEIGHT_TOLERANCE x ||theirs - start||."""
    for name, weight in theirs.items():
        gap, moved = (ours[name] - weight).norm(), (weight - start[name]).norm()
        assert moved > 0 and gap <= WEIGHT_TOLERANCE * moved, f"{name}: {gap:.3g} apart, moved {moved:.3g}"


def project_run(tmp_path):
    """reference.methods.train.run on the llm2024 recipe, fp32 base (no NF4), cut to four steps of 2 x 2 records."""
    recipe = apply_overrides(
        load_recipe("llm2024"),
        [
            f"max_steps={STEPS}",
            f"per_device_train_batch_size={BATCH}",
            f"gradient_accumulation_steps={ACCUMULATION}",
            "warmup_steps=0",
            f"learning_rate={LEARNING_RATE}",
            "save_steps=1000",
            "bf16=false",
            "quantization.load_in_4bit=false",
            f"sft.max_seq_length={MAX_LENGTH}",
        ],
    )
    observed = Observed()
    record = train.run(
        recipe,
        str(MODEL),
        str(QA111),
        str(tmp_path / "project"),
        columns=QA_COLUMNS,
        say=observed.lines.append,
        callbacks=[observed],
    )
    return record, observed


def trl_run(tmp_path):
    """trl's SFTTrainer as seed 001 sets it up (the same settings written out), on the seed's text field.

    LoRA as the seed's get_peft_model: r=64, alpha=64, dropout 0, seven projections, random_state 3407
    (the seed before peft draws A). Not set: dataset_num_proc=2 (worker processes; the same map result)."""
    import datasets
    import peft

    tok = tokenizer()
    rows = [{"text": seed_text(r["input"], r["output"], tok.eos_token)} for r in read_jsonl(QA111)]
    texts = datasets.Dataset.from_list(rows)
    torch.manual_seed(3407)
    model = peft.get_peft_model(
        base_model(),
        peft.LoraConfig(
            r=64, lora_alpha=64, lora_dropout=0.0, bias="none", target_modules=SEVEN_PROJECTIONS, task_type="CAUSAL_LM"
        ),
    )
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    config = trl.SFTConfig(
        output_dir=str(tmp_path / "trl"),
        dataset_text_field="text",
        max_length=MAX_LENGTH,
        packing=False,
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUMULATION,
        max_steps=STEPS,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="linear",
        warmup_steps=0,
        optim="adamw_8bit",
        weight_decay=0.01,
        neftune_noise_alpha=5,
        seed=3407,
        auto_find_batch_size=True,
        do_eval=True,
        gradient_checkpointing=True,
        bf16=False,
        use_cpu=True,
        logging_steps=1,
        save_steps=1000,
        report_to="none",
        disable_tqdm=True,
    )
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=texts, processing_class=tok)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, start, trainer


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("x9-sft")
    return project_run(tmp_path), trl_run(tmp_path)


@pytest.mark.slow
@pytest.mark.claim("X9")
def test_four_steps_of_the_llm2024_recipe_give_trls_per_step_losses_from_the_same_lora_start(two_runs):
    """Same records in the same order (the Trainer's sampler, seed 3407), same adamw_8bit, linear schedule,
    NEFTune alpha 5 on both (the Trainer's hook, drawing the same noise), dropout 0: per-step losses within
    LOSS_TOLERANCE, and the trained adapters moved alike (assert_moved_alike)."""
    (record, observed), (trl_losses, trl_start, trl_trainer) = two_runs
    trainable = [n for n, p in observed.model.named_parameters() if p.requires_grad]
    assert sorted(trainable) == sorted(trl_start)
    assert all(torch.equal(observed.before[n], trl_start[n]) for n in trainable)
    ours = [step["loss"] for step in record.steps]
    assert len(ours) == len(trl_losses) == STEPS
    assert ours == pytest.approx(trl_losses, abs=LOSS_TOLERANCE)
    assert any(step["tokens"] < BATCH * ACCUMULATION * MAX_LENGTH for step in record.steps)  # padding was there
    assert_trained(record, observed)
    ours_args, trl_args = observed.args, trl_trainer.args
    assert (ours_args.neftune_noise_alpha, ours_args.optim, ours_args.seed) == (5, "adamw_8bit", 3407)
    assert (trl_args.neftune_noise_alpha, trl_args.optim, trl_args.seed) == (5, "adamw_8bit", 3407)
    assert optimizer_settings(observed) == optimizer_settings(trl_trainer)
    trained = {n: p.detach() for n, p in observed.model.named_parameters()}
    theirs = {n: p.detach() for n, p in trl_trainer.model.named_parameters() if p.requires_grad}
    assert_moved_alike(trained, theirs, trl_start)


# ---- DPO: reference.methods.dpo against trl's DPOTrainer -------------------------------------------------------------

BETA = 0.1
BOUNDARY_PAIR = {"prompt": "質問：東", "chosen": "京です。", "rejected": "大阪です。"}
"""The prompt's last character joins the chosen answer's first ("東" + "京" is one token, 東京): trl scores
that token as part of the answer, for both answers of the pair (the prompt is their common prefix)."""
EOS_PAIR = {"prompt": "質問：", "chosen": "はい。<eos>", "rejected": "いいえ。"}
"""An answer that already ends with EOS gets no second one (trl's add_eos checks the text's end)."""


def preference_rows() -> list[dict]:
    return read_jsonl(PAIRS) + [BOUNDARY_PAIR, EOS_PAIR]


def lora_policy(seed: int = 0):
    """The tiny Gemma-2 with a LoRA adapter whose B is not zero (peft's init_lora_weights=False), so the
    policy differs from the base."""
    import peft

    torch.manual_seed(seed)
    config = peft.LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(base_model(), config)


def dpo_config(tmp_path, **settings):
    defaults = {
        "beta": BETA,
        "max_length": 256,
        "bf16": False,
        "use_cpu": True,
        "report_to": "none",
        "disable_tqdm": True,
    }
    return trl.DPOConfig(output_dir=str(tmp_path), **{**defaults, **settings})


@pytest.fixture(scope="module")
def trl_dpo(tmp_path_factory):
    """trl's DPOTrainer with the LoRA policy and the base as the reference model, on every pair at once."""
    import datasets

    policy = lora_policy()
    policy.eval()
    trainer = trl.DPOTrainer(
        model=policy,
        ref_model=base_model(),
        args=dpo_config(tmp_path_factory.mktemp("dpo")),
        train_dataset=datasets.Dataset.from_list(preference_rows()),
        processing_class=tokenizer(),
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
        policy_logps = trainer.compute_ref_log_probs(trainer.model, batch)  # trl's sequence log-probs of any model
        reference_logps = trainer.compute_ref_log_probs(trainer.ref_model, batch)
    return trainer, policy, batch, loss, policy_logps, reference_logps


def our_logps(policy) -> list:
    """reference.methods.dpo's sequence log-probs: policy chosen, policy rejected, then the same with the adapter
    off."""
    chosen, rejected, _ = our_encoding()
    tok = tokenizer()
    with torch.no_grad():
        ours = [dpo.sequence_logprobs(policy, chosen, tok), dpo.sequence_logprobs(policy, rejected, tok)]
        with policy.disable_adapter():
            ours += [dpo.sequence_logprobs(policy, chosen, tok), dpo.sequence_logprobs(policy, rejected, tok)]
    return ours


def our_encoding(max_length: int = 256):
    pairs = [dpo.PreferencePair(**row) for row in preference_rows()]
    return dpo.encode_pairs(tokenizer(), pairs, max_length)


@pytest.mark.claim("X9", "D3")
def test_dpo_sequences_are_trls_prompt_answer_and_eos_with_the_same_tokens_scored(trl_dpo):
    """trl's batch is [chosen..., rejected...], each prompt + completion, completion_mask 1 on the scored
    tokens; ours the same ids, with -100 exactly where trl's mask is 0."""
    _, _, batch, *_ = trl_dpo
    chosen, rejected, dropped = our_encoding()
    assert dropped == 0
    for row, (ids, labels) in enumerate(chosen + rejected):
        length = int(batch["attention_mask"][row].sum())
        assert ids == batch["input_ids"][row, :length].tolist()
        assert [label != -100 for label in labels] == [bool(m) for m in batch["completion_mask"][row, :length]]
    tok = tokenizer()
    answers = [tok.decode([t for t in labels if t != -100]) for _, labels in (chosen[-2], rejected[-2], chosen[-1])]
    assert answers == ["東京です。<eos>", "東大阪です。<eos>", "はい。<eos>"]


@pytest.mark.claim("X9", "D3")
def test_dpo_sequence_log_probabilities_equal_trls_for_policy_and_reference(trl_dpo):
    """Per sequence, the sum of the answer tokens' log-probabilities: reference.methods.dpo.sequence_logprobs of the
    policy (adapter on) and of the reference (adapter off: the base) against trl's, within 1e-4 on sums of
    about -100 (float32 rounding)."""
    _, policy, _, _, (trl_chosen, trl_rejected), (trl_ref_chosen, trl_ref_rejected) = trl_dpo
    ours = our_logps(policy)
    for mine, theirs in zip(ours, (trl_chosen, trl_rejected, trl_ref_chosen, trl_ref_rejected), strict=True):
        assert torch.allclose(mine, theirs, atol=1e-4, rtol=0)
    assert not torch.allclose(ours[0], ours[2], atol=1e-2)  # the policy is not the reference: the test can fail


@pytest.mark.claim("X9", "D3")
def test_the_dpo_loss_equals_trls_on_the_fixture_pairs(trl_dpo):
    """reference.methods.dpo.dpo_loss on trl's own log-probs, and on ours, equals trl's loss (about 0.68, not log 2:
    the policy's adapter is not zero)."""
    _, policy, _, trl_loss, (pc, pr), (rc, rr) = trl_dpo
    on_trls, _, _ = dpo.dpo_loss(pc, pr, rc, rr, BETA)
    on_ours, _, _ = dpo.dpo_loss(*our_logps(policy), BETA)
    assert on_trls.item() == pytest.approx(trl_loss.item(), abs=1e-6)
    assert on_ours.item() == pytest.approx(trl_loss.item(), abs=1e-5)
    assert abs(trl_loss.item() - math.log(2)) > 1e-3


@pytest.mark.claim("X9")
@pytest.mark.parametrize("max_length", [3, 4])
def test_a_pair_whose_prompt_fills_max_length_is_dropped_and_the_others_cut_as_trl_does(tmp_path, max_length):
    """trl drops a pair whose prompt alone reaches max_length (its filter keeps len(prompt) < max_length:
    keep_start would leave no answer token) and cuts the others' ends. The two short prompts are 3 tokens
    (<bos> 質問 ：), the fixture prompts far longer: at 3 no pair is left (ours: an error saying so), at 4
    the two short pairs stay, every sequence cut to 4 tokens, EOS gone."""
    import datasets

    from reference.errors import InputError

    trainer = trl.DPOTrainer(
        model=lora_policy(),
        ref_model=base_model(),
        args=dpo_config(tmp_path, max_length=max_length),
        train_dataset=datasets.Dataset.from_list(preference_rows()),
        processing_class=tokenizer(),
    )
    kept = [dpo.encode_pair(tokenizer(), dpo.PreferencePair(**row), max_length) for row in preference_rows()]
    assert sum(pair is not None for pair in kept) == len(trainer.train_dataset) == {3: 0, 4: 2}[max_length]
    if max_length == 3:
        with pytest.raises(InputError, match="no answer token is left"):
            our_encoding(max_length)
        return
    chosen, rejected, dropped = our_encoding(max_length)
    assert dropped == len(preference_rows()) - 2
    batch = trainer.data_collator(list(trainer.train_dataset))
    for row, (ids, labels) in enumerate(chosen + rejected):
        assert ids == batch["input_ids"][row].tolist() and len(ids) == max_length
        assert [label != -100 for label in labels] == batch["completion_mask"][row].bool().tolist()


@pytest.fixture(scope="module")
def saved_sft_adapter(tmp_path_factory):
    """A saved adapter that is not the identity (B != 0), standing for the SFT adapter DPO starts from."""
    directory = tmp_path_factory.mktemp("sft-adapter")
    lora_policy(seed=1).save_pretrained(directory)
    tokenizer().save_pretrained(directory)
    return directory


@pytest.mark.slow
@pytest.mark.claim("X9", "D3")
def test_dpo_from_a_saved_adapter_takes_trls_steps_with_that_adapter_frozen_as_the_reference(
    tmp_path, saved_sft_adapter
):
    """Both start from the saved adapter, loaded trainable. trl copies it to a frozen "ref" adapter; so must
    we: the first loss is exactly log 2 (r_w = r_l = 0), the next ones equal trl's when the `dpo` run is given
    trl's settings (AdamW, lr 5e-3, weight decay 0.01, constant rate, no clipping, all pairs in one batch), and
    after training the
    reference still holds the saved weights while the policy moved."""
    import datasets
    import peft
    from safetensors.torch import load_file

    steps, learning_rate = 3, 5e-3
    rows = read_jsonl(PAIRS)
    theirs = peft.PeftModel.from_pretrained(base_model(), str(saved_sft_adapter), is_trainable=True)
    config = dpo_config(
        tmp_path,
        per_device_train_batch_size=len(rows),
        learning_rate=learning_rate,
        max_steps=steps,
        lr_scheduler_type="constant",
        weight_decay=0.01,
        optim="adamw_torch",
        max_grad_norm=0.0,
        gradient_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
    )
    trainer = trl.DPOTrainer(
        model=theirs, args=config, train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer()
    )
    trainer.train()
    trl_losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    same_settings = [
        f"per_device_train_batch_size={len(rows)}",
        f"learning_rate={learning_rate}",
        f"max_steps={steps}",
        "lr_scheduler_type=constant",
        "weight_decay=0.01",
        "optim=adamw_torch",
        "max_grad_norm=0.0",
        "save_strategy=no",
        "bf16=false",
        f"dpo.beta={BETA}",
        "dpo.max_length=256",
    ]
    seen = {}
    record = dpo.run(
        apply_overrides(load_recipe("dpo"), same_settings),
        MODEL,
        PAIRS,
        tmp_path / "ours",
        adapter=saved_sft_adapter,
        say=lambda _: None,
        callbacks=[WhenBuilt(lambda model: seen.update(model=model))],
    )
    ours, losses = seen["model"], [s["loss"] for s in record.steps]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6) == trl_losses[0]
    assert losses == pytest.approx(trl_losses, abs=1e-5)
    reference = [[s["metrics"]["reference_chosen_logp"], s["metrics"]["reference_rejected_logp"]] for s in record.steps]
    assert reference == [pytest.approx(reference[0], rel=1e-6)] * steps  # the pairs summed in each step's order

    saved = load_file(str(saved_sft_adapter / "adapter_model.safetensors"))
    weights = peft.get_peft_model_state_dict(ours, adapter_name=dpo.REFERENCE_ADAPTER)
    assert weights.keys() == saved.keys() and all(torch.equal(weights[k], saved[k]) for k in saved)
    assert all(not p.requires_grad for n, p in ours.named_parameters() if f".{dpo.REFERENCE_ADAPTER}." in n)
    policy = peft.get_peft_model_state_dict(ours)
    assert all(not torch.equal(policy[k], saved[k]) for k in saved)
    assert_moved_alike(policy, peft.get_peft_model_state_dict(trainer.model), saved)
