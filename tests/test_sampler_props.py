"""Properties of misa_theory.sampler.ModuleSampler: hard budget, determinism, resumable state, marginals = π.

Marginals: the sampler's docstring documents that draws are π-exact except in the one size class left
fractional by the pipage rounding when the budget is saturated, whose members are short by a relative bias
of at most f_s/E_s (E_s = Σ π over the class's non-forced members, f_s its fractional part). Layer rules over
equal layers are exact. The tests check exactness where it is claimed and the documented bound elsewhere.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from scipy import stats

from misa_theory.sampler import RULES, ModuleSampler

LAYER_RULES = ("lisa", "badam")
# Per-module binomial tests per run: Bonferroni over ≤ 500 examples × ≤ 10 modules keeps the family-wise
# false-alarm rate under 1e-3 (and the derandomised profile fixes the cases, so a pass is reproducible).
ALPHA = 1e-3 / (500 * 10)


@st.composite
def sampler_args(draw: st.DrawFn, rules: tuple[str, ...] = RULES, max_modules: int = 10) -> dict:
    """Constructor arguments with a few size classes (as in transformers), random layers and a feasible delta."""
    m = draw(st.integers(1, max_modules))
    classes = draw(st.lists(st.integers(1, 300), min_size=1, max_size=3, unique=True))
    sizes = np.array(draw(st.lists(st.sampled_from(classes), min_size=m, max_size=m)), dtype=np.int64)
    groups = np.array(draw(st.lists(st.integers(0, 3), min_size=m, max_size=m)))
    rule = draw(st.sampled_from(rules))
    unit = np.bincount(np.unique(groups, return_inverse=True)[1], sizes) if rule in LAYER_RULES else sizes
    total = int(sizes.sum()) + draw(st.integers(0, 500))
    lo = int(unit.min())
    budget = draw(st.integers(lo, max(lo, int(sizes.sum()))))
    return dict(
        sizes=sizes, groups=groups, rule=rule, total_params=total, delta=min(1.0, (budget + 0.5) / total),
        seed=draw(st.integers(0, 2**32 - 1)), eta=draw(st.floats(0.0, 5.0)),
        ema_beta=draw(st.floats(0.0, 0.99)), explore=draw(st.booleans()),
    )


def _norms(rng: np.random.Generator, k: int) -> np.ndarray:
    return rng.gamma(0.5, 10.0, size=k) * (rng.random(k) > 0.1)


def _run(s: ModuleSampler, draws: int, feed: np.random.Generator) -> list[np.ndarray]:
    out = []
    for _ in range(draws):
        idx = s.draw()
        out.append(idx)
        s.observe(idx, _norms(feed, idx.size))
    return out


@given(sampler_args())
def test_never_over_budget_and_well_formed(args: dict) -> None:
    s = ModuleSampler(**args)
    assert s.budget == int(np.floor(args["delta"] * args["total_params"])) or args["rule"] in LAYER_RULES
    assert s.budget <= args["delta"] * args["total_params"]
    feed = np.random.default_rng(0)
    for _ in range(15):
        pi = s.target_inclusion()
        assert pi.shape == (s.n_modules,) and np.all(pi >= -1e-12) and np.all(pi <= 1 + 1e-12)
        assert float(np.sum(pi * s.sizes)) <= s.budget * (1 + 1e-9)
        idx = s.draw()
        assert idx.dtype == np.int64 and idx.ndim == 1
        assert np.all(np.diff(idx) > 0) and (idx.size == 0 or (idx[0] >= 0 and idx[-1] < s.n_modules))
        assert int(s.sizes[idx].sum()) <= s.budget
        if args["rule"] in LAYER_RULES:  # whole layers only
            gid = s.groups
            chosen = np.zeros(s.n_modules, bool)
            chosen[idx] = True
            for g in np.unique(gid[idx]):
                assert chosen[gid == g].all()
        s.observe(idx, _norms(feed, idx.size))
        assert np.all(s.scores >= 0)


@given(sampler_args())
def test_same_seed_same_draws(args: dict) -> None:
    a, b = ModuleSampler(**args), ModuleSampler(**args)
    ra, rb = _run(a, 10, np.random.default_rng(1)), _run(b, 10, np.random.default_rng(1))
    for x, y in zip(ra, rb, strict=True):
        np.testing.assert_array_equal(x, y)


@given(sampler_args(), st.integers(0, 8))
def test_state_dict_round_trip_through_json(args: dict, warm: int) -> None:
    """Save mid-run (after ``warm`` draws), reload through JSON into a fresh sampler seeded differently:
    the next 20 draws, scores and targets are identical."""
    s = ModuleSampler(**args)
    feed = np.random.default_rng(2)
    _run(s, warm, feed)
    state = json.loads(json.dumps(s.state_dict()))
    fresh = ModuleSampler(**{**args, "seed": args["seed"] + 1})
    fresh.load_state_dict(state)
    f1, f2 = np.random.default_rng(3), np.random.default_rng(3)
    for x, y in zip(_run(s, 20, f1), _run(fresh, 20, f2), strict=True):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(s.scores, fresh.scores)
    np.testing.assert_array_equal(s.target_inclusion(), fresh.target_inclusion())
    np.testing.assert_array_equal(s.last_inclusion, fresh.last_inclusion)


def test_state_dict_refuses_another_sampler() -> None:
    s = ModuleSampler([10, 20, 30], delta=0.5, rule="misa")
    with pytest.raises(ValueError):
        ModuleSampler([10, 20, 30], delta=0.5, rule="optimal").load_state_dict(s.state_dict())
    with pytest.raises(ValueError):
        ModuleSampler([10, 20, 31], delta=0.5, rule="misa").load_state_dict(s.state_dict())


def _class_bias_bound(s: ModuleSampler, pi: np.ndarray) -> np.ndarray:
    """Documented relative bias per module: f_s/E_s for the units of a size class whose expected count is fractional.

    Units are modules for module-wise rules and whole layers for layer rules (equal layers form one class whose
    budget is rounded to whole layers, so they come out exact; unequal layers get the same bound as modules).
    """
    layer = s.rule in LAYER_RULES
    unit_of = np.unique(s.groups, return_inverse=True)[1] if layer else np.arange(s.n_modules)
    unit_size = np.bincount(unit_of, s.sizes)
    unit_pi = np.zeros(unit_size.size)
    unit_pi[unit_of] = pi
    bound = np.zeros(unit_size.size)
    rest = (unit_pi > 1e-9) & (unit_pi < 1 - 1e-9)
    for size in np.unique(unit_size[rest]):
        members = rest & (unit_size == size)
        e = float(unit_pi[members].sum())
        f = e - np.floor(e + 1e-9)
        if f > 1e-9:
            bound[members] = f / e
    return bound[unit_of]


def _binomial_ok(count: int, r: int, p_lo: float, p_hi: float) -> bool:
    """Two-sided exact binomial test that the success probability lies in [p_lo, p_hi]."""
    p_lo, p_hi = max(0.0, p_lo), min(1.0, p_hi)
    upper_tail = stats.binom.sf(count - 1, r, p_hi)  # P(X ≥ count | p_hi)
    lower_tail = stats.binom.cdf(count, r, p_lo)  # P(X ≤ count | p_lo)
    return bool(upper_tail >= ALPHA / 2 and lower_tail >= ALPHA / 2)


@given(sampler_args(rules=("misa", "optimal", "uniform", "lisa"), max_modules=8))
def test_inclusion_frequencies_match_target(args: dict) -> None:
    """With fixed scores, R draws hit each module with frequency π_b (exact binomial test, documented bias)."""
    args = {**args, "explore": False}
    s = ModuleSampler(**args)
    score = np.random.default_rng(args["seed"] % 1000).gamma(0.7, 5.0, s.n_modules) + 1e-3
    s.observe(np.arange(s.n_modules), score)
    pi = s.target_inclusion()
    r = 50
    counts = np.zeros(s.n_modules, dtype=np.int64)
    for _ in range(r):
        counts[s.draw()] += 1
    np.testing.assert_allclose(s.last_inclusion, pi, rtol=0, atol=1e-12)
    bias = _class_bias_bound(s, pi)
    for b in range(s.n_modules):
        assert _binomial_ok(int(counts[b]), r, pi[b] * (1 - bias[b]), pi[b] * (1 + bias[b])), (b, counts, pi, bias)


def _frequencies(s: ModuleSampler, r: int) -> np.ndarray:
    counts = np.zeros(s.n_modules)
    for _ in range(r):
        counts[s.draw()] += 1
    return counts / r


def _llama_like(layers: int) -> tuple[np.ndarray, np.ndarray]:
    # q, k, v, o, gate, up, down of a scaled-down GQA transformer (hidden 64, kv 16, mlp 224).
    per_layer = [64 * 64, 64 * 16, 64 * 16, 64 * 64, 64 * 224, 64 * 224, 64 * 224]
    return np.tile(per_layer, layers).astype(np.int64), np.repeat(np.arange(layers), 7)


@pytest.mark.parametrize("rule", ["misa", "optimal", "uniform"])
def test_high_power_marginals_on_a_transformer_shape(rule: str) -> None:
    """8k draws on 4 layers × 7 modules: every module within z ≤ 5 of π, allowing only the documented bias."""
    sizes, groups = _llama_like(4)
    s = ModuleSampler(sizes, groups, delta=0.2, rule=rule, seed=11, explore=False)
    a = np.random.default_rng(5).gamma(1.0, 1.0, sizes.size) * sizes
    s.observe(np.arange(sizes.size), a)
    pi = s.target_inclusion()
    r = 8_000
    freq = _frequencies(s, r)
    bias = _class_bias_bound(s, pi)
    se = np.sqrt(np.maximum(pi * (1 - pi), 1e-12) / r)
    excess = np.maximum(np.abs(freq - pi) - bias * pi, 0.0)
    assert np.all(excess <= 5 * se + 1e-12), np.round((freq - pi) / se, 1)


def test_high_power_marginals_exact_for_equal_sizes() -> None:
    """Equal sizes and a whole-module budget: no fractional class, so frequencies must equal π (z ≤ 5)."""
    sizes = np.full(12, 100)
    s = ModuleSampler(sizes, delta=(500 + 0.5) / 1200, rule="optimal", seed=4, explore=False)
    s.observe(np.arange(12), np.linspace(1.0, 40.0, 12) ** 2)
    pi = s.target_inclusion()
    assert abs(float(pi.sum()) - 5.0) < 1e-9
    r = 10_000
    freq = _frequencies(s, r)
    se = np.sqrt(np.maximum(pi * (1 - pi), 1e-12) / r)
    assert np.all(np.abs(freq - pi) <= 5 * se + 1e-12), np.round((freq - pi) / se, 1)


def test_lisa_equal_layers_exact() -> None:
    sizes, groups = _llama_like(6)
    s = ModuleSampler(sizes, groups, delta=0.34, rule="lisa", seed=2)
    pi = s.target_inclusion()
    freq = _frequencies(s, 10_000)
    se = np.sqrt(np.maximum(pi * (1 - pi), 1e-12) / 10_000)
    assert s.budget % int(sizes[:7].sum()) == 0
    assert np.all(np.abs(freq - pi) <= 5 * se + 1e-12)


def test_badam_frequency_equals_target() -> None:
    """Regression: a pass that wraps mid-draw used to cut the draw short (frequency 0.413 for a 3/7 target)."""
    s = ModuleSampler([10] * 7, delta=(30 + 0.5) / 70, rule="badam", seed=1)
    pi = s.target_inclusion()
    freq = _frequencies(s, 10_000)
    np.testing.assert_allclose(freq, pi, atol=0.003)


def test_badam_target_at_most_one() -> None:
    s = ModuleSampler([1, 3], delta=0.5, rule="badam")
    assert np.all(s.target_inclusion() <= 1.0), s.target_inclusion()


def test_badam_visits_every_layer_once_per_pass() -> None:
    s = ModuleSampler([10] * 7, delta=(30 + 0.5) / 70, rule="badam", seed=1)
    seen = np.concatenate([s.draw() for _ in range(7)])
    counts = np.bincount(seen, minlength=7)
    assert counts.max() - counts.min() <= 1


@pytest.mark.xfail(strict=True, reason="Known limitation (docs/sampler.md): per-class capacities are "
                   "applied one class at a time, so when the budget is tight against module sizes a reachable class "
                   "can get π = 0, ignoring min_inclusion (sizes [2,2,3], budget 3, misa); needs hull-aware targets")
def test_min_inclusion_keeps_every_reachable_module_drawable() -> None:
    s = ModuleSampler([2, 2, 3], delta=3.5 / 7, rule="misa", seed=0, explore=False, min_inclusion=0.05)
    s.observe(np.arange(3), np.array([3.0, 4.0, 2.0]))
    assert s.budget == 3
    assert np.all(s.target_inclusion() >= 0.05 - 1e-12), s.target_inclusion()


@given(sampler_args(rules=("misa", "optimal"), max_modules=8))
def test_exploration_visits_every_reachable_module_first(args: dict) -> None:
    args = {**args, "explore": True}
    s = ModuleSampler(**args)
    reachable = s.sizes <= s.budget
    seen = np.zeros(s.n_modules, bool)
    feed = np.random.default_rng(0)
    for _ in range(s.n_modules):
        if not s.exploring:
            break
        idx = s.draw()
        assume(idx.size > 0)
        seen[idx] = True
        s.observe(idx, _norms(feed, idx.size))
    assert not s.exploring
    assert seen[reachable].all()


BAD_CTOR = [
    (dict(sizes=[]), "sizes"),
    (dict(sizes=[10, 0]), "sizes"),
    (dict(sizes=[10, -5]), "sizes"),
    (dict(sizes=[10, float("nan")]), "sizes"),
    (dict(sizes=[10, 2.5]), "sizes"),
    (dict(sizes=[10, 20], groups=[0]), "groups"),
    (dict(sizes=[10, 20], rule="nope"), "rule"),
    (dict(sizes=[10, 20], delta=0.0), "delta"),
    (dict(sizes=[10, 20], delta=1.5), "delta"),
    (dict(sizes=[10, 20], delta=float("nan")), "delta"),
    (dict(sizes=[10, 20], delta=0.1), "delta"),  # budget 3 < smallest module 10
    (dict(sizes=[10, 20], total_params=5), "total_params"),
    (dict(sizes=[10, 20], delta=0.5, eta=-1.0), "eta"),
    (dict(sizes=[10, 20], delta=0.5, eta=float("nan")), "eta"),
    (dict(sizes=[10, 20], delta=0.5, ema_beta=1.0), "ema_beta"),
    (dict(sizes=[10, 20], delta=0.5, min_inclusion=-0.1), "min_inclusion"),
    (dict(sizes=[10, 10], delta=0.5, min_inclusion=0.9), "min_inclusion"),
]


@pytest.mark.parametrize(("kwargs", "name"), BAD_CTOR)
def test_bad_constructor_input_names_the_argument(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        ModuleSampler(**kwargs)


@pytest.mark.parametrize(
    ("idx", "norms", "name"),
    [([0, 1], [1.0, -1.0], "sq_norms"), ([0, 1], [1.0, float("nan")], "sq_norms"), ([0, 1], [1.0], "sq_norms"),
     ([0, 5], [1.0, 1.0], "indices"), ([0, 0], [1.0, 1.0], "indices"), ([-1], [1.0], "indices")],
)
def test_bad_observe_input_names_the_argument(idx: list, norms: list, name: str) -> None:
    s = ModuleSampler([10, 20, 30], delta=0.5)
    with pytest.raises(ValueError, match=name):
        s.observe(idx, norms)
