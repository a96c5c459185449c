"""Simulator: Adam arithmetic against a plain reference, sampler use, determinism, rate fit."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from misa_theory.problems import make_problem
from misa_theory.simulate import ALL_RULES, SimConfig, block_updates_to_target, rate_fit, simulate, summarize


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


def _block_adam_reference(problem, draws, T, alpha, retain, b1=0.9, b2=0.999, eps=1e-8, alg1=False):
    """One seed of block Adam on the given active sets, moments per module as misa_train's ActiveAdamW keeps them:
    a module that stays keeps (m, v, c); one that leaves loses them unless ``retain``.  ``alg1``: the paper's
    Algorithm 1 instead: zero state every period, v̂ from max(v̄, v), and the momentum flush at the period's end."""
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
                vbar = np.maximum(vbar, v) if alg1 else v
                theta[sl] -= alpha * (m / (1 - b1**c)) / (np.sqrt(vbar / (1 - b2**c)) + eps)
                state[b] = (m, v, vbar, c)
        for b in sorted(active) if alg1 else ():
            m, _, vbar, c = state[b]
            sl = slice(problem.offsets[b], problem.offsets[b + 1])
            theta[sl] -= alpha * b1 / (1 - b1) * (m / (1 - b1**c)) / (np.sqrt(vbar / (1 - b2**c)) + eps)
        prev = active
    return float(problem.grad_sq(theta[None])[0])


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
