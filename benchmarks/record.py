"""How every benchmark hands back its result: printed as JSON, and appended to a results file if asked."""

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
