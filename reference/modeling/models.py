"""Loading models from local directories: full precision, 8-bit or 4-bit NF4; quantise once and save.

Follows seed 001 §2.1.1: the base is loaded with bitsandbytes NF4, double quantisation and bf16
compute, saved once with `save_pretrained`, and the saved 4-bit directory is what later runs load (no
re-quantisation: the packed 4-bit weights and their scales are read back as they were written).

Every load records the model's identity (resolved directory and a SHA-256 of its weight files), so a
silent substitution, such as the pre-quantised model unsloth swaps in, shows in the run's manifest.

Only local directories are read: weights from safetensors, never pickles, and no remote code unless
asked for. A hub name fails at once with how to download it (with `HF_TOKEN` or `token=` for a gated
model); nothing here contacts a hub, so nothing can hang on one, and a token is never printed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from reference.errors import InputError
from reference.hashing import digests, listing_sha256
from reference.modeling import kernels
from reference.paths import complete_directory

DTYPES = ("float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "8bit", "nf4")


def require_model_dir(path: str | Path) -> Path:
    """A local model directory with a config.json, resolved, or a clear error naming it and how to get it."""
    directory = Path(path)
    if not directory.is_dir():
        token = "HF_TOKEN is set" if os.environ.get("HF_TOKEN") else "no HF_TOKEN is set"
        raise InputError(
            f"model {path!s}: not a local directory. Models are read from local directories only; download it "
            f"first, e.g. `hf download {path!s} --local-dir DIR`. A gated or private model needs an access "
            f"token: set HF_TOKEN or pass token=... to the download (`use_auth_token` is deprecated); "
            f"{token}."
        )
    if not (directory / "config.json").is_file():
        raise InputError(f"model {path!s}: no config.json in the directory")
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise InputError(f"model {path!s}: config.json is not readable JSON: {error}") from None
    if not isinstance(config, dict):
        raise InputError(f"model {path!s}: config.json is not a JSON object")
    return directory.resolve()  # what the model records as its name: an adapter's base, valid from any folder


@dataclass(frozen=True)
class ModelIdentity:
    """What was loaded: enough to notice that a different model stood behind the same name."""

    path: str
    """The directory, resolved (symlinks followed)."""
    weights_sha256: str
    """SHA-256 over the weight files' names and contents, in name order."""
    files: dict
    """Weight file name -> its own SHA-256."""
    quantization: str
    """none, 8bit or nf4 as loaded (a saved 4-bit directory reads as nf4)."""


def safetensors_fault(path: str | Path) -> str | None:
    """Why a safetensors file cannot be read whole, or None when it can: "it is truncated, N bytes of the M its
    header describes" for a file cut short (an interrupted copy or save), else "it is damaged (why)". Only the
    header is read (safetensors checks that it describes the file exactly); no tensor is loaded."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):
            return None
    except (SafetensorError, OSError) as error:
        reason = str(error)
    size, described = Path(path).stat().st_size, _described_size(Path(path))
    if described is not None and described > size:
        return f"it is truncated, {size:,} bytes of the {described:,} its header describes"
    return f"it is damaged (safetensors: {reason})"


def _described_size(path: Path) -> int | None:
    """The bytes a safetensors file's header says the file holds (8 + header + tensor data), at least as many
    as the header alone when that is cut short; None when there is no header to read."""
    with open(path, "rb") as file:
        head = file.read(8)
        if len(head) < 8:
            return None
        length = int.from_bytes(head, "little")
        if length > 100_000_000:  # safetensors' own limit: not a header length, but damage
            return None
        header = file.read(length)
    if len(header) < length:
        return 8 + length
    try:
        entries = json.loads(header)
        ends = [entry["data_offsets"][1] for key, entry in entries.items() if key != "__metadata__"]
        return 8 + length + max(ends, default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None


def embedding_rows(directory: str | Path) -> int | None:
    """How many token ids the model in `directory` has input embeddings for: its config's vocab_size (the rows
    from_pretrained builds the embedding with), or its text model's for a composite config; None if unsaid."""
    config = json.loads((require_model_dir(directory) / "config.json").read_text(encoding="utf-8"))
    rows = config.get("vocab_size")
    if rows is None and isinstance(config.get("text_config"), dict):
        rows = config["text_config"].get("vocab_size")
    return rows if isinstance(rows, int) and not isinstance(rows, bool) and rows > 0 else None


def check_vocabulary(tokenizer, tokenizer_dir: str | Path, model_dir: str | Path) -> None:
    """A tokenizer with more tokens than the model has embedding rows is refused, naming the tokenizer's
    directory and both sizes: an id past the last row has no embedding, and the model fails on it mid-run
    (index out of range). Fewer tokens than rows is normal (vocabularies padded to a multiple of 64 or 128)."""
    rows = embedding_rows(model_dir)
    if rows is not None and len(tokenizer) > rows:
        raise InputError(
            f"tokenizer {tokenizer_dir} has {len(tokenizer):,} tokens, more than the {rows:,} rows of the input "
            f"embeddings of model {model_dir} (config.json vocab_size): ids {rows:,} and up have no embedding. "
            "Use the tokenizer saved with the model, or register new tokens with `add-tokens`, which grows the "
            "embeddings"
        )


def weight_files(directory: Path) -> list[Path]:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise InputError(f"model {directory}: no *.safetensors weight files (pickled weights are not loaded)")
    return files


def identity(path: str | Path, quantization: str = "none") -> ModelIdentity:
    directory = require_model_dir(path).resolve()
    files = digests(directory, weight_files(directory))
    return ModelIdentity(str(directory), listing_sha256(files), files, quantization)


def quantization_name(settings: dict) -> str:
    """nf4, 8bit or none: the name of what bitsandbytes settings load, from a recipe's [quantization] or a
    saved model's quantization_config (another method's config is named by its quant_method)."""
    if settings.get("load_in_4bit"):
        return "nf4"
    if settings.get("load_in_8bit"):
        return "8bit"
    return settings.get("quant_method", "none")


def saved_quantization(directory: Path) -> str | None:
    """The quantisation a saved directory already carries (its config's quantization_config), if any."""
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    settings = config.get("quantization_config")
    return quantization_name(settings) if settings else None


def recipe_quantization(section: dict) -> tuple[str, dict]:
    """How a recipe's [quantization] section loads a base: (none, 8bit or nf4; its bnb_4bit_* settings, which
    load_causal_lm passes to BitsAndBytesConfig). The one reading of that section for every method."""
    return quantization_name(section), {k: v for k, v in section.items() if k.startswith("bnb_4bit")}


def bnb_config(quantization: str, section: dict | None = None):
    """BitsAndBytesConfig: nf4 with the recipe's [quantization] (seed: double quant, bf16 compute), or 8-bit."""
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    section = dict(section or {})
    compute = section.pop("bnb_4bit_compute_dtype", "bfloat16")
    settings = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True, **section}
    return BitsAndBytesConfig(**settings, bnb_4bit_compute_dtype=getattr(torch, compute))


def load_causal_lm(
    path: str | Path,
    dtype: str = "float32",
    quantization: str = "none",
    quantization_section=None,
    trust_remote_code: bool = False,
    model_class=None,
    device: str | None = None,
    **model_kwargs,
):
    """A model from a local directory, weights from safetensors only; returns (model, identity).

    `quantization` is none, 8bit or nf4; a directory saved already quantised loads as saved. `device`
    (e.g. "cuda:0") places the weights there as they load; quantised layers are packed on it.
    `model_class` (default AutoModelForCausalLM) and `model_kwargs` (e.g. num_labels=3) go to from_pretrained.
    4-bit layers keep bitsandbytes' standard layout on every CPU, never its CPU inference repacking
    (reference.modeling.kernels), so the same model computes the same way wherever it is loaded and can be trained."""
    if dtype not in DTYPES:
        raise InputError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if quantization not in QUANTIZATIONS:
        raise InputError(f"quantization {quantization!r}: choose one of {', '.join(QUANTIZATIONS)}")
    directory = require_model_dir(path)
    saved = saved_quantization(directory)
    extra = {}
    if saved is None and quantization != "none":
        extra["quantization_config"] = bnb_config(quantization, quantization_section)
    try:
        model = (model_class or AutoModelForCausalLM).from_pretrained(
            str(directory),
            dtype=getattr(torch, dtype),
            local_files_only=True,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            **({"device_map": {"": device}} if device else {}),
            **extra,
            **model_kwargs,
        )
    except (OSError, ValueError) as error:
        raise InputError(f"model {path!s}: cannot be loaded: {error}") from None
    kernels.standard_layout(model)  # one 4-bit kernel on every CPU, differentiable (reference.modeling.kernels)
    return model, identity(directory, saved or quantization)


def quantize_and_save(
    path: str | Path, output: str | Path, quantization: str = "nf4", quantization_section=None
) -> ModelIdentity:
    """Load once with bitsandbytes, save the quantised weights (safetensors) and the tokenizer beside them."""
    if quantization == "none":
        raise InputError("quantize: choose --bits 4 (nf4) or 8")
    directory = require_model_dir(path)
    if saved_quantization(directory):
        raise InputError(f"model {path!s} is already quantised ({saved_quantization(directory)}); nothing to do")
    model, _ = load_causal_lm(
        directory, dtype="bfloat16", quantization=quantization, quantization_section=quantization_section
    )
    target = Path(output)
    with complete_directory(target) as partial:
        model.save_pretrained(partial, safe_serialization=True)
        if (directory / "tokenizer.json").is_file() or (directory / "tokenizer_config.json").is_file():
            AutoTokenizer.from_pretrained(str(directory), local_files_only=True).save_pretrained(partial)
    return identity(target, quantization)


def weight_bytes(model) -> int:
    """Bytes the model's weights take as loaded: parameters at their stored size plus the quantisation
    constants bitsandbytes keeps beside packed weights (NF4 absmax, nested or not, the offset and the
    quantisation maps `code`; int8 SCB). Buffers
    (rotary frequencies, Gemma's embedding normaliser) are not weights and are left out."""
    seen, total = set(), 0

    def add(tensor) -> None:
        nonlocal total
        if isinstance(tensor, torch.Tensor) and id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()

    for tensor in model.parameters():
        add(tensor)
        state = getattr(tensor, "quant_state", None)
        while state is not None:  # NF4: absmax (quantised again under double quantisation) and its own state
            add(state.absmax)
            add(state.code)
            add(getattr(state, "offset", None))
            state = getattr(state, "state2", None)
        add(getattr(tensor, "SCB", None))
    return total
