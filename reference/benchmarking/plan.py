"""`bench --plan`: what a LoRA/QLoRA run of a published shape needs, by arithmetic, without loading a weight.

Per run, with P the LoRA parameters (reference.modeling.lora.trainable_parameters: r x (in + out) per targeted
projection and layer), B the batch, T the sequence length, L layers, d the hidden size:

    weights      reference.modeling.memory.weight_memory for bf16, int8, NF4 and NF4 with double quantisation
    LoRA         4 P bytes (fp32 weights, as peft keeps an adapter on a quantised or bf16 base)
    gradients    4 P bytes (fp32, one per LoRA weight; the frozen base gets none)
    optimizer    adamw_torch: 2 fp32 moments, 8 P bytes. adamw_8bit (bitsandbytes): a tensor of n >= 4,096 values
                 keeps 2 x (n + 4 ceil(n / 256)) bytes (uint8 moments, an fp32 absmax per 256), a smaller one
                 2 x 4n (bitsandbytes' min_8bit_size)
    activations  with gradient checkpointing, at least each layer's input: L x B x T x d x 2 bytes (bf16); the
                 recomputed layer's own tensors and the loss's come on top (not in the lower bound).
    a layer kept what one decoder layer saves for its backward when it is not checkpointed, measured: the shape
                 built on the meta device (no memory, no arithmetic) with the recipe's LoRA, one training forward
                 at B x T counted by reference.training.recompute (every saved tensor, each storage once), with the
                 model's attention as transformers picks it without a GPU (Gemma-2: eager, which keeps the B x
                 heads x T x T scores; flash-attention keeps none). Without checkpointing the activations are L of
                 these; with `recompute = fit` a GPU keeps as many as half its memory left by the lower bound
                 holds (`kept_layers`).

FLOPs per token are reference.modeling.flops.lora_training_flops_per_token; the step time at a stated MFU on a
GPU is B x T x FLOPs per token / (MFU x its dense bf16 peak). `fits` compares the sum of the rows above with
the GPU's memory: a lower bound, so "no" is certain and "yes" leaves out the CUDA context, the allocator's slack
and the recomputed layer.

Checked against what torch, peft and bitsandbytes allocate on the CPU at small shapes (spec/test_bench.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from reference.modeling import flops, lora, memory

MIN_8BIT_SIZE = 4096
"""bitsandbytes' 8-bit optimizers keep fp32 states for tensors with fewer values than this."""
STATE_BLOCK = 256
"""Values per fp32 absmax of a bitsandbytes 8-bit optimizer state (blockwise quantisation)."""

GPUS = {  # memory as nvidia-smi reports it (MiB x 2^20), dense bf16 tensor-core peak from the datasheets
    "H100 80GB": (81_559 * 2**20, 989.4e12),
    "A100 80GB": (81_920 * 2**20, 312e12),
    "A100 40GB": (40_960 * 2**20, 312e12),
    "L4": (23_034 * 2**20, 121e12),
    "RTX 4090": (24_564 * 2**20, 165.2e12),
}
SCHEME_OF = {"none": "bf16", "8bit": "int8", "nf4": "nf4", "nf4-dq": "nf4-dq"}


def lora_matrices(config: dict, r: int, targets) -> list[int]:
    """The values of every LoRA matrix: A (r x in) and B (out x r) per targeted projection and layer."""
    from reference.modeling.shapes import projection_shapes

    shapes = projection_shapes(config)
    per_layer = [n for m in targets for n in (r * shapes[m][0], r * shapes[m][1])]
    return per_layer * config["num_hidden_layers"]


def optimizer_bytes(matrices: list[int], optimizer: str) -> int:
    """The optimizer's state for these trainable tensors (see the module docstring)."""
    if optimizer in ("adamw_8bit", "paged_adamw_8bit", "adamw_bnb_8bit"):
        return sum(2 * (n + 4 * math.ceil(n / STATE_BLOCK)) if n >= MIN_8BIT_SIZE else 2 * 4 * n for n in matrices)
    return sum(2 * 4 * n for n in matrices)


@dataclass
class RunPlan:
    """What a LoRA run of one shape under one recipe needs (bytes, FLOPs, seconds)."""

    shape: str
    r: int
    targets: list
    batch: int
    seq_len: int
    quantization: str
    optimizer: str
    checkpointing: bool
    weights: dict = field(default_factory=dict)
    """Bytes of the weights under every scheme; `quantization` names the one the run uses."""
    lora_parameters: int = 0
    lora_bytes: int = 0
    gradient_bytes: int = 0
    optimizer_bytes: int = 0
    activation_bytes: int | None = None
    """With checkpointing, the layers' inputs (a lower bound); None without (see layer_bytes)."""
    layer_bytes: int | None = None
    """What one decoder layer keeps when it is not checkpointed, measured on the meta device (None: not measured)."""
    attention: str | None = None
    """The attention implementation layer_bytes was measured with."""
    flops_per_token: float = 0.0
    total_bytes: int = 0
    """The run's weights, LoRA, gradients, optimizer and activations: a lower bound of its peak."""
    gpus: dict = field(default_factory=dict)
    """{name: {memory, fits, step_seconds, kept_layers}} at the stated MFU."""
    mfu: float = 0.4

    def to_dict(self) -> dict:
        return asdict(self)


def plan(
    config: dict,
    shape: str,
    r: int,
    targets,
    batch: int,
    seq_len: int,
    quantization: str,
    optimizer: str,
    checkpointing: bool,
    mfu: float = 0.4,
    layer_bytes: tuple[int, str] | None = None,
) -> RunPlan:
    """The plan of one run (see the module docstring); `quantization` is none, 8bit, nf4 or nf4-dq; `layer_bytes`
    (bytes, attention) from measured_layer_bytes."""
    params = memory.parameters(config)
    matrices = lora_matrices(config, r, targets)
    lora_parameters = lora.trainable_parameters(config, r, targets)
    result = RunPlan(shape, r, list(targets), batch, seq_len, quantization, optimizer, checkpointing, mfu=mfu)
    result.weights = {scheme: memory.weight_memory(params, scheme) for scheme in ("bf16", "int8", "nf4", "nf4-dq")}
    result.lora_parameters = lora_parameters
    result.lora_bytes = result.gradient_bytes = 4 * lora_parameters
    result.optimizer_bytes = optimizer_bytes(matrices, optimizer)
    if checkpointing:
        result.activation_bytes = config["num_hidden_layers"] * batch * seq_len * config["hidden_size"] * 2
    result.flops_per_token = flops.lora_training_flops_per_token(config, seq_len, lora_parameters)
    weights = result.weights[SCHEME_OF[quantization]]
    result.total_bytes = (
        weights + result.lora_bytes + result.gradient_bytes + result.optimizer_bytes + (result.activation_bytes or 0)
    )
    if layer_bytes:
        result.layer_bytes, result.attention = layer_bytes
    layers = config["num_hidden_layers"]
    for name, (capacity, peak) in GPUS.items():
        seconds = batch * seq_len * result.flops_per_token / (mfu * peak)
        fits = result.total_bytes <= capacity
        kept = None
        if result.layer_bytes and fits:  # reference.training.recompute's rule, on what the lower bound leaves
            from reference.training.recompute import FREE_FRACTION

            kept = min(layers, int(FREE_FRACTION * (capacity - result.total_bytes) // result.layer_bytes))
        result.gpus[name] = {"memory": capacity, "fits": fits, "step_seconds": seconds, "kept_layers": kept}
    return result


def measured_layer_bytes(config: dict, r: int, targets, batch: int, seq_len: int) -> tuple[int, str]:
    """(bytes, attention implementation): what one decoder layer of the shape keeps for its backward, measured by
    a training forward on the meta device with the LoRA attached (the module docstring)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from reference.benchmarking.random_weights import shape_config
    from reference.training import recompute

    # what a layer keeps does not depend on how many follow it: the measured layers alone are built
    config = shape_config(config, recompute.MEASURED_LAYERS)
    settings = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    shape = AutoConfig.for_model(config["model_type"], **settings)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(shape, dtype=torch.bfloat16)
    model = lora.attach(model, {"r": r, "lora_alpha": r, "target_modules": list(targets)})
    model.activation_checkpointing_enable({"use_reentrant": False})
    model.train()
    layers = recompute.decoder_layers(model)
    return recompute.saved_bytes_per_layer(model, (batch, seq_len), layers), model.config._attn_implementation


def table(p: RunPlan) -> str:
    """The plan as a person reads it."""
    gib = lambda n: f"{n / 2**30:,.2f} GiB" if n is not None else "not estimated"  # noqa: E731
    rows = [
        ("shape", p.shape),
        ("LoRA", f"r={p.r} on {', '.join(p.targets)}: {p.lora_parameters:,} parameters"),
        ("batch x sequence", f"{p.batch} x {p.seq_len}"),
        *[
            (f"weights {scheme}", gib(n) + (" <- this run" if SCHEME_OF[p.quantization] == scheme else ""))
            for scheme, n in p.weights.items()
        ],
        ("LoRA weights (fp32)", gib(p.lora_bytes)),
        ("LoRA gradients (fp32)", gib(p.gradient_bytes)),
        (f"optimizer ({p.optimizer})", gib(p.optimizer_bytes)),
        ("activations" + (" (checkpointed layer inputs)" if p.checkpointing else ""), gib(p.activation_bytes)),
        (f"a layer kept ({p.attention} attention)", gib(p.layer_bytes)),
        ("total, a lower bound", gib(p.total_bytes)),
        ("FLOPs per token", f"{p.flops_per_token:.3e}"),
    ]
    rows += [
        (
            f"{name} ({gib(g['memory'])})",
            f"{'fits' if g['fits'] else 'does NOT fit'}; a step at {p.mfu:.0%} MFU {g['step_seconds']:.2f} s"
            + (f"; recompute=fit keeps {g['kept_layers']} layers" if g["kept_layers"] is not None else ""),
        )
        for name, g in p.gpus.items()
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
