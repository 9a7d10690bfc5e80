"""The Hugging Face cache folders a command writes into, checked before they are used, so that a cache that cannot be
written is named with the variable that chose it, not blamed on the data file being read.

`datasets` writes every file it loads as Arrow tables under its cache (HF_DATASETS_CACHE, else HF_HOME/datasets,
else $XDG_CACHE_HOME/huggingface/datasets, else ~/.cache/huggingface/datasets). When that path is a file, lies
under a file, or cannot be written (a read-only HOME), `datasets` fails with NotADirectoryError or PermissionError
deep inside its loader. `require_writable_cache` says which folder and which variable, and how to fix it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from reference.errors import InputError


def datasets_cache() -> tuple[Path, str]:
    """(the folder `datasets` caches into, the environment variable that chose it), as `datasets.config` reads them."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return Path(os.environ["HF_DATASETS_CACHE"]).expanduser(), "HF_DATASETS_CACHE"
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "datasets", "HF_HOME"
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "huggingface" / "datasets", "XDG_CACHE_HOME"
    return Path("~/.cache/huggingface/datasets").expanduser(), "HOME"


def require_writable_cache() -> Path:
    """The datasets cache folder, made if missing; an error naming it and its variable when it cannot be."""
    folder, variable = datasets_cache()
    blocker = next((p for p in (folder, *folder.parents) if p.exists()), None)
    why = None
    if blocker is not None and not blocker.is_dir():
        why = f"{blocker} is a file, not a folder"
    else:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as error:
            why = f"it cannot be written ({error.strerror})"
    if why:
        raise InputError(
            f"the datasets cache {folder} (chosen by {variable}): {why}; set HF_DATASETS_CACHE (or HF_HOME) to a "
            "folder this user can write"
        )
    return folder
