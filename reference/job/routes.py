"""Seed 000's question, measured: an adapter was trained on old data; how do you train it again on new data
without losing what it learned (the asker found "it only learned the new data")?

Each route the thread touches, run with the project's own functions on the same new data and settings:

* trainable: the saved adapter loaded with is_trainable=True and trained further (train.run(adapter=...),
  what `continue --mode adapter` does);
* merge: `continue --mode merge` itself (continuation.continue_merged: the adapter folded into the base, an NF4
  base dequantised first, then a fresh adapter trained on that merged base; the thread's answer);
* frozen: peft's default, PeftModel.from_pretrained(is_trainable=False) (lora.load_adapter(trainable=False)):
  no weight is trainable, so "training" would change nothing; the project refuses it (lora.require_trainable)
  and the reason is kept for the report;
* fresh: a new adapter on the bare base, the saved one left unused: it can only learn the new data.

Every route is scored (reference/inference/scoring.py) on the old and on the new data, before and after, by a
`score(base_dir, adapter_dir)` the caller gives. A route keeps what was learned first when, after it,
the old-data loss keeps at least half of the drop SFT made (`kept_share`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from reference.errors import InputError

ROUTES = {
    "trainable": "adapter loaded trainable",
    "merge": "merged, new adapter on top",
    "frozen": "peft's default load (frozen)",
    "fresh": "fresh adapter on the bare base",
}
KEEPS = 0.5
"""A route keeps what was learned first when its old-data loss keeps at least this share of SFT's drop."""


@dataclass
class Route:
    name: str
    title: str
    before: dict
    """{"old": AnswerScore, "new": AnswerScore} of the model the route starts from."""
    after: dict | None = None
    """The same after training on the new data; None when the route was refused."""
    run: object | None = None
    """The training run's record (reference.methods.train), None when refused."""
    refused: str | None = None
    trainable_weights: int | None = None
    notes: list = field(default_factory=list)


def kept_share(route: Route, base_old: float, sft_old: float) -> float | None:
    """How much of SFT's old-data loss drop (base -> SFT) is still there after the route: 1 all, 0 none."""
    if route.after is None or base_old == sft_old:
        return None
    return (base_old - route.after["old"].loss) / (base_old - sft_old)


def run_routes(recipe, base: str, sft_adapter: str, new_data: str, columns: dict, out: Path, score, say) -> list:
    """The four routes from `sft_adapter` (trained on `base`), each training on `new_data` as `recipe` says
    into out/<route>; returns them in ROUTES order."""
    from reference.methods import continuation, train
    from reference.modeling import lora

    def trained(name: str, model_dir: str, adapter: str | None) -> Route:
        say(f"route {name}: {ROUTES[name]}")
        before = score(model_dir, adapter)
        record = train.run(
            recipe, model_dir, new_data, str(out / name), columns=columns, adapter=adapter, say=say, overwrite=True
        )
        return Route(
            name, ROUTES[name], before, score(model_dir, out / name), record, None, record.trainable_parameters
        )

    routes = [trained("trainable", base, sft_adapter)]

    say(f"route merge: folding {sft_adapter} into {base}, then a fresh adapter on the merged base")
    record = continuation.continue_merged(
        recipe, base, sft_adapter, new_data, str(out / "merge"), columns, say=say, overwrite=True
    )
    merged = out / "merge" / continuation.MERGED_BASE  # unchanged by the training: the route's starting point
    after = score(str(merged), out / "merge")
    routes.append(
        Route("merge", ROUTES["merge"], score(str(merged), None), after, record, None, record.trainable_parameters)
    )
    routes[-1].notes.append(f"merged base: merge/{merged.name}/ (bf16, quantised again to train on)")

    say("route frozen: peft's default load, is_trainable=False")
    model, _, _ = train.load_base(recipe, Path(base), None, "float32")  # as the other routes' training loads it
    frozen = lora.load_adapter(model, sft_adapter, trainable=False)
    refused = None
    try:
        lora.require_trainable(frozen)
    except InputError as error:
        refused = str(error)
        say(f"route frozen refused: {refused}")
    trainable, _ = lora.count_trainable(frozen)
    routes.append(Route("frozen", ROUTES["frozen"], score(base, sft_adapter), None, None, refused, trainable))
    del model, frozen

    routes.append(trained("fresh", base, None))
    return routes


def verdict(routes: list[Route], base_old: float, sft_old: float, sft_accuracy: float | None = None) -> str:
    """One sentence from the numbers the report shows: which routes keep most of SFT's drop in old-data loss (the
    share kept, and the old-data accuracy after, beside SFT's `sft_accuracy`), which lose it, which was refused."""
    keep, lose, accuracy_fell = [], [], []
    for route in routes:
        share = kept_share(route, base_old, sft_old)
        if share is not None:
            accuracy = route.after["old"].accuracy
            text = f"{route.title} ({share:.0%} of the loss drop kept, old-data accuracy {accuracy:.1%})"
            (keep if share >= KEEPS else lose).append(text)
            if share >= KEEPS and sft_accuracy is not None and accuracy < sft_accuracy:
                accuracy_fell.append(route.title)
    refused = [route.title for route in routes if route.refused]
    parts = []
    if keep:
        fell = (
            f", though their old-data accuracy falls below SFT's {sft_accuracy:.1%}"
            if accuracy_fell and len(accuracy_fell) == len(keep)
            else ""
        )
        parts.append(f"{' and '.join(keep)} keep most of SFT's drop in old-data loss while learning the new{fell}")
    if lose:
        parts.append(f'{" and ".join(lose)} learns the new data but loses the old ("it only learned the new data")')
    if refused:
        parts.append(f"{' and '.join(refused)} trains nothing (no weight is trainable) and is refused")
    sentence = "; ".join(parts) + "." if parts else "No route was measured."
    return sentence[0].upper() + sentence[1:]
