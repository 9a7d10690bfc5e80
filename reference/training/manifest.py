"""A run's manifest (manifest.json): what a training run (`train`, `continue`, `dpo`, `preference train`) writes about
itself, and does one run reproduce another.

`RunManifest` is what reference.methods.train writes once a run has finished: the resolved settings, package
versions, data and model hashes, the step plan, and per optimizer step its loss, learning rate, tokens and
seconds (`StepLog`); `AdapterMode` says whether the run created an adapter, loaded one, or had none.

Two manifests are compared by `compare`. A run reproduces another when it trained the same model (weight
hash) on the same data (hash) with the same settings (every TrainingArguments field but the paths, LoRA,
quantisation, SFT settings) and the same step plan, and its losses agree at every optimizer step both
recorded: |loss_a - loss_b| <= rtol x max(|loss_a|, |loss_b|), so rtol = 0 asks for equal losses. Steps are
matched by their step number, not by their place in the list: a run resumed from a checkpoint records only
the steps after it, and it reproduces the uninterrupted run it continues when those steps agree. A step that
one run recorded and the other did not (other than the steps before a resume) is a difference.

Differences are reported apart, by part: model, data, settings, step plan, losses. Package versions are
compared and reported as notes; a difference there is not by itself a failure (it is often the reason for a
loss divergence, which is).
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from reference.errors import InputError
from reference.paths import write_text_atomic
from reference.settings import sections

FILE = "manifest.json"


class AdapterMode(enum.StrEnum):
    """What a run did about an adapter; manifest.json holds the value as it is written here."""

    CREATED = "created"
    """A fresh LoRA adapter from the recipe's [lora], trained."""
    LOADED = "loaded"
    """A saved adapter, loaded trainable and trained on."""
    NONE = "none (full fine-tuning)"
    """No adapter: every weight of the model trained."""


@dataclass
class StepLog:
    """One optimizer step of a run."""

    step: int
    epoch: float
    loss: float
    """The step's loss: the sum over its micro-batches, each already divided by the accumulation window."""
    learning_rate: float
    """The rate this step's update used."""
    tokens: int
    """Real tokens the step was fed: its micro-batches' attention_mask sums (padding left out)."""
    seconds: float
    tokens_per_second: float
    metrics: dict = field(default_factory=dict)
    """The method's own measures, averaged over the step's micro-batches (DPO: reward margin, rewards)."""


@dataclass
class RunManifest:
    """What `manifest.json` holds: how a finished run was made and what it did, step by step."""

    settings: dict
    """reference.settings.training_arguments.resolved_settings: the TrainingArguments the Trainer ran with, LoRA,
    versions."""
    data: dict
    model: dict
    """reference.modeling.models.ModelIdentity of the base."""
    trainable_parameters: int
    all_parameters: int
    weight_bytes: int
    step_plan: dict
    batch_size_attempts: list = field(default_factory=list)
    steps: list = field(default_factory=list)
    """One StepLog (as a dict) per optimizer step."""
    warmup_step_seconds: float | None = None
    steady_tokens_per_second: float | None = None
    train_seconds: float | None = None
    use_cache: dict = field(default_factory=dict)
    loss: str | None = None
    """What computed the training loss: reference.methods.chunked_loss.train_with's answer (`[sft] chunked_loss`)."""
    adapter: dict = field(default_factory=dict)
    """{"mode": AdapterMode, ...}: r and lora_alpha of a created adapter, path and SHA-256 of a loaded one."""
    resumed_from: str | None = None
    """The checkpoint the run carried on from, if any."""
    trainable_sha256_per_process: list = field(default_factory=list)
    """Digest of the trained weights on each process (torchrun): all equal when data parallelism kept them in step."""
    output: str = ""
    files: list = field(default_factory=list)
    """The files and folders the run's save put in its output directory (what `--overwrite` may remove)."""
    method: str = "sft"
    """The training method (reference.training.runs.Method.name): sft, dpo or classifier."""
    results: dict = field(default_factory=dict)
    """What the method measured besides the per-step losses (the classifier's held-out log-loss before and after)."""
    device: dict = field(default_factory=dict)
    """Where the run trained: the device and torch's CPU threads, with how they were chosen (reference.training.cpu).
    Not compared by `verify`: the thread count moves a loss by a few units in its last digits."""

    @classmethod
    def read(cls, directory: str | Path) -> RunManifest:
        """The manifest a finished run wrote, as the object it was written from (unknown keys left out)."""
        recorded = load(directory)
        return cls(**{f.name: recorded[f.name] for f in fields(cls) if f.name in recorded})

    @property
    def path(self) -> Path:
        """Where the manifest is written: manifest.json in the run's output directory."""
        return Path(self.output) / FILE

    def write(self) -> None:
        """Write manifest.json, put in place whole (never half written)."""
        write_text_atomic(self.path, json.dumps(asdict(self), ensure_ascii=False, indent=2, default=str) + "\n")


PATH_ARGUMENTS = ("output_dir", "logging_dir", "run_name", "hub_model_id")
PARTS = ("model", "data", "settings", "step plan", "losses")
REQUIRED = {"settings": dict, "model": dict, "data": dict, "step_plan": dict, "steps": list}
"""What a manifest must hold, and of which type, for verify to read it."""


@dataclass
class Verdict:
    differences: dict = field(default_factory=lambda: {part: [] for part in PARTS})
    """What differs, one line each, under the part it belongs to; every list empty when the runs agree."""
    notes: list = field(default_factory=list)
    """Differences that do not fail the comparison (package versions, steps before a resume)."""
    steps_compared: list = field(default_factory=list)
    """The optimizer steps both runs recorded, whose losses were compared."""
    max_loss_difference: float = 0.0

    @property
    def reproduces(self) -> bool:
        return not any(self.differences.values())


def load(path: str | Path) -> dict:
    """The manifest in a run directory (or the file itself); anything else is an error naming the file."""
    source = Path(path)
    file = source / FILE if source.is_dir() else source
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(
            f"{path}: no manifest.json (a run directory written by a training command: train, continue, dpo, "
            "preference train)"
        ) from None
    except (ValueError, UnicodeDecodeError) as error:
        raise InputError(f"{file}: not a readable manifest: {error}") from None
    if not isinstance(manifest, dict):
        raise InputError(
            f"{file}: not a manifest (a JSON object written by a training command), but a JSON "
            f"{type(manifest).__name__}"
        )
    wrong = [key for key, kind in REQUIRED.items() if not isinstance(manifest.get(key), kind)]
    if wrong:
        raise InputError(
            f"{file}: not a manifest written by a training command: {', '.join(wrong)} missing or malformed"
        )
    return manifest


WITHOUT_EFFECT = {"sft": ("recompute",)}
"""Settings that cannot change a run's numbers, so runs that differ in them still reproduce each other (a
difference is a note): which layers checkpointing recomputes gives the same losses and weights bit for bit
(spec/test_recompute.py), and a resumed run may keep other layers than the run it continues."""


def _settings(manifest: dict) -> dict:
    """The settings two runs must share to be the same run (WITHOUT_EFFECT left out)."""
    parts = _all_settings(manifest)
    for name, keys in WITHOUT_EFFECT.items():
        if isinstance(parts[name], dict):
            parts[name] = {k: v for k, v in parts[name].items() if k not in keys}
    return parts


def _without_effect(manifest: dict) -> dict:
    parts = _all_settings(manifest)
    return {f"{n}.{k}": (parts[n] or {}).get(k) for n, keys in WITHOUT_EFFECT.items() for k in keys}


def _all_settings(manifest: dict) -> dict:
    settings = manifest["settings"]
    arguments = {k: v for k, v in settings.get("training_arguments", {}).items() if k not in PATH_ARGUMENTS}
    parts = {k: settings.get(k) for k in ("lora", "quantization", "sft", "dpo", "classifier")}
    for name, section in sections.SECTIONS.items():  # a field added since a run was recorded: it ran the default
        if isinstance(parts[name], dict):
            defaults = {f.name: f.default for f in fields(section)}
            parts[name] = {**defaults, **parts[name]}
    return {"method": settings.get("method", "sft"), "training_arguments": arguments, **parts}


def _dict_differences(name: str, ours: dict, theirs: dict) -> list[str]:
    keys = sorted(set(ours) | set(theirs))
    return [f"{name}.{k}: {ours.get(k)!r} vs {theirs.get(k)!r}" for k in keys if ours.get(k) != theirs.get(k)]


def _losses_by_step(manifest: dict) -> dict[int, float]:
    return {int(step["step"]): float(step["loss"]) for step in manifest["steps"]}


def _compare_losses(a: dict, b: dict, rtol: float, verdict: Verdict) -> None:
    """Losses step by step. A step only one run recorded is a difference, unless it comes before the first
    step of the other run and that run was resumed from a checkpoint (it never meant to record it)."""
    losses = {"A": _losses_by_step(a), "B": _losses_by_step(b)}
    runs = {"A": a, "B": b}
    for name, other in (("A", "B"), ("B", "A")):
        only = sorted(set(losses[name]) - set(losses[other]))
        first_of_other = min(losses[other], default=0)
        resumed = runs[other].get("resumed_from")
        before_resume = [s for s in only if resumed and s < first_of_other]
        if before_resume:
            verdict.notes.append(f"{_span(before_resume)} only in {name}: {other} resumed from {resumed}")
        unexplained = [s for s in only if s not in before_resume]
        if unexplained:
            verdict.differences["losses"].append(f"recorded only in {name}: {_span(unexplained)}")
    verdict.steps_compared = sorted(set(losses["A"]) & set(losses["B"]))
    if not verdict.steps_compared:
        verdict.differences["losses"].append("no optimizer step recorded by both runs")
    for step in verdict.steps_compared:
        x, y = losses["A"][step], losses["B"][step]
        gap = abs(x - y)
        verdict.max_loss_difference = max(verdict.max_loss_difference, gap)
        if not gap <= rtol * max(abs(x), abs(y)):  # `not <=`: a NaN loss is a difference too
            verdict.differences["losses"].append(f"loss diverges first at step {step}: {x!r} vs {y!r}")
            break


def _span(steps: list[int]) -> str:
    return f"step {steps[0]}" if len(steps) == 1 else f"{len(steps)} steps, {steps[0]} to {steps[-1]}"


def what_ran_differences(a: dict, b: dict) -> dict[str, list[str]]:
    """Model, data and settings of two runs (their manifests, or run.json): what differs, by part."""
    diffs: dict[str, list[str]] = {"model": [], "data": [], "settings": []}
    if a["model"].get("weights_sha256") != b["model"].get("weights_sha256"):
        diffs["model"].append(f"weights: {a['model'].get('path')} vs {b['model'].get('path')} (different SHA-256)")
    if a["data"].get("sha256") != b["data"].get("sha256"):
        diffs["data"].append(f"{a['data'].get('path')} vs {b['data'].get('path')} (different SHA-256)")
    sa, sb = _settings(a), _settings(b)
    for part in sa:
        if isinstance(sa[part], dict) and isinstance(sb[part], dict):
            diffs["settings"] += _dict_differences(part, sa[part], sb[part])
        elif sa[part] != sb[part]:
            diffs["settings"].append(f"{part}: {sa[part]!r} vs {sb[part]!r}")
    return diffs


def compare(a: dict, b: dict, rtol: float = 1e-5) -> Verdict:
    if not (isinstance(rtol, int | float) and math.isfinite(rtol) and rtol >= 0):
        raise InputError(f"--rtol {rtol!r}: a relative tolerance is a finite number >= 0 (0: losses equal)")
    verdict = Verdict()
    diffs = verdict.differences
    diffs.update(what_ran_differences(a, b))
    diffs["step plan"] += _dict_differences("step_plan", a["step_plan"], b["step_plan"])
    verdict.notes += _dict_differences("versions", a["settings"].get("versions", {}), b["settings"].get("versions", {}))
    verdict.notes += _dict_differences("no effect on the numbers", _without_effect(a), _without_effect(b))
    _compare_losses(a, b, rtol, verdict)
    return verdict


def report(verdict: Verdict, a: str, b: str) -> str:
    head = f"{b} reproduces {a}" if verdict.reproduces else f"{b} does not reproduce {a}"
    compared = verdict.steps_compared
    lines = [
        head,
        f"losses compared at {_span(compared) if compared else 'no step'}; largest difference "
        f"{verdict.max_loss_difference:.3g}",
    ]
    for part in PARTS:
        found = verdict.differences[part]
        lines.append(f"  {part}: " + ("same" if not found else f"{len(found)} difference(s)"))
        lines += [f"    {d}" for d in found]
    lines += [f"  note: {n}" for n in verdict.notes]
    return "\n".join(lines)
