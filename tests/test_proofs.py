"""Every proofs/check_*.py must exit 0: each is a sympy script that checks one derivation step by step."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

PROOFS = Path(__file__).resolve().parent.parent / "proofs"
# Globbed, so a checker added later (e.g. a convergence proof) is picked up without editing this file.
CHECKERS = sorted(PROOFS.glob("check_*.py"))


def test_there_are_checkers() -> None:
    """Guard against the glob silently matching nothing (a moved directory would make the suite vacuous)."""
    assert len(CHECKERS) >= 4


@pytest.mark.parametrize("script", CHECKERS, ids=[p.stem for p in CHECKERS])
def test_proof_checker_passes(script: Path) -> None:
    """Run the checker as its own process (cwd = proofs/ so it imports its helper) and require exit 0."""
    res = subprocess.run([sys.executable, str(script)], cwd=PROOFS, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{script.name} failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    assert "FAIL" not in res.stdout
