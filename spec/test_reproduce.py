"""The main job (reference/reproduce.py) and `verify` (reference/manifest.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from reference import manifest
from reference.recipes import apply_overrides, load_recipe
from spec.observe import SHORT, Observed, run_recipe


@pytest.mark.slow
@pytest.mark.claim("X2")
def test_verify_says_a_repeated_run_reproduces_and_names_where_a_changed_one_diverges(tmp_path, fixtures_dir):
    """Same recipe, model and data twice on the CPU: every per-step loss equal. A third run with another
    learning rate differs in that setting, and its losses part from step 2 (step 1 is computed before
    the first update, so it is the same)."""
    model, data = fixtures_dir / "models" / "tiny-gemma2", fixtures_dir / "data" / "qa111_sample.jsonl"
    recipe = apply_overrides(load_recipe("llm2024"), SHORT)
    for name, run_recipe_ in (("a", recipe), ("b", recipe), ("c", apply_overrides(recipe, ["learning_rate=1e-2"]))):
        run_recipe(run_recipe_, model, data, tmp_path / name, Observed())
    same = manifest.compare(manifest.load(tmp_path / "a"), manifest.load(tmp_path / "b"), rtol=0)
    assert same.reproduces and same.max_loss_difference == 0 and same.steps_compared == [1, 2, 3, 4]
    changed = manifest.compare(manifest.load(tmp_path / "a"), manifest.load(tmp_path / "c"))
    assert not changed.reproduces
    assert changed.differences["settings"] == ["training_arguments.learning_rate: 0.002 vs 0.01"]
    assert changed.differences["losses"][0].startswith("loss diverges first at step 2")
    cli = subprocess.run(
        [sys.executable, "-m", "reference", "verify", str(tmp_path / "a"), str(tmp_path / "c")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 1 and "does not reproduce" in cli.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "reference", "verify", str(tmp_path / "a"), str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2 and "nope" in missing.stderr


@pytest.mark.slow
@pytest.mark.claim("C10", "X2", "X7")
def test_the_main_job_runs_the_llm2024_pipeline_end_to_end(tmp_path):
    secret = "hf_REPRODUCEsecret42"  # X7: a token given as a setting is written nowhere
    result = subprocess.run(
        [sys.executable, "-m", "reference", "reproduce", "--output", str(tmp_path), "--set", f"hub_token={secret}"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert secret not in result.stdout + result.stderr
    assert [p for p in tmp_path.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()] == []
    summary = json.loads((tmp_path / "summary.json").read_text())
    kept, qa = summary["filter"]["kept"], 24
    assert summary["training_records"] == kept + qa  # C10: kept magpie records + the QA111 set
    rows = [json.loads(line) for line in (tmp_path / "output.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["task_id"] for r in rows] == [0, 1, 2, 3]
    report = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "## Filter" in report and "(created adapter)" in report and "(loaded adapter)" in report
    assert (tmp_path / "loss.svg").read_text().startswith("<svg") and (tmp_path / "sft" / "manifest.json").is_file()
