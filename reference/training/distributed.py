"""Beyond one device: fully sharded data parallelism (FSDP) through the Trainer's own settings, CPU included.

A recipe shards its model over torchrun's processes with two TrainingArguments, as `key=value` overrides or
in the recipe: ``fsdp = true`` and ``fsdp_config`` (transformers 5 still reads the legacy strings, such as
``fsdp = "full_shard auto_wrap"``, with a deprecation warning). transformers 5 builds accelerate's FSDP2
plugin from them: PyTorch's ``fully_shard``, one unit per decoder layer (the model's ``_no_split_modules``),
the embeddings and the head apart. accelerate and PyTorch do the wrapping, the gradient reduce-scatter, the
clipping and the Trainer's checkpoints. What this module adds, each where they leave a gap:

* accelerate 1.x turns its FSDP plugin on only for accelerator devices (CUDA, XPU, NPU ...). A multi-process
  CPU run (torchrun over gloo) stays ``DistributedType.MULTI_CPU``, the plugin is dropped and the Trainer
  wraps the model in DDP instead, without a word, while ``args.fsdp`` still says True. `shard_on_the_cpu`
  hands accelerate's state the plugin the Trainer built, so the same ``fsdp2_prepare_model`` runs, over gloo.
* Each process holds one slice of every weight. `full_state_dict` gathers the weights a run saves (an
  adapter's alone) onto the main process; every process takes part.
* Each process's loss is its share of the global batch's; `step_totals` gives the step's, as one process
  on the whole batch computes it.

QLoRA under FSDP: bitsandbytes packs 4-bit weights into ``uint8`` by default, and accelerate leaves such
weights out of the sharding (a uint8 Params4bit does not survive fully_shard's conversion to DTensor): each
process keeps them whole. ``bnb_4bit_quant_storage = "bfloat16"``, the dtype of the rest of each layer, packs
them into bf16 storage, and they shard with the layer (reference/recipes/llm2024-fsdp.toml).

Refused (`check_arguments`): FSDP's own ``fsdp_config.activation_checkpointing`` with an adapter (its wrapper
renames the layers and peft 0.21 then saves an empty adapter; the recipe's gradient checkpointing works), and FSDP
in one process. Not handled: FSDP1 (``fsdp_config.version = 1``, deprecated in transformers 5) on the CPU;
bitsandbytes' 8-bit optimizers (they
cannot step sharded weights); ``SHARDED_STATE_DICT`` checkpoints; resuming a sharded run (not tested); XLA
FSDP; tensor, sequence or context parallelism.
"""

from __future__ import annotations

import os

import torch

from reference.errors import InputError


def check_arguments(args, adapter: bool) -> None:
    """Before the model loads, refuse what FSDP cannot run: FSDP's own activation checkpointing with an adapter (peft
    0.21 would save an empty adapter; the Trainer's `activation_checkpointing` works), and a run in one process
    (there is nothing to shard over; the Trainer would raise a bare ValueError later), naming the command that
    starts several."""
    from transformers.training_args import ParallelMode

    if not args.fsdp:
        return
    if adapter and args.fsdp_config.get("activation_checkpointing"):
        raise InputError(
            "fsdp_config activation_checkpointing with a LoRA adapter: FSDP's checkpoint wrapper renames the layers "
            "and peft then saves an empty adapter; use the Trainer's activation_checkpointing=true instead"
        )
    if args.parallel_mode != ParallelMode.DISTRIBUTED:
        started = int(os.environ.get("WORLD_SIZE", "1"))
        if started > 1:  # torchrun started several, but the Trainer's arguments set up no process group
            raise InputError(
                f"fsdp: {started} processes were started but the Trainer runs each alone (parallel mode "
                f"{args.parallel_mode.value}); add use_cpu=true on a machine without a GPU, or fsdp=false"
            )
        raise InputError(
            "fsdp: FSDP shards the model over several processes, and this is one: start it with "
            "`torchrun --nproc_per_node N -m reference train ...`, or add fsdp=false to train in one process"
        )


def shard_on_the_cpu(trainer) -> bool:
    """Turn accelerate's FSDP on for a multi-process CPU run whose arguments ask for it (`fsdp`); True if done.

    Call it right after the Trainer built its Accelerator (`create_accelerator_and_postprocess`). Elsewhere
    (FSDP already on, no FSDP asked for, a single process, a GPU) it changes nothing."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if not trainer.args.fsdp or trainer.is_fsdp_enabled or state.distributed_type != DistributedType.MULTI_CPU:
        return False
    settings = trainer.args.fsdp_plugin_args
    if settings["fsdp_version"] != 2:
        raise InputError(f"fsdp_config version={settings['fsdp_version']}: FSDP on the CPU needs version 2 (FSDP2)")
    plugin = FullyShardedDataParallelPlugin(**settings)
    if plugin.activation_checkpointing and trainer.args.activation_checkpointing:
        raise InputError(
            "fsdp_config activation_checkpointing and activation_checkpointing are both on: keep one (FSDP's own for "
            "full fine-tuning, the Trainer's with an adapter)"
        )
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    # The process state too, as accelerate does on a GPU: every later AcceleratorState() copies its type from it.
    state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
    trainer.is_fsdp_enabled = True
    return True


def full_state_dict(trainer) -> dict | None:
    """Under FSDP, the weights a run saves, gathered whole from every process's shards onto the main one (the
    others get an empty dict); every process must call it. An adapter run gathers only the trainable weights
    (peft saves the adapter alone, and the frozen base may be many GB); full fine-tuning gathers all.
    Without FSDP, None: the model saves its own weights."""
    if not trainer.is_fsdp_enabled:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    adapter_only = hasattr(trainer.model, "peft_config")
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=adapter_only)
    return get_model_state_dict(trainer.model, options=options)


def step_totals(accelerator, loss: float, tokens: int) -> tuple[float, int]:
    """A step's loss and real tokens over every process: the mean of the processes' losses and the sum of their
    tokens. Each process's loss is its share of the global batch's loss scaled by the number of processes
    (the Trainer's `average_tokens_across_devices`), so the mean is the loss of the global batch, as one
    process computes it; the Trainer logs the same mean."""
    if accelerator.num_processes == 1:
        return loss, tokens
    local = torch.tensor([[loss, float(tokens)]], dtype=torch.float64, device=accelerator.device)
    every = accelerator.gather(local)
    return float(every[:, 0].mean()), int(every[:, 1].sum())
