"""What the benchmarks share: the CPU-sized model shape they build, and how each hands back its result (printed as
JSON, and appended to a results file if asked)."""

from __future__ import annotations

import json
from pathlib import Path


def report(result: dict, json_path: str | None) -> None:
    """Print the result; with a path, append it to that JSON list (earlier runs are kept)."""
    print(json.dumps(result, indent=2))
    if json_path:
        path = Path(json_path)
        runs = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps(runs + [result], indent=2) + "\n")


SMALL_GEMMA2 = {
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "query_pre_attn_scalar": 64,
}
"""Gemma-2's sizes at a width and depth a shared 2-core CPU trains in seconds a step and decodes in minutes, for
random-weight models laid out as Gemma-2 (reference.modeling.shapes.GEMMA2_COMMON: soft-capping, sliding window, GQA,
tied
head); each benchmark gives its own vocabulary."""


def installed(name: str) -> str | None:
    """The package's version, None when it is not installed (trl is an extra): recorded, never a crash at the end."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
