"""X14: a 4-bit base computes the same way, and trains correctly, on every x86-64 CPU (reference/modeling/kernels.py).

On a CPU with `avx512_bf16`, bitsandbytes 0.50 repacks an NF4 weight the first time its layer runs in eval mode on
an input that needs no gradient (`Linear4bit.forward` -> `_convert_weight_packed_for_cpu`), and from then on runs
`gemv_4bit`, which has no backward pass: training after an evaluation loses the gradient through the frozen base.
The project keeps the standard layout. These tests call bitsandbytes' own repacking directly, so both layouts are
exercised on every machine, whether or not its CPU would repack by itself.
"""

from __future__ import annotations

import pytest
import torch
from bitsandbytes.functional import _convert_weight_packed_for_cpu, dequantize_4bit, dequantize_blockwise

from reference.methods import train
from reference.modeling import kernels, lora, models
from reference.modeling.shapes import PROJECTIONS
from reference.settings.recipes import apply_overrides, load_recipe
from spec.observe import QA_COLUMNS, SHORT, Observed, WhenBuilt, assert_trained


def nf4_model(model_dir, double_quant: bool = True):
    section = {"bnb_4bit_use_double_quant": double_quant}
    model, _ = models.load_causal_lm(model_dir, dtype="bfloat16", quantization="nf4", quantization_section=section)
    return model


def repack_all(model) -> None:
    """What `Linear4bit.forward` does to each layer on an avx512_bf16 CPU in eval mode without grad."""
    for layer in kernels.four_bit_layers(model).values():
        layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(
            layer.weight.data, layer.weight.quant_state
        )


def block_scales(state) -> torch.Tensor:
    """The fp32 scale of each 64-weight block, nested or not, as bitsandbytes' dequantisation reads it."""
    if state.nested:
        return dequantize_blockwise(state.absmax, state.state2) + state.offset
    return state.absmax.float()


@pytest.mark.claim("X14")
@pytest.mark.parametrize("double_quant", [True, False], ids=["double-quant", "single-quant"])
def test_a_repacked_weight_is_restored_to_its_standard_bytes_and_the_values_the_packed_kernel_used(
    tiny_gemma2_dir, double_quant
):
    """Byte i of the standard layout holds weight 2i in its high nibble and 2i+1 in its low one; the value of a
    weight is code[nibble] x its block's scale. Repacking rounds each scale to bf16, so after the restore

        W[n, k] = code[nibble(n, k)] x bf16(scale of block (n, k // 64))

    with the nibbles byte for byte as before. Single quantisation of bf16 weights stores each scale as a bf16
    weight's magnitude already, so there the values are the original ones exactly."""
    model = nf4_model(tiny_gemma2_dir, double_quant)
    layers = kernels.four_bit_layers(model)
    originals = {
        name: (layer.weight.data.clone(), block_scales(layer.weight.quant_state)) for name, layer in layers.items()
    }
    repack_all(model)
    assert sorted(kernels.repacked_layers(model)) == sorted(layers)

    assert sorted(kernels.standard_layout(model)) == sorted(layers)

    assert kernels.repacked_layers(model) == []
    for name, layer in layers.items():
        data, scales = originals[name]
        state = layer.weight.quant_state
        assert torch.equal(layer.weight.data, data), name
        nibbles = torch.stack([data.view(torch.uint8).reshape(-1) >> 4, data.view(torch.uint8).reshape(-1) & 0xF], 1)
        codes = state.code[nibbles.reshape(-1).long()].reshape(-1, state.blocksize)
        rounded = scales.to(torch.bfloat16).float()
        expected = (codes * rounded[:, None]).reshape(state.shape).to(state.dtype)
        assert torch.equal(dequantize_4bit(layer.weight.data, state), expected), name
        if not double_quant:
            assert torch.equal(rounded, scales), name


def lora_gradients(model, tokens) -> dict:
    model.train()
    model.zero_grad()
    model(input_ids=tokens, labels=tokens).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.claim("X14")
def test_training_after_the_base_was_repacked_gets_the_gradients_of_a_base_never_repacked(tiny_gemma2_dir):
    """LoRA r=8 on the seven projections of an NF4 base (single quantisation: the restore is exact, see above).
    The gradient of every LoRA weight flows through the frozen 4-bit layers above it (dL/dx = dL/dy . W), so a
    layer whose product has no backward pass (the repacked kernel) changes the gradients of every layer below.
    The same inputs, the same values, the same kernel: the gradients are equal, bit for bit."""
    tokens = torch.tensor([[2, 17, 95, 304, 41, 8, 77, 5, 250, 9]])
    settings = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": list(PROJECTIONS)}
    torch.manual_seed(0)
    never = lora.attach(nf4_model(tiny_gemma2_dir, double_quant=False), settings)
    torch.manual_seed(0)
    repacked = lora.attach(nf4_model(tiny_gemma2_dir, double_quant=False), settings)
    for model in (never, repacked):  # B starts at zero: give the adapters weight so every gradient is non-zero
        torch.manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.02)
    repack_all(repacked)

    kernels.standard_layout(repacked)

    expected, observed = lora_gradients(never, tokens), lora_gradients(repacked, tokens)
    assert expected.keys() == observed.keys() and len(expected) == 2 * 7 * 2  # A and B, 7 projections, 2 layers
    for name, grad in expected.items():
        assert grad.abs().sum() > 0, name
        assert torch.equal(observed[name], grad), name


@pytest.mark.claim("X14")
def test_a_loaded_4bit_model_is_never_repacked_even_on_a_cpu_that_would_repack_it(tiny_gemma2_dir, monkeypatch):
    """bitsandbytes decides when a layer is built whether the CPU can repack (`has_avx512bf16`); it is made to say
    yes here, as an avx512_bf16 CPU does, so the check means the same on every machine. An eval-mode forward
    without grad (what scoring, generation and the Trainer's evaluation do) leaves every layer standard."""
    import bitsandbytes.nn.modules

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)
    model = nf4_model(tiny_gemma2_dir)
    layers = kernels.four_bit_layers(model)
    assert len(layers) == 2 * 7

    model.eval()
    with torch.no_grad():
        model(input_ids=torch.tensor([[2, 17, 95, 304]]))

    assert kernels.repacked_layers(model) == []
    assert not any(layer.support_avx512bf16_for_cpu for layer in layers.values())


@pytest.mark.slow
@pytest.mark.claim("X14", "A6")
def test_a_run_whose_base_was_repacked_before_it_trains_trains_on_the_standard_kernel(
    tiny_gemma2_dir, fixtures_dir, tmp_path
):
    """Anything may run the model in eval mode before the Trainer steps (a user's check, logits taken before the
    first update): the run still trains through a differentiable base. Here every layer is repacked once the
    Trainer is built; the run trains as any QLoRA run does (loss falls, exactly the adapter changes, the base's
    values do not: single quantisation, where the restore is exact) and no layer is left repacked."""
    observed = Observed()
    recipe = apply_overrides(load_recipe("llm2024"), [*SHORT, "quantization.bnb_4bit_use_double_quant=false"])

    record = train.run(
        recipe,
        str(tiny_gemma2_dir),
        str(fixtures_dir / "data" / "qa111_sample.jsonl"),
        str(tmp_path / "run"),
        columns=QA_COLUMNS,
        say=observed.lines.append,
        callbacks=[observed, WhenBuilt(repack_all)],
    )

    assert_trained(record, observed)
