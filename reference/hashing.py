"""SHA-256 of files, folders and trained weights: how a run names the exact data, model and adapter it used.

A folder's digest is the SHA-256 of its listing, one line per file in name order: the file's path inside the
folder, a NUL byte, the file's own SHA-256 and a newline. A single file is listed the same way under its own
name, so renaming a data file changes its digest, and a changed byte anywhere changes every digest above it.

Not handled: empty folders and symbolic links to folders are not listed (only files are), and nothing is
streamed from a remote store; every file is read from the local disk.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of one file's bytes, read in chunks."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def digests(folder: str | Path, files: Iterable[Path] | None = None) -> dict[str, str]:
    """Path inside `folder` -> SHA-256, for `files` (by default every file under it), in name order."""
    root = Path(folder)
    chosen = (p for p in root.rglob("*") if p.is_file()) if files is None else files
    return {str(path.relative_to(root)): file_sha256(path) for path in sorted(chosen)}


def listing_sha256(named: dict[str, str]) -> str:
    """The SHA-256 of a listing {name: file digest}: `name NUL digest LF` per file, in the order given."""
    total = hashlib.sha256()
    for name, digest in named.items():
        total.update(f"{name}\0{digest}\n".encode())
    return total.hexdigest()


def sha256_of(path: str | Path) -> str:
    """The SHA-256 of a file, or of a folder's files (names and contents, in name order)."""
    source = Path(path)
    if source.is_dir():
        return listing_sha256(digests(source))
    return listing_sha256({source.name: file_sha256(source)})


def trainable_weights_sha256(model) -> str:
    """SHA-256 over the trainable weights' names and values (as fp32): equal digests mean equal weights.
    A weight sharded over processes (FSDP's DTensor) is gathered whole first: every process must call this."""
    total = hashlib.sha256()
    for name, param in model.named_parameters():
        if param.requires_grad:
            whole = param.full_tensor() if hasattr(param, "full_tensor") else param
            total.update(name.encode())
            total.update(whole.detach().float().cpu().contiguous().numpy().tobytes())
    return total.hexdigest()
