"""Synthetic problems: exact gradients, lower bound, noise model, block layout."""

from __future__ import annotations

import numpy as np
import pytest

from misa_theory.problems import (
    PROBLEMS,
    llama3_8b_layout,
    make_problem,
    synthetic_sq_norms,
    transformer_layout,
)


@pytest.fixture(params=sorted(PROBLEMS))
def problem(request):
    return make_problem(request.param)


def test_gradient_matches_central_differences(problem):
    rng = np.random.default_rng(0)
    theta = problem.x0(3) + 0.2 * rng.standard_normal((3, problem.n_params))
    g = problem.grad(theta)
    for _ in range(3):
        e = rng.standard_normal(problem.n_params)
        h = 1e-6
        fd = (problem.f(theta + h * e) - problem.f(theta - h * e)) / (2 * h)
        np.testing.assert_allclose(g @ e, fd, rtol=1e-5, atol=1e-6)


def test_shapes_layout_and_lower_bound(problem):
    theta = problem.x0(4) + np.random.default_rng(1).standard_normal((4, problem.n_params))
    assert problem.f(theta).shape == (4,) and problem.grad(theta).shape == (4, problem.n_params)
    assert np.all(problem.f(theta) >= problem.f_star)
    assert problem.offsets[-1] == problem.n_params == problem.sizes.sum()
    assert len(problem.module_slices) == problem.n_modules == len(problem.kinds) == problem.groups.size
    assert np.unique(problem.sizes).size >= 2  # heterogeneous module sizes
    assert problem.scales.max() / problem.scales.min() > 3  # heterogeneous importance
    sq = problem.module_sq_norms(problem.grad(theta))
    np.testing.assert_allclose(sq.sum(axis=1), problem.grad_sq(theta))


def test_seed_rows_are_independent(problem):
    rng = np.random.default_rng(2)
    theta = problem.x0(3) + rng.standard_normal((3, problem.n_params))
    full = problem.grad(theta)
    for s in range(3):
        np.testing.assert_allclose(problem.grad(theta[s:s + 1])[0], full[s], rtol=1e-12, atol=1e-12)


def test_stochastic_gradient_is_unbiased_with_variance_sigma_squared():
    p = make_problem("sensing")
    theta = p.x0(2000)
    rng = np.random.default_rng(3)
    g = p.stoch_grad(theta, rng, sigma=0.5)
    noise = g - p.grad(theta)
    assert abs(np.mean(np.sum(noise**2, axis=1)) - 0.25) < 0.02
    assert np.abs(noise.mean(axis=0)).max() < 5 * 0.5 / np.sqrt(2000)
    np.testing.assert_array_equal(p.stoch_grad(theta[:2], rng, 0.0), p.grad(theta[:2]))


def test_transformer_layout_and_llama_sizes():
    sizes, groups, kinds = transformer_layout(2, 4, 2, 8)
    assert sizes.size == 14 and set(kinds) == {"q", "k", "v", "o", "gate", "up", "down"}
    assert np.all(np.bincount(groups, sizes) == 2 * 16 + 2 * 8 + 3 * 32)
    s, g, k = llama3_8b_layout()
    assert s.sum() == 32 * (2 * 4096**2 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
    a = synthetic_sq_norms(s, g, k)
    assert a.shape == s.shape and np.all(a > 0)
    with pytest.raises(ValueError):
        make_problem("nope")
