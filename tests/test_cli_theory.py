"""`python -m misa_theory`: outputs, JSON contents and one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "misa_theory", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_simulate_writes_json_and_plots(tmp_path):
    out = tmp_path / "o"
    r = run("simulate", "--problem", "sensing", "--rule", "misa,lisa,adam", "--K", "20", "--seeds", "3",
            "--T", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "misa" in r.stdout and "lisa/misa" in r.stdout
    data = json.loads((out / "summary.json").read_text())
    rules = data["runs"]["20"]["rules"]
    assert set(rules) == {"misa", "lisa", "adam"}
    for s in rules.values():
        for key in ("avg_grad_sq", "avg_grad_sq_std", "avg_grad_sq_stderr", "min_grad_sq", "min_grad_sq_stderr"):
            assert s[key] >= 0
    assert (out / "grad_sq.png").stat().st_size > 1000


def test_k_sweep_fits_a_slope(tmp_path):
    r = run("simulate", "--problem", "sensing", "--rule", "uniform", "--K-sweep", "4,16,64", "--seeds", "3",
            "--T", "1", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    rate = json.loads((tmp_path / "summary.json").read_text())["rate"]["uniform"]["avg"]
    assert rate["lo"] <= rate["slope"] <= rate["hi"] and len(rate["Ks"]) == 3
    assert (tmp_path / "rate.png").exists() and "slope" in r.stdout


def test_variance_toy_and_norms_file(tmp_path):
    r = run("variance", "--toy", "llama3-8b", "--delta", "0.1")
    assert r.returncode == 0, r.stderr
    for name in ("uniform layer-wise", "optimal layer-wise", "uniform module-wise", "optimal module-wise",
                 "deficit-optimal module-wise", "deficit-optimal layer-wise", "paper softmax", "deficit D"):
        assert name in r.stdout
    f = tmp_path / "importance.json"
    f.write_text(json.dumps({"modules": [{"name": f"m{i}", "size": 10 + i % 3, "layer": i // 3,
                                          "sq_norm": float(1 + i)} for i in range(12)]}))
    r = run("variance", "--norms", str(f), "--delta", "0.5", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    v = out["variance"]
    assert v["optimal module-wise"] <= v["optimal layer-wise"] + 1e-9
    assert v["optimal module-wise"] <= v["uniform module-wise"] + 1e-9
    d = out["deficit"]  # the trainer's account: module-wise ≤ layer-wise ≤ uniform, the greedy optimum lowest
    assert d["deficit-optimal module-wise"] <= d["deficit-optimal layer-wise"] + 1e-9
    assert d["deficit-optimal layer-wise"] <= d["uniform layer-wise"] + 1e-9
    assert all(d["deficit-optimal module-wise"] <= x + 1e-9 for x in d.values())
    assert 0.0 <= d["deficit-optimal module-wise"] <= out["sum_sq_norms"]


@pytest.mark.parametrize("args, needle", [
    (("simulate", "--problem", "nope"), "robust"),
    (("simulate", "--rule", "foo"), "lisa"),
    (("simulate", "--K", "0"), "K must be positive"),
    (("simulate", "--K-sweep", "10,-1"), "K must be positive"),
    (("simulate", "--delta", "0"), "delta"),
    (("simulate", "--eta", "-1"), "eta"),
    (("simulate", "--jobs", "0"), "jobs"),
    (("simulate", "--sigma", "nan"), "--sigma"),
    (("simulate", "--target-frac", "inf"), "--target-frac"),
    (("simulate", "--sgd-alpha0", "-0.1"), "--sgd-alpha0"),
    (("simulate", "--seeds", "0"), "--seeds"),
    (("simulate", "--T", "0"), "--T"),
    (("variance", "--toy", "llama3-8b", "--delta", "1.5"), "delta"),
    (("variance", "--toy", "llama3-8b", "--eta", "-2"), "eta"),
    (("variance", "--toy", "gpt5"), "llama3-8b"),
    (("variance", "--norms", "/no/such/file.json"), "not found"),
    (("frobnicate",), "simulate"),
])
def test_bad_input_is_one_line_exit_2(args, needle):
    r = run(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("misa_theory: error:") and needle in lines[0]
    assert "Traceback" not in r.stderr


def test_variance_at_the_default_delta_runs_and_marks_layer_designs_unavailable():
    """README's command: at δ = 3% no whole Llama-3-8B layer fits (1/32 of the model), so the layer-wise rows
    say so instead of the command failing."""
    r = run("variance", "--toy", "llama3-8b", "--delta", "0.03", "--json")
    assert r.returncode == 0, r.stderr
    v = json.loads(r.stdout)["variance"]
    assert v["uniform layer-wise"] is None and v["optimal layer-wise"] is None
    assert 0 < v["optimal module-wise"] <= v["uniform module-wise"]
    table = run("variance", "--toy", "llama3-8b")
    assert table.returncode == 0 and "n/a" in table.stdout


def test_load_norms_reads_the_trainers_importance_json(tmp_path):
    """The notebook's measured-norms cell reads what misa_train.report writes: keep the two in step."""
    pytest.importorskip("torch")
    from misa_theory.cli import load_norms
    from misa_train.modules import find_modules
    from misa_train.report import write_importance
    from tests.helpers_tiny import make_tiny

    model, _ = make_tiny("llama")
    mods = find_modules(model)
    scores = [float(i + 1) for i in range(len(mods))]
    write_importance(tmp_path / "importance.json", mods, scores)
    sizes, layers, norms, names = load_norms(tmp_path / "importance.json")
    assert sizes.tolist() == [m.size for m in mods]
    assert layers.tolist() == [m.layer for m in mods]
    assert norms.tolist() == scores
    assert names == [m.name for m in mods]


def test_unusable_out_folder_fails_before_simulating(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    r = run("simulate", "--K", "50", "--rule", "misa", "--out", str(blocker / "sub"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("misa_theory: error: --out: cannot create"), r.stderr
    assert r.stdout == ""  # nothing was simulated (and lost) first


def test_jobs_do_not_change_results(tmp_path):
    """(horizon, rule) runs in a process pool give the same summary as one after the other."""
    common = ("simulate", "--rule", "misa,lisa,adam", "--K-sweep", "10,40", "--T", "2", "--seeds", "3",
              "--no-plots")
    one = run(*common, "--out", str(tmp_path / "one"))
    two = run(*common, "--out", str(tmp_path / "two"), "--jobs", "2")
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    a = json.loads((tmp_path / "one" / "summary.json").read_text())
    b = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert a == b and set(a["runs"]) == {"10", "40"}
