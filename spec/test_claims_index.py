"""The claims index (spec/CLAIMS.md) is generated from the tests' claim markers and kept current."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SPEC = Path(__file__).resolve().parent


def test_every_claim_marker_names_a_claim_of_the_specification():
    sys.path.insert(0, str(SPEC))
    import claims

    spec_ids = set(claims.claims_in_spec())
    if not spec_ids:
        pytest.skip("../shared/SPEC.md is not beside this checkout")
    assert set(claims.tests_by_claim()) <= spec_ids


def test_the_committed_claims_index_is_current():
    sys.path.insert(0, str(SPEC))
    import claims

    if not claims.SPEC_MD.is_file():
        pytest.skip("../shared/SPEC.md is not beside this checkout: the index's claim texts come from it")
    result = subprocess.run([sys.executable, str(SPEC / "claims.py"), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
