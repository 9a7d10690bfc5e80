"""The peer the benchmark is held against: trl's `SFTTrainer`, the seed's own library, at its best setting for the
device (`bench --against trl`).

Best setting: on a GPU, `padding_free=True` (flash-attention runs the packed row as separate sequences; chosen, not
measured: no GPU has been lent to this project, and without flash-attention installed the row runs behind an N x N
mask, as on the CPU, so `bench` on a GPU should be read with that in mind); on the CPU
its padded default, since its padding-free rows run a full N x N masked attention there and are slower (measured
with the fixture model and the llm2024 recipe in fp32, two runs each: padded 5,479 and 6,292 real tokens/s,
padding-free 5,110 and 5,713; on the benchmarks' small Gemma-2 2,160 and 2,284 against 1,917 and 1,950).
Everything else as the project's run: the same records, rendered in the recipe's format and tokenized as the
project does, cut at max_seq_length (trl takes them as token ids), the same base (loaded NF4 when the recipe says
so, by reference.modeling.models), the recipe's LoRA given to trl as its peft_config (trl prepares a quantised base
itself), its TrainingArguments (the same CPU threads and dtype: the command adapts the recipe before either runs),
the loss on every token. Steady real tokens/s (padding left out) after a first step apart.

trl is an extra: without it, `install_hint` says how to add it.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

INSTALL = "pip install 'trl==1.16.0' (or the project's dev extra: pip install -e '.[dev]')"


def available() -> bool:
    return importlib.util.find_spec("trl") is not None


def install_hint() -> str:
    return f"trl is not installed, so it was not timed beside the project; to add it: {INSTALL}"


def best_setting(device: str) -> dict:
    """trl's fastest batch layout on `device` (see the module docstring)."""
    return {"padding_free": device.startswith("cuda")}


def sft_trainer(recipe, model_dir: str, records: Path, output: Path, padding_free: bool = False):
    """trl's SFTTrainer on the records (instruction/response JSONL) with the recipe's base, LoRA and arguments, as
    the module docstring says; `padding_free` trl's own (on a GPU, its best)."""
    import datasets
    import peft
    import trl
    from transformers import AutoTokenizer, PrinterCallback

    from reference.methods import sft
    from reference.modeling import models
    from reference.settings import sections
    from reference.settings.training_arguments import gradient_checkpointing, map_training_arguments

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in Path(records).read_text(encoding="utf-8").splitlines()]
    longest = sections.resolve("sft", recipe.sft).max_seq_length
    # the project's own token ids of the recipe's text, cut at max_seq_length: the same tokens on both sides, and
    # already cut, as trl's padding-free layout without packing asks (it does not cut them itself)
    encoded = [
        sft.encode_record(tokenizer, recipe.format, row["instruction"], row["response"], longest, "all") for row in rows
    ]
    dtype = "bfloat16" if recipe.training_arguments.get("bf16") else "float32"
    quantization, bnb_4bit = models.recipe_quantization(recipe.quantization)
    # the same base on both sides (NF4 when the recipe says so); trl prepares it and attaches the LoRA itself
    model, _ = models.load_causal_lm(model_dir, dtype=dtype, quantization=quantization, quantization_section=bnb_4bit)
    lora = peft.LoraConfig(**{k: v for k, v in recipe.lora.items() if k != "random_state"})
    arguments = map_training_arguments(recipe, str(output)).kwargs
    config = trl.SFTConfig(
        **arguments,
        activation_checkpointing=gradient_checkpointing(recipe, arguments),
        disable_tqdm=True,
        max_length=None if padding_free else longest,
        packing=False,
        padding_free=padding_free,
    )
    trainer = trl.SFTTrainer(
        model=model,
        args=config,
        train_dataset=datasets.Dataset.from_list([{"input_ids": e["input_ids"]} for e in encoded]),
        processing_class=tokenizer,
        peft_config=lora,
    )
    trainer.remove_callback(PrinterCallback)  # stdout holds the command's table
    trainer.model.config.use_cache = False  # as the seed does before trainer.train()
    return trainer


def trl_training(recipe, model_dir: str, records: Path, output: Path, steps: int, device: str) -> dict:
    """trl's SFTTrainer on the same records and settings, at its best setting for `device`; steady real tokens/s
    (a first step apart) and the setting used."""
    import time

    from transformers import TrainerCallback

    from reference.settings.recipes import apply_overrides

    recipe = apply_overrides(recipe, [f"max_steps={steps}", "save_strategy=no", "report_to=none"])
    setting = best_setting(device)
    trainer = sft_trainer(recipe, model_dir, records, output, **setting)
    window, times = [], []

    def count(module, args, kwargs):
        if module.training:
            mask = kwargs.get("attention_mask")
            window.append(int(mask.sum()) if mask is not None else kwargs["input_ids"].numel())

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append((time.perf_counter() - self.start, sum(window)))
            window.clear()

    trainer.model.register_forward_pre_hook(count, with_kwargs=True)
    trainer.add_callback(Clock())
    trainer.train()
    steady = times[1:]
    rate = sum(t for _, t in steady) / max(sum(s for s, _ in steady), 1e-9)
    layout = "padding-free" if setting["padding_free"] else "padded"
    return {
        "setting": f"{layout}, its best on {device}",
        "tokens_per_second": rate,
        "step_seconds": statistics.median(s for s, _ in steady) if steady else None,
    }
