"""budget_draw: targets within the budget and class capacities; draws never over budget, marginals = π
wherever the rounding's last class fits."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from misa_theory.budget_draw import budgeted_inclusion, draw_within_budget


def _pi_with_slack(rng: np.random.Generator, sizes: np.ndarray, budget: int, forced: int) -> np.ndarray:
    """π with a few forced units and Σ n π ≤ budget − max n, so the last fractional class always fits."""
    pi = rng.random(sizes.size) ** 2
    pi[rng.choice(sizes.size, forced, replace=False)] = 1.0
    room = budget - sizes.max() - sizes[pi >= 1].sum()
    free = pi < 1
    pi[free] *= max(room, 0) / max((pi[free] * sizes[free]).sum(), 1e-12)
    pi[free] = np.minimum(pi[free], 0.999)
    return pi


def _draws(pi: np.ndarray, sizes: np.ndarray, budget: int, rng: np.random.Generator, R: int) -> np.ndarray:
    return np.stack([draw_within_budget(pi, sizes, budget, rng) for _ in range(R)])


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_classes=st.integers(1, 4), U=st.integers(2, 30))
def test_never_over_budget_and_marginals_equal_pi(seed, n_classes, U):
    rng = np.random.default_rng(seed)
    sizes = rng.choice(rng.integers(1, 40, n_classes), U)
    budget = int(sizes.sum() * rng.uniform(0.3, 0.8)) + int(sizes.max())
    forced = int(rng.integers(0, 2))
    pi = _pi_with_slack(rng, sizes, budget, forced if sizes.max() * 2 <= budget else 0)
    R = 4_000
    mask = _draws(pi, sizes, budget, rng, R)
    assert np.all(mask @ sizes <= budget)
    freq = mask.mean(axis=0)
    se = np.sqrt(pi * (1 - pi) / R) + 1e-12
    assert np.all(np.abs(freq - pi) <= 5 * se), np.max(np.abs(freq - pi) / se)
    assert np.all(mask[:, pi >= 1]) and not mask[:, pi <= 0].any()


@pytest.mark.parametrize("sizes", [[3, 3, 3], [5, 2, 2, 1, 1, 1]])
def test_pipage_keeps_class_counts_exact_in_expectation(sizes):
    """Class counts: E[count_s] = Σ_{u∈s} π_u, and each count is ⌊E_s⌋ or ⌈E_s⌉."""
    sizes = np.asarray(sizes)
    rng = np.random.default_rng(7)
    budget = int(sizes.sum() * 0.7) + int(sizes.max())
    pi = _pi_with_slack(rng, sizes, budget, 0)
    mask = _draws(pi, sizes, budget, rng, 20_000)
    for size in np.unique(sizes):
        members = sizes == size
        counts = mask[:, members].sum(axis=1)
        target = pi[members].sum()
        assert set(np.unique(counts)) <= {int(np.floor(target)), int(np.ceil(target))}
        assert abs(counts.mean() - target) < 5 * counts.std() / np.sqrt(counts.size) + 1e-9


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), U=st.integers(1, 20), floor=st.sampled_from([0.0, 0.01]))
def test_targets_spend_at_most_the_budget_and_respect_class_capacity(seed, U, floor):
    rng = np.random.default_rng(seed)
    sizes = rng.choice([32, 64, 224], U)
    budget = int(rng.integers(sizes.min(), sizes.sum() + 1))
    if floor * sizes[sizes <= budget].sum() > budget:
        floor = 0.0
    pi = budgeted_inclusion(rng.random(U) ** 3, sizes, budget, floor)
    assert np.all((pi >= 0) & (pi <= 1)) and pi @ sizes <= budget * (1 + 1e-9)
    assert np.all(pi[sizes > budget] == 0)
    for c in np.unique(sizes):
        assert pi[sizes == c].sum() <= np.floor(budget / c) + 1e-9


def test_targets_without_a_binding_capacity_are_the_waterfill():
    """Equal sizes and a budget of whole modules: π is exactly optimal.waterfill's."""
    from misa_theory.optimal import waterfill

    rates = np.array([0.1, 0.5, 1.0, 2.0, 4.0])
    sizes = np.full(5, 10)
    np.testing.assert_allclose(budgeted_inclusion(rates, sizes, 30), waterfill(rates, sizes.astype(float), 30.0))
