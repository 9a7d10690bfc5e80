"""FLOPs and bandwidth bounds for the benchmarks: what the hardware could do at best.

Training a LoRA on a frozen base, per token (model FLOPs: recomputation under gradient checkpointing
is real work but not counted, as in every MFU figure):

    forward     2 N_matmul          + 4 L H Q T   (attention scores and weighted sum)  + 2 N_lora
    backward    2 N_matmul (inputs) + 8 L H Q T                                        + 4 N_lora
    total       4 N_matmul + 12 L H Q T + 6 N_lora

with N_matmul the weights of every matrix product (projections and the LM head), L layers, H heads,
Q head dimension, T the sequence length. The frozen base gets no weight gradients, hence 4 N rather
than the 6 N of full fine-tuning. MFU = achieved FLOP/s / peak FLOP/s.

Decoding reads every weight once per step, and a step writes one token for each of the batch's B
sequences, so tokens/s <= B x bandwidth / weight bytes; the fraction of that bound is the weight bytes
read per second (tokens/s / B x weight bytes) over the bandwidth.
"""

from __future__ import annotations

PEAK_BF16_FLOPS = {  # dense bf16 tensor-core peaks from the vendors' datasheets
    "NVIDIA H100 80GB HBM3": 989.4e12,  # H100 SXM
    "NVIDIA H200": 989.4e12,
}


def matmul_parameters(config: dict) -> int:
    """Weights that take part in a matrix product per token: every projection plus the LM head."""
    from reference.modeling import memory

    params = memory.parameters(config)
    return params.linear + config["vocab_size"] * config["hidden_size"]


def lora_training_flops_per_token(config: dict, seq_len: int, lora_parameters: int) -> float:
    layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return 4 * matmul_parameters(config) + 12 * layers * heads * head_dim * seq_len + 6 * lora_parameters


def peak_flops(device_name: str) -> float | None:
    """The datasheet bf16 peak for a known GPU, else None (measure it: measured_matmul_flops)."""
    return PEAK_BF16_FLOPS.get(device_name)


def measured_matmul_flops(device: str = "cpu", dtype: str = "bfloat16", size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a large square matrix product on `device`: the practical peak where no datasheet applies."""
    import statistics
    import time

    import torch

    a = torch.randn(size, size, device=device, dtype=getattr(torch, dtype))
    b = torch.randn(size, size, device=device, dtype=getattr(torch, dtype))
    a @ b  # warm-up
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


def model_flops_utilisation(tokens_per_s: float, flops_per_token: float, peak_flops_per_s: float) -> float:
    """MFU: the model FLOP/s achieved (tokens/s x FLOPs per token) as a fraction of the peak FLOP/s."""
    return tokens_per_s * flops_per_token / peak_flops_per_s


def decode_bandwidth_bound(bandwidth_bytes_per_s: float, weight_bytes: float, batch: int = 1) -> float:
    """Tokens/s at most when decoding: each step reads every weight once and writes one token per sequence."""
    return bandwidth_bytes_per_s / weight_bytes * batch


def fraction_of_bandwidth_bound(
    tokens_per_s: float, bandwidth_bytes_per_s: float, weight_bytes: float, batch: int = 1
) -> float:
    """Decoding's weight bytes read per second (steps/s x weight bytes, steps/s = tokens/s / batch) over the
    bandwidth: how close decoding comes to the memory-bandwidth bound."""
    bytes_per_s = tokens_per_s / batch * weight_bytes
    return bytes_per_s / bandwidth_bytes_per_s
