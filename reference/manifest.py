"""Does one run reproduce another? Two run records (manifest.json, written by reference.train) compared.

A run reproduces another when it trained the same model (weight hash) on the same data (hash) with
the same settings (every TrainingArguments field but the paths, LoRA, quantisation, SFT settings)
and the same step plan, and its per-step losses agree within `rtol`. Package versions are compared
and reported; a difference there is named but is not by itself a failure (it is often the reason
for a loss divergence, which is). The first divergent step is reported with both losses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from reference.errors import InputError

PATH_ARGUMENTS = ("output_dir", "logging_dir", "run_name", "hub_model_id")


@dataclass
class Verdict:
    reproduces: bool
    differences: list = field(default_factory=list)
    """What differs, one line each; empty when the runs agree in every compared part."""
    notes: list = field(default_factory=list)
    """Differences that do not fail the comparison (package versions)."""
    max_loss_difference: float = 0.0


def load(path: str | Path) -> dict:
    source = Path(path)
    file = source / "manifest.json" if source.is_dir() else source
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no manifest.json (a run directory written by `train`)") from None
    except ValueError as error:
        raise InputError(f"{file}: not a readable manifest: {error}") from None


def _settings(manifest: dict) -> dict:
    settings = manifest.get("settings", {})
    arguments = {k: v for k, v in settings.get("training_arguments", {}).items() if k not in PATH_ARGUMENTS}
    return {"training_arguments": arguments, **{k: settings.get(k) for k in ("lora", "quantization", "sft")}}


def _dict_differences(name: str, ours: dict, theirs: dict) -> list[str]:
    keys = sorted(set(ours) | set(theirs))
    return [f"{name}.{k}: {ours.get(k)!r} vs {theirs.get(k)!r}" for k in keys if ours.get(k) != theirs.get(k)]


def compare(a: dict, b: dict, rtol: float = 1e-5) -> Verdict:
    verdict = Verdict(reproduces=True)
    diffs = verdict.differences
    if a["model"].get("weights_sha256") != b["model"].get("weights_sha256"):
        diffs.append(f"model weights: {a['model'].get('path')} vs {b['model'].get('path')} (different SHA-256)")
    if a["data"].get("sha256") != b["data"].get("sha256"):
        diffs.append(f"data: {a['data'].get('path')} vs {b['data'].get('path')} (different SHA-256)")
    sa, sb = _settings(a), _settings(b)
    for part in sa:
        if isinstance(sa[part], dict) and isinstance(sb[part], dict):
            diffs += _dict_differences(part, sa[part], sb[part])
        elif sa[part] != sb[part]:
            diffs.append(f"{part}: {sa[part]!r} vs {sb[part]!r}")
    diffs += _dict_differences("step_plan", a.get("step_plan", {}), b.get("step_plan", {}))
    verdict.notes += _dict_differences("versions", a["settings"].get("versions", {}), b["settings"].get("versions", {}))
    steps_a, steps_b = a.get("steps", []), b.get("steps", [])
    if len(steps_a) != len(steps_b):
        diffs.append(f"steps recorded: {len(steps_a)} vs {len(steps_b)}")
    for x, y in zip(steps_a, steps_b, strict=False):  # a length difference is reported above
        gap = abs(x["loss"] - y["loss"])
        verdict.max_loss_difference = max(verdict.max_loss_difference, gap)
        if gap > rtol * max(abs(x["loss"]), abs(y["loss"])):
            diffs.append(f"loss diverges first at step {x['step']}: {x['loss']!r} vs {y['loss']!r}")
            break
    verdict.reproduces = not diffs
    return verdict


def report(verdict: Verdict, a: str, b: str) -> str:
    head = f"{b} reproduces {a}" if verdict.reproduces else f"{b} does not reproduce {a}"
    lines = [head, f"largest per-step loss difference: {verdict.max_loss_difference:.3g}"]
    lines += [f"  differs: {d}" for d in verdict.differences]
    lines += [f"  note: {n}" for n in verdict.notes]
    return "\n".join(lines)
