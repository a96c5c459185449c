"""The incremental gradient oracle of the ``robust`` family equals the dense gradient, step after step."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from misa_theory.oracle import Active, DenseOracle, RobustOracle, make_oracle
from misa_theory.problems import RobustFeatures, make_problem
from misa_theory.sim_config import SimConfig
from misa_theory.simulate import simulate


def gather(problem, mask: np.ndarray) -> Active:
    """The active (seed, module) pairs of a mask (S, M), as simulate forms them."""
    return Active.from_mask(mask, problem.sizes, problem.offsets[:-1], problem.n_params)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n_layers=st.integers(1, 4), d=st.integers(2, 6), kv=st.integers(1, 3),
       ff=st.integers(2, 9), m=st.integers(1, 5), r=st.integers(1, 3), S=st.integers(1, 4),
       frac=st.floats(0.05, 1.0))
def test_robust_oracle_matches_dense_gradient(seed, n_layers, d, kv, ff, m, r, S, frac):
    problem = RobustFeatures(n_layers=n_layers, d=d, kv=kv, ff=ff, m=m, r=r, seed=seed)
    rng = np.random.default_rng(seed)
    theta = problem.x0(S) + rng.standard_normal((S, problem.n_params))
    fast, ref = RobustOracle(problem, theta), DenseOracle(problem, theta)
    for i in range(6):
        g = problem.grad(ref.theta)
        scale = 1.0 + float(np.max(np.einsum("sn,sn->s", g, g)))
        np.testing.assert_allclose(fast.grad_sq(), ref.grad_sq(), rtol=1e-10, atol=1e-12 * scale)
        active = gather(problem, rng.random((S, problem.n_modules)) < frac)
        got, want = np.empty(active.idx.size), np.empty(active.idx.size)
        np.testing.assert_allclose(fast.grad_at(active, got), ref.grad_at(active, want), rtol=1e-10, atol=1e-12)
        delta = 0.3 * rng.standard_normal(active.idx.size)
        fast.step(active, delta)
        ref.step(active, delta)
        np.testing.assert_array_equal(fast.theta, ref.theta)
        if i % 2:  # two steps without a query in between: on the same set, then on an overlapping other set
            fast.step(active, delta)
            ref.step(active, delta)
            other = gather(problem, rng.random((S, problem.n_modules)) < frac)
            delta = 0.3 * rng.standard_normal(other.idx.size)
            fast.step(other, delta)
            ref.step(other, delta)
            np.testing.assert_array_equal(fast.theta, ref.theta)
        # two inner steps on the same set: the moved modules must be recomputed, not served stale
        np.testing.assert_allclose(fast.grad_at(active, got), ref.grad_at(active, want), rtol=1e-10, atol=1e-12)
        # a strided output buffer gets the same values
        strided = np.empty(2 * active.idx.size)[::2]
        np.testing.assert_array_equal(fast.grad_at(active, strided), got)


def test_robust_oracle_refuses_pairs_out_of_module_order():
    problem = RobustFeatures(n_layers=2, d=4, kv=2, ff=6)
    oracle = RobustOracle(problem, problem.x0(2))
    active = gather(problem, np.ones((2, problem.n_modules), dtype=bool))
    swapped = Active(active.seed[::-1].copy(), active.module[::-1].copy(), active.starts, active.lens[::-1].copy(),
                     problem.offsets[:-1], problem.n_params)
    with pytest.raises(ValueError, match="sorted by module"):
        oracle.grad_at(swapped, np.empty(active.size))


def test_make_oracle_picks_incremental_only_where_it_pays():
    robust = make_problem("robust")
    assert isinstance(make_oracle(robust, robust.x0(2), active_fraction=0.03), RobustOracle)
    assert isinstance(make_oracle(robust, robust.x0(2), active_fraction=0.5), DenseOracle)
    mlp = make_problem("mlp")
    assert isinstance(make_oracle(mlp, mlp.x0(2), active_fraction=0.03), DenseOracle)


@pytest.mark.parametrize("T, keep, flush", [(2, False, False), (1, False, False), (3, True, True), (1, False, True)])
def test_simulation_with_incremental_oracle_starts_on_the_dense_trajectory(monkeypatch, T, keep, flush):
    """Same run through both oracles: equal to rounding until the sampler's discrete draws may diverge (kept
    state and the momentum flush's second step on the same set included)."""
    import misa_theory.simulate as sim

    problem = RobustFeatures(n_layers=6, d=8, kv=4, ff=16)
    cfg = SimConfig(alpha=0.01, T=T, delta=0.05, sigma=0.05, retain_state=keep, momentum_flush=flush)
    fast = simulate(problem, "misa", 8, 3, cfg, seed=4)
    monkeypatch.setattr(sim, "make_oracle", lambda p, theta, active_fraction=1.0: DenseOracle(p, theta))
    dense = simulate(problem, "misa", 8, 3, cfg, seed=4)
    np.testing.assert_allclose(fast.grad_sq, dense.grad_sq, rtol=1e-9)
    np.testing.assert_array_equal(fast.inclusion_counts, dense.inclusion_counts)


def test_active_from_mask_lists_pairs_by_module_with_their_runs():
    problem = RobustFeatures(n_layers=2, d=4, kv=2, ff=6)
    rng = np.random.default_rng(0)
    S, n = 3, problem.n_params
    mask = rng.random((S, problem.n_modules)) < 0.4
    active = Active.from_mask(mask, problem.sizes, problem.offsets[:-1], n)
    pairs = sorted((b, s) for s, b in zip(*np.nonzero(mask), strict=True))
    assert list(zip(active.module.tolist(), active.seed.tolist(), strict=True)) == pairs
    want = np.concatenate([s * n + np.arange(problem.offsets[b], problem.offsets[b + 1]) for b, s in pairs])
    np.testing.assert_array_equal(active.idx, want)
    assert active.size == want.size and active.ordered
    np.testing.assert_array_equal(active.starts, np.cumsum(active.lens) - active.lens)
    empty = Active.from_mask(np.zeros_like(mask), problem.sizes, problem.offsets[:-1], n)
    assert empty.size == 0 and empty.idx.size == 0
