"""Continuing from a saved LoRA adapter (seed 000): loading it frozen or trainable, and training it further.

The library calls this file is about, each shown in a test beside the project's function that wraps it:

    PeftModel.from_pretrained(base, adapter_dir)                     frozen: peft's default (A2)
    PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)  training goes on (A1)   = lora.load_adapter

The adapter continued is checkpoint-3 of one uninterrupted six-step run on the QA fixture (the "old" data;
the `uninterrupted` fixture of spec/conftest.py, shared with spec/test_resume.py and spec/test_merge.py);
training goes on for six steps on the magpie sample (the "new" data), a module fixture shared by the tests
that look at it. The same continuation tests run on the CPU and, with a 4-bit base, on CUDA when a GPU is
there (A6; skipped with the reason when none is). Resuming a run is spec/test_resume.py, merging the adapter
into its base spec/test_merge.py; the `continue` command built on these calls is checked in spec/test_cli.py.

The numbers the tests lean on, defined in spec/adapters.py:
- SIX_STEPS: the llm2024 recipe cut to 6 steps of 4 records, warmup 2, learning rate 2e-3, a checkpoint every 3
  steps, records cut to 40 tokens;
- SCHEDULE: the rate of each of those steps, by hand: 0, 1e-3, 2e-3, 1.5e-3, 1e-3, 5e-4 (warmup over steps 1 and 2,
  then linear decay to 0 at step 6);
- TOLERANCE: 2^-7, bf16's resolution near 1 (fp32 norms in training against bf16 ones in a plain reload).

Where it leads: the main job measures what each route keeps of the old data (reference/job/routes.py, its report's
section 5; spec/test_reproduce.py pins it). The adapter loaded trainable keeps most of SFT's drop in old-data loss,
and a fresh adapter loses it.
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from reference.errors import InputError
from reference.methods import train
from reference.modeling import lora, models
from reference.settings.recipes import apply_overrides, load_recipe
from spec.adapters import (
    SCHEDULE,
    SIX_STEPS,
    TOLERANCE,
    adapter_tensors,
    assert_same_tensors,
    base_logits,
    base_plus_adapter_logits,
    logits_of,
    max_difference,
    trainable_weights,
)
from spec.observe import Observed, WhenBuilt, assert_trained

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


# --- A2: loading a saved adapter (fast: an untrained adapter is enough to count what is trainable) ---

TINY_GEMMA2_LORA_PER_LAYER = 1024
"""tiny-gemma2: hidden 64, 4 query heads and 2 key/value heads of 16, MLP 128. in + out per projection:
q 64+64, k 64+32, v 64+32, o 64+64, gate 64+128, up 64+128, down 128+64 = 128+96+96+128+192+192+192 = 1024."""


@pytest.fixture(scope="module")
def saved_fresh_adapter(tiny_gemma2_dir, tmp_path_factory):
    """The recipe's adapter (r=64, seven projections) saved untrained, as a checkpoint holds one."""
    directory = tmp_path_factory.mktemp("fresh") / "adapter"
    base, _ = models.load_causal_lm(tiny_gemma2_dir)
    lora.attach(base, load_recipe("llm2024").lora).save_pretrained(directory)
    return directory


@pytest.mark.claim("A2")
@pytest.mark.library("peft")
def test_peft_loads_a_saved_adapter_frozen_unless_asked_for_is_trainable(saved_fresh_adapter, tiny_gemma2_dir):
    """Seed 000's "it only learned the new data": PeftModel.from_pretrained(base, dir) has
    is_trainable=False, so not one adapter weight can change. With is_trainable=True every LoRA weight
    trains and nothing else does: r x 1024 per layer x 2 layers = 64 x 2048 = 131,072 weights."""
    base, _ = models.load_causal_lm(tiny_gemma2_dir)
    frozen = PeftModel.from_pretrained(base, str(saved_fresh_adapter))
    assert sum(p.numel() for p in frozen.parameters() if p.requires_grad) == 0

    base, _ = models.load_causal_lm(tiny_gemma2_dir)
    trainable = PeftModel.from_pretrained(base, str(saved_fresh_adapter), is_trainable=True)
    assert sum(w.numel() for w in trainable_weights(trainable).values()) == 64 * TINY_GEMMA2_LORA_PER_LAYER * 2
    assert all("lora_" in name for name in trainable_weights(trainable))


@pytest.mark.claim("A2")
def test_training_an_adapter_peft_loaded_frozen_is_refused(saved_fresh_adapter, tiny_gemma2_dir):
    base, _ = models.load_causal_lm(tiny_gemma2_dir)
    frozen = PeftModel.from_pretrained(base, str(saved_fresh_adapter))
    with pytest.raises(InputError, match="is_trainable"):
        lora.require_trainable(frozen)


@pytest.mark.claim("A1", "A2")
def test_load_adapter_is_peft_loading_it_with_is_trainable_true(saved_fresh_adapter, tiny_gemma2_dir):
    """lora.load_adapter(base, dir) checks the adapter first (below), then gives what peft's call gives: the
    same weights under the same names, trainable; 131,072 of them, the LoRA weights and nothing else."""
    base, _ = models.load_causal_lm(tiny_gemma2_dir)
    ours = lora.load_adapter(base, saved_fresh_adapter)
    base, _ = models.load_causal_lm(tiny_gemma2_dir)
    theirs = PeftModel.from_pretrained(base, str(saved_fresh_adapter), is_trainable=True)
    assert_same_tensors(trainable_weights(ours), trainable_weights(theirs))
    assert lora.require_trainable(ours) == 64 * TINY_GEMMA2_LORA_PER_LAYER * 2 == 131_072
    assert all(("lora_" in name) == p.requires_grad for name, p in ours.named_parameters())


@pytest.mark.claim("A2")
def test_an_adapter_loaded_to_generate_or_merge_stays_frozen(saved_fresh_adapter, tiny_gemma2_dir):
    """load_adapter(..., trainable=False) is peft's default, frozen load: generation and merging never train it."""
    base, _ = models.load_causal_lm(tiny_gemma2_dir)
    frozen = lora.load_adapter(base, saved_fresh_adapter, trainable=False)
    assert not any(p.requires_grad for p in frozen.parameters())
    base, _ = models.load_causal_lm(tiny_gemma2_dir)
    assert_same_tensors(frozen.state_dict(), PeftModel.from_pretrained(base, str(saved_fresh_adapter)).state_dict())


@pytest.mark.claim("A2")
def test_an_adapter_made_for_another_architecture_of_the_same_shapes_is_refused(
    tiny_llama_dir, tiny_gemma2_dir, tmp_path
):
    """tiny-llama has tiny-gemma2's shapes (hidden 64, MLP 128, heads 4/2 of 16, 2 layers, vocab 2862), so
    peft would load its adapter onto Gemma without a word. The base the adapter records is read instead."""
    llama, _ = models.load_causal_lm(tiny_llama_dir)
    section = {"r": 4, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}
    lora.attach(llama, section).save_pretrained(tmp_path / "llama")
    gemma, _ = models.load_causal_lm(tiny_gemma2_dir)
    with pytest.raises(InputError, match="model_type 'llama' vs 'gemma2'"):
        lora.load_adapter(gemma, tmp_path / "llama")


@pytest.mark.claim("A2")
def test_the_recorded_base_is_found_whatever_folder_the_command_runs_in(
    fixtures_dir, tiny_llama_dir, tiny_gemma2_dir, tmp_path, monkeypatch
):
    """An adapter made on a base given by a relative path records the resolved directory, so the check
    above still finds the base when a later command runs from another folder."""
    monkeypatch.chdir(fixtures_dir.parent)
    llama, _ = models.load_causal_lm("fixtures/models/tiny-llama")
    lora.attach(llama, {"r": 4, "lora_alpha": 4, "target_modules": ["q_proj"]}).save_pretrained(tmp_path / "llama")
    recorded = json.loads((tmp_path / "llama" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str(tiny_llama_dir.resolve())
    monkeypatch.chdir(tmp_path)
    gemma, _ = models.load_causal_lm(tiny_gemma2_dir)
    with pytest.raises(InputError, match="model_type 'llama' vs 'gemma2'"):
        lora.load_adapter(gemma, tmp_path / "llama")


@pytest.mark.claim("A2")
def test_an_adapter_of_other_shapes_is_refused_even_when_its_recorded_base_is_gone(tiny_gemma2_dir, tmp_path):
    """A Llama of hidden size 32 gets an adapter; its base directory is then deleted, so only peft's
    shape check is left: the error names the adapter and the base it does not fit."""
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        num_hidden_layers=2,
        vocab_size=2862,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "small")
    small, _ = models.load_causal_lm(tmp_path / "small")
    lora.attach(small, {"r": 4, "lora_alpha": 4, "target_modules": ["q_proj"]}).save_pretrained(tmp_path / "adapter")
    shutil.rmtree(tmp_path / "small")
    gemma, _ = models.load_causal_lm(tiny_gemma2_dir)
    with pytest.raises(InputError, match="does not fit"):
        lora.load_adapter(gemma, tmp_path / "adapter")


@pytest.mark.claim("A2")
def test_an_adapter_missing_the_weights_of_a_layer_is_refused(saved_fresh_adapter, tiny_gemma2_dir, tmp_path):
    """peft only warns about missing adapter keys and leaves those layers' B at zero; that is an error here."""
    shutil.copytree(saved_fresh_adapter, tmp_path / "partial")
    kept = {k: v for k, v in adapter_tensors(saved_fresh_adapter).items() if ".layers.1." not in k}
    save_file(kept, str(tmp_path / "partial" / "adapter_model.safetensors"))
    base, _ = models.load_causal_lm(tiny_gemma2_dir)
    with pytest.raises(InputError, match="missing adapter keys"):
        lora.load_adapter(base, tmp_path / "partial")


# --- A1, A4 (restart), A6, C15: continuing the saved adapter, on the CPU and on CUDA ---


@pytest.fixture(scope="module", params=DEVICES)
def continued(request, uninterrupted, tiny_gemma2_dir, magpie_data, tmp_path_factory):
    """Six steps on the new data (the magpie sample) from the uninterrupted run's checkpoint-3, on
    `device`; the logits are taken before the first update and after the last."""
    device = request.param
    output, observed, seen = tmp_path_factory.mktemp(f"continued-{device}"), Observed(), {}

    def before(model):
        seen["before"] = logits_of(model, device)

    overrides = [*SIX_STEPS, f"use_cpu={str(device == 'cpu').lower()}"]  # the later setting wins
    record = train.run(
        apply_overrides(load_recipe("llm2024"), overrides),
        str(tiny_gemma2_dir),
        str(magpie_data),
        str(output),
        say=observed.lines.append,
        callbacks=[observed, WhenBuilt(before)],
        adapter=str(uninterrupted.checkpoint),
    )
    return SimpleNamespace(
        device=device,
        record=record,
        observed=observed,
        output=output,
        before=seen["before"],
        after=logits_of(observed.model, device),
    )


@pytest.mark.slow
@pytest.mark.claim("A1", "A6")
def test_before_the_first_update_the_model_is_base_plus_the_saved_adapter_not_the_base(
    continued, uninterrupted, tiny_gemma2_dir
):
    """The continued model's logits equal peft's base(NF4) + checkpoint-3 within bf16 resolution, and are
    more than ten times that from the bare base's (a fresh adapter, B = 0, would give exactly the base's)."""
    expected = base_plus_adapter_logits(tiny_gemma2_dir, uninterrupted.checkpoint, continued.device)
    assert max_difference(continued.before, expected) <= TOLERANCE
    assert max_difference(continued.before, base_logits(tiny_gemma2_dir, continued.device)) > 10 * TOLERANCE
    assert continued.record.adapter["mode"] == "loaded"
    assert any("adapter loaded" in line for line in continued.observed.lines)


@pytest.mark.slow
@pytest.mark.claim("A1", "A6")
def test_continuing_trains_the_loaded_adapter_and_leaves_the_4bit_base_frozen(continued):
    """The loss falls, every adapter weight changes, no base weight does; the base stays packed 4-bit
    (uint8 storage) on the device it trains on."""
    layer = continued.observed.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert continued.record.model["quantization"] == "nf4"
    assert layer.weight.dtype == torch.uint8 and layer.weight.device.type == continued.device
    assert_trained(continued.record, continued.observed)
    assert all(("lora_" in name) == p.requires_grad for name, p in continued.observed.model.named_parameters())


@pytest.mark.slow
@pytest.mark.claim("A1", "A6", "C16")
def test_the_continued_adapter_reloads_to_the_logits_it_trained_to(continued, tiny_gemma2_dir):
    """The saved output directory, loaded by peft onto a fresh NF4 base, gives the trained model's logits."""
    reloaded = base_plus_adapter_logits(tiny_gemma2_dir, continued.output, continued.device)
    assert max_difference(continued.after, reloaded) <= TOLERANCE


@pytest.mark.slow
@pytest.mark.claim("C15", "A6")
def test_use_cache_is_off_at_every_training_step_and_on_again_after(continued):
    assert continued.observed.use_cache == [False] * 6
    assert continued.observed.model.config.use_cache is True
    assert continued.record.use_cache == {"during_training": False, "after_training": True}


@pytest.mark.slow
@pytest.mark.claim("A4", "A6")
def test_continuing_from_adapter_weights_starts_a_new_schedule_at_step_0(continued):
    """checkpoint-3 holds the old run's optimizer and scheduler at step 3; continuing from its adapter
    weights ignores them: steps 1..6 again, warmup first (lr 0, 1e-3: SCHEDULE in spec/adapters.py)."""
    assert [s["step"] for s in continued.record.steps] == [1, 2, 3, 4, 5, 6] and continued.record.resumed_from is None
    assert [s["learning_rate"] for s in continued.record.steps] == pytest.approx(SCHEDULE)
