"""The FLOPs model behind the benchmarks' MFU (reference/modeling/flops.py), derived by hand."""

from __future__ import annotations

import pytest

from reference.modeling import flops, lora
from reference.modeling.shapes import PROJECTIONS, load_config


@pytest.mark.claim("X4")
def test_lora_training_flops_per_token_for_gemma_2_9b_at_2048_tokens():
    """gemma-2-9b: hidden 3584, 42 layers, 16 heads of 256, 8 KV heads, MLP 14336, vocab 256000.
    Per layer the projections hold 3584*4096 (q) + 2*3584*2048 (k, v) + 4096*3584 (o) + 3*3584*14336 (MLP)
    = 14,680,064 * 3 + 154,140,672 = 198,180,864 weights; 42 layers = 8,323,596,288; plus the (tied) LM
    head 256000*3584 = 917,504,000 -> N_matmul = 9,241,100,288. LoRA r=64 on all seven:
    64 * (3584+4096 + 2*(3584+2048) + 4096+3584 + 3*(3584+14336)) * 42 = 216,072,192.
    FLOPs/token = 4 N + 12 * 42 * 16 * 256 * 2048 + 6 N_lora = 36,964,401,152 + 4,227,858,432 + 1,296,433,152."""
    config = load_config("gemma-2-9b")
    n_lora = lora.trainable_parameters(config, 64, PROJECTIONS)
    assert n_lora == 216_072_192
    assert flops.matmul_parameters(config) == 9_241_100_288
    assert flops.lora_training_flops_per_token(config, 2048, n_lora) == 36_964_401_152 + 4_227_858_432 + 1_296_433_152


@pytest.mark.claim("X4")
def test_the_peak_is_the_datasheet_for_known_gpus_and_measured_elsewhere():
    assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12 and flops.peak_flops("some CPU") is None
    assert flops.measured_matmul_flops("cpu", "float32", 256, repeats=3) > 1e8  # a real product was timed


@pytest.mark.claim("X4")
def test_mfu_is_tokens_per_second_times_flops_per_token_over_the_peak():
    """By hand: 1,000 tokens/s x 98.94e9 FLOPs/token = 98.94e12 FLOP/s; over the H100 SXM's 989.4e12 = 0.1.
    gemma-2-9b LoRA at 2048 tokens (42,488,692,736 FLOPs/token, derived above) at 1,000 tokens/s:
    42.488692736e12 / 989.4e12 = 0.0429439 (989.4 x 0.0429 = 42.44526; the rest 0.04343 / 989.4 = 0.0000439)."""
    peak = flops.peak_flops("NVIDIA H100 80GB HBM3")
    assert flops.model_flops_utilisation(1_000, 98.94e9, peak) == pytest.approx(0.1)
    assert flops.model_flops_utilisation(1_000, 42_488_692_736, peak) == pytest.approx(0.0429439, abs=1e-7)
    assert flops.peak_flops("NVIDIA H200") == 989.4e12  # the same compute as the H100 SXM, more memory


@pytest.mark.claim("X4")
def test_decoding_as_a_fraction_of_the_memory_bandwidth_bound():
    """Weights of 5e9 bytes (a 2.5B model in bf16) on 3.35e12 bytes/s (H100 SXM HBM3): every step reads
    all weights once, so at most 3.35e12 / 5e9 = 670 steps/s: 670 tokens/s at batch 1, 5,360 at batch 8.
    Batch 1 at 134 tokens/s reads 134 x 5e9 = 6.7e11 bytes/s = 0.2 of the bandwidth; batch 8 at
    536 tokens/s makes 536 / 8 = 67 steps/s, 67 x 5e9 = 3.35e11 bytes/s = 0.1 of it."""
    assert flops.decode_bandwidth_bound(3.35e12, 5e9) == pytest.approx(670)
    assert flops.decode_bandwidth_bound(3.35e12, 5e9, batch=8) == pytest.approx(5_360)
    assert flops.fraction_of_bandwidth_bound(134, 3.35e12, 5e9) == pytest.approx(0.2)
    assert flops.fraction_of_bandwidth_bound(536, 3.35e12, 5e9, batch=8) == pytest.approx(0.1)
