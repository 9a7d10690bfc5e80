"""The specification lives in the repository (spec/SPEC.md), covers every claim the project was asked to
make, and its index (spec/CLAIMS.md) is generated from it and from the tests' claim markers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SPEC = Path(__file__).resolve().parent
sys.path.insert(0, str(SPEC))
import claims  # noqa: E402


def test_every_claim_marker_names_a_claim_of_the_specification():
    assert set(claims.tests_by_claim()) <= set(claims.claims_in_spec())


def test_every_claim_is_a_whole_sentence_or_paragraph():
    for claim, text in claims.claims_in_spec().items():
        assert len(text) > 40 and text.endswith((".", ")")), f"{claim}: {text!r}"


def test_the_committed_claims_index_is_current():
    result = subprocess.run([sys.executable, str(SPEC / "claims.py"), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
