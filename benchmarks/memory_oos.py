"""Out-of-sample check of the peak-memory model: predictions written down before the rows are measured.

The in-sample residuals (benchmarks/memory_residuals.py) are taken on the rows the model was built against.
This script holds rows of two architectures never measured while it was written (``llama3.2-3b``,
``llama2-7b`` in benchmarks/bench_grid.py):

    python benchmarks/memory_oos.py predict --out docs/results/memory_oos_predicted.json   # before measuring
    python benchmarks/memory_oos.py compare --predicted docs/results/memory_oos_predicted.json BENCH.json ...

``predict`` records, per row, the model's peak for the non-sampled methods and, for sampled ones, the bound
over every draw the budget admits (``active=None``: the method plan's worst case), with the commit of the model.
``compare`` reads the bench outputs of those rows and prints measured peak, the prediction written before, the
model's prediction for the draws the run made (what the bench records), and both errors in %.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from benchmarks.bench_grid import ARCHS, METHODS, predict_kwargs  # noqa: E402  (torch-free)
from misa_theory import memory as mm  # noqa: E402

#: (model, bench method, seq, ckpt) of the held-out rows, as benchmarks/bench_gpu.py names them.
ROWS: list[tuple[str, str, int, bool]] = [
    *[("llama3.2-3b", m, 2048, False) for m in ("full", "lora", "lisa", "badam", "misa1", "misa3")],
    *[("llama2-7b", m, 4096, True) for m in ("lora", "badam", "misa1", "misa3")],
]


def _key(model: str, method: str, seq: int, ckpt: bool) -> str:
    return f"{model}:{method}:{seq}:{'on' if ckpt else 'off'}"


def predict(out: Path) -> None:
    """Write the pre-registered predictions (one per row of ROWS) to ``out``."""
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    rows = {}
    for model, name, seq, ckpt in ROWS:
        method, over = METHODS[name]
        kw = predict_kwargs({"seq": seq, "ckpt": ckpt, "lean_ops": True, "inplace_head_grad": True}, over)
        est = mm.predict_peak(ARCHS[model], method, **kw)
        rows[_key(model, name, seq, ckpt)] = {"pred_gib": est.peak_gib, "phase": est.phase,
                                               "bound_over_draws": method in ("misa", "lisa", "badam")}
    out.write_text(json.dumps({"model_commit": commit, "lean_ops": "on", "rows": rows}, indent=1) + "\n")
    print(f"{len(rows)} predictions -> {out} (memory model at {commit[:10]})")


def compare(predicted: Path, bench_files: list[Path]) -> None:
    """Print measured vs predicted (before, and for the run's own draws) for every held-out row measured."""
    pre = json.loads(predicted.read_text())["rows"]
    print("| row | measured GiB | predicted before (GiB, err %) | model on the run's draws (GiB, err %) |")
    print("|---|---:|---:|---:|")
    errs: dict[str, list[float]] = {"before": [], "draws": []}
    for f in bench_files:
        for r in json.loads(f.read_text())["rows"]:
            key = _key(r["model"], r["method"], r["seq"], r["ckpt"])
            if key not in pre or not r.get("peak_gib"):
                continue
            before = pre[key]["pred_gib"]
            e0 = 100 * (before - r["peak_gib"]) / r["peak_gib"]
            errs["before"].append(e0)
            errs["draws"].append(r["pred_err_pct"])
            print(f"| {key} | {r['peak_gib']:.2f} | {before:.2f} ({e0:+.1f}) | {r['pred_gib']:.2f} "
                  f"({r['pred_err_pct']:+.1f}) |")
    for k, v in errs.items():
        if v:
            print(f"max |err| {k}: {max(map(abs, v)):.1f}% over {len(v)} rows")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("predict")
    a.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "memory_oos_predicted.json")
    c = sub.add_parser("compare")
    c.add_argument("--predicted", type=Path, default=ROOT / "docs" / "results" / "memory_oos_predicted.json")
    c.add_argument("bench", type=Path, nargs="+")
    args = p.parse_args(argv)
    if args.cmd == "predict":
        predict(args.out)
    else:
        compare(args.predicted, args.bench)


if __name__ == "__main__":
    main()
