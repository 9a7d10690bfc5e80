"""X11: padding-free batches (reference/methods/sft.py's collator, reference/methods/padding_free.py) against padded
ones.

A padded batch pads every record to the batch's longest (transformers' DataCollatorForSeq2Seq, padding masked out
and never a target); a padding-free batch lays the same records end to end in one row, position ids restarting at 0
for each record (transformers' DataCollatorWithFlattening), so only real tokens are computed. The padded batch is
the reference: transformers computes it, and trl's SFTTrainer batches that way (spec/test_trl.py).

Tolerances, fp32 on the CPU: a record's loss 1e-5 (the same sums in another order: a flattened row's matrix products
run over N rows where the padded batch's run over B x L, ~1e-7 apart); a step's loss 1e-5 as spec/test_trl.py (Adam's
normalised steps keep four steps' drift that small), 1e-3 as the recipe runs (NF4 base, bf16 autocast); trained
adapters within 1% of how far they moved.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from reference.methods import padding_free, sft, train
from reference.settings.recipes import apply_overrides, load_recipe
from spec.conftest import FIXTURES
from spec.observe import QA_COLUMNS, Observed, WhenBuilt, assert_trained

IGNORED = -100
QA111 = FIXTURES / "data" / "qa111_sample.jsonl"
RECORD_TOLERANCE = STEP_TOLERANCE = 1e-5
WEIGHT_TOLERANCE = 1e-2
BF16_STEP_TOLERANCE = 1e-3
"""The recipe as it is: an NF4 base and bf16 autocast, which keeps 8 bits of each product's mantissa, so the two
layouts round differently (3e-5 apart seen over four steps; bf16's own step at a loss of 8 is 0.03)."""


def records_of_3_1_and_2_tokens() -> list[dict]:
    return [
        {"input_ids": [2, 6, 7], "attention_mask": [1, 1, 1], "labels": [IGNORED, 6, 7]},
        {"input_ids": [2], "attention_mask": [1], "labels": [IGNORED]},
        {"input_ids": [2, 9], "attention_mask": [1, 1], "labels": [IGNORED, 9]},
    ]


@pytest.mark.claim("X11")
def test_a_padding_free_batch_lays_the_records_end_to_end_with_positions_restarting_at_each(gemma_tokenizer):
    """By hand: one row of 3 + 1 + 2 = 6 tokens, positions 0 1 2 | 0 | 0 1, no attention mask and no padding; each
    record's first label is -100, so the last token of one record never learns to predict the next one's first."""
    batch = sft.collator(gemma_tokenizer, padding_free=True)(records_of_3_1_and_2_tokens())
    assert batch["input_ids"].tolist() == [[2, 6, 7, 2, 2, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1]]
    assert batch["labels"].tolist() == [[IGNORED, 6, 7, IGNORED, IGNORED, 9]]
    assert "attention_mask" not in batch
    assert padding_free.record_bounds(batch["position_ids"]) == [(0, 3), (3, 4), (4, 6)]


@pytest.mark.claim("X11", "L2")
def test_the_real_tokens_of_a_batch_are_its_mask_ones_or_every_position_of_a_flattened_row(gemma_tokenizer):
    """3 + 1 + 2 = 6 real tokens either way: the padded batch holds 3 x 3 = 9 positions, 3 of them padding."""
    records = records_of_3_1_and_2_tokens()
    padded = sft.collator(gemma_tokenizer)(records)
    flattened = sft.collator(gemma_tokenizer, padding_free=True)(records)
    assert padded["input_ids"].numel() == 9
    assert sft.real_tokens(padded) == sft.real_tokens(flattened) == 6


# ---- one forward pass: each record's loss, padded and flattened ------------------------------------------------


def qa_records(tokenizer, count: int = 4) -> list[dict]:
    """The first QA111 records, instruction-tuned (labels on the response): 299, 224, 161 and 160 Gemma tokens."""
    rows = [json.loads(line) for line in QA111.read_text(encoding="utf-8").splitlines()][:count]
    return [sft.encode_record(tokenizer, "alpaca-ja", r["input"], r["output"], 2048, "response") for r in rows]


def record_losses(logits: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """Per row of (rows, length, vocab) logits: the mean cross-entropy of each token's logits against the next label."""
    return [
        F.cross_entropy(row_logits[:-1], row_labels[1:], ignore_index=IGNORED).item()
        for row_logits, row_labels in zip(logits, labels, strict=True)
    ]


def split_row(logits: torch.Tensor, labels: torch.Tensor, bounds) -> tuple[list, list]:
    """A flattened row's logits and labels cut back into its records."""
    return [logits[0, s:e] for s, e in bounds], [labels[0, s:e] for s, e in bounds]


MODELS = {
    "tiny-gemma2": {"sliding_window": 16, "attn_logit_softcapping": 5.0},
    "tiny-llama": {},
}
"""Gemma-2 with a window of 16 tokens (its sliding layer then sees only part of each record) and attention logits
soft-capped at 5: both must hold within each record."""
SHARPEN = 10.0
"""The attention projections' weights times 10: on the fixture's small random weights every record's attention is
near uniform and no cap binds; sharpened, the window and the cap each move the loss by about 1e-2."""


def sharpened(name: str, **config):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(FIXTURES / "models" / name), dtype=torch.float32, use_cache=False, **config
    )
    with torch.no_grad():
        for layer in model.model.layers:
            for projection in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(layer.self_attn, projection).weight.mul_(SHARPEN)
    return model


@pytest.mark.claim("X11")
@pytest.mark.parametrize("name", MODELS)
def test_each_records_loss_in_a_flattened_row_equals_its_loss_in_the_padded_batch(name):
    """The padded batch through the model as transformers runs it (Gemma-2 eager, Llama sdpa) is the reference. The
    flattened row gives each record the same loss within RECORD_TOLERANCE twice: with transformers' own mask built
    from the position ids (the whole row scored against itself), and record by record (reference.methods.padding_free).
    Gemma-2's window and soft cap were in play: without either, the same records score otherwise."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(FIXTURES / "models" / name))
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    records = qa_records(tokenizer)
    padded = sft.collator(tokenizer)(records)
    flattened = sft.collator(tokenizer, padding_free=True)(records)
    bounds = padding_free.record_bounds(flattened["position_ids"])
    model = sharpened(name, **MODELS[name])
    with torch.no_grad():
        expected = record_losses(model(**padded).logits, padded["labels"])
        masked = record_losses(*split_row(model(**flattened).logits, flattened["labels"], bounds))
        with padding_free.record_by_record(model):
            one_by_one = record_losses(*split_row(model(**flattened).logits, flattened["labels"], bounds))
        assert model.config._attn_implementation == ("eager" if name == "tiny-gemma2" else "sdpa")  # put back
        for setting in MODELS[name]:
            without = sharpened(name, **{**MODELS[name], setting: load_config(name)[setting]})
            assert record_losses(without(**padded).logits, padded["labels"]) != pytest.approx(expected, abs=1e-3)
    assert [e - s for s, e in bounds] == [len(r["input_ids"]) for r in records]
    assert masked == pytest.approx(expected, abs=RECORD_TOLERANCE)
    assert one_by_one == pytest.approx(expected, abs=RECORD_TOLERANCE)


def load_config(name: str) -> dict:
    """The fixture's own config.json (Gemma-2: no cap at 50 binds here, and a window of 4096)."""
    return json.loads((FIXTURES / "models" / name / "config.json").read_text())


@pytest.mark.claim("X11", "C14")
def test_a_flattened_row_gets_the_neftune_noise_its_padded_batch_gets():
    """The Trainer's hook (transformers' neftune_post_forward_hook) on the padded embeddings of records of 3, 1 and
    2 tokens, against padding_free.padded_noise on the flattened row, from the same generator state: each real
    token gets exactly the same noise (the hook on the flattened row itself would draw 6 x d numbers, not 3 x 3 x d)."""
    from transformers.integrations.neftune import neftune_post_forward_hook

    embedding = torch.nn.Embedding(16, 8)
    embedding.neftune_noise_alpha = 5.0
    padded_ids = torch.tensor([[2, 6, 7], [2, 0, 0], [2, 9, 0]])
    flat_ids = torch.tensor([[2, 6, 7, 2, 2, 9]])
    with torch.no_grad():
        clean_padded, clean_flat = embedding(padded_ids), embedding(flat_ids)
        torch.manual_seed(0)
        noise_padded = neftune_post_forward_hook(embedding, None, clean_padded) - clean_padded
        torch.manual_seed(0)
        hook = padding_free.padded_noise(5.0, [(0, 3), (3, 4), (4, 6)])
        noise_flat = hook(embedding, None, clean_flat) - clean_flat
    real = torch.cat([noise_padded[0, :3], noise_padded[1, :1], noise_padded[2, :2]])
    assert torch.equal(noise_flat[0], real)
    assert noise_flat.abs().max() <= 5.0 / (3 * 8) ** 0.5
    embedding.eval()
    assert torch.equal(hook(embedding, None, clean_flat), clean_flat)


# ---- four optimizer steps of the llm2024 recipe, padded and padding-free -------------------------------------------

STEPS = ["max_steps=4", "per_device_train_batch_size=4", "gradient_accumulation_steps=1", "warmup_steps=0"]
STEPS += ["learning_rate=2e-3", "save_steps=1000", "logging_steps=1", "sft.max_seq_length=160"]
FP32 = ["bf16=false", "quantization.load_in_4bit=false"]
"""The recipe as it is (NEFTune alpha 5, adamw_8bit, gradient checkpointing, seed 3407) cut to 4 steps of 4 QA
records, in fp32 on a full-precision base or as the recipe says (NF4, bf16): at 160 tokens half the records are
cut and half padded in their batch."""
RUNS = {
    "tiny-gemma2": ("tiny-gemma2", FP32),
    "tiny-llama": ("tiny-llama", FP32),
    "tiny-gemma2-nf4-bf16": ("tiny-gemma2", []),
}


class SeenRecords(TrainerCallback):
    """A forward pre-hook of our own, registered once the Trainer is built: per optimizer step, the records the
    model was fed (token ids), read from the padded rows (up to their mask's last one) or cut from the flattened
    row at its position-id restarts, and the positions it computed."""

    def __init__(self):
        self.steps, self.positions = [[]], [0]

    def on_init_end(self, args, state, control, model=None, **kwargs):
        model.register_forward_pre_hook(self.look, with_kwargs=True)

    def look(self, module, args, kwargs):
        if not module.training:
            return
        ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
        if mask is not None:
            self.steps[-1] += [tuple(row[: int(m.sum())].tolist()) for row, m in zip(ids, mask, strict=True)]
        else:
            bounds = padding_free.record_bounds(kwargs["position_ids"])
            self.steps[-1] += [tuple(ids[0, s:e].tolist()) for s, e in bounds]
        self.positions[-1] += ids.numel()

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append([])
        self.positions.append(0)


def train_run(model_dir, output, precision: list[str], padding_free_batches: bool):
    recipe = apply_overrides(
        load_recipe("llm2024"), STEPS + precision + [f"sft.padding_free={str(padding_free_batches).lower()}"]
    )
    observed, seen = Observed(), SeenRecords()

    record = train.run(
        recipe,
        str(model_dir),
        str(QA111),
        str(output),
        QA_COLUMNS,
        say=observed.lines.append,
        callbacks=[observed, seen],
    )
    return record, observed, seen


@pytest.fixture(scope="module", params=list(RUNS))
def two_runs(request, tmp_path_factory):
    """(padded, padding-free) runs of STEPS on the model: each (manifest, Observed, SeenRecords)."""
    name, precision = RUNS[request.param]
    directory, output = FIXTURES / "models" / name, tmp_path_factory.mktemp(f"x11-{request.param}")
    return train_run(directory, output / "padded", precision, False), train_run(
        directory, output / "padding-free", precision, True
    )


@pytest.mark.slow
@pytest.mark.claim("X11")
def test_padding_free_steps_train_on_the_same_records_to_the_padded_steps_losses(two_runs):
    """The same records in the same order in every step (the Trainer's sampler, seed 3407; the collator only lays
    them out), the per-step losses within STEP_TOLERANCE with NEFTune on (BF16_STEP_TOLERANCE as the recipe is),
    and in fp32 adapters that moved alike."""
    (padded, padded_seen_by, padded_seen), (free, free_seen_by, free_seen) = two_runs
    assert len(padded_seen.steps[:-1]) == len(free_seen.steps[:-1]) == 4
    assert padded_seen.steps == free_seen.steps and all(len(step) == 4 for step in free_seen.steps[:-1])
    assert padded_seen_by.arguments["neftune_noise_alpha"] == free_seen_by.arguments["neftune_noise_alpha"] == 5
    bf16 = free.settings["training_arguments"]["bf16"]
    tolerance = BF16_STEP_TOLERANCE if bf16 else STEP_TOLERANCE
    assert [s["loss"] for s in free.steps] == pytest.approx([s["loss"] for s in padded.steps], abs=tolerance)
    assert_trained(free, free_seen_by)
    start, theirs = padded_seen_by.before, dict(padded_seen_by.model.named_parameters())
    assert all(torch.equal(free_seen_by.before[name], start[name]) for name in start)  # one LoRA start
    if bf16:
        # No bound on the weights follows from bf16's rounding here: adamw_8bit's first update is lr x sign(g) per
        # weight, so a gradient near zero, rounded to the other sign in the other layout, moves that weight 2 x lr
        # the other way (then its 8-bit moments may round to neighbouring codes). The losses above carry the
        # comparison; the fp32 runs compare the weights.
        return
    for name, weight in free_seen_by.model.named_parameters():
        if weight.requires_grad:  # ||padding-free - padded|| <= WEIGHT_TOLERANCE x ||padded - start||
            gap, moved = (weight - theirs[name]).norm().item(), (theirs[name] - start[name]).norm().item()
            assert gap <= WEIGHT_TOLERANCE * moved, f"{name}: {gap:.3g} apart, moved {moved:.3g}"


@pytest.mark.slow
@pytest.mark.claim("X11", "L2")
def test_padding_free_steps_compute_only_the_real_tokens_and_count_the_same_ones(two_runs):
    """Each step's real tokens in the manifest are the same in both runs and are the lengths of the records fed;
    the padded steps computed padding besides (positions > tokens), the padding-free ones none."""
    (padded, _, padded_seen), (free, free_seen_by, free_seen) = two_runs
    fed = [sum(len(r) for r in step) for step in free_seen.steps[:-1]]
    assert [s["tokens"] for s in free.steps] == [s["tokens"] for s in padded.steps] == fed
    assert free_seen.positions[:-1] == fed
    assert all(p >= t for p, t in zip(padded_seen.positions, fed, strict=False))
    assert sum(padded_seen.positions[:-1]) > sum(fed)
    assert any("padding-free batches" in line for line in free_seen_by.lines)
    assert free.settings["sft"]["padding_free"] is True and padded.settings["sft"]["padding_free"] is False


@pytest.mark.slow
@pytest.mark.claim("X11", "C13")
def test_auto_find_batch_size_retries_a_padding_free_run_with_fewer_records_per_row(tmp_path, tiny_gemma2_dir):
    """As spec/test_train.py's C13 test, on flattened rows: a forward pass on a row of more than 2 records raises the
    CPU allocator's out-of-memory error (a flattened row is always 1 row, so the records are counted from its
    position ids). The Trainer retries with int(4 x 0.9) = 3 records, which fails too, then int(3 x 0.9) = 2, which
    runs: 24 records / 2 = 12 micro-batches, 6 steps at accumulation 2, each step's tokens the real tokens fed, and
    the model's attention and embeddings as they were before training, after the failed steps too. The recipe's
    `recompute = fit` kept every layer's activations at first; after running out of memory it recomputes them all."""
    observed, fed = Observed(), []
    recipe = apply_overrides(
        load_recipe("llm2024"),
        ["num_train_epochs=1", "per_device_train_batch_size=4", "gradient_accumulation_steps=2", "warmup_steps=0"]
        + ["save_steps=100", "sft.max_seq_length=24", "quantization.load_in_4bit=false", "sft.padding_free=true"],
    )

    def hook(module, args, kwargs):
        if module.training and len(padding_free.record_bounds(kwargs["position_ids"])) > 2:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1099511627776 bytes.")
        if module.training:
            fed.append(kwargs["input_ids"].numel())

    limit_records = WhenBuilt(lambda model: model.register_forward_pre_hook(hook, with_kwargs=True))

    manifest = train.run(
        recipe,
        str(tiny_gemma2_dir),
        str(QA111),
        str(tmp_path),
        QA_COLUMNS,
        observed.lines.append,
        callbacks=[observed, limit_records],
    )
    assert manifest.batch_size_attempts == [4, 3, 2]
    assert any("out of memory at batch size 4" in line and "retries with 3" in line for line in observed.lines)
    assert any(line.startswith("recompute fit: 2 of 2 layers keep their activations") for line in observed.lines)
    assert any("starts again after running out of memory; every layer recomputed" in line for line in observed.lines)
    assert manifest.device["recompute"] is None
    assert manifest.step_plan["micro_batches_per_epoch"] == 12 and manifest.step_plan["total_optimizer_steps"] == 6
    assert len(manifest.steps) == 6 and [s["tokens"] for s in manifest.steps] == [24 * 4] * 6 == [
        a + b for a, b in zip(fed[::2], fed[1::2], strict=True)
    ]
    model = observed.model.get_base_model()
    assert model.config._attn_implementation == "eager"
    embeddings, ids = model.get_input_embeddings().train(), torch.tensor([[2, 100, 200]])
    with torch.no_grad():
        assert torch.equal(embeddings(ids), embeddings(ids))  # no NEFTune noise left on after training
