"""benchmarks/sim_study.py runs end to end (--quick): every rule tuned and evaluated, the rate table with its
negative controls, the markdown table and two figures; bad input exits with code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "sim_study.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


@pytest.mark.slow
def test_quick_study_writes_every_output(tmp_path):
    r = _run("--quick", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((tmp_path / "study.json").read_text())
    rules = {row["rule"] for row in report["rows"]}
    assert {"misa", "misa_alg1", "misa_norm", "optimal", "uniform", "lisa", "badam", "adam", "sgd"} <= rules
    for row in report["rows"]:
        if "n/a" in row:
            continue
        assert row["alpha0"] in (report["settings"]["sgd_grid"] if row["rule"] == "sgd" else report["settings"]["grid"])
        for key in ("f_final", "min_grad_sq", "avg_grad_sq"):
            assert row[key]["lo"] <= row[key]["mean"] <= row[key]["hi"]
        assert 0 <= row["to_target"]["reached"] <= row["to_target"]["seeds"] == report["settings"]["seeds"]
    assert {0.0} < {row["heterogeneity"] for row in report["rows"]}  # the sweep includes h = 0
    rate = {row["name"]: row for row in report["rate"]["rows"]}
    never = [row for name, row in rate.items() if "at π = 0" in name]
    assert len(never) == 2 and all(row["verdict"] == "fail" for row in never)
    assert all(b == float("inf") for b in next(r for r in never if "SGD" in r["name"])["bound"])
    assert (tmp_path / "study.md").read_text().count("| misa_alg1") >= 2
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["heterogeneity.png", "rate.png"]


@pytest.mark.parametrize(("args", "message"), [
    (("--delta", "1.5"), "--delta"), (("--seeds", "1"), "--seeds"), (("--K", "0"), "--K"),
    (("--rate-Ks", "10"), "--rate-Ks"), (("--grid", "a,b"), "--grid"),
])
def test_bad_input_exits_2(tmp_path, args, message):
    r = _run("--out", str(tmp_path), *args)
    assert r.returncode == 2 and message in r.stderr
