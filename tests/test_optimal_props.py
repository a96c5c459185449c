"""Properties of misa_theory.optimal: feasibility, KKT, orderings between designs, softmax optimality."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from misa_theory.optimal import (
    kl_softmax,
    optimal_inclusion,
    optimal_variance,
    uncapped_optimal_variance,
    variance_gap,
)
from misa_theory.variance import sampled_gradient_variance


@st.composite
def problems(draw: st.DrawFn, with_floor: bool = True) -> dict:
    """a ≥ 0 (some zeros, wide dynamic range), n > 0, groups, a budget between the smallest module and Σn·1.2."""
    m = draw(st.integers(1, 14))
    a = np.array(draw(st.lists(st.one_of(st.just(0.0), st.floats(1e-6, 1e6)), min_size=m, max_size=m)))
    n = np.array(draw(st.lists(st.integers(1, 10_000), min_size=m, max_size=m)), dtype=float)
    groups = np.array(draw(st.lists(st.integers(0, 3), min_size=m, max_size=m)))
    lo, hi = float(n.min()), float(n.sum()) * 1.2
    budget = draw(st.floats(lo, max(lo, hi)))
    floor = 0.0
    if with_floor and draw(st.booleans()):
        floor = draw(st.floats(0.0, 1.0)) * min(1.0, budget / n.sum())
    return dict(a=a, n=n, groups=groups, budget=budget, floor=floor)


def _ratios(a: np.ndarray, n: np.ndarray, pi: np.ndarray) -> np.ndarray:
    return np.sqrt(a / n) / pi


def check_kkt(a: np.ndarray, n: np.ndarray, budget: float, floor: float, pi: np.ndarray) -> None:
    """Primal feasibility, and the KKT sign pattern of π = clip(√(a/(λn)), floor, 1)."""
    assert pi.shape == a.shape and pi.dtype == np.float64
    assert float(np.sum(pi * n)) <= budget * (1 + 1e-9)
    assert np.all(pi >= floor - 1e-12) and np.all(pi <= 1 + 1e-12)
    tol = 1e-9
    at_cap = pi >= 1 - tol
    at_floor = pi <= floor + tol * max(floor, 1e-300)
    live = a > 0
    interior = live & ~at_cap & ~at_floor
    r = _ratios(a, n, np.maximum(pi, 1e-300))
    if interior.any():
        level = r[interior]
        assert np.ptp(level) <= 1e-6 * level.max(), ("interior √(a/n)/π not constant", level)
        lam = float(np.median(level))
        assert np.all(r[live & at_cap] >= lam * (1 - 1e-6)), "a capped module must have a larger ratio"
        assert np.all(r[live & at_floor & ~at_cap] <= lam * (1 + 1e-6)), "a floored module must have a smaller ratio"
    if n.sum() > budget and interior.any():
        # λ > 0: the budget is spent (complementary slackness).
        assert float(np.sum(pi * n)) >= budget * (1 - 1e-9)
    # Capped modules are exactly the most important per parameter: no floored/interior one beats a capped one.
    if (live & at_cap).any() and (live & ~at_cap).any():
        assert r[live & at_cap].min() >= r[live & ~at_cap].max() * (1 - 1e-6)


@given(problems())
def test_optimal_inclusion_is_feasible_and_satisfies_kkt(p: dict) -> None:
    pi = optimal_inclusion(p["a"], p["n"], p["budget"], floor=p["floor"])
    check_kkt(p["a"], p["n"], p["budget"], p["floor"], pi)


@given(problems())
def test_layerwise_optimum_is_constant_per_layer_and_kkt_over_layers(p: dict) -> None:
    a, n, groups = p["a"], p["n"], p["groups"]
    pi = optimal_inclusion(a, n, p["budget"], groups=groups, floor=p["floor"])
    labels, dense = np.unique(groups, return_inverse=True)
    per_layer = np.zeros(labels.size)
    per_layer[dense] = pi
    np.testing.assert_array_equal(pi, per_layer[dense])
    check_kkt(np.bincount(dense, a), np.bincount(dense, n), p["budget"], p["floor"], per_layer)


def _uniform_layerwise_variance(a: np.ndarray, n: np.ndarray, budget: float) -> float:
    pi = min(1.0, budget / float(n.sum()))
    return float(np.sum(a * (1 / pi - 1)))


@given(problems(with_floor=False))
def test_module_le_layer_le_uniform_at_equal_budget(p: dict) -> None:
    """V*(module) ≤ V*(layer) ≤ V(uniform layer-wise): each design's feasible set contains the next one's."""
    a, n, b, groups = p["a"], p["n"], p["budget"], p["groups"]
    v_mod = optimal_variance(a, n, b)
    v_lay = optimal_variance(a, n, b, groups=groups)
    v_uni = _uniform_layerwise_variance(a, n, b)
    tol = 1e-9 * (1 + abs(v_uni) + float(a.sum()))
    assert v_mod <= v_lay + tol
    assert v_lay <= v_uni + tol
    assert v_mod >= -tol


@given(problems(), st.lists(st.floats(1e-3, 1.0), min_size=14, max_size=14))
def test_optimum_beats_any_random_feasible_design(p: dict, u: list[float]) -> None:
    """Scale a random positive vector onto the budget (then cap at 1 and lift to the floor if room): never better."""
    a, n, b, floor = p["a"], p["n"], p["budget"], p["floor"]
    w = np.array(u[: a.size])
    pi = np.clip(w * b / float(np.sum(w * n)), floor, 1.0)
    if float(np.sum(pi * n)) > b:  # the floor lift overspent: fall back to a uniform feasible design
        pi = np.full(a.size, max(floor, min(1.0, b / float(n.sum()))))
    assert float(np.sum(pi * n)) <= b * (1 + 1e-9)
    v_star = optimal_variance(a, n, b, floor=floor)
    v_rand = sampled_gradient_variance(a, pi)
    assert v_star <= v_rand + 1e-9 * (1 + abs(v_rand))


@given(problems(with_floor=False))
def test_uncapped_closed_form_is_a_lower_bound_and_exact_without_caps(p: dict) -> None:
    a, n, b = p["a"], p["n"], p["budget"]
    closed = uncapped_optimal_variance(a, n, b)
    ref = float(np.sum(np.sqrt(a * n)) ** 2 / b - a.sum())
    assert math.isclose(closed, ref, rel_tol=1e-9, abs_tol=1e-9 * (1 + float(a.sum())))
    exact = optimal_variance(a, n, b)
    tol = 1e-7 * (1 + abs(exact) + float(a.sum()))
    assert closed <= exact + tol
    pi = optimal_inclusion(a, n, b)
    if np.all(pi[a > 0] < 1 - 1e-9) and (a > 0).all():
        assert math.isclose(closed, exact, rel_tol=1e-7, abs_tol=tol)


@given(problems(with_floor=False))
def test_variance_gap_is_the_cauchy_schwarz_gap(p: dict) -> None:
    a, n, b, groups = p["a"], p["n"], p["budget"], p["groups"]
    gap = variance_gap(a, n, b, groups)
    _, dense = np.unique(groups, return_inverse=True)
    A, N = np.bincount(dense, a), np.bincount(dense, n)
    ref = (np.sum(np.sqrt(A * N)) ** 2 - np.sum(np.sqrt(a * n)) ** 2) / b
    scale = 1e-9 * (1 + float(np.sum(np.sqrt(A * N)) ** 2 / b))
    assert math.isclose(gap, ref, rel_tol=1e-7, abs_tol=scale)
    assert gap >= -scale


@given(problems(with_floor=False), st.lists(st.floats(1e-3, 1e3), min_size=4, max_size=4))
def test_variance_gap_vanishes_iff_ratio_constant_within_layers(p: dict, k: list[float]) -> None:
    n, b, groups = p["n"], p["budget"], p["groups"]
    a = np.array(k)[groups] * n  # a_b/n_b = k_l in every layer
    gap = variance_gap(a, n, b, groups)
    assert abs(gap) <= 1e-9 * (1 + float(np.sum(np.sqrt(a * n)) ** 2 / b))


@given(st.lists(st.floats(-50, 50), min_size=1, max_size=20), st.one_of(st.just(0.0), st.floats(1e-3, 20.0)),
       st.lists(st.floats(0.0, 1.0), min_size=20, max_size=20))
def test_kl_softmax_is_the_regularised_maximiser(s: list[float], eta: float, q_raw: list[float]) -> None:
    """p ∝ exp(η s) on the simplex, and no other q in the simplex has a larger Σ q s − KL(q‖u)/η."""
    s_arr = np.array(s)
    p = kl_softmax(s_arr, eta)
    assert p.shape == s_arr.shape
    assert np.all(p >= 0) and math.isclose(float(p.sum()), 1.0, rel_tol=1e-12)
    logits = eta * (s_arr - s_arr.max())
    np.testing.assert_allclose(p, np.exp(logits) / np.exp(logits).sum(), rtol=1e-10, atol=1e-300)
    if eta == 0:
        np.testing.assert_allclose(p, 1 / s_arr.size)
        return
    m = s_arr.size

    def objective(x: np.ndarray) -> float:
        nz = x > 0
        return float(x @ s_arr - np.sum(x[nz] * np.log(m * x[nz])) / eta)

    q = np.array(q_raw[:m]) + 1e-12
    q /= q.sum()
    assert objective(p) >= objective(q) - 1e-9 * (1 + abs(objective(q)))


@given(st.lists(st.floats(-50, 50), min_size=1, max_size=20))
def test_kl_softmax_limits(s: list[float]) -> None:
    s_arr = np.array(s)
    np.testing.assert_allclose(kl_softmax(s_arr, 0.0), 1 / s_arr.size)
    greedy = kl_softmax(s_arr, math.inf)
    top = s_arr == s_arr.max()
    np.testing.assert_allclose(greedy, top / top.sum())


BAD = [
    (dict(sq_norms=[1.0, -1.0], sizes=[1, 1], budget=1), "sq_norms"),
    (dict(sq_norms=[1.0, float("nan")], sizes=[1, 1], budget=1), "sq_norms"),
    (dict(sq_norms=[], sizes=[], budget=1), "sq_norms"),
    (dict(sq_norms=[1.0, 1.0], sizes=[1, 0], budget=1), "sizes"),
    (dict(sq_norms=[1.0, 1.0], sizes=[1, -3], budget=1), "sizes"),
    (dict(sq_norms=[1.0, 1.0], sizes=[1, float("nan")], budget=1), "sizes"),
    (dict(sq_norms=[1.0, 1.0], sizes=[1], budget=1), "sizes"),
    (dict(sq_norms=[1.0, 1.0], sizes=[5, 7], budget=4), "budget"),
    (dict(sq_norms=[1.0, 1.0], sizes=[5, 7], budget=0), "budget"),
    (dict(sq_norms=[1.0, 1.0], sizes=[5, 7], budget=float("nan")), "budget"),
    (dict(sq_norms=[1.0, 1.0], sizes=[5, 7], budget=-10), "budget"),
    (dict(sq_norms=[1.0, 1.0], sizes=[5, 7], budget=10, groups=[0]), "groups"),
]


@pytest.mark.parametrize(("kwargs", "name"), BAD)
@pytest.mark.parametrize("fn", [optimal_inclusion, optimal_variance, uncapped_optimal_variance])
def test_bad_input_raises_value_error_naming_the_argument(fn: object, kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        fn(**kwargs)  # type: ignore[operator]


@pytest.mark.parametrize(("floor", "budget"), [(-0.1, 10), (1.5, 10), (0.9, 10)])
def test_bad_floor(floor: float, budget: float) -> None:
    with pytest.raises(ValueError, match="floor"):
        optimal_inclusion([1.0, 2.0], [5, 7], budget, floor=floor)


@pytest.mark.parametrize(("scores", "eta", "name"), [([], 1.0, "scores"), ([1.0, float("nan")], 1.0, "scores"),
                                                     ([1.0], -1.0, "eta"), ([1.0], float("nan"), "eta")])
def test_kl_softmax_bad_input(scores: list, eta: float, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        kl_softmax(scores, eta)


def test_variance_gap_bad_groups() -> None:
    with pytest.raises(ValueError, match="groups"):
        variance_gap([1.0, 2.0], [1, 1], 1, [0, 1, 2])


@st.composite
def softmax_rates(draw: st.DrawFn) -> dict:
    """Rates like the misa softmax's (1 down to 1e-40), module sizes, a budget, a floor the budget can pay."""
    m = draw(st.integers(2, 120))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    span = draw(st.sampled_from([2.0, 20.0, 40.0, 330.0]))  # 330: subnormal rates, some underflow to 0
    r = 10.0 ** -rng.uniform(0, span, m)
    r[0] = 1.0
    n = rng.choice([32.0, 64.0, 224.0], m)
    budget = float(rng.uniform(n.max(), n.sum()))
    floor = draw(st.sampled_from([0.0, 0.001, 0.005, 0.05])) * min(1.0, budget / n.sum())
    return dict(r=r, n=n, budget=budget, floor=floor)


@pytest.mark.parametrize("fallback", [False, True], ids=["as-called", "segment-solver"])
@given(p=softmax_rates())
def test_waterfill_spends_the_budget_exactly_over_any_dynamic_range(p: dict, fallback: bool) -> None:
    """π = clip(μr, floor, 1) with Σ nπ = budget even when the rates span 40 decades (a softmax of sharp
    scores): running-sum differences lose the small rates there, and the sampler then drew over budget."""
    import warnings

    import misa_theory.optimal as optimal

    r, n, budget, floor = p["r"], p["n"], p["budget"], p["floor"]
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow on the way either
        if fallback:  # the breakpoint solver alone, as when the active-set iteration does not settle
            mp.setattr(optimal, "_active_set_mu", lambda *a, **k: None)
        pi = optimal.waterfill(r, n, budget, floor)
    pos = r > 0
    spent = float(pi @ n)
    if floor * n[~pos].sum() + n[pos].sum() <= budget:  # everything with a positive rate fits
        assert np.all(pi[pos] == 1.0) and spent <= budget * (1 + 1e-12)
        return
    assert abs(spent - budget) <= 1e-9 * budget
    assert np.all(pi >= floor) and np.all(pi <= 1.0)
    order = np.argsort(r, kind="stable")
    assert np.all(np.diff(pi[order]) >= -1e-12), "π must not decrease with the rate"
    inside = (pi > floor * (1 + 1e-9)) & (pi < 1 - 1e-9) & (r > 1e-300)
    if inside.any():
        mu = pi[inside] / r[inside]
        assert np.ptp(mu) <= 1e-9 * mu.max()
        mu = float(np.median(mu))
        np.testing.assert_allclose(pi, np.clip(mu * r, floor, 1.0), rtol=1e-9, atol=0)


# --- the deficit account (unweighted block-Adam): greedy optimum, KL-regularised softmax, orderings ---------

from scipy.optimize import linprog, minimize  # noqa: E402

from misa_theory.optimal import (  # noqa: E402
    deficit_gap,
    deficit_optimal_inclusion,
    kl_deficit_inclusion,
    optimal_deficit,
    proportional_inclusion,
    waterfill,
)
from misa_theory.variance import gradient_deficit  # noqa: E402


def _linprog_captured(a: np.ndarray, n: np.ndarray, budget: float, floor: float) -> float:
    """max Σ aπ s.t. Σ nπ ≤ budget, floor ≤ π ≤ 1, by HiGHS: the reference the greedy must match."""
    res = linprog(-a, A_ub=n[None, :], b_ub=[budget], bounds=[(floor, 1.0)] * a.size, method="highs")
    assert res.status == 0, res.message
    return float(-res.fun)


def _layer_sums(a: np.ndarray, n: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    _, dense = np.unique(groups, return_inverse=True)
    return np.bincount(dense, a), np.bincount(dense, n), dense


@pytest.mark.parametrize("layerwise", [False, True], ids=["module", "layer"])
@given(p=problems())
def test_deficit_optimum_matches_linprog_and_is_greedy(p: dict, layerwise: bool) -> None:
    """Feasible, spends min(budget, Σn), value equals the LP optimum, and π is bang-bang in the density a/n."""
    a, n, b, floor = p["a"], p["n"], p["budget"], p["floor"]
    groups = p["groups"] if layerwise else None
    pi = deficit_optimal_inclusion(a, n, b, groups=groups, floor=floor)
    ua, un, dense = _layer_sums(a, n, p["groups"]) if layerwise else (a, n, np.arange(a.size))
    upi = np.zeros(ua.size)
    upi[dense] = pi
    np.testing.assert_array_equal(pi, upi[dense])  # one switch per unit
    assert np.all(upi >= floor - 1e-12) and np.all(upi <= 1.0)
    spent = float(upi @ un)
    assert spent <= b * (1 + 1e-9)
    assert spent >= min(b, float(un.sum())) * (1 - 1e-9), "the budget must be spent"
    ref = _linprog_captured(ua, un, b, floor)
    got = float(ua @ upi)
    assert math.isclose(got, ref, rel_tol=1e-7, abs_tol=1e-9 * (1 + float(ua.sum())))
    assert math.isclose(optimal_deficit(a, n, b, groups, floor), float(a.sum()) - got, rel_tol=1e-7,
                        abs_tol=1e-9 * (1 + float(a.sum())))
    # KKT of the LP: a unit above the floor never has a lower density than a unit below the cap
    rho = ua / un
    above, below = upi > floor + 1e-9, upi < 1 - 1e-9
    if above.any() and below.any():
        assert rho[above].min() >= rho[below].max() * (1 - 1e-12)


@given(problems(with_floor=False), st.lists(st.floats(1e-3, 1.0), min_size=14, max_size=14))
def test_deficit_optimum_beats_any_random_feasible_design(p: dict, u: list[float]) -> None:
    a, n, b = p["a"], p["n"], p["budget"]
    w = np.array(u[: a.size])
    pi = np.clip(w * b / float(w @ n), 0.0, 1.0)
    assert float(pi @ n) <= b * (1 + 1e-9)
    assert optimal_deficit(a, n, b) <= gradient_deficit(a, pi) + 1e-9 * (1 + float(a.sum()))


@given(problems())
def test_deficit_module_le_layer_le_uniform_at_equal_budget(p: dict) -> None:
    """D*(module) ≤ D*(layer) ≤ D(uniform layer-wise): each design's feasible set contains the next one's."""
    a, n, b, groups, floor = p["a"], p["n"], p["budget"], p["groups"], p["floor"]
    d_mod = optimal_deficit(a, n, b, floor=floor)
    d_lay = optimal_deficit(a, n, b, groups=groups, floor=floor)
    d_uni = gradient_deficit(a, np.full(a.size, min(1.0, b / float(n.sum()))))
    tol = 1e-9 * (1 + float(a.sum()))
    assert -tol <= d_mod <= d_lay + tol
    assert d_lay <= d_uni + tol
    assert math.isclose(deficit_gap(a, n, b, groups, floor), d_lay - d_mod, rel_tol=1e-12, abs_tol=tol)


@given(problems(with_floor=False), st.lists(st.floats(1e-3, 1e3), min_size=4, max_size=4))
def test_deficit_gap_vanishes_when_density_is_constant_within_layers(p: dict, k: list[float]) -> None:
    n, b, groups = p["n"], p["budget"], p["groups"]
    a = np.array(k)[groups] * n
    assert abs(deficit_gap(a, n, b, groups)) <= 1e-9 * (1 + float(a.sum()))


def _kl_objective(a: np.ndarray, n: np.ndarray, budget: float, eta: float, pi: np.ndarray) -> float:
    """F(π) = Σ aπ − (1/η) Σ n[π log(π/δ) − π + δ], δ = budget/Σn, with 0 log 0 = 0."""
    delta = budget / float(n.sum())
    x = np.maximum(pi, 0.0)
    ent = np.where(x > 0, x * np.log(np.where(x > 0, x, 1.0) / delta), 0.0) - x + delta
    return float(a @ x - (n @ ent) / eta)


@st.composite
def kl_problems(draw: st.DrawFn) -> dict:
    """Small instances a numerical optimiser solves reliably: η·(a/n) spread within a few dozen."""
    m = draw(st.integers(2, 6))
    a = np.array(draw(st.lists(st.one_of(st.just(0.0), st.floats(0.0, 10.0)), min_size=m, max_size=m)))
    n = np.array(draw(st.lists(st.integers(1, 10), min_size=m, max_size=m)), dtype=float)
    budget = draw(st.floats(float(n.min()), float(n.sum()) * 0.999))
    eta = draw(st.floats(0.01, 5.0))
    return dict(a=a, n=n, budget=budget, eta=eta)


@pytest.mark.slow
@given(kl_problems())
def test_kl_deficit_inclusion_is_the_maximiser_a_numerical_optimiser_finds(p: dict) -> None:
    """SLSQP from the uniform design never finds a larger F, and lands on the same π (F is strictly concave)."""
    a, n, b, eta = p["a"], p["n"], p["budget"], p["eta"]
    pi = kl_deficit_inclusion(a, n, b, eta)
    assert float(pi @ n) <= b * (1 + 1e-9) and np.all(pi > 0) and np.all(pi <= 1)
    x0 = np.full(a.size, min(1.0, b / float(n.sum())))
    res = minimize(lambda x: -_kl_objective(a, n, b, eta, x), x0, method="SLSQP",
                   bounds=[(1e-12, 1.0)] * a.size,
                   constraints=[{"type": "ineq", "fun": lambda x: b - float(n @ x)}],
                   options={"ftol": 1e-13, "maxiter": 500})
    f_ours, f_num = _kl_objective(a, n, b, eta, pi), _kl_objective(a, n, b, eta, res.x)
    scale = 1e-9 * (1 + abs(f_ours) + float(a.sum()))
    if float(n @ res.x) <= b * (1 + 1e-9):
        assert f_ours >= f_num - scale
    assert f_ours <= f_num + 1e-6 * (1 + abs(f_ours)), "the optimiser found a worse point than ours by far"
    np.testing.assert_allclose(pi, res.x, atol=2e-3)


@given(problems(with_floor=False), st.floats(1e-3, 50.0))
def test_kl_deficit_inclusion_satisfies_kkt(p: dict, eta: float) -> None:
    """π = min(1, c·e^{η a/n}) with one c, budget spent; layer-wise: the same over (A_l, N_l)."""
    a, n, b, groups = p["a"], p["n"], p["budget"], p["groups"]
    for g in (None, groups):
        pi = kl_deficit_inclusion(a, n, b, eta, groups=g)
        ua, un, dense = _layer_sums(a, n, groups) if g is not None else (a, n, np.arange(a.size))
        upi = np.zeros(ua.size)
        upi[dense] = pi
        if un.sum() <= b:
            np.testing.assert_array_equal(upi, 1.0)
            continue
        assert math.isclose(float(upi @ un), b, rel_tol=1e-9)
        z = eta * (ua / un - (ua / un).max())
        inside = (upi < 1 - 1e-12) & (upi > 1e-290)  # subnormal π carry too few digits for log π
        if inside.any():
            log_c = np.log(upi[inside]) - z[inside]
            assert np.ptp(log_c) <= 1e-7 * (1 + np.abs(log_c).max())
            capped = upi >= 1 - 1e-12
            assert np.all(z[capped] + log_c.max() >= -1e-7), "a capped unit must have c·e^{ηρ} ≥ 1"


@given(kl_problems(), st.lists(st.floats(1e-3, 1.0), min_size=6, max_size=6))
def test_kl_deficit_inclusion_beats_any_random_feasible_design(p: dict, u: list[float]) -> None:
    a, n, b, eta = p["a"], p["n"], p["budget"], p["eta"]
    w = np.array(u[: a.size])
    rand = np.clip(w * b / float(w @ n), 0.0, 1.0)
    f_ours = _kl_objective(a, n, b, eta, kl_deficit_inclusion(a, n, b, eta))
    assert f_ours >= _kl_objective(a, n, b, eta, rand) - 1e-9 * (1 + abs(f_ours))


@given(kl_problems())
def test_kl_module_optimum_ge_layer_optimum(p: dict) -> None:
    """The layer-wise maximiser is a module-wise design, so it cannot beat the module-wise maximiser."""
    a, n, b, eta = p["a"], p["n"], p["budget"], p["eta"]
    groups = np.arange(a.size) // 2
    f_mod = _kl_objective(a, n, b, eta, kl_deficit_inclusion(a, n, b, eta))
    f_lay = _kl_objective(a, n, b, eta, kl_deficit_inclusion(a, n, b, eta, groups=groups))
    assert f_mod >= f_lay - 1e-9 * (1 + abs(f_mod))


@pytest.mark.slow
@given(problems(with_floor=False))
def test_kl_deficit_inclusion_approaches_greedy_at_the_proved_rate(p: dict) -> None:
    """D(π_η) is non-increasing in η, D(π_η) − D* ≤ budget·log(1/δ)/η, and η = ∞ is the greedy optimum."""
    a, n, b, groups = p["a"], p["n"], p["budget"], p["groups"]
    for g in (None, groups):
        d_star = optimal_deficit(a, n, b, groups=g)
        np.testing.assert_allclose(kl_deficit_inclusion(a, n, b, math.inf, groups=g),
                                   deficit_optimal_inclusion(a, n, b, groups=g), rtol=0, atol=0)
        un = float(n.sum())
        if un <= b:
            continue
        bound = b * math.log(un / b)
        scale = 1e-9 * (1 + float(a.sum()))
        previous = math.inf
        top = float((a / n).max())
        for eta in np.geomspace(1e-3, 1e9, 13) / (top if top > 0 else 1.0):
            d = gradient_deficit(a, kl_deficit_inclusion(a, n, b, float(eta), groups=g))
            assert d_star - scale <= d <= d_star + bound / eta + scale * 1e3
            assert d <= previous + scale * 1e3
            previous = d


@given(kl_problems())
def test_equal_sizes_give_the_papers_softmax_made_into_inclusion(p: dict) -> None:
    """n_b ≡ n: π = min(1, κ·softmax((η/n)·a)), i.e. proportional_inclusion of the paper's softmax."""
    a, eta = p["a"], p["eta"]
    size = float(p["n"][0])
    n = np.full(a.size, size)
    b = min(p["budget"], size * a.size * 0.999)
    if b < size:
        return
    np.testing.assert_allclose(kl_deficit_inclusion(a, n, b, eta),
                               proportional_inclusion(kl_softmax(a, eta / size), n, b), rtol=1e-9, atol=1e-12)


@given(problems(with_floor=False), st.floats(1e-3, 30.0))
def test_kl_deficit_inclusion_agrees_with_waterfill_where_rates_are_representable(p: dict, eta: float) -> None:
    """The log-space solver against the water-filling specification on rates e^{η(ρ − max ρ)} above 1e-250."""
    a, n, b = p["a"], p["n"], p["budget"]
    density = a / n
    if density.max() == 0:
        return
    eta = eta / density.max()
    rates = np.exp(eta * (density - density.max()))
    if rates.min() < 1e-250:
        return
    np.testing.assert_allclose(kl_deficit_inclusion(a, n, b, eta), waterfill(rates, n, b), rtol=1e-9, atol=1e-12)


def test_kl_deficit_inclusion_limits_on_a_fixed_instance() -> None:
    """η = 0 is the uniform design δ; a huge η and η = ∞ are the greedy (1, 1/4, 1, 0) of a = (5, 1, 3, 0)."""
    a, n, b = np.array([5.0, 1.0, 3.0, 0.0]), np.array([1.0, 2.0, 1.0, 1.0]), 2.5
    np.testing.assert_allclose(kl_deficit_inclusion(a, n, b, 0.0), 0.5)
    greedy = np.array([1.0, 0.25, 1.0, 0.0])
    np.testing.assert_array_equal(deficit_optimal_inclusion(a, n, b), greedy)
    for eta in (1e6, 1e300, math.inf):
        np.testing.assert_allclose(kl_deficit_inclusion(a, n, b, eta), greedy, atol=1e-12)


@pytest.mark.parametrize(("kwargs", "name"), BAD)
@pytest.mark.parametrize("fn", [deficit_optimal_inclusion, optimal_deficit])
def test_deficit_bad_input_raises_value_error_naming_the_argument(fn: object, kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        fn(**kwargs)  # type: ignore[operator]


@pytest.mark.parametrize(("kwargs", "name"), BAD + [(dict(sq_norms=[1.0], sizes=[1], budget=1, eta=-1.0), "eta"),
                                                   (dict(sq_norms=[1.0], sizes=[1], budget=1, eta=math.nan), "eta")])
def test_kl_deficit_bad_input_raises_value_error_naming_the_argument(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        kl_deficit_inclusion(**{"eta": 1.0, **kwargs})
