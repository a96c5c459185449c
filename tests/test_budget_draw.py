"""BudgetDraw: never over budget, and marginals equal π wherever the rounding's last class fits."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from misa_theory.budget_draw import BudgetDraw


def _pi_with_slack(rng: np.random.Generator, sizes: np.ndarray, budget: int, forced: int) -> np.ndarray:
    """π with a few forced units and Σ n π ≤ budget − max n, so the last fractional class always fits."""
    pi = rng.random(sizes.size) ** 2
    pi[rng.choice(sizes.size, forced, replace=False)] = 1.0
    room = budget - sizes.max() - sizes[pi >= 1].sum()
    free = pi < 1
    pi[free] *= max(room, 0) / max((pi[free] * sizes[free]).sum(), 1e-12)
    pi[free] = np.minimum(pi[free], 0.999)
    return pi


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_classes=st.integers(1, 4), U=st.integers(2, 30))
def test_never_over_budget_and_marginals_equal_pi(seed, n_classes, U):
    rng = np.random.default_rng(seed)
    sizes = rng.choice(rng.integers(1, 40, n_classes), U)
    budget = int(sizes.sum() * rng.uniform(0.3, 0.8)) + int(sizes.max())
    forced = int(rng.integers(0, 2))
    pi = _pi_with_slack(rng, sizes, budget, forced if sizes.max() * 2 <= budget else 0)
    draw = BudgetDraw(sizes, budget)
    R = 20_000
    mask = draw(np.tile(pi, (R, 1)), rng)
    assert np.all(mask @ sizes <= budget)
    freq = mask.mean(axis=0)
    se = np.sqrt(pi * (1 - pi) / R) + 1e-12
    assert np.all(np.abs(freq - pi) <= 5 * se), np.max(np.abs(freq - pi) / se)
    assert np.all(mask[:, pi >= 1]) and not mask[:, pi <= 0].any()


def test_rows_are_independent_draws_and_the_generator_advances_by_shape():
    """Two rows with the same π are different draws; the generator state after a call depends on R only."""
    sizes = np.array([4, 4, 2, 2, 2, 1, 1])
    draw = BudgetDraw(sizes, 6)
    pi = np.array([0.3, 0.3, 0.4, 0.4, 0.2, 0.5, 0.5])
    a, b = np.random.default_rng(1), np.random.default_rng(1)
    m1 = draw(np.tile(pi, (64, 1)), a)
    draw(np.tile(np.full(7, 0.1), (64, 1)), b)
    assert a.bit_generator.state == b.bit_generator.state
    assert len({row.tobytes() for row in m1}) > 1


@pytest.mark.parametrize("sizes", [[3, 3, 3], [5, 2, 2, 1, 1, 1]])
def test_pipage_keeps_class_counts_exact_in_expectation(sizes):
    """Class counts: E[count_s] = Σ_{u∈s} π_u, and each count is ⌊E_s⌋ or ⌈E_s⌉."""
    sizes = np.asarray(sizes)
    rng = np.random.default_rng(7)
    pi = _pi_with_slack(rng, sizes, int(sizes.sum() * 0.7) + int(sizes.max()), 0)
    draw = BudgetDraw(sizes, int(sizes.sum() * 0.7) + int(sizes.max()))
    mask = draw(np.tile(pi, (40_000, 1)), rng)
    for size in np.unique(sizes):
        members = sizes == size
        counts = mask[:, members].sum(axis=1)
        target = pi[members].sum()
        assert set(np.unique(counts)) <= {int(np.floor(target)), int(np.ceil(target))}
        assert abs(counts.mean() - target) < 5 * counts.std() / np.sqrt(counts.size) + 1e-9


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), R=st.integers(1, 20), integral=st.floats(0.0, 0.6),
       edge=st.booleans())
def test_two_class_rounding_is_the_general_loop_bit_for_bit(seed, R, integral, edge):
    """The two-class shortcut of the pipage rounding gives the general loop's rounding, rows that do not move
    (one class already integral) and fractions at the TOL edges included."""
    rng = np.random.default_rng(seed)
    draw = BudgetDraw(np.array([32, 64, 224] * 4), 400)
    frac = rng.random((R, 3)) * (rng.random((R, 3)) > integral)
    if edge:  # fractions within rounding of TOL and of 1 − TOL
        pick = rng.random((R, 3)) < 0.3
        frac[pick] = rng.choice([1e-9, 1e-9 + 1e-17, 1.0 - 1e-9, 1.0 - 2e-9], int(pick.sum()))
    u = rng.random((R, 3))
    for order in (np.array([2, 1]), np.array([2, 0]), np.array([1, 0])):
        got = draw._round_pair(frac, u, order, np.zeros((R, 3), dtype=bool))
        want = draw._round_loop(frac, u, order, np.zeros((R, 3), dtype=bool))
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w)
