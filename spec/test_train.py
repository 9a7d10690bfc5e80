"""A whole SFT run (reference/methods/train.py) on the tiny Gemma-2: real Trainer, real peft, real bitsandbytes.

Here: the Trainer loop on each base (loss fell, exactly the trainable weights changed), the quantised base,
the optimizer and schedule, use_cache, and the saved adapter reloading. The runs are spec/sft_runs.py's (the
llm2024 recipe cut to 4 optimizer steps, on NF4, int8 and bf16 bases and in full fine-tuning), made once per
session and device by the `sft_runs` fixture; every test that reads one runs on the CPU and, when CUDA is
present, again on the GPU (`gpu`-marked parameters are reported as skipped, not passed, without one).

By hand, for the tiny Gemma-2 (hidden 64, 4 query heads and 2 key/value heads of 16, MLP 128, 2 layers,
vocabulary 2,862, tied head). Projection weights (out x in) per layer: q 64x64 = 4,096, k 32x64 = 2,048,
v 2,048, o 64x64 = 4,096, gate 128x64 = 8,192, up 8,192, down 64x128 = 8,192; 36,864 a layer, 73,728 in all.
Everything else: embeddings 2,862 x 64 = 183,168, four RMSNorms of 64 a layer (512) and the final norm (64):
183,744. So 257,472 parameters, all trainable in full fine-tuning.

LoRA r = 64 on the seven projections trains r x (in + out) each: q 64x128 = 8,192, k 64x96 = 6,144,
v 6,144, o 8,192, gate 64x192 = 12,288, up 12,288, down 12,288 = 65,536 a layer, 131,072 in all.

Weight memory as loaded (the non-projection parameters always bf16: 183,744 x 2 = 367,488 bytes):
* bf16: 257,472 x 2 = 514,944 bytes;
* int8: each projection n bytes + one fp32 scale per output row: q 4,096 + 256, k 2,048 + 128, v the same,
  o 4,352, gate 8,192 + 512, up the same, down 8,192 + 256 -> 4,352 + 2,176 + 2,176 + 4,352 + 8,704 + 8,704
  + 8,448 = 38,912 a layer, 77,824 + 367,488 = 445,312 bytes;
* NF4 with double quantisation (the recipe): n/2 packed bytes, one uint8 absmax per 64 values, one fp32
  absmax per 256 of those and an fp32 offset, the 16-value fp32 NF4 map (64 bytes) and the 256-value fp32
  map of the absmaxes (1,024 bytes): q 2,048 + 64 + 4 + 4 + 64 + 1,024 = 3,208, k 1,024 + 32 + 4 + 4 + 1,088
  = 2,152, v 2,152, o 3,208, gate/up/down 4,096 + 128 + 8 + 1,088 = 5,320 each -> 26,680 a layer, 53,360
  + 367,488 = 420,848 bytes.
"""

from __future__ import annotations

import json

import pytest
import torch

from reference.methods import train
from reference.modeling import models
from reference.settings.recipes import apply_overrides, load_recipe
from reference.training.manifest import AdapterMode
from spec.observe import QA_COLUMNS, Observed, WhenBuilt, assert_trained, unwrapped
from spec.sft_runs import IDS, autocast

TIED_TOLERANCE = 2**-7  # bf16 resolution near 1: training keeps norms in fp32 (peft), a plain reload in bf16
LORA_TRAINABLE, FULL_PARAMETERS = 131_072, 257_472
WEIGHT_BYTES = {"nf4": 420_848, "int8": 445_312, "bf16": 514_944, "full": 514_944}


# ------------------------------------------------------------------ D1: one method on every base


@pytest.mark.slow
@pytest.mark.claim("D1", "C12")
@pytest.mark.parametrize("base", ["nf4", "int8", "bf16"])
def test_lora_on_each_base_lowers_the_loss_and_trains_exactly_the_adapter(sft_runs, base):
    """Loss fell, every LoRA weight changed, nothing else did; trainable parameters and weight memory as
    derived in the module docstring, reported in the run's own line and manifest."""
    run = sft_runs(base)
    manifest, observed = run.manifest, run.observed
    assert_trained(manifest, observed)
    trainable = {n for n, p in observed.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert manifest.adapter["mode"] is AdapterMode.CREATED
    assert manifest.trainable_parameters == LORA_TRAINABLE and manifest.weight_bytes == WEIGHT_BYTES[base]
    reported = f"{LORA_TRAINABLE:,} of", f"weights {WEIGHT_BYTES[base]:,} bytes"
    assert any(all(part in line for part in reported) for line in observed.lines)


@pytest.mark.slow
@pytest.mark.claim("D1")
def test_full_fine_tuning_without_a_lora_section_trains_every_weight(sft_runs):
    """A recipe with no [lora] section: no adapter, all 257,472 parameters trainable, every one changes, the
    loss falls, and the whole model is saved (it reloads with the trained weights). manifest.json says so in
    words: its adapter mode is "none (full fine-tuning)"."""
    run = sft_runs("full")
    manifest, observed = run.manifest, run.observed
    assert manifest.adapter["mode"] is AdapterMode.NONE
    assert json.loads((run.output / "manifest.json").read_text())["adapter"] == {"mode": "none (full fine-tuning)"}
    assert manifest.trainable_parameters == manifest.all_parameters == FULL_PARAMETERS
    assert manifest.weight_bytes == WEIGHT_BYTES["full"]
    assert all(p.requires_grad for p in observed.model.parameters())
    assert_trained(manifest, observed)
    assert any("full fine-tuning" in line for line in observed.lines)
    reloaded, _ = models.load_causal_lm(run.output, dtype="bfloat16")
    trained = dict(observed.model.named_parameters())
    assert all(torch.equal(p.cpu(), trained[n].detach().cpu()) for n, p in reloaded.named_parameters())


@pytest.mark.slow
@pytest.mark.claim("C1", "D1")
def test_the_qlora_base_is_nf4_with_double_quantisation_and_bf16_compute_packed_where_it_trains(sft_runs):
    """The recipe's BitsAndBytesConfig reaches the layers: packed uint8 weights on the training device, an
    8-bit absmax with a nested fp32 state (double quantisation), bf16 compute, NF4 blocks of 64."""
    import bitsandbytes as bnb

    run = sft_runs("nf4")
    layer = unwrapped(run.observed.model).model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(layer, bnb.nn.Linear4bit) and layer.compute_dtype == torch.bfloat16
    state = layer.weight.quant_state
    assert layer.weight.dtype == torch.uint8 and layer.weight.device.type == run.device
    assert state.quant_type == "nf4" and state.blocksize == 64
    assert state.nested and state.absmax.dtype == torch.uint8 and state.state2.absmax.dtype == torch.float32
    assert run.manifest.model["quantization"] == "nf4"


@pytest.mark.claim("C1", "D2")
@pytest.mark.parametrize(
    "double_quant, compute, weight_bytes", [(True, "bfloat16", 420_848), (False, "float16", 409_856)]
)
def test_the_recipes_quantization_section_reaches_the_base_a_run_loads(
    tiny_gemma2_dir, double_quant, compute, weight_bytes
):
    """The run's base follows the recipe's [quantization], not a default: with double quantisation off and
    fp16 compute the layers say so, and the weights take 409,856 bytes (derived in test_models.py) instead
    of 420,848."""
    recipe = load_recipe("llm2024")
    recipe.quantization.update(bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute)
    model, identity, measured, _ = train.prepare_model(
        recipe, tiny_gemma2_dir, "cpu", False, "bfloat16", None, say=lambda text: None
    )
    layer = unwrapped(model).model.layers[0].self_attn.q_proj.base_layer
    assert layer.weight.quant_state.nested is double_quant and layer.compute_dtype == getattr(torch, compute)
    assert (identity.quantization, measured) == ("nf4", weight_bytes)


@pytest.mark.slow
@pytest.mark.claim("C12")
def test_before_the_first_update_the_model_gives_the_bases_logits(sft_runs):
    """B starts at zero, so base + adapter is the base exactly until the first update; after training the
    adapter changes the logits."""
    run = sft_runs("nf4")
    seen = run.logits_before
    assert torch.equal(seen["model"], seen["base"])
    model = run.observed.model
    with torch.no_grad(), autocast(run.device):
        after = model(input_ids=IDS.to(run.device)).logits.float()
    assert not torch.allclose(after, seen["base"], atol=TIED_TOLERANCE)


# ------------------------------------------------------------------ C13, C15, C16 on the QLoRA run


@pytest.mark.slow
@pytest.mark.claim("C13")
def test_the_run_trains_with_the_recipes_optimizer_schedule_and_settings(sft_runs):
    """adamw_8bit is bitsandbytes' 8-bit AdamW with uint8 state on the training device; weight decay 0.01;
    NEFTune alpha 5, seed 3407, bf16, auto_find_batch_size and keep-10 reach the Trainer. The rate each step
    used, linear from 2e-3 to 0 over 4 steps without warmup: 2e-3 x (4 - s)/4 = 2e-3, 1.5e-3, 1e-3, 5e-4."""
    import bitsandbytes as bnb

    run = sft_runs("nf4")
    trainer = run.observed
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert isinstance(inner, bnb.optim.AdamW) and inner.args.optim_bits == 8
    state = next(iter(inner.state.values()))
    assert state["state1"].dtype == torch.uint8 and state["state1"].device.type == run.device
    assert {g["weight_decay"] for g in inner.param_groups if g["params"]} == {0.01}
    args = trainer.args
    assert (args.optim, args.neftune_noise_alpha, args.seed, args.bf16) == ("adamw_8bit", 5, 3407, True)
    assert (args.auto_find_batch_size, args.save_total_limit, args.lr_scheduler_type) == (True, 10, "linear")
    assert [s["learning_rate"] for s in run.manifest.steps] == pytest.approx([2e-3, 1.5e-3, 1e-3, 5e-4], rel=1e-9)


@pytest.mark.slow
@pytest.mark.claim("C15")
def test_use_cache_is_off_and_checkpointing_on_during_training_and_the_reverse_for_generation(sft_runs):
    run = sft_runs("nf4")
    observed = run.observed
    assert observed.use_cache == [False] * 4 and observed.checkpointing == [True] * 4
    assert run.manifest.use_cache == {"during_training": False, "after_training": True}
    model = observed.model
    assert not model.training and not unwrapped(model).is_activation_checkpointing
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([[2, 100, 200]], device=run.device),
            max_new_tokens=3,
            do_sample=False,
            return_dict_in_generate=True,
        )
    assert out.past_key_values.get_seq_length() == 3 + 3 - 1  # the prompt and the new tokens but the last


@pytest.mark.slow
@pytest.mark.claim("C16")
def test_the_saved_adapter_and_tokenizer_reload_and_give_the_trained_models_logits(sft_runs):
    """Every adapter tensor reloads bit for bit. The logits agree to bf16 precision only: training
    kept the norms in fp32 (peft's k-bit preparation), a fresh bf16 load keeps them in bf16."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    run = sft_runs("nf4")
    output, trained = run.output, run.observed.model
    assert (output / "adapter_model.safetensors").is_file() and (output / "adapter_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(str(output))
    base, _ = models.load_causal_lm(
        run.manifest.model["path"],
        dtype="bfloat16",
        quantization="nf4",
        device=f"{run.device}:0" if run.device == "cuda" else None,
    )
    reloaded = PeftModel.from_pretrained(base, str(output)).eval()
    saved = {n: p for n, p in reloaded.named_parameters() if "lora_" in n}
    weights = dict(trained.named_parameters())
    assert len(saved) == 2 * 7 * 2 and all(torch.equal(p, weights[n]) for n, p in saved.items())  # A and B, 7 x 2
    ids = torch.tensor([tokenizer("日本の首都はどこですか。")["input_ids"]], device=run.device)
    with torch.no_grad(), autocast(run.device):
        ours, theirs = reloaded(input_ids=ids).logits.float(), trained(input_ids=ids).logits.float()
    assert torch.allclose(ours, theirs, atol=TIED_TOLERANCE)


# ------------------------------------------------------------------ C13: auto_find_batch_size


@pytest.mark.slow
@pytest.mark.claim("C13")
def test_auto_find_batch_size_shrinks_the_batch_on_out_of_memory_and_recomputes_the_step_plan(
    tmp_path, fixtures_dir, tiny_gemma2_dir
):
    """A forward pass on more than 2 records raises the CPU allocator's own out-of-memory error. The
    Trainer retries through accelerate's find_executable_batch_size, which (accelerate 1.x) multiplies
    the batch by 0.9 rather than halving it as in the seed's day: int(4 x 0.9) = 3 fails too, int(3 x 0.9)
    = 2 runs. The run's plan follows, by hand: 24 records / 2 = 12 micro-batches, 6 steps at accumulation 2."""
    observed = Observed()
    recipe = apply_overrides(
        load_recipe("llm2024"),
        [
            "num_train_epochs=1",
            "per_device_train_batch_size=4",
            "gradient_accumulation_steps=2",
            "warmup_steps=0",
            "save_steps=100",
            "sft.max_seq_length=24",
            "sft.padding_free=false",  # the hook counts rows; a flattened batch's retry: spec/test_padding_free.py
            "quantization.load_in_4bit=false",
        ],
    )

    def hook(module, args, kwargs):
        if kwargs["input_ids"].shape[0] > 2:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1099511627776 bytes.")

    limit_batch = WhenBuilt(lambda model: model.register_forward_pre_hook(hook, with_kwargs=True))

    manifest = train.run(
        recipe,
        str(tiny_gemma2_dir),
        str(fixtures_dir / "data" / "qa111_sample.jsonl"),
        str(tmp_path),
        columns=QA_COLUMNS,
        say=observed.lines.append,
        callbacks=[observed, limit_batch],
    )
    assert manifest.batch_size_attempts == [4, 3, 2]
    assert any("out of memory at batch size 4" in line and "retries with 3" in line for line in observed.lines)
    assert any("out of memory at batch size 3" in line and "retries with 2" in line for line in observed.lines)
    assert manifest.step_plan["micro_batches_per_epoch"] == 12 and manifest.step_plan["total_optimizer_steps"] == 6
    assert len(manifest.steps) == 6 and observed.state.global_step == 6


@pytest.mark.claim("C13", "P3")
def test_the_sequence_length_defaults_to_2048_and_the_loss_to_the_response(tmp_path, gemma_tokenizer):
    """A recipe that names neither: records are cut at 2048 tokens (seed 001's max_seq_length) and prompt
    tokens carry -100. By hand: a record of 3,000 characters "あ" is longer than 2048 tokens."""
    recipe = load_recipe("llm2024")
    del recipe.sft["max_seq_length"], recipe.sft["loss_on"]
    path = tmp_path / "long.jsonl"
    row = {"instruction": "質問", "response": "あ" * 3000}
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    encoded, info = train.encode_data(recipe, gemma_tokenizer, str(path), None)
    assert (info["max_seq_length"], info["loss_on"]) == (2048, "response")
    assert len(encoded[0]["input_ids"]) == 2048 and encoded[0]["labels"][1] == -100
