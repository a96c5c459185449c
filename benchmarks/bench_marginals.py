"""How closely do long-run inclusion frequencies track the target π under a hard budget?

Compares ``ModuleSampler``'s π rules with a sequential weighted draw from the same p (add modules one at a
time with probability ∝ p among those that still fit, until none fits: the fill of the paper's ``misa`` rule,
without its forced picks) on Llama-3-8B module sizes with a fixed, heterogeneous score profile.  Reported per
rule and δ: the fill of the budget, and the error of the per-module frequencies
against π (total variation Σ|f − π|/Σπ, and per size class the expected count target vs measured).

    python benchmarks/bench_marginals.py --draws 20000 --out docs/results/marginals.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from misa_theory.optimal import kl_softmax
from misa_theory.problems import llama3_8b_layout, synthetic_sq_norms
from misa_theory.sampler import ModuleSampler


def sequential_weighted_draw(p: np.ndarray, sizes: np.ndarray, budget: int, rng: np.random.Generator) -> np.ndarray:
    """The authors' scheme: repeatedly pick b ∝ p_b among unpicked modules that fit, until none fits."""
    chosen = np.zeros(p.size, dtype=bool)
    left = budget
    while True:
        ok = (~chosen) & (sizes <= left)
        if not ok.any():
            return chosen
        w = np.where(ok, p, 0.0)
        b = rng.choice(p.size, p=w / w.sum())
        chosen[b] = True
        left -= sizes[b]


def tv(freq: np.ndarray, pi: np.ndarray) -> float:
    """Σ_b |f_b − π_b| / Σ_b π_b: 0 when every module's frequency equals its target."""
    return float(np.abs(freq - pi).sum() / pi.sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draws", type=int, default=20000)
    ap.add_argument("--deltas", default="0.01,0.03,0.1")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    sizes, layers, kinds = llama3_8b_layout()
    a = synthetic_sq_norms(sizes, layers, kinds, seed=0)
    total = int(sizes.sum())
    rows = []
    for delta in [float(x) for x in args.deltas.split(",")]:
        for rule in ("misa_norm", "optimal", "uniform"):
            s = ModuleSampler(sizes, layers, delta=delta, rule=rule, seed=0, total_params=total, explore=False)
            s.observe(np.arange(sizes.size), a)
            pi = s.target_inclusion()
            freq = np.zeros(sizes.size)
            t0 = time.perf_counter()
            for _ in range(args.draws):
                freq[s.draw()] += 1
            dt = (time.perf_counter() - t0) / args.draws
            freq /= args.draws
            row = {"delta": delta, "rule": rule, "sampler": "ModuleSampler", "tv": tv(freq, pi),
                   "fill": float(freq @ sizes / s.budget), "us_per_draw": dt * 1e6, "classes": {}}
            for n in np.unique(sizes):
                m = sizes == n
                row["classes"][int(n)] = [float(pi[m].sum()), float(freq[m].sum())]
            rows.append(row)
            if rule == "misa_norm":
                # a sequential draw from the same softmax p, compared with the same π
                p = kl_softmax(s.scores / s.scores.mean(), s.eta)
                rng = np.random.default_rng(1)
                f2 = np.zeros(sizes.size)
                for _ in range(max(args.draws // 10, 500)):
                    f2 += sequential_weighted_draw(p, sizes, s.budget, rng)
                f2 /= max(args.draws // 10, 500)
                rows.append({"delta": delta, "rule": rule, "sampler": "sequential (authors)", "tv": tv(f2, pi),
                             "fill": float(f2 @ sizes / s.budget), "us_per_draw": float("nan"),
                             "classes": {int(n): [float(pi[sizes == n].sum()), float(f2[sizes == n].sum())]
                                         for n in np.unique(sizes)}})
    print(f"{'delta':>6} {'rule':8} {'sampler':22} {'TV vs π':>8} {'fill':>6}  class E[count] target→measured")
    for r in rows:
        cls = "  ".join(f"{t:.2f}→{m:.2f}" for t, m in r["classes"].values())
        print(f"{r['delta']:6.2f} {r['rule']:8} {r['sampler']:22} {r['tv']:8.3f} {r['fill']:6.3f}  {cls}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
