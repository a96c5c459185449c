"""The rate section of benchmarks/sim_study.py: K-sweeps of every rule, and the negative controls.

Every rule's α₀ is tuned again for this section, by (1/K)Σ‖∇f‖² at the longest horizon (the quantity the check
fits), on the tuning seeds.  Each row fits the slope of (1/K)Σ‖∇f(θ_k)‖² against K and asks
:func:`misa_theory.convergence.rate_check` for a verdict.  Block SGD rows carry the bound of proofs/05 (ρ = 1,
R² = G₂² + σ², the problem's L, π_min of the uniform rule's π, or 0 for the control that never draws one module);
Adam-type rows are checked on the slope only (ρ is an assumption for Adam).  Controls: the module with the
largest ‖∇_b f(θ₀)‖² excluded (π = 0), a constant step α = α₀ (the decay forgotten) and a constant step
α = α₀/√K_max (equal to the decayed step at the longest horizon only).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np

from misa_theory.convergence import proof_bound, proof_constants, rate_check
from misa_theory.sampler import ModuleSampler
from misa_theory.sim_config import SimConfig, alpha_for
from misa_theory.sim_stats import rate_fit
from misa_theory.simulate import simulate

#: α per horizon K for each schedule, given α₀ and the longest horizon.
SCHEDULES: dict[str, Callable[[int, float, int], float]] = {
    "α₀/√K": lambda K, a0, kmax: alpha_for(K, a0),
    "α₀": lambda K, a0, kmax: a0,
    "α₀/√K_max": lambda K, a0, kmax: alpha_for(kmax, a0),
}


def sweep_row(job: tuple) -> dict:
    """One row: (1/K)Σ‖∇f‖² per seed at every horizon, the slope fit, the bound (block SGD) and the verdict."""
    name, kind, rule, alpha0, schedule, extra, pi_min, a, problem = job
    Ks, ys = a.rate_Ks, []
    for K in Ks:
        alpha = SCHEDULES[schedule](K, alpha0, max(Ks))
        cfg = SimConfig(alpha=alpha, sgd_alpha=alpha, T=a.T, delta=a.rate_delta, sigma=a.sigma, **extra)
        ys.append(simulate(problem, rule, K, a.seeds, cfg, seed=0).avg_grad_sq())
    bounds = None
    if pi_min is not None:  # the O(1/√K) claim's bound: the α₀/√K schedule's, whatever schedule the row ran
        consts = proof_constants(problem, SimConfig(T=a.T, sigma=a.sigma, optimizer="sgd"), pi_min)
        bounds = [proof_bound(consts, alpha_for(K, alpha0), K) for K in Ks]
    fit = rate_fit(Ks, ys)
    return {"name": name, "kind": kind, "rule": rule, "alpha0": alpha0, "schedule": schedule, "Ks": Ks,
            "y": list(fit.y), "slope": fit.slope, "lo": fit.lo, "hi": fit.hi,
            "bound": None if bounds is None else [float(b) for b in bounds], "verdict": rate_check(fit, bounds)}


def _rows(problem, a: argparse.Namespace, rules: list[str], alpha0: dict) -> list[tuple]:
    """Every row's job: the rules at α₀/√K, then block SGD and Adam uniform with their controls."""
    worst = int(np.argmax(problem.module_sq_norms(problem.grad(problem.x0(1)))[0]))
    pi = float(ModuleSampler(problem.sizes, problem.groups, delta=a.rate_delta, rule="uniform")
               .target_inclusion().min())
    jobs = [(r, "rule", r, alpha0[r], "α₀/√K", {}, 1.0 if r == "sgd" else None, a, problem) for r in rules]
    for opt, a0, pi_min in (("sgd", alpha0["block_sgd"], pi), ("adam", alpha0["uniform"], None)):
        label = "block SGD" if opt == "sgd" else "Adam"
        jobs += [(f"uniform ({label})", "positive", "uniform", a0, "α₀/√K", {"optimizer": opt}, pi_min, a, problem),
                 (f"uniform ({label}), module {worst} at π = 0", "control", "uniform", a0, "α₀/√K",
                  {"optimizer": opt, "excluded": (worst,)}, None if pi_min is None else 0.0, a, problem)]
        jobs += [(f"uniform ({label}), constant α = {s}", "control", "uniform", a0, s, {"optimizer": opt}, pi_min, a,
                  problem) for s in ("α₀", "α₀/√K_max")]
    return jobs


def tune_job(job: tuple) -> float:
    """α₀ of one rule for the rate section: the smallest mean (1/K_max)Σ‖∇f‖² on the tuning seeds."""
    rule, extra, a, problem, tune = job
    return tune(problem, rule, a.rate_delta, a, K=max(a.rate_Ks), metric_name="avg_grad_sq", **extra)[0]


def rate_section(a: argparse.Namespace, rules: list[str], make_problem, tune, pool_map) -> dict:
    """The rate table at the middle heterogeneity and the middle δ of the sweeps (``make_problem(h, quick)``,
    ``tune`` and ``pool_map(fn, items)`` are sim_study's)."""
    h = a.heterogeneity[len(a.heterogeneity) // 2]
    a.rate_delta = a.delta[len(a.delta) // 2]
    problem = make_problem(h, a.quick)
    names = rules + ["block_sgd"]
    tuned = pool_map(tune_job, [(r if r != "block_sgd" else "uniform", {"optimizer": "sgd"} if r == "block_sgd"
                                 else {}, a, problem, tune) for r in names])
    rows = pool_map(sweep_row, _rows(problem, a, rules, dict(zip(names, tuned, strict=True))))
    return {"heterogeneity": h, "delta": a.rate_delta, "Ks": a.rate_Ks, "rows": rows,
            "constants": {"L": problem.smoothness(), "G2": problem.gradient_bound(),
                          "delta0": float(problem.f(problem.x0(1))[0])}}
