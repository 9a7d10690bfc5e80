"""Weight memory under fp32, bf16, int8 and NF4 (with and without double quantisation), by arithmetic.

Seed 003 asks how far a model shrinks "down to 8 or 16 bit". What bitsandbytes quantises is every
`nn.Linear` of the decoder (the q/k/v/o and gate/up/down projections); the embeddings, the norms and
an untied LM head stay in the compute dtype (bf16 here). Per quantised weight matrix of n = in x out
values:

    int8 (LLM.int8)   n bytes                      + out x 4 bytes   (one fp32 scale per output row)
    NF4               n / 2 bytes                  + ceil(n / 64) x 4 (one fp32 absmax per 64 values)
                      + 16 x 4                                       (the NF4 map `code`: 16 fp32 values)
    NF4 + double q.   n / 2 bytes                  + ceil(n / 64) x 1 (the absmaxes quantised to 8 bit)
                      + ceil(ceil(n / 64) / 256) x 4 + 4             (their fp32 absmax per 256, one offset)
                      + 16 x 4 + 256 x 4                             (the NF4 map and the absmaxes' 8-bit map)

so NF4 costs 4.5 bits a value, and 4.127 with double quantisation (the QLoRA paper's 0.5 -> 0.127
bits of constants), plus the two small maps bitsandbytes keeps beside every weight (each layer holds
its own copy; 1,088 bytes under double quantisation, which outweighs the saving on a tiny layer).
The parameter counts come from the real model class built on the meta device
(no memory, no weights), so the arithmetic covers exactly the modules the library creates. The spec
compares these numbers with what a loaded fixture model actually holds (reference.modeling.models.weight_bytes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM

SCHEMES = ("fp32", "bf16", "int8", "nf4", "nf4-dq")
BLOCK = 64  # values per NF4 absmax (bitsandbytes' default blocksize)
NESTED_BLOCK = 256  # absmaxes per second-level absmax under double quantisation
NF4_CODE = 16 * 4  # the NF4 quantisation map (16 fp32 values) each quantised weight keeps
NESTED_CODE = 256 * 4  # under double quantisation, the 8-bit dynamic map of its absmaxes (256 fp32 values)


@dataclass(frozen=True)
class Parameters:
    """A model's parameters, split as bitsandbytes splits them."""

    linear_shapes: tuple
    """(out, in) of every quantisable linear weight (decoder projections; not the LM head)."""
    other: int
    """All other parameters: embeddings, norms, biases, an untied LM head."""

    @property
    def linear(self) -> int:
        return sum(out * inp for out, inp in self.linear_shapes)

    @property
    def total(self) -> int:
        return self.linear + self.other


def parameters(config: dict) -> Parameters:
    """Count a model config's parameters by building its real class on the meta device."""
    config = dict(config)
    model_type = config.pop("model_type")
    hf_config = AutoConfig.for_model(model_type, **{k: v for k, v in config.items() if k != "architectures"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    head = model.get_output_embeddings()
    shapes, linear_ids = [], set()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            shapes.append(tuple(module.weight.shape))
            linear_ids.add(id(module.weight))
    other = sum(p.numel() for p in model.parameters() if id(p) not in linear_ids)
    return Parameters(tuple(shapes), other)


def nf4_constants(n: int, double_quant: bool) -> int:
    """Bytes of quantisation constants for one NF4 weight of n values."""
    blocks = math.ceil(n / BLOCK)
    if not double_quant:
        return blocks * 4 + NF4_CODE
    return blocks + math.ceil(blocks / NESTED_BLOCK) * 4 + 4 + NF4_CODE + NESTED_CODE


def weight_memory(params: Parameters, scheme: str, other_bytes: int = 2) -> int:
    """Bytes of weights under `scheme`; unquantised parameters take `other_bytes` each (bf16: 2)."""
    if scheme == "fp32":
        return params.total * 4
    if scheme == "bf16":
        return params.total * 2
    if scheme == "int8":
        quantised = sum(out * inp + out * 4 for out, inp in params.linear_shapes)
    elif scheme in ("nf4", "nf4-dq"):
        sizes = [out * inp for out, inp in params.linear_shapes]
        quantised = sum(math.ceil(n / 2) + nf4_constants(n, scheme == "nf4-dq") for n in sizes)
    else:
        raise ValueError(f"scheme {scheme!r}: choose one of {', '.join(SCHEMES)}")
    return quantised + params.other * other_bytes


def table(config: dict) -> dict[str, int]:
    """Weight bytes for every scheme."""
    params = parameters(config)
    return {scheme: weight_memory(params, scheme) for scheme in SCHEMES}
