"""`verify` (reference/training/manifest.py): does run B reproduce run A? Shown on manifests written out by hand here;
the real runs are compared in spec/test_reproduce.py (a repeated run, a changed one) and
spec/test_continuation.py (a killed and resumed run against the uninterrupted one).

Losses are matched by optimizer step number. With relative tolerance rtol, losses x and y agree when
|x - y| <= rtol * max(|x|, |y|): for x = 2.0, y = 2.0002 the gap is 2e-4 and the bound at rtol 1e-4 is
2.0002e-4, so they agree; at rtol 5e-5 the bound is 1.0001e-4 and they do not.
"""

from __future__ import annotations

import copy
import json

import pytest

from reference import cli
from reference.errors import InputError
from reference.training import manifest


def run_record(losses: dict[int, float], resumed_from: str | None = None) -> dict:
    """A manifest as `train` writes one, with only what verify reads."""
    return {
        "settings": {
            "training_arguments": {"learning_rate": 2e-4, "output_dir": "/runs/a/checkpoints"},
            "lora": {"r": 64},
            "quantization": {"load_in_4bit": True},
            "sft": {"max_seq_length": 2048},
            "versions": {"torch": "2.13.0"},
        },
        "model": {"path": "/models/tiny", "weights_sha256": "m" * 64},
        "data": {"path": "/data/qa.jsonl", "sha256": "d" * 64},
        "step_plan": {"total_optimizer_steps": max(losses)},
        "steps": [{"step": step, "loss": loss} for step, loss in sorted(losses.items())],
        "resumed_from": resumed_from,
    }


SIX = {1: 2.0, 2: 1.9, 3: 1.8, 4: 1.7, 5: 1.6, 6: 1.5}


@pytest.mark.claim("X8")
def test_a_run_resumed_at_step_4_reproduces_the_uninterrupted_run_by_step_number():
    """B recorded steps 4-6 only (resumed from checkpoint-3); compared by list position, B's first loss (step 4,
    1.7) would be set against A's first (step 1, 2.0) and fail."""
    resumed = run_record({4: 1.7, 5: 1.6, 6: 1.5}, resumed_from="/runs/b/checkpoints/checkpoint-3")
    verdict = manifest.compare(run_record(SIX), resumed, rtol=0)
    assert verdict.reproduces and verdict.steps_compared == [4, 5, 6]
    assert verdict.notes == ["3 steps, 1 to 3 only in A: B resumed from /runs/b/checkpoints/checkpoint-3"]


@pytest.mark.claim("X8")
def test_steps_missing_from_a_run_that_was_not_resumed_are_a_difference():
    verdict = manifest.compare(run_record(SIX), run_record({4: 1.7, 5: 1.6, 6: 1.5}), rtol=0)
    assert not verdict.reproduces
    assert verdict.differences["losses"] == ["recorded only in A: 3 steps, 1 to 3"]


@pytest.mark.claim("X8")
def test_the_first_divergent_step_is_named_by_its_number():
    verdict = manifest.compare(run_record(SIX), run_record({**SIX, 5: 1.61, 6: 1.49}), rtol=1e-5)
    assert verdict.differences["losses"] == ["loss diverges first at step 5: 1.6 vs 1.61"]


@pytest.mark.claim("X8")
@pytest.mark.parametrize("rtol,agree", [(1e-4, True), (5e-5, False), (0, False)])
def test_the_tolerance_is_relative_to_the_larger_loss(rtol, agree):
    """The docstring's example: 2.0 against 2.0002."""
    verdict = manifest.compare(run_record({1: 2.0}), run_record({1: 2.0002}), rtol=rtol)
    assert verdict.reproduces is agree


@pytest.mark.claim("X8")
def test_a_run_reproduces_itself_at_tolerance_0():
    assert manifest.compare(run_record(SIX), run_record(SIX), rtol=0).reproduces


@pytest.mark.claim("X8")
@pytest.mark.parametrize("rtol", [-1, -1e-9, float("nan"), float("inf")])
def test_a_tolerance_below_0_or_not_finite_is_refused(rtol):
    with pytest.raises(InputError, match="rtol"):
        manifest.compare(run_record(SIX), run_record(SIX), rtol=rtol)


@pytest.mark.claim("X8")
def test_a_nan_loss_is_a_difference():
    verdict = manifest.compare(run_record(SIX), run_record({**SIX, 2: float("nan")}), rtol=1e-3)
    assert verdict.differences["losses"] == ["loss diverges first at step 2: 1.9 vs nan"]


@pytest.mark.claim("X8")
def test_model_data_settings_and_losses_are_reported_apart():
    """Each part of the comparison has its own list; the output directory is a path, not a setting."""
    other = run_record({**SIX, 6: 1.4})
    other["model"]["weights_sha256"] = "x" * 64
    other["data"]["sha256"] = "y" * 64
    other["settings"]["training_arguments"].update(learning_rate=1e-4, output_dir="/elsewhere")
    other["step_plan"]["total_optimizer_steps"] = 7
    other["settings"]["versions"]["torch"] = "2.14.1"
    verdict = manifest.compare(run_record(SIX), other)
    assert verdict.differences == {
        "model": ["weights: /models/tiny vs /models/tiny (different SHA-256)"],
        "data": ["/data/qa.jsonl vs /data/qa.jsonl (different SHA-256)"],
        "settings": ["training_arguments.learning_rate: 0.0002 vs 0.0001"],
        "step plan": ["step_plan.total_optimizer_steps: 6 vs 7"],
        "losses": ["loss diverges first at step 6: 1.5 vs 1.4"],
    }
    assert verdict.notes == ["versions.torch: '2.13.0' vs '2.14.1'"]
    text = manifest.report(verdict, "a", "b")
    assert [line for line in text.splitlines() if line.startswith("  ") and not line.startswith("    ")] == [
        "  model: 1 difference(s)",
        "  data: 1 difference(s)",
        "  settings: 1 difference(s)",
        "  step plan: 1 difference(s)",
        "  losses: 1 difference(s)",
        "  note: versions.torch: '2.13.0' vs '2.14.1'",
    ]


@pytest.mark.claim("X8")
@pytest.mark.parametrize(
    "content,says",
    [
        (
            '{"reproduces": true}',
            "not a manifest written by a training command: settings, model, data, step_plan, steps",
        ),
        ("[1, 2, 3]", "not a manifest (a JSON object written by a training command), but a JSON list"),
        ("{not json", "not a readable manifest"),
        (b"\xff\xfe", "not a readable manifest"),
    ],
)
def test_a_file_that_is_not_a_manifest_is_a_clear_error(tmp_path, content, says):
    path = tmp_path / "manifest.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(InputError, match="not a") as error:
        manifest.load(path)
    assert str(path) in str(error.value) and says in str(error.value)


@pytest.mark.claim("X8")
def test_verify_command_exits_0_1_or_2(tmp_path, capsys):
    """0: B reproduces A; 1: it does not; 2: bad input (here, not a manifest), the file named, no traceback."""
    for name, record in (("a", run_record(SIX)), ("b", run_record(SIX)), ("c", run_record({**SIX, 3: 1.0}))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(json.dumps(record), encoding="utf-8")
    (tmp_path / "junk.json").write_text("{}", encoding="utf-8")
    assert cli.main(["verify", str(tmp_path / "a"), str(tmp_path / "b"), "--rtol", "0"]) == 0
    assert cli.main(["verify", str(tmp_path / "a"), str(tmp_path / "c")]) == 1
    assert "losses: 1 difference(s)" in capsys.readouterr().out
    assert cli.main(["verify", str(tmp_path / "a"), str(tmp_path / "junk.json")]) == 2
    err = capsys.readouterr().err
    assert "junk.json" in err and "Traceback" not in err


def test_comparing_leaves_both_manifests_unchanged():
    a, b = run_record(SIX), run_record({4: 1.7}, resumed_from="/c")
    before = copy.deepcopy((a, b))
    manifest.compare(a, b)
    assert (a, b) == before
