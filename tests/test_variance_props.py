"""Properties of misa_theory.variance: closed forms, their identities, and agreement with real sampler draws."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from misa_theory.sampler import ModuleSampler
from misa_theory.variance import (
    captured_gradient,
    gradient_deficit,
    monte_carlo,
    reweighted_variance,
    sampled_gradient_variance,
)

sq_norm = st.floats(0.0, 1e3, allow_nan=False, allow_subnormal=False)
prob = st.floats(1e-3, 1.0, allow_nan=False)


@st.composite
def modules(draw: st.DrawFn, max_size: int = 12) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a, pi, groups) with one entry per module; groups are arbitrary small ints (not necessarily dense)."""
    m = draw(st.integers(1, max_size))
    a = np.array(draw(st.lists(sq_norm, min_size=m, max_size=m)))
    pi = np.array(draw(st.lists(prob, min_size=m, max_size=m)))
    groups = np.array(draw(st.lists(st.integers(-3, 5), min_size=m, max_size=m)))
    return a, pi, groups


@given(modules())
def test_closed_forms_match_their_definitions(case: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    """V = Σ a(1/π − 1), captured = Σ π a, deficit = Σ (1 − π) a, and captured + deficit = Σ a."""
    a, pi, _ = case
    v = sampled_gradient_variance(a, pi)
    c = captured_gradient(a, pi)
    d = gradient_deficit(a, pi)
    scale = 1.0 + float(np.sum(a / pi))
    assert math.isclose(v, float(np.sum(a * (1 / pi - 1))), rel_tol=1e-9, abs_tol=1e-9 * scale)
    assert math.isclose(c, float(np.sum(pi * a)), rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(d, float(np.sum((1 - pi) * a)), rel_tol=1e-9, abs_tol=1e-9 * (1 + a.sum()))
    assert math.isclose(c + d, float(a.sum()), rel_tol=1e-9, abs_tol=1e-9)
    assert v >= -1e-9 * scale and c >= 0 and d >= -1e-9 * (1 + a.sum())


@given(modules())
def test_grouped_per_group_and_per_module_inclusion_agree(case: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    """With groups, π per group (indexed by sorted label) equals the same π broadcast to the modules."""
    a, pi, groups = case
    labels, dense = np.unique(groups, return_inverse=True)
    pi_group = pi[: labels.size] if labels.size <= pi.size else np.resize(pi, labels.size)
    per_module = pi_group[dense]
    for f in (sampled_gradient_variance, captured_gradient, gradient_deficit):
        ref = f(a, per_module)
        scale = 1e-9 * (1.0 + abs(ref))
        assert math.isclose(f(a, per_module, groups), ref, rel_tol=1e-9, abs_tol=scale)
        if labels.size != a.size:  # a per-group vector is only distinguishable when its length differs
            assert math.isclose(f(a, pi_group, groups), ref, rel_tol=1e-9, abs_tol=scale)
    # Per group: Σ_G A_G (1/π_G − 1).
    A = np.bincount(dense, a, labels.size)
    assert math.isclose(sampled_gradient_variance(a, per_module, groups), float(np.sum(A * (1 / pi_group - 1))),
                        rel_tol=1e-9, abs_tol=1e-9 * (1 + float(np.sum(A / pi_group))))


@given(modules(max_size=8))
def test_grouped_inclusion_must_be_constant_within_a_group(case: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    """A per-module π that differs inside a layer is not a layer-wise design: refuse it."""
    a, pi, _ = case
    if a.size < 2:
        return
    groups = np.zeros(a.size, dtype=int)
    pi = pi.copy()
    pi[0] = 0.5
    pi[1] = 0.25
    with pytest.raises(ValueError, match="inclusion"):
        sampled_gradient_variance(a, pi, groups)


@st.composite
def exact_sampler_case(draw: st.DrawFn) -> tuple[ModuleSampler, np.ndarray]:
    """Equal-size modules with a budget of whole modules: the sampler's marginals are exactly π (no rounding bias).

    A floor on π keeps every module drawn often enough in a few hundred draws for the CLT z-bound to be sound.
    """
    m = draw(st.integers(2, 6))
    n = draw(st.integers(1, 50))
    k = draw(st.integers(1, m - 1))
    rule = draw(st.sampled_from(["misa_norm", "optimal", "uniform"]))
    a = np.array(draw(st.lists(st.floats(0.01, 100.0), min_size=m, max_size=m)))
    total = m * n
    delta = (k * n + 0.5) / total  # floor(delta * total) = k n exactly, whatever the float rounding
    s = ModuleSampler(np.full(m, n), delta=delta, rule=rule, seed=draw(st.integers(0, 2**31)),
                      eta=draw(st.floats(0.0, 3.0)), min_inclusion=0.5 * k / m, explore=False)
    s.observe(np.arange(m), a)  # one observation: bias-corrected EMA equals a exactly
    return s, a


@given(exact_sampler_case())
def test_monte_carlo_from_sampler_draws_matches_closed_forms(case: tuple[ModuleSampler, np.ndarray]) -> None:
    """Sample means of per-draw ‖ĝ−g‖², captured, deficit over real draws agree with the closed forms (z ≤ 5)."""
    s, a = case
    assert s.budget % int(s.sizes[0]) == 0
    pi = s.target_inclusion()
    r = 250
    masks = np.zeros((r, s.n_modules), dtype=bool)
    for i in range(r):
        masks[i, s.draw()] = True
    np.testing.assert_allclose(s.last_inclusion, pi, rtol=1e-12, atol=1e-12)
    mc = monte_carlo(a, masks, pi)
    assert mc.n_draws == r
    for est, se, exact in (
        (mc.variance, mc.variance_se, sampled_gradient_variance(a, pi)),
        (mc.captured, mc.captured_se, captured_gradient(a, pi)),
        (mc.deficit, mc.deficit_se, gradient_deficit(a, pi)),
    ):
        assert abs(est - exact) <= 5 * se + 1e-9 * (1 + abs(exact)), (est, se, exact, pi)
    assert math.isclose(mc.captured + mc.deficit, float(a.sum()), rel_tol=1e-9, abs_tol=1e-9)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(sq_norms=[1.0, -1.0], inclusion=[0.5, 0.5]), "sq_norms"),
        (dict(sq_norms=[1.0, float("nan")], inclusion=[0.5, 0.5]), "sq_norms"),
        (dict(sq_norms=[1.0, float("inf")], inclusion=[0.5, 0.5]), "sq_norms"),
        (dict(sq_norms=[], inclusion=[]), "sq_norms"),
        (dict(sq_norms=[[1.0]], inclusion=[0.5]), "sq_norms"),
        (dict(sq_norms=[1.0, 2.0], inclusion=[0.5]), "inclusion"),
        (dict(sq_norms=[1.0, 2.0], inclusion=[0.5, -0.25]), "inclusion"),  # π = 0: see the test below
        (dict(sq_norms=[1.0, 2.0], inclusion=[0.5, 1.5]), "inclusion"),
        (dict(sq_norms=[1.0, 2.0], inclusion=[0.5, float("nan")]), "inclusion"),
        (dict(sq_norms=[1.0, 2.0], inclusion=[0.5, 0.5], groups=[0]), "groups"),
        (dict(sq_norms=[1.0, 2.0], inclusion=[0.5, 0.5], groups=[0.5, 1.0]), "groups"),
    ],
)
@pytest.mark.parametrize("fn", [sampled_gradient_variance, captured_gradient, gradient_deficit])
def test_bad_input_raises_value_error_naming_the_argument(fn: object, kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        fn(**kwargs)  # type: ignore[operator]


@pytest.mark.parametrize(
    ("a", "masks", "pi", "name"),
    [
        ([1.0, -2.0], np.ones((3, 2), bool), [0.5, 0.5], "sq_norms"),
        ([1.0, 2.0], np.ones((3, 3), bool), [0.5, 0.5], "masks"),
        ([1.0, 2.0], np.ones(2, bool), [0.5, 0.5], "masks"),
        ([1.0, 2.0], np.ones((3, 2), bool), [0.5], "inclusion"),
        ([1.0, 2.0], np.ones((3, 2), bool), [0.5, 0.0], "inclusion"),
    ],
)
def test_monte_carlo_bad_input(a: list, masks: np.ndarray, pi: list, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        monte_carlo(a, masks, pi)


@st.composite
def joint_laws(draw: st.DrawFn) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Gradient blocks g_b of random dimensions and an arbitrary law over all 2^M subsets (M ≤ 5)."""
    m = draw(st.integers(1, 5))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    blocks = [rng.normal(size=draw(st.integers(1, 4))) * draw(st.floats(0.0, 10.0)) for _ in range(m)]
    subsets = np.array([[(k >> b) & 1 for b in range(m)] for k in range(2**m)], dtype=bool)
    weights = np.array(draw(st.lists(st.floats(0.0, 1.0), min_size=2**m, max_size=2**m))) + 1e-9
    return blocks, subsets, weights / weights.sum()


@given(joint_laws())
def test_deficit_and_captured_are_expectations_of_the_masked_gradient_under_any_joint_law(
    case: tuple[list[np.ndarray], np.ndarray, np.ndarray],
) -> None:
    """Σ_S P(S)·‖g − g_S‖² = Σ_b (1 − π_b) a_b and Σ_S P(S)·⟨g, g_S⟩ = Σ_b π_b a_b, by exact enumeration."""
    blocks, subsets, law = case
    g = np.concatenate(blocks)
    owner = np.concatenate([np.full(x.size, b) for b, x in enumerate(blocks)])
    a = np.array([float(x @ x) for x in blocks])
    pi = np.minimum(law @ subsets, 1.0)
    miss = sum(p * float(np.sum(np.where(s[owner], 0.0, g) ** 2)) for s, p in zip(subsets, law, strict=True))
    reach = sum(p * float(g @ np.where(s[owner], g, 0.0)) for s, p in zip(subsets, law, strict=True))
    scale = 1e-9 * (1 + float(a.sum()))
    assert math.isclose(gradient_deficit(a, pi), miss, rel_tol=1e-9, abs_tol=scale)
    assert math.isclose(captured_gradient(a, pi), reach, rel_tol=1e-9, abs_tol=scale)


def test_deficit_and_captured_allow_a_module_never_drawn_but_the_reweighted_variance_does_not() -> None:
    a, pi = [4.0, 1.0], [0.0, 1.0]
    assert gradient_deficit(a, pi) == 4.0 and captured_gradient(a, pi) == 1.0
    assert gradient_deficit(a, [0.0], groups=[7, 7]) == 5.0
    with pytest.raises(ValueError, match="inclusion"):
        reweighted_variance(a, pi)
    with pytest.raises(ValueError, match="inclusion"):
        gradient_deficit(a, [-0.1, 1.0])


def test_sampled_gradient_variance_is_the_reweighted_variance() -> None:
    """The old name stays importable and is the same function."""
    assert sampled_gradient_variance is reweighted_variance
    assert reweighted_variance([3.0, 1.0], [0.5, 1.0]) == 3.0
