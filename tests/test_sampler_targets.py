"""The sampler's targets equal a reference written out here from the rules' definitions on ``optimal.waterfill``.

The reference spells out the rules (module docstrings of misa_theory.sampler and misa_theory.budget_draw):
the rule's rates, water-filled over the free modules; every size class whose expected count exceeds its
capacity ⌊budget/n_s⌋ scaled down to it, taken out with its budget, and the rest re-spread, until no class
is over.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from misa_theory.optimal import waterfill
from misa_theory.problems import transformer_layout
from misa_theory.sampler import ModuleSampler


def reference_targets(smp: ModuleSampler, scores: np.ndarray) -> np.ndarray:
    """π per module of one stream with the given scores, one class-capacity pass at a time."""
    n = smp.sizes.astype(float)
    cls = np.unique(n, return_inverse=True)[1].reshape(-1)
    csz = np.unique(n)
    depth = smp.groups / max(smp.groups.max(), 1)
    tilt = np.exp(smp.depth_bias * (depth - 1.0))
    free = n <= smp.budget
    budget, pi = float(smp.budget), np.zeros(n.size)
    s = scores[free]
    rates = tilt.copy()
    if smp.rule == "misa_norm" and (s > 0).any():  # softmax of the scores over their mean (modules that fit)
        z = smp.eta * scores / s.mean()
        rates = np.exp(z - z[free].max()) * tilt
    elif smp.rule == "optimal" and (s > 0).any():
        rates = np.sqrt(scores / n) * tilt
    while True:
        r = rates[free]
        p = np.zeros(n.size)
        floor = min(smp.min_inclusion, budget / n[free].sum())  # what the budget left can pay
        p[free] = waterfill(r, n[free], budget, floor)
        pi[free] = p[free]
        expected = np.bincount(cls, p, csz.size)
        cap = np.floor(budget / csz + 1e-9)
        over = expected > cap + 1e-9
        if not over.any():
            return pi
        pi *= np.where(over, cap / np.where(over, expected, 1.0), 1.0)[cls]
        budget -= (cap * csz * over).sum()
        free &= ~over[cls]
        if not free.any():
            return pi
        if budget < n[free].min():
            pi[free] = 0.0
            return pi


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rule=st.sampled_from(["misa_norm", "optimal", "uniform"]),
       delta=st.sampled_from([0.01, 0.03, 0.1, 0.25, 0.6]), eta=st.sampled_from([0.0, 1.0, 4.0]),
       depth_bias=st.sampled_from([0.0, 1.5]), floor=st.sampled_from([0.0, 0.0, 0.005]),
       streams=st.integers(1, 4), sparse=st.booleans())
def test_targets_equal_the_reference(seed, rule, delta, eta, depth_bias, floor, streams,
                                                          sparse):
    rng = np.random.default_rng(seed)
    sizes, groups, _ = transformer_layout(int(rng.integers(1, 5)), int(rng.integers(2, 9)),
                                          int(rng.integers(1, 5)), int(rng.integers(2, 20)))
    total = int(sizes.sum() * rng.choice([1.0, 1.3]))
    budget = int(delta * total)
    if budget < sizes.min() or floor * sizes[sizes <= budget].sum() > budget:
        delta = min(1.0, 1.5 * sizes.max() / total)  # keep the example: a budget that fits every module
    smp = ModuleSampler(sizes, groups, delta=delta, rule=rule, seed=seed, eta=eta, streams=streams,
                        depth_bias=depth_bias, min_inclusion=floor, total_params=total)
    for _ in range(3):
        mask = rng.random((streams, sizes.size)) < 0.6
        x = rng.random((streams, sizes.size)) ** 3
        if sparse:  # exact zeros: zero-rate modules, rows without a positive score
            x *= rng.random((streams, sizes.size)) < 0.5
        smp.observe_mask(mask, x)
        got = smp.target_inclusion()
        for s in range(streams):
            np.testing.assert_allclose(got[s], reference_targets(smp, smp.scores[s]), rtol=0, atol=1e-12)
        assert np.all(got @ sizes <= smp.budget * (1 + 1e-9) + 1e-6)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), eta=st.sampled_from([1.0, 2.0, 8.0]),
       floor=st.sampled_from([0.001, 0.005, 0.02]), delta=st.sampled_from([0.05, 0.1, 0.25]))
def test_sharp_scores_with_a_floor_stay_within_the_budget(seed, eta, floor, delta):
    """Scores over many decades make misa's softmax rates span 1e-30 and more; the floor > 0 water-filling
    then used to lose the small rates to cancellation, overspend its budget, and the draw asserted."""
    rng = np.random.default_rng(seed)
    sizes, groups, _ = transformer_layout(12, 8, 4, 28)
    smp = ModuleSampler(sizes, groups, delta=delta, rule="misa_norm", seed=seed, eta=eta, streams=4,
                        min_inclusion=floor)
    for _ in range(4):
        mask = rng.random((4, sizes.size)) < 0.7
        smp.observe_mask(mask, 10.0 ** rng.uniform(-6, 3, (4, sizes.size)))
    got = smp.target_inclusion()
    assert np.all(got @ sizes <= smp.budget * (1 + 1e-9))
    for s in range(4):
        np.testing.assert_allclose(got[s], reference_targets(smp, smp.scores[s]), rtol=0, atol=1e-12)
    for _ in range(20):
        assert np.all(smp.draw_mask() @ sizes <= smp.budget)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), floor=st.sampled_from([0.0, 0.01, 0.1]),
       delta=st.sampled_from([0.005, 0.1, 0.5]), streams=st.sampled_from([None, 3]))
def test_a_softmax_beyond_the_float_range_neither_warns_nor_overspends(seed, floor, delta, streams):
    """η = 20 on scores over many decades: rates of all but a few modules are subnormal or 0, and the budget
    (or a pinned class's leftover, whose floor then drops to what it can pay) must reach them."""
    import warnings

    rng = np.random.default_rng(seed)
    sizes, groups, _ = transformer_layout(14, 41, 9, 91)
    total = int(1.5 * sizes.sum())
    if floor * sizes.sum() > int(delta * total):
        floor = 0.0
    smp = ModuleSampler(sizes, groups, delta=delta, rule="misa_norm", seed=seed, eta=20.0, streams=streams,
                        min_inclusion=floor, depth_bias=2.0, total_params=total)
    S = 1 if streams is None else streams
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(6):
            x = 10.0 ** rng.uniform(-8, 2, (S, sizes.size))
            if streams is None:
                drawn = smp.draw()
                assert sizes[drawn].sum() <= smp.budget
                smp.observe(drawn, x[0, drawn])
            else:
                drawn = smp.draw_mask()
                assert np.all(drawn @ sizes <= smp.budget)
                smp.observe_mask(drawn, x)
        got = np.atleast_2d(smp.target_inclusion())
    assert np.all(got @ sizes <= smp.budget * (1 + 1e-9))
    scores = np.atleast_2d(smp.scores)
    for s in range(S):
        np.testing.assert_allclose(got[s], reference_targets(smp, scores[s]), rtol=0, atol=1e-12)
