"""Issue 21 item 4, X13: which layers gradient checkpointing recomputes (`[sft] recompute`,
reference/training/recompute.py).

`all` recomputes every layer in the backward pass, as the seed and trl do; `fit` keeps the activations of as many
layers as fit in half the memory free when training begins, measured by one forward at the run's largest batch.
Recomputing repeats the same operations on the same inputs, so the losses and the trained weights are the same
whichever layers are recomputed: bit for bit on the CPU.
"""

from __future__ import annotations

import json

import pytest
import torch

from reference.methods import train
from reference.modeling import lora, models, shapes
from reference.settings.recipes import apply_overrides, load_recipe
from reference.training import recompute
from spec.conftest import FIXTURES
from spec.observe import QA_COLUMNS, Observed

QA111 = FIXTURES / "data" / "qa111_sample.jsonl"
STEPS = ["max_steps=3", "per_device_train_batch_size=4", "gradient_accumulation_steps=1", "warmup_steps=0"]
STEPS += ["learning_rate=2e-3", "save_steps=1000", "logging_steps=1", "sft.max_seq_length=96"]
"""The llm2024 recipe as it is (NF4 base, NEFTune alpha 5, adamw_8bit, padding-free rows, checkpointing) cut to 3
steps of 4 QA records."""


def run_with(recompute_setting: str, output):
    recipe = apply_overrides(load_recipe("llm2024"), [*STEPS, f"sft.recompute={recompute_setting}"])
    observed = Observed()
    record = train.run(
        recipe, str(FIXTURES / "models" / "tiny-gemma2"), str(QA111), str(output), QA_COLUMNS,
        say=observed.lines.append, callbacks=[observed],
    )  # fmt: skip
    return record, observed


@pytest.fixture(scope="module")
def all_and_fit(tmp_path_factory):
    output = tmp_path_factory.mktemp("recompute")
    return run_with("all", output / "all"), run_with("fit", output / "fit")


@pytest.mark.slow
@pytest.mark.claim("X13")
def test_keeping_layers_activations_changes_neither_the_losses_nor_the_trained_weights(all_and_fit):
    """NEFTune's noise is drawn from the same generator after `fit`'s measuring forward (it runs under fork_rng),
    and a kept layer's backward is the recomputed one's: rtol 0."""
    (every, every_seen), (fit, fit_seen) = all_and_fit
    assert [s["loss"] for s in fit.steps] == [s["loss"] for s in every.steps]
    trained = {n: p for n, p in fit_seen.model.named_parameters() if p.requires_grad}
    assert trained and all(torch.equal(p, dict(every_seen.model.named_parameters())[n]) for n, p in trained.items())


@pytest.mark.slow
@pytest.mark.claim("X13")
def test_fit_keeps_every_layer_where_memory_is_plentiful_and_the_manifest_says_what_it_kept(all_and_fit):
    (every, _), (fit, fit_seen) = all_and_fit
    plan = fit.device["recompute"]
    assert plan["layers"] == plan["kept"] == 2 and plan["batch_shape"] == [4, 96]
    assert plan["bytes_per_layer"] > 0 and plan["free_bytes"] > 2 * plan["bytes_per_layer"] * plan["layers"]
    assert any(line.startswith("recompute fit: 2 of 2 layers keep their activations") for line in fit_seen.lines)
    assert every.device.get("recompute") is None and every.settings["sft"]["recompute"] == "all"
    assert fit.settings["sft"]["recompute"] == "fit"


def tiny_lora_with_checkpointing():
    model, _ = models.load_causal_lm(FIXTURES / "models" / "tiny-gemma2")
    model = lora.attach(model, {"r": 8, "lora_alpha": 8, "target_modules": list(shapes.PROJECTIONS)})
    model.activation_checkpointing_enable({"use_reentrant": False})
    model.train()
    return model


@pytest.mark.claim("X13")
@pytest.mark.parametrize("free_layers, kept", [(0.9, 0), (1.9, 0), (2.5, 1), (3.5, 1), (4.0, 2), (100.0, 2)])
def test_fit_keeps_as_many_of_the_last_layers_as_half_the_free_memory_holds(monkeypatch, free_layers, kept):
    """With free memory worth F measured layers, floor(F / 2) layers are kept (at most all 2), the last ones; the
    others stay checkpointed."""
    model = tiny_lora_with_checkpointing()
    per_layer = recompute.saved_bytes_per_layer(model, (2, 32), recompute.decoder_layers(model))
    monkeypatch.setattr(recompute, "free_memory", lambda device: int(free_layers * per_layer))
    plan = recompute.fit(model, (2, 32))
    flags = [layer.gradient_checkpointing for layer in recompute.decoder_layers(model)]
    assert plan.kept == kept and plan.bytes_per_layer == per_layer
    assert flags == [True] * (2 - kept) + [False] * kept


@pytest.mark.claim("X13")
def test_a_layers_measured_activations_hold_at_least_its_attention_probabilities_and_grow_with_the_batch():
    """By hand: an eager attention layer keeps its softmax output, batch x heads x T x T fp32 values (the tiny
    Gemma-2: 4 heads), so a layer at (2, 32) holds at least 2 x 4 x 32 x 32 x 4 = 32,768 bytes; at twice the tokens
    the quadratic part alone makes it more than twice as much."""
    model = tiny_lora_with_checkpointing()
    layers = recompute.decoder_layers(model)
    small = recompute.saved_bytes_per_layer(model, (2, 32), layers)
    large = recompute.saved_bytes_per_layer(model, (2, 64), layers)
    assert small >= 2 * 4 * 32 * 32 * 4 and large > 2 * small
    assert all(layer.gradient_checkpointing for layer in layers)  # measuring leaves every flag as it was


@pytest.mark.claim("X13")
def test_measuring_draws_nothing_from_the_runs_random_numbers():
    model = tiny_lora_with_checkpointing()
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    recompute.saved_bytes_per_layer(model, (2, 16), recompute.decoder_layers(model))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.slow
@pytest.mark.claim("X13", "X2")
def test_runs_that_differ_only_in_the_layers_they_recompute_are_the_same_run(all_and_fit):
    """A run recorded before `recompute` existed ran the default, all. Against a fit run the setting cannot change
    the numbers, so it is a note, not a difference: the runs reproduce each other (and --resume may change it)."""
    from dataclasses import asdict

    from reference.training import manifest

    (every, _), (fit, _) = all_and_fit
    older = json.loads(json.dumps(asdict(every), default=str))
    del older["settings"]["sft"]["recompute"]
    newer = json.loads(json.dumps(asdict(every), default=str))
    assert manifest.what_ran_differences(older, newer)["settings"] == []
    fit_record = json.loads(json.dumps(asdict(fit), default=str))
    assert manifest.what_ran_differences(older, fit_record)["settings"] == []
    verdict = manifest.compare(older, fit_record, rtol=0)
    assert verdict.reproduces and "no effect on the numbers.sft.recompute: 'all' vs 'fit'" in verdict.notes
