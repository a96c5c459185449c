"""Simulation study of the sampling rules: α₀ tuned per rule, sweeps of heterogeneity and δ, intervals over seeds.

Problem: ``RobustFeatures(n_layers=12)`` (9,216 parameters, 84 modules; ``--quick``: 4 layers) at each planted
heterogeneity h (0 = every module equally important).  For every cell (h, δ, rule):

1. **tuning**: each α₀ of the grid (α = α₀/√K) runs ``--tune-seeds`` seeds from seed base 1000 (disjoint from
   the evaluation seeds); the α₀ with the smallest mean ``--tune-metric`` is chosen;
2. **evaluation**: ``--seeds`` seeds from seed base 0 at the chosen α₀.

Reported per cell: mean and 95% t-interval over seeds of f(θ_K), min_k‖∇f(θ_k)‖² and (1/K)Σ_k‖∇f(θ_k)‖²; the
median number of block updates until ‖∇f‖² ≤ frac·‖∇f(θ₀)‖² and how many seeds reached it within K.
Layer rules (lisa, badam) are n/a where one layer does not fit the budget.  The baselines adam and sgd ignore δ.

The rate section (h = the middle of the sweep, δ = the middle of the sweep) runs a K-sweep for every rule at its
tuned α₀ and the negative controls of :mod:`misa_theory.convergence` (module at π = 0, constant step), and
reports :func:`~misa_theory.convergence.rate_check` with the proof's bound where it is computable (block SGD).

Writes ``study.json``, ``study.md``, ``heterogeneity.png`` and ``rate.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from scipy import stats

from misa_theory.problems import RobustFeatures
from misa_theory.sampler import ModuleSampler
from misa_theory.sim_config import BASELINES, SimConfig, alpha_for
from misa_theory.sim_stats import block_updates_to_target
from misa_theory.simulate import SimResult, simulate

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sim_study_rate  # noqa: E402  (the rate section, next to this file)
import sim_study_report  # noqa: E402

RULES = ("misa", "misa_alg1", "misa_norm", "optimal", "uniform", "lisa", "badam", "adam", "sgd")
TUNE_SEED = 1000
METRICS = ("avg_grad_sq", "min_grad_sq", "f_final")


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of numbers, got {text!r}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line; a bad value exits with code 2 and a one-line message naming the option."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for study.json, study.md and the PNGs")
    p.add_argument("--quick", action="store_true", help="a small, fast version (tests)")
    p.add_argument("--K", type=int, default=400, help="block updates per run")
    p.add_argument("--T", type=int, default=2, help="inner steps per block update")
    p.add_argument("--sigma", type=float, default=0.3, help="gradient noise σ (E‖ξ‖² = σ²)")
    p.add_argument("--seeds", type=int, default=10, help="evaluation seeds (≥ 2 for intervals)")
    p.add_argument("--tune-seeds", type=int, default=3, dest="tune_seeds")
    p.add_argument("--heterogeneity", type=_floats, default=[0.0, 1.0, 2.0])
    p.add_argument("--delta", type=_floats, default=[0.03, 0.1, 0.3])
    p.add_argument("--grid", type=_floats, default=[0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0],
                   help="α₀ grid of the Adam-type rules")
    p.add_argument("--sgd-grid", type=_floats, default=[0.3, 1.0, 3.0, 10.0, 30.0, 100.0], dest="sgd_grid",
                   help="α₀ grid of SGD (the sgd baseline and block SGD)")
    p.add_argument("--tune-metric", choices=METRICS, default="f_final", dest="tune_metric",
                   help="what α₀ minimises; f_final by default, since on this problem a large step can shrink "
                        "‖∇f‖² by saturating the robust loss without lowering f")
    p.add_argument("--target-frac", type=float, default=0.1, dest="target_frac")
    p.add_argument("--rate-Ks", type=_floats, default=[100, 300, 1000, 3000], dest="rate_Ks",
                   help="horizons of the rate check (past the first periods' transient)")
    p.add_argument("--jobs", type=int, default=1, help="worker processes (results do not depend on it)")
    a = p.parse_args(argv)
    if a.quick:
        a.K, a.seeds, a.tune_seeds, a.heterogeneity, a.delta = 40, 3, 2, [0.0, 2.0], [0.1, 0.3]
        a.grid, a.sgd_grid, a.rate_Ks = [0.1, 0.3, 1.0], [0.1, 0.3, 1.0, 3.0], [10, 30, 100]
    _check(p, a)
    return a


def _check(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    for name in ("K", "T", "seeds", "tune_seeds", "jobs"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(a, name)}")
    if a.seeds < 2:
        p.error(f"--seeds must be ≥ 2 for an interval, got {a.seeds}")
    if not all(0 < d <= 1 for d in a.delta):
        p.error(f"--delta values must lie in (0, 1], got {a.delta}")
    if not all(h >= 0 for h in a.heterogeneity) or a.sigma < 0:
        p.error("--heterogeneity and --sigma must be ≥ 0")
    if not all(g > 0 for g in a.grid + a.sgd_grid) or not 0 < a.target_frac < 1:
        p.error("--grid/--sgd-grid values must be > 0 and --target-frac in (0, 1)")
    if len(a.rate_Ks) < 2 or any(k < 1 or k != int(k) for k in a.rate_Ks):
        p.error(f"--rate-Ks needs ≥ 2 whole horizons ≥ 1, got {a.rate_Ks}")
    a.rate_Ks = [int(k) for k in a.rate_Ks]


def make_problem(h: float, quick: bool) -> RobustFeatures:
    """The study's problem at planted heterogeneity h."""
    return RobustFeatures(n_layers=4 if quick else 12, heterogeneity=h)


def config(rule: str, alpha0: float, K: int, delta: float, a: argparse.Namespace, **extra) -> SimConfig:
    """α = α₀/√K for the rule (the sgd baseline's step is the same α)."""
    alpha = alpha_for(K, alpha0)
    return SimConfig(alpha=alpha, sgd_alpha=alpha, T=a.T, delta=delta, sigma=a.sigma, **extra)


def infeasible(problem: RobustFeatures, rule: str, delta: float) -> str | None:
    """Why ``rule`` cannot run at budget δ (a layer larger than the budget), or None."""
    if rule in BASELINES or rule == "misa_alg1":
        return None
    try:
        ModuleSampler(problem.sizes, problem.groups, delta=delta, rule=rule)
    except ValueError as e:
        return str(e).split(";")[0]
    return None


def metric(res: SimResult, name: str) -> np.ndarray:
    """Per-seed values of a reported quantity."""
    return {"avg_grad_sq": res.avg_grad_sq, "min_grad_sq": res.min_grad_sq, "f_final": lambda: res.f_final}[name]()


def interval(x: np.ndarray) -> dict[str, float]:
    """Mean and 95% Student-t interval over seeds."""
    x = np.asarray(x, dtype=float)
    half = float(stats.t.ppf(0.975, x.size - 1) * x.std(ddof=1) / np.sqrt(x.size))
    return {"mean": float(x.mean()), "lo": float(x.mean() - half), "hi": float(x.mean() + half)}


def tune(problem: RobustFeatures, rule: str, delta: float, a: argparse.Namespace, K: int | None = None,
         metric_name: str | None = None, **extra) -> tuple[float, dict[str, float]]:
    """(chosen α₀, {α₀: mean tuning metric}) on the tuning seeds (K and the metric default to the study's); a
    diverging α₀ scores +∞."""
    K, metric_name = K or a.K, metric_name or a.tune_metric
    grid = a.sgd_grid if rule == "sgd" or extra.get("optimizer") == "sgd" else a.grid
    scores = {}
    for alpha0 in grid:
        res = simulate(problem, rule, K, a.tune_seeds, config(rule, alpha0, K, delta, a, **extra), seed=TUNE_SEED)
        value = float(metric(res, metric_name).mean())
        scores[alpha0] = value if np.isfinite(value) else float("inf")
    return min(scores, key=scores.get), scores


def run_cell(cell: tuple[float, float, str, argparse.Namespace]) -> dict:
    """Tune α₀, then evaluate: one row of the study's table."""
    h, delta, rule, a = cell
    problem = make_problem(h, a.quick)
    row: dict = {"heterogeneity": h, "delta": None if rule in BASELINES else delta, "rule": rule}
    reason = infeasible(problem, rule, delta)
    if reason is not None:
        return {**row, "n/a": reason}
    alpha0, scores = tune(problem, rule, delta, a)
    res = simulate(problem, rule, a.K, a.seeds, config(rule, alpha0, a.K, delta, a), seed=0)
    target = a.target_frac * float(res.grad_sq[0, 0])
    hits = block_updates_to_target(res.grad_sq, target)
    reached = hits <= a.K
    row.update(alpha0=alpha0, grid={str(k): v for k, v in scores.items()},
               **{m: interval(metric(res, m)) for m in METRICS},
               to_target={"target": target, "reached": int(reached.sum()), "seeds": int(hits.size),
                          "median": float(np.median(hits)) if reached.sum() * 2 > hits.size else None})
    return row


def cells(a: argparse.Namespace) -> list[tuple[float, float, str, argparse.Namespace]]:
    """Every (h, δ, rule) to run; the baselines once per h (they ignore δ)."""
    out = []
    for h in a.heterogeneity:
        out += [(h, a.delta[0], r, a) for r in BASELINES]
        out += [(h, d, r, a) for d in a.delta for r in RULES if r not in BASELINES]
    return out


def pool_map(fn, items: list, jobs: int, desc: str) -> list:
    """[fn(x) for x in items], in a pool of ``jobs`` processes when > 1, with a progress bar; order kept."""
    from tqdm import tqdm

    out = []
    with tqdm(total=len(items), desc=desc, file=sys.stderr, dynamic_ncols=True) as bar:
        if jobs == 1:
            for x in items:
                out.append(fn(x))
                bar.update(1)
            return out
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            for y in pool.map(fn, items):
                out.append(y)
                bar.update(1)
    return out


def environment() -> dict:
    """Machine and versions, recorded with the numbers."""
    import scipy

    return {"python": platform.python_version(), "numpy": np.__version__, "scipy": scipy.__version__,
            "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}", "cpus": _cpus(),
            "date": time.strftime("%Y-%m-%d")}


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def main(argv: list[str] | None = None) -> int:
    """Run the study and write its outputs."""
    a = parse_args(argv)
    try:
        a.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"--out: cannot create {a.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    rows = pool_map(run_cell, cells(a), a.jobs, "cells")
    rate = sim_study_rate.rate_section(a, list(RULES), make_problem, tune,
                                       lambda fn, items: pool_map(fn, items, a.jobs, "rate"))
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
    problem = make_problem(a.heterogeneity[0], a.quick)
    command = " ".join(["python", "benchmarks/sim_study.py", *(argv if argv is not None else sys.argv[1:])])
    report = {"command": command, "settings": settings,
              "problem": {"family": "robust", "n_params": problem.n_params, "n_modules": problem.n_modules,
                          "n_layers": int(problem.groups.max()) + 1},
              "environment": environment(), "rows": rows, "rate": rate,
              "wall_s": round(time.perf_counter() - t0, 1)}
    (a.out / "study.json").write_text(json.dumps(report, indent=1))
    (a.out / "study.md").write_text(sim_study_report.markdown(report))
    sim_study_report.figures(report, a.out)
    print(f"wrote {a.out / 'study.json'}, study.md and 2 figures in {report['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

