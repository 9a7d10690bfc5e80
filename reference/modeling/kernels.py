"""Which kernel a 4-bit layer runs on the CPU, so training is the same computation on every x86-64 CPU.

bitsandbytes (0.50) has two layouts for an NF4 weight on the CPU:

* the standard one: packed nibbles `[(N*K+1)//2, 1]`, per-block scales `absmax` (quantised again under double
  quantisation). Products go through `MatMul4Bit`, an autograd function: the gradient flows through the frozen
  base to the input, `dL/dx = dL/dy · dequant(W)`, which every LoRA weight below the layer needs;
* a CPU layout for inference on CPUs with `avx512_bf16`: `Linear4bit.forward` repacks the weight in place the
  first time it runs in eval mode on an input that needs no gradient (`_convert_weight_packed_for_cpu`): nibbles
  regrouped in tiles of 32 rows, `absmax` transposed, de-nested and rounded to bf16. From then on every product,
  in training too, runs `gemv_4bit`, which has no autograd formula: the backward pass through the base is lost
  and the LoRA gradients below it are wrong (torch only warns). `dequantize_4bit` does not read this layout
  either, so a merge of such a weight is wrong too. Only saving puts the standard layout back.

So the project keeps the standard layout everywhere: `standard_layout(model)` turns the repacking off on every
4-bit layer (models.load_causal_lm calls it for each model it loads; the SFT Trainer and DPO call it again before
their first step, for a model repacked after it loaded) and puts back, exactly, any weight already repacked: the
nibbles by the inverse permutation, the scales as the fp32 values of their bf16 rounding, not nested (the repacking
rounded them; that rounding is not undone).
The value of each weight is then `code[nibble] × absmax` as the packed layer computed it. (bitsandbytes' own
inverse, `_convert_weight_packed_for_cpu_inverse`, leaves a singly quantised weight's scales transposed: 40% of a
layer's largest weight off, measured on tiny-gemma2's down_proj.)

What is not handled: the repacked kernel's inference speed is given up on those CPUs (a decode step of the small
Gemma-2 at batch 1 to 8 took about 1.4x as long in the standard layout, measured with another job running; a
prompt of 8 x 128 tokens was faster in it). An upstream fix would register an autograd formula for `gemv_4bit`, or
skip the repacking while any parameter needs a gradient.
"""

from __future__ import annotations

import torch

TILE_ROWS = 32
"""Rows of a tile in bitsandbytes' CPU layout (`block_n` of `_convert_weight_packed_for_cpu`)."""


def four_bit_layers(model) -> dict:
    """name -> bitsandbytes Linear4bit module, for every 4-bit layer in the model (inside a peft wrapper too)."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # no bitsandbytes: no 4-bit layer
        return {}
    return {name: module for name, module in model.named_modules() if isinstance(module, Linear4bit)}


def is_repacked(layer) -> bool:
    """Whether the layer's weight is in bitsandbytes' CPU inference layout."""
    return bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))


def repacked_layers(model) -> list[str]:
    """Names of the 4-bit layers whose weight is in the CPU inference layout."""
    return [name for name, layer in four_bit_layers(model).items() if is_repacked(layer)]


def standard_nibbles(tiled: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The inverse of bitsandbytes' CPU regrouping. In the tiled `[N, K/2]` bytes, the weight is cut into tiles of
    32 rows by 2 columns (2j, 2j+1), each tile 32 bytes: byte b holds, in its low nibble, row b // 2 of the tile at
    column 2j + b % 2, and in its high nibble row 16 + b // 2 at the same column. The standard bytes `[N*K/2]` hold
    element 2i of the flattened `[N, K]` weight in the high nibble of byte i and element 2i+1 in its low nibble."""
    rows, columns = shape
    tiled = tiled.reshape(-1, TILE_ROWS)  # one tile's 32 bytes a row
    tile = torch.cat([tiled & 0xF, tiled >> 4], dim=-1)  # its 64 nibbles: rows 0-15, then rows 16-31, 2 columns each
    tiles = tile.reshape(rows // TILE_ROWS, columns // 2, TILE_ROWS, 2).transpose(1, 2)
    nibbles = tiles.reshape(-1)  # element order of the [N, K] weight
    return (nibbles[0::2] << 4) | nibbles[1::2]


def restore_standard_layout(layer) -> None:
    """Put a repacked layer's weight back in the standard layout, holding the values the packed layer used."""
    state = layer.weight.quant_state
    rows, columns = state.shape
    data = standard_nibbles(layer.weight.data.view(torch.uint8), (rows, columns))
    data = data.reshape(state.original_qshape)
    storage = getattr(state, "original_storage_type", None)
    layer.weight.data = data.view(storage) if storage is not None else data
    state.absmax = state.absmax.T.contiguous().reshape(-1).to(torch.float32)  # per block, in weight order
    state.nested, state.offset = False, None
    state.__dict__.pop("state2", None)
    state.dtype = state.original_dtype
    state.packing_format_for_cpu = False


def standard_layout(model) -> list[str]:
    """Keep every 4-bit layer of the model in the standard layout from now on (no CPU repacking, whatever runs
    in eval mode later) and restore the layers already repacked. Returns the names of those restored."""
    restored = []
    for name, layer in four_bit_layers(model).items():
        layer.support_avx512bf16_for_cpu = False  # the switch Linear4bit.forward reads before it repacks
        if is_repacked(layer):
            restore_standard_layout(layer)
            restored.append(name)
    return restored
