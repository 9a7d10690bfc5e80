"""LoRA adapters (reference/modeling/lora.py) on the real peft: counts, the scale on B A x, and where they train."""

from __future__ import annotations

import json
import math

import pytest
import torch

from reference.modeling import lora, models
from reference.modeling.shapes import PROJECTIONS
from reference.settings.recipes import load_recipe


@pytest.mark.claim("C12")
@pytest.mark.parametrize("model_dir", ["tiny_gemma2_dir", "tiny_llama_dir"])
@pytest.mark.parametrize("r", [4, 64])
def test_trainable_parameters_equal_peft_count_of_the_recipes_adapter(request, model_dir, r):
    """sum of r x (in + out) over q,k,v,o,gate,up,down in every layer = what peft makes trainable."""
    directory = request.getfixturevalue(model_dir)
    config = json.loads((directory / "config.json").read_text())
    model, _ = models.load_causal_lm(directory)
    section = {**load_recipe("llm2024").lora, "r": r, "lora_alpha": r}
    peft_model = lora.attach(model, section)
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert trainable == lora.trainable_parameters(config, r, PROJECTIONS) == lora.count_trainable(peft_model)[0]
    assert all(("lora_A" in n or "lora_B" in n) == p.requires_grad for n, p in peft_model.named_parameters())


@pytest.mark.claim("C12")
@pytest.mark.parametrize(
    "r, alpha, rslora, expected", [(64, 64, False, 1.0), (32, 64, False, 2.0), (16, 16, True, 4.0)]
)
def test_the_update_is_scaled_by_alpha_over_r_or_alpha_over_sqrt_r(tiny_gemma2_dir, r, alpha, rslora, expected):
    """h = W0 x + s B A x with s = alpha/r (64/64 = 1, 64/32 = 2) or, with rsLoRA, alpha/sqrt(r) (16/4 = 4).
    Set A and B by hand and compare one adapted projection's output with W0 x + s B A x."""
    model, _ = models.load_causal_lm(tiny_gemma2_dir)
    peft_model = lora.attach(
        model,
        {
            "r": r,
            "lora_alpha": alpha,
            "use_rslora": rslora,
            "target_modules": ["q_proj"],
            "lora_dropout": 0.0,
            "bias": "none",
        },
    )
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.randn(layer.lora_A["default"].weight.shape, generator=generator))
        layer.lora_B["default"].weight.copy_(torch.randn(layer.lora_B["default"].weight.shape, generator=generator))
        x = torch.randn(3, layer.in_features, generator=generator)
        w0 = layer.base_layer.weight
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        by_hand = x @ w0.T + expected * (x @ a.T @ b.T)
        assert torch.allclose(layer(x), by_hand, atol=1e-4)
    assert lora.scale(r, alpha, rslora) == pytest.approx(expected)
    assert layer.scaling["default"] == pytest.approx(alpha / (math.sqrt(r) if rslora else r))


@pytest.mark.claim("C12")
def test_a_fresh_adapter_leaves_the_model_unchanged_because_b_starts_at_zero(tiny_gemma2_dir):
    ids = torch.tensor([[2, 10, 20, 30]])
    model, _ = models.load_causal_lm(tiny_gemma2_dir)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        after = lora.attach(model, load_recipe("llm2024").lora)(input_ids=ids).logits
    assert torch.equal(before, after)


def test_an_unknown_lora_key_is_named():
    from reference.errors import InputError

    with pytest.raises(InputError, match="rank"):
        lora.lora_config({"rank": 8})


@pytest.mark.claim("C12")
def test_a_fresh_adapter_is_initialised_from_the_recipes_random_state(tiny_gemma2_dir):
    """The seed's get_peft_model(random_state=3407): A is drawn from that seed, so two runs start from the
    same adapter whatever the RNG did before, and another random_state starts elsewhere."""

    def lora_a(random_state: int, seed_before: int) -> torch.Tensor:
        torch.manual_seed(seed_before)  # whatever ran before
        model, _ = models.load_causal_lm(tiny_gemma2_dir)
        section = {**load_recipe("llm2024").lora, "random_state": random_state}
        return lora.attach(model, section).base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight

    assert torch.equal(lora_a(3407, seed_before=1), lora_a(3407, seed_before=2))
    assert not torch.equal(lora_a(3407, seed_before=1), lora_a(1, seed_before=1))
