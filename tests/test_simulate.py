"""Simulator: Adam arithmetic against a plain reference, sampler use, determinism, rate fit."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from misa_theory.convergence import proof_bound, proof_constants, rate_check
from misa_theory.problems import RobustFeatures, make_problem
from misa_theory.sampler import ModuleSampler
from misa_theory.sim_config import ALL_RULES, SimConfig, alpha_for
from misa_theory.sim_stats import block_updates_to_target, rate_fit
from misa_theory.simulate import simulate, summarize


def _adam_reference(problem, steps: int, T: int, alpha: float, reset: bool, b1=0.9, b2=0.999, eps=1e-8):
    """Plain full-parameter Adam on one seed, state zeroed every T steps when ``reset``."""
    theta = problem.x0(1)[0].copy()
    out = []
    for i in range(steps):
        if i % T == 0:
            out.append(float(problem.grad_sq(theta[None])[0]))
            if reset or i == 0:
                m, v, c = np.zeros_like(theta), np.zeros_like(theta), 0
        g = problem.grad(theta[None])[0]
        c += 1
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        theta = theta - alpha * (m / (1 - b1**c)) / (np.sqrt(v / (1 - b2**c)) + eps)
    out.append(float(problem.grad_sq(theta[None])[0]))
    return np.array(out)


def test_full_adam_matches_reference():
    p = make_problem("sensing")
    res = simulate(p, "adam", 6, 2, SimConfig(alpha=0.01, T=3))
    ref = _adam_reference(p, 18, 3, 0.01, reset=False)
    np.testing.assert_allclose(res.grad_sq[:, 0], ref, rtol=1e-10)
    np.testing.assert_allclose(res.grad_sq[:, 1], ref, rtol=1e-10)


def test_full_budget_block_adam_keeps_moments_as_the_trainer_does():
    """δ = 1: every module stays active, so ActiveAdamW never resets a moment: block Adam is full Adam."""
    p = make_problem("sensing")
    ref = _adam_reference(p, 20, 4, 0.01, reset=False)
    for retain in (False, True):
        res = simulate(p, "uniform", 5, 1, SimConfig(alpha=0.01, T=4, delta=1.0, retain_state=retain))
        np.testing.assert_allclose(res.grad_sq[:, 0], ref, rtol=1e-10)


def _block_adam_reference(problem, draws, T, alpha, retain, b1=0.9, b2=0.999, eps=1e-8, alg1=False, amsgrad=False):
    """One seed of block Adam on the given active sets, moments per module as misa_train's ActiveAdamW keeps them:
    a module that stays keeps (m, v, c); one that leaves loses them unless ``retain``.  ``amsgrad``: v̂ from the
    running maximum v̄ of v, part of the module's state.  ``alg1``: the paper's Algorithm 1 instead: zero state
    every period, v̂ from max(v̄, v), and the momentum flush at the period's end."""
    theta = problem.x0(1)[0].copy()
    state: dict[int, tuple] = {}
    prev: set[int] = set()
    for active in draws:
        active = set(active.tolist())
        if alg1:
            state = {}
        elif not retain:
            state = {b: st for b, st in state.items() if b in prev}
        for _ in range(T):
            g = problem.grad(theta[None])[0]
            for b in sorted(active):
                sl = slice(problem.offsets[b], problem.offsets[b + 1])
                zero = np.zeros(sl.stop - sl.start)
                m, v, vbar, c = state.get(b, (zero, zero, zero, 0))
                c += 1
                m = b1 * m + (1 - b1) * g[sl]
                v = b2 * v + (1 - b2) * g[sl] ** 2
                vbar = np.maximum(vbar, v) if alg1 or amsgrad else v
                theta[sl] -= alpha * (m / (1 - b1**c)) / (np.sqrt(vbar / (1 - b2**c)) + eps)
                state[b] = (m, v, vbar, c)
        for b in sorted(active) if alg1 else ():
            m, _, vbar, c = state[b]
            sl = slice(problem.offsets[b], problem.offsets[b + 1])
            theta[sl] -= alpha * b1 / (1 - b1) * (m / (1 - b1**c)) / (np.sqrt(vbar / (1 - b2**c)) + eps)
        prev = active
    return float(problem.grad_sq(theta[None])[0])


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("retain", [False, True])
@pytest.mark.parametrize("rule", ["misa", "misa_norm"])
def test_block_adam_matches_the_reference_in_every_seed(monkeypatch, rule, retain, amsgrad):
    """Each seed of a multi-seed run is block Adam on its own active sets, with (m, v, c) (and v̄) kept, dropped or
    parked per module exactly as the reference keeps them (the simulator stores c per (seed, module) pair, and
    without retain_state carries the last period's state in its run order)."""
    masks = []
    draw = ModuleSampler.draw_mask

    def recording(self):
        mask = draw(self)
        masks.append(mask.copy())
        return mask

    monkeypatch.setattr(ModuleSampler, "draw_mask", recording)
    p = make_problem("robust", n_layers=3)
    res = simulate(p, rule, 12, 3, SimConfig(alpha=0.02, T=2, delta=0.3, retain_state=retain, amsgrad=amsgrad))
    kept = sum(bool((a & b).any()) for a, b in zip(masks, masks[1:], strict=False))
    assert kept > 0  # some module stays active between periods, so the kept-moments path runs
    for s in range(3):
        want = _block_adam_reference(p, [np.flatnonzero(mk[s]) for mk in masks], 2, 0.02, retain=retain,
                                     amsgrad=amsgrad)
        np.testing.assert_allclose(res.grad_sq[-1, s], want, rtol=1e-9)


@pytest.mark.parametrize("beta2", [0.999, 0.5])
def test_misa_alg1_is_the_papers_algorithm_1(beta2):
    """misa_alg1 = the misa draw, then fresh AMSGrad-type Adam state every period and the momentum flush."""
    p = make_problem("robust", n_layers=2)
    cfg = SimConfig(alpha=0.02, T=3, delta=0.3, beta2=beta2, retain_state=True)  # the variant overrides retain
    res = simulate(p, "misa_alg1", 10, 1, cfg, record_draws=True)
    want = _block_adam_reference(p, res.draws, 3, 0.02, retain=False, b2=beta2, alg1=True)
    np.testing.assert_allclose(res.grad_sq[-1, 0], want, rtol=1e-9)
    plain = simulate(p, "misa", 10, 1, cfg, record_draws=True)
    assert [d.tolist() for d in plain.draws] == [d.tolist() for d in res.draws]  # same draws, other optimizer
    assert plain.grad_sq[-1, 0] != res.grad_sq[-1, 0]
    if beta2 == 0.5:  # v shrinks inside a period here, so the maximum binds
        no_max = replace(cfg, retain_state=False, reset_state=True, momentum_flush=True)
        assert simulate(p, "misa", 10, 1, no_max).grad_sq[-1, 0] != res.grad_sq[-1, 0]


def test_deterministic_and_seed_dependent():
    p = make_problem("robust")
    cfg = SimConfig(alpha=0.02, T=2, sigma=0.1)
    a = simulate(p, "misa", 10, 2, cfg, seed=5)
    b = simulate(p, "misa", 10, 2, cfg, seed=5)
    c = simulate(p, "misa", 10, 2, cfg, seed=6)
    np.testing.assert_array_equal(a.grad_sq, b.grad_sq)
    assert not np.array_equal(a.grad_sq, c.grad_sq)
    assert not np.array_equal(a.grad_sq[:, 0], a.grad_sq[:, 1])  # seeds differ


@pytest.mark.parametrize("rule", ALL_RULES)
def test_every_rule_decreases_the_gradient(rule):
    p = make_problem("sensing")
    cfg = SimConfig(alpha=0.02, T=3, delta=0.4, sigma=0.01, sgd_alpha=0.05, retain_state=rule == "misa")
    res = simulate(p, rule, 40, 3, cfg)
    assert res.grad_sq.shape == (41, 3) and np.all(np.isfinite(res.grad_sq))
    assert res.grad_sq[-1].mean() < res.grad_sq[0].mean()
    s = summarize(res)
    assert s["min_grad_sq"] <= s["avg_grad_sq"] and s["avg_grad_sq_stderr"] >= 0


def test_momentum_flush_moves_the_iterate_further():
    p = make_problem("sensing")
    plain = simulate(p, "uniform", 3, 1, SimConfig(alpha=0.001, T=2, delta=0.4))
    flushed = simulate(p, "uniform", 3, 1, SimConfig(alpha=0.001, T=2, delta=0.4, momentum_flush=True))
    np.testing.assert_array_equal(plain.grad_sq[:1], flushed.grad_sq[:1])
    assert not np.allclose(plain.grad_sq[1:], flushed.grad_sq[1:]) and np.all(np.isfinite(flushed.grad_sq))


def test_bad_arguments():
    p = make_problem("sensing")
    with pytest.raises(ValueError, match="rule"):
        simulate(p, "nope", 2, 1, SimConfig())
    with pytest.raises(ValueError, match="K"):
        simulate(p, "misa", 0, 1, SimConfig())
    with pytest.raises(ValueError, match="delta"):
        simulate(p, "misa", 2, 1, SimConfig(delta=1.5))
    with pytest.raises(ValueError, match="n_seeds"):
        simulate(p, "misa", 2, 0, SimConfig())


@pytest.mark.parametrize(("field", "value"), [
    ("sigma", float("nan")), ("sigma", -1.0), ("alpha", 0.0), ("alpha", float("inf")), ("sgd_alpha", -0.1),
    ("T", 0), ("eta", -1.0), ("ema_beta", 1.0), ("beta1", -0.1), ("min_inclusion", 1.5), ("eps", 0.0),
    ("optimizer", "lion"), ("excluded", (-1,)),
])
def test_config_validate_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SimConfig(**{field: value}).validate()


def test_rate_fit_recovers_a_known_slope():
    rng = np.random.default_rng(0)
    Ks = [10, 100, 1000, 10000]
    seed_effect = np.exp(0.3 * rng.standard_normal(20))  # a per-seed constant leaves the slope exact
    fit = rate_fit(Ks, [3.0 * k**-0.5 * seed_effect for k in Ks])
    assert abs(fit.slope + 0.5) < 1e-9 and fit.covered
    np.testing.assert_allclose(fit.C_half, 3.0 * seed_effect.mean())
    noisy = rate_fit(Ks, [3.0 * k**-0.7 * np.exp(0.2 * rng.standard_normal(20)) for k in Ks])
    assert noisy.lo <= noisy.slope <= noisy.hi and abs(noisy.slope + 0.7) < 0.05 and noisy.covered
    steep = rate_fit(Ks, [k**-0.2 * np.ones(5) for k in Ks])
    assert not steep.covered


def test_block_updates_to_target():
    g = np.array([[5.0, 5.0], [2.0, 4.0], [0.5, 3.0]])
    np.testing.assert_array_equal(block_updates_to_target(g, 1.0), [2, 3])


# --- the rate check of misa_theory.convergence: positive runs pass, negative controls fail -------------------
RATE_KS = [10, 100, 1000]


def _rate_run(rule="uniform", alpha0=1.0, schedule="decay", optimizer="adam", excluded=(), pi_min=None):
    """rate_check of a K-sweep on a small robust problem (5 seeds, T = 2, δ = 0.25, σ = 0.3); ``pi_min`` set
    adds the proof's bound of the α₀/√K schedule (block SGD)."""
    p = RobustFeatures(n_layers=2)
    ys, bounds = [], []
    for K in RATE_KS:
        alpha = alpha_for(K, alpha0) if schedule == "decay" else alpha0
        cfg = SimConfig(alpha=alpha, sgd_alpha=alpha, T=2, delta=0.25, sigma=0.3, optimizer=optimizer,
                        excluded=excluded)
        ys.append(simulate(p, rule, K, 5, cfg).avg_grad_sq())
        if pi_min is not None:
            bounds.append(proof_bound(proof_constants(p, replace(cfg, optimizer="sgd"), pi_min),
                                      alpha_for(K, alpha0), K))
    return rate_check(rate_fit(RATE_KS, ys), bounds if pi_min is not None else None)


def _uniform_pi_min(p, delta=0.25):
    return float(ModuleSampler(p.sizes, p.groups, delta=delta, rule="uniform").target_inclusion().min())


@pytest.mark.slow
def test_rate_check_passes_the_theorems_runs():
    """α = α₀/√K, every module reachable: block SGD (slope and the proof's bound) and block/full Adam pass."""
    pi = _uniform_pi_min(RobustFeatures(n_layers=2))
    assert _rate_run(alpha0=10.0, optimizer="sgd", pi_min=pi) == "pass"
    assert _rate_run(alpha0=1.0) == "pass"
    assert _rate_run(rule="adam", alpha0=1.0) == "pass"


@pytest.mark.slow
@pytest.mark.parametrize(("optimizer", "alpha0"), [("sgd", 10.0), ("adam", 1.0)])
def test_rate_check_fails_a_module_never_drawn(optimizer, alpha0):
    """(a) the module with the largest gradient at π = 0: a gradient floor, the slope flattens (and for block SGD
    the proof's bound is +∞: the theorem promises nothing)."""
    p = RobustFeatures(n_layers=2)
    worst = int(np.argmax(p.module_sq_norms(p.grad(p.x0(1)))[0]))
    pi = 0.0 if optimizer == "sgd" else None
    assert _rate_run(alpha0=alpha0, optimizer=optimizer, excluded=(worst,), pi_min=pi) == "fail"


@pytest.mark.slow
@pytest.mark.parametrize(("optimizer", "alpha0"), [("sgd", 10.0), ("adam", 1.0)])
def test_rate_check_fails_a_constant_step(optimizer, alpha0):
    """(b) α = α₀ at every horizon (the 1/√K decay forgotten): the noise keeps (1/K)Σ‖∇f‖² from falling."""
    pi = _uniform_pi_min(RobustFeatures(n_layers=2)) if optimizer == "sgd" else None
    assert _rate_run(alpha0=alpha0, schedule="constant", optimizer=optimizer, pi_min=pi) == "fail"


def _fit(y, Ks=(10, 100, 1000)):
    return rate_fit(list(Ks), [np.full(4, v) * np.exp(0.01 * np.arange(4)) for v in y])


def test_rate_check_verdicts():
    """Slope interval reaching −1/2 and mean under a finite bound at every horizon → pass; anything else fails."""
    y = [1.0, 10**-0.5, 0.1]  # slope −1/2
    assert rate_check(_fit(y)) == "pass"
    assert rate_check(_fit(y), [2.0, 1.0, 0.5]) == "pass"
    assert rate_check(_fit(y), [2.0, 1.0, 0.05]) == "fail"  # over the proof's bound at K = 1000
    assert rate_check(_fit(y), [np.inf] * 3) == "fail"  # π_min = 0: no guarantee
    assert rate_check(_fit([1.0, 0.8, 0.7])) == "fail"  # a floor
    with pytest.raises(ValueError, match="bounds"):
        rate_check(_fit(y), [1.0, 1.0])


def test_proof_constants_are_bounds_of_the_problem():
    """L and sup‖∇f‖ of RobustFeatures bound what random points and Hessian power iterations show."""
    p = RobustFeatures(n_layers=2)
    rng = np.random.default_rng(0)
    theta = 3.0 * rng.standard_normal((100, p.n_params))
    assert np.sqrt(p.grad_sq(theta)).max() <= p.gradient_bound()
    for x in theta[:3]:
        v = rng.standard_normal(p.n_params)
        for _ in range(30):  # power iteration on finite-difference Hessian-vector products
            hv = (p.grad((x + 1e-5 * v)[None]) - p.grad((x - 1e-5 * v)[None]))[0] / 2e-5
            lam, v = np.linalg.norm(hv) / np.linalg.norm(v), hv / np.linalg.norm(hv)
        assert lam <= p.smoothness()
    c = proof_constants(p, SimConfig(T=2, sigma=0.3, optimizer="sgd"), 0.25)
    assert c.R2 == pytest.approx(p.gradient_bound() ** 2 + 0.09) and c.rho == 1.0
    assert proof_bound(replace(c, pi_min=0.0), 0.1, 10) == np.inf
    with pytest.raises(ValueError, match="optimizer"):
        proof_constants(p, SimConfig(), 0.25)


@pytest.mark.parametrize("per_module", [True, False])
def test_noise_scale_is_sigma_noise_std_on_the_active_coordinates(per_module):
    """The per-module scale (repeated over runs) and the per-coordinate table (gathered) give σ·noise_std of
    each active coordinate; the first where noise_std is constant on every module, the second otherwise."""
    from misa_theory.oracle import Active
    from misa_theory.simulate import _init_state, _noise_scale

    prob = RobustFeatures(n_layers=3, d=8, kv=4, ff=28)
    if not per_module:
        prob.noise_std = prob.noise_std * (1.0 + 0.25 * (np.arange(prob.n_params) % 3))
    cfg = SimConfig(sigma=0.3, delta=0.3)
    S = 3
    sampler = ModuleSampler(prob.sizes, prob.groups, delta=cfg.delta, seed=0, streams=S)
    state = _init_state(prob, "misa", S, cfg, 0, sampler)
    assert state.noise_per_module is per_module
    active = Active.from_mask(sampler.draw_mask(), prob.sizes, prob.offsets[:-1], prob.n_params)
    got = _noise_scale(state, active, active.seed * prob.n_modules + active.module)
    np.testing.assert_array_equal(got, np.tile(cfg.sigma * prob.noise_std, S)[active.idx])
