"""The rate section of benchmarks/sim_study.py: K-sweeps of every rule at its tuned α₀, and negative controls.

Each row fits the slope of (1/K)Σ‖∇f(θ_k)‖² against K and asks :func:`misa_theory.convergence.rate_check`
for a verdict.  Block SGD rows carry the bound of proofs/05 (ρ = 1, R² = G₂² + σ², the problem's L, π_min of the
uniform rule's π, or 0 for the control that never draws one module); Adam-type rows are checked on the slope
only (ρ is an assumption for Adam).  Controls: the module with the largest ‖∇_b f(θ₀)‖² excluded (π = 0), a
constant step α = α₀ (the decay forgotten) and a constant step α = α₀/√K_max (equal to the decayed step at the
longest horizon only).
"""

from __future__ import annotations

import argparse

import numpy as np

from misa_theory.convergence import proof_bound, proof_constants, rate_check
from misa_theory.sampler import ModuleSampler
from misa_theory.simulate import SimConfig, alpha_for, rate_fit, simulate


def _sweep(problem, rule: str, a: argparse.Namespace, delta: float, step, **extra) -> tuple[list[float], list]:
    """(1/K)Σ‖∇f‖² per seed at every horizon of ``a.rate_Ks``; ``step(K)`` is the run's α."""
    ys = []
    for K in a.rate_Ks:
        cfg = SimConfig(alpha=step(K), sgd_alpha=step(K), T=a.T, delta=delta, sigma=a.sigma, **extra)
        ys.append(simulate(problem, rule, K, a.seeds, cfg, seed=0).avg_grad_sq())
    return ys


def _row(name: str, kind: str, rule: str, alpha0: float, schedule: str, Ks: list[int], ys: list,
         bounds: list[float] | None) -> dict:
    fit = rate_fit(Ks, ys)
    return {"name": name, "kind": kind, "rule": rule, "alpha0": alpha0, "schedule": schedule, "Ks": Ks,
            "y": list(fit.y), "slope": fit.slope, "lo": fit.lo, "hi": fit.hi,
            "bound": None if bounds is None else [float(b) for b in bounds], "verdict": rate_check(fit, bounds)}


def _rule_rows(problem, a: argparse.Namespace, rows: list[dict], h: float, delta: float) -> list[dict]:
    """Every feasible rule of the main table at its tuned α₀ and α = α₀/√K; the sgd baseline with its bound."""
    out = []
    for r in rows:
        if r["heterogeneity"] != h or r["delta"] not in (delta, None) or "n/a" in r:
            continue
        rule, alpha0 = r["rule"], r["alpha0"]
        ys = _sweep(problem, rule, a, delta, lambda K, a0=alpha0: alpha_for(K, a0))
        bounds = None
        if rule == "sgd":
            consts = proof_constants(problem, SimConfig(T=a.T, sigma=a.sigma, optimizer="sgd"), 1.0)
            bounds = [proof_bound(consts, alpha_for(K, alpha0), K) for K in a.rate_Ks]
        out.append(_row(rule, "rule", rule, alpha0, "α₀/√K", a.rate_Ks, ys, bounds))
    return out


def _control_rows(problem, a: argparse.Namespace, rows: list[dict], h: float, delta: float, tune) -> list[dict]:
    """Block SGD uniform (positive, with the bound) and the negative controls, for block SGD and for Adam."""
    Ks, kmax = a.rate_Ks, max(a.rate_Ks)
    worst = int(np.argmax(problem.module_sq_norms(problem.grad(problem.x0(1)))[0]))
    pi_min = float(ModuleSampler(problem.sizes, problem.groups, delta=delta, rule="uniform").target_inclusion().min())
    adam0 = next(r["alpha0"] for r in rows if r["heterogeneity"] == h and r["delta"] == delta
                 and r["rule"] == "uniform")
    sgd0, _ = tune(problem, "uniform", delta, a, optimizer="sgd")
    consts = proof_constants(problem, SimConfig(T=a.T, sigma=a.sigma, optimizer="sgd"), pi_min)
    claim = [proof_bound(consts, alpha_for(K, sgd0), K) for K in Ks]  # C/√K-type bound of the α₀/√K schedule
    none = [float("inf")] * len(Ks)
    out = []
    for opt, a0, bounds_ok, bounds_pi0 in (("sgd", sgd0, claim, none), ("adam", adam0, None, None)):
        label = "block SGD" if opt == "sgd" else "Adam"
        specs = (("positive", f"uniform ({label})", (), lambda K, x=a0: alpha_for(K, x), "α₀/√K", bounds_ok),
                 ("control", f"uniform ({label}), module {worst} at π = 0", (worst,),
                  lambda K, x=a0: alpha_for(K, x), "α₀/√K", bounds_pi0),
                 ("control", f"uniform ({label}), constant α = α₀", (), lambda K, x=a0: x, "α₀", bounds_ok),
                 ("control", f"uniform ({label}), constant α = α₀/√K_max", (),
                  lambda K, x=a0: alpha_for(kmax, x), "α₀/√K_max", bounds_ok))
        for kind, name, excluded, step, schedule, bounds in specs:
            ys = _sweep(problem, "uniform", a, delta, step, optimizer=opt, excluded=excluded)
            out.append(_row(name, kind, "uniform", a0, schedule, Ks, ys, bounds))
    return out


def rate_section(a: argparse.Namespace, rows: list[dict], make_problem, tune) -> dict:
    """The rate table at the middle heterogeneity and the middle δ of the sweeps (``make_problem(h, quick)`` and
    ``tune`` are sim_study's)."""
    h, delta = a.heterogeneity[len(a.heterogeneity) // 2], a.delta[len(a.delta) // 2]
    problem = make_problem(h, a.quick)
    out = _rule_rows(problem, a, rows, h, delta) + _control_rows(problem, a, rows, h, delta, tune)
    return {"heterogeneity": h, "delta": delta, "Ks": a.rate_Ks, "rows": out,
            "constants": {"L": problem.smoothness(), "G2": problem.gradient_bound(),
                          "delta0": float(problem.f(problem.x0(1))[0])}}
