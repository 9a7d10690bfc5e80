"""Loading models from local directories (safetensors only, no remote code).

Issue 4 extends this module with 8-bit/4-bit loading, quantise-and-save and the model's identity record.
"""

from __future__ import annotations

from pathlib import Path

from reference.errors import InputError

DTYPES = ("float32", "bfloat16", "float16")


def require_model_dir(path: str | Path) -> Path:
    """A local model directory with a config.json, or a clear error naming it."""
    directory = Path(path)
    if not directory.is_dir():
        raise InputError(f"model {path!s}: not a local directory (no model hub is used; download the model first)")
    if not (directory / "config.json").is_file():
        raise InputError(f"model {path!s}: no config.json in the directory")
    return directory


def load_causal_lm(path: str | Path, dtype: str = "float32", trust_remote_code: bool = False):
    """AutoModelForCausalLM from a local directory, weights from safetensors only."""
    import torch
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise InputError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    directory = require_model_dir(path)
    try:
        return AutoModelForCausalLM.from_pretrained(
            str(directory),
            dtype=getattr(torch, dtype),
            local_files_only=True,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError) as error:
        raise InputError(f"model {path!s}: cannot be loaded: {error}") from None
