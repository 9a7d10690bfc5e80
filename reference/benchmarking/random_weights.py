"""A model of a published shape with random weights, to time on the device at hand without downloading it
(`bench --shape NAME`, issue 21 item 1).

The config is the published one (reference.modeling.shapes: hidden size, heads, intermediate size, vocabulary),
optionally cut to its first `layers` decoder layers so that a CPU can time a 9b or 27b layer at all; the weights
are drawn by transformers' own initialisation (seeded, so two builds are equal) and saved as safetensors in bf16,
with the fixtures' trained tokenizer beside them (its ids all fall inside every published vocabulary, so the
embedding and the LM head have their real size). Timings of such a model are those of the real one: the same
shapes and kernels; its losses mean nothing.

A directory already holding this build (its random_weights.json) is used again; any other contents are refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from reference.errors import InputError

TOKENIZER = Path(__file__).resolve().parents[2] / "fixtures" / "models" / "tiny-gemma2"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
SEED = 0
BUILT = "random_weights.json"
"""What a build was made from (the config and seed): a later build of the same is this one, used again."""


def shape_config(config: dict, layers: int | None = None) -> dict:
    """The published config cut to its first `layers` decoder layers (all when None or more)."""
    config = dict(config)
    total = config["num_hidden_layers"]
    if layers is not None and layers < total:
        config["num_hidden_layers"] = layers
        if "layer_types" in config:
            config["layer_types"] = config["layer_types"][:layers]
    return config


def build(config: dict, directory: Path, say=lambda line: None) -> Path:
    """`config` with random weights in `directory` (see the module docstring); returns the directory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    built = directory / BUILT
    if built.exists() and json.loads(built.read_text(encoding="utf-8")) == {"config": config, "seed": SEED}:
        say(f"random weights: {directory} holds this shape already; used again")
        return directory
    if directory.exists() and any(directory.iterdir()):
        raise InputError(f"{directory}: holds other files; a random-weight model is built only in an empty directory")
    layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    say(f"random weights: building {layers} layers of hidden size {hidden} in {directory}")
    wanted = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    torch.manual_seed(SEED)
    model_config = AutoConfig.for_model(config["model_type"], **wanted)
    model = AutoModelForCausalLM.from_config(model_config, dtype=torch.bfloat16)
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(TOKENIZER / name, partial / name)
    (partial / BUILT).write_text(json.dumps({"config": config, "seed": SEED}, indent=1) + "\n", encoding="utf-8")
    if directory.exists():
        directory.rmdir()
    partial.rename(directory)  # complete or absent: a build cut short leaves only the .partial folder
    return directory
