"""Which layers gradient checkpointing recomputes (`[sft] recompute`, issue 21 item 4).

Checkpointing keeps each decoder layer's input and recomputes the rest of its forward in the backward pass. With
LoRA on a frozen base the backward costs about one forward (the base's weights get no gradient), so recomputing
every layer makes a step about 3 forwards instead of 2: 1.45x the real tokens/s without it on the benchmarks' small
Gemma-2 (`bench --model ... sft.gradient_checkpointing=false`). The seed checkpoints every layer because a 27b model
on one GPU has no memory to spare; where memory is free, recomputing is time thrown away.

`recompute = "all"` checkpoints every layer, as the seed (and trl) do. `recompute = "fit"` keeps the activations of
as many layers as fit in half of the memory free when training begins and checkpoints the others
(transformers' per-layer `gradient_checkpointing` flag, the one `activation_checkpointing_kwargs.every_n_layers`
sets). A layer's activations are measured, not estimated: one forward of the decoder at the run's largest batch
(batch size x longest record, which bounds a padding-free row too), with every layer checkpointed but the first two
(Gemma-2 alternates sliding and full attention), counting the bytes of every tensor autograd saves inside each
(`torch.autograd.graph.saved_tensors_hooks`, each storage once); the larger of the two is taken for every layer.
The forward runs under `torch.random.fork_rng`, so the run's random numbers (NEFTune's noise) are the ones it would
draw without it, and the losses are the same whichever layers are recomputed (the recomputed forward repeats the
same operations on the same inputs: spec/test_recompute.py pins them equal).

Free memory: on CUDA the driver's free bytes (torch.cuda.mem_get_info); on the CPU MemAvailable, capped by a cgroup
memory limit. The other half is left for what comes after: optimizer states, gradients, the loss's chunks, the
recomputed layer of a checkpointed one. When the Trainer runs out of memory anyway and starts again with a smaller
batch (auto_find_batch_size), every layer is recomputed from then on. Under torchrun every layer is recomputed:
processes with different free memory would keep different layers, and FSDP's all-gathers of a recomputed layer
would fall out of step. Not handled: a model whose decoder layers are not transformers' GradientCheckpointingLayer
(then every layer is recomputed, and the run says so).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.modeling_layers import GradientCheckpointingLayer

CHOICES = ("all", "fit")
FREE_FRACTION = 0.5
"""The part of the free memory the kept activations may take."""
MEASURED_LAYERS = 2


@dataclass
class Plan:
    """What `fit` chose, for the manifest."""

    layers: int
    kept: int
    """Layers whose activations are kept (not recomputed)."""
    bytes_per_layer: int
    """The activations one kept layer holds at the largest batch (the larger of the measured layers)."""
    free_bytes: int
    batch_shape: list[int]
    """(records, tokens) of the largest batch the run can make: batch size x its longest record."""


def decoder_layers(model) -> list[GradientCheckpointingLayer]:
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def free_memory(device: torch.device) -> int:
    """Bytes free for this process on `device` (the module docstring)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    available = None
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            available = int(line.split()[1]) * 1024
    for limit, usage in (
        ("memory.max", "memory.current"),
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"),
    ):
        try:
            room = int(Path("/sys/fs/cgroup", limit).read_text()) - int(Path("/sys/fs/cgroup", usage).read_text())
        except (OSError, ValueError):
            continue
        available = room if available is None else min(available, room)
    return max(0, available or 0)


def saved_bytes_per_layer(model, batch_shape: tuple[int, int], layers: list) -> int:
    """The bytes autograd saves inside each of the first MEASURED_LAYERS layers in a training forward of the decoder
    at `batch_shape`, every other layer checkpointed; the larger one."""
    measured = layers[:MEASURED_LAYERS]
    flags = [layer.gradient_checkpointing for layer in layers]
    inner = (model.get_base_model() if hasattr(model, "get_base_model") else model).base_model  # the decoder
    device = next(p.device for p in model.parameters())
    counted: list[dict[int, int]] = [{} for _ in measured]
    current: list[int | None] = [None]

    # a storage's identity is its _cdata: data_ptr() is 0 for every tensor on the meta device (bench --plan)
    weights = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}

    def pack(tensor):  # activations only: a weight autograd keeps is held by the model anyway
        storage = tensor.untyped_storage()
        if current[0] is not None and storage._cdata not in weights:
            counted[current[0]][storage._cdata] = storage.nbytes()
        return tensor

    def entering(index):
        return lambda module, args: current.__setitem__(0, index)

    def leaving(module, args, output):
        current[0] = None

    hooks = []
    for index, layer in enumerate(measured):
        layer.gradient_checkpointing = False
        hooks += [layer.register_forward_pre_hook(entering(index)), layer.register_forward_hook(leaving)]
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.enable_grad():
            ids = torch.randint(0, inner.config.vocab_size, batch_shape, device=device)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                output = inner(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
            del output
    finally:
        for hook in hooks:
            hook.remove()
        for layer, flag in zip(layers, flags, strict=True):
            layer.gradient_checkpointing = flag
    return max(sum(c.values()) for c in counted)


def fit(model, batch_shape: tuple[int, int]) -> Plan | None:
    """Keep the activations of as many layers as fit (the module docstring); None where the layers are unknown."""
    layers = decoder_layers(model)
    if not layers or not all(layer.gradient_checkpointing for layer in layers):
        return None
    per_layer = saved_bytes_per_layer(model, batch_shape, layers)
    device = next(p.device for p in model.parameters())
    free = free_memory(device)
    kept = min(len(layers), int(FREE_FRACTION * free // max(per_layer, 1)))
    for layer in layers[len(layers) - kept :]:  # the last ones: the first whose activations the backward frees
        layer.gradient_checkpointing = False
    return Plan(len(layers), kept, per_layer, free, list(batch_shape))


class FitRecompute(TrainerCallback):
    """`recompute = "fit"` at the start of training, once the Trainer has checkpointed every layer; `plan` holds the
    choice (None: every layer recomputed), said through `say`."""

    def __init__(self, batch_shape: tuple[int, int], say):
        self.batch_shape, self.say, self.plan = batch_shape, say, None
        self.started = False
        """Training has begun once: a second start is auto_find_batch_size's retry after running out of memory."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not args.activation_checkpointing:
            return
        if self.started:  # auto_find_batch_size starts again after running out of memory: the safe choice, for good
            if self.plan is not None:
                for layer in decoder_layers(model):
                    layer.gradient_checkpointing = True
                self.plan = None
                self.say("recompute fit: training starts again after running out of memory; every layer recomputed")
            return
        self.started = True
        if args.world_size > 1:  # ranks that kept different layers would all-gather (FSDP) out of step
            self.say(f"recompute fit: {args.world_size} processes recompute every layer alike")
            return
        self.plan = fit(model, self.batch_shape)
        if self.plan is None:
            self.say("recompute fit: not every layer is checkpointed by transformers' flag; all recomputed as they are")
            return
        p = self.plan
        self.say(
            f"recompute fit: {p.kept} of {p.layers} layers keep their activations "
            f"({p.bytes_per_layer / 2**20:,.1f} MiB each at a batch of {p.batch_shape[0]} x {p.batch_shape[1]} "
            f"tokens; half of {p.free_bytes / 2**30:,.1f} GiB free), {p.layers - p.kept} recomputed"
        )

    def record(self) -> dict:
        return {"recompute": asdict(self.plan) if self.plan else None}
