"""Properties of misa_theory.sampler.ModuleSampler: hard budget, determinism, resumable state, marginals = π.

Marginals: misa_theory.budget_draw documents that draws of the π rules are π-exact except in the one size class
left fractional by the pipage rounding when the budget is saturated, whose members are short by a relative bias
of at most f_s/E_s (E_s = Σ π over the class's non-forced members, f_s its fractional part). Layer rules over
equal layers are exact. The tests check exactness where it is claimed and the documented bound elsewhere.
The paper's ``misa`` rule has no π design; its tests check the authors' forced picks, the cap and the budget.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from scipy import stats

from misa_theory.sampler import EXPONENT_CAP, RULES, ModuleSampler

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
        if args["rule"] != "misa":
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
    if args["rule"] != "misa":
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


@given(sampler_args(rules=("misa_norm", "optimal", "uniform", "lisa"), max_modules=8))
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


@pytest.mark.parametrize("rule", ["misa_norm", "optimal", "uniform"])
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
                   "can get π = 0, ignoring min_inclusion (sizes [2,2,3], budget 3, misa_norm); needs hull-aware "
                   "targets")
def test_min_inclusion_keeps_every_reachable_module_drawable() -> None:
    s = ModuleSampler([2, 2, 3], delta=3.5 / 7, rule="misa_norm", seed=0, explore=False, min_inclusion=0.05)
    s.observe(np.arange(3), np.array([3.0, 4.0, 2.0]))
    assert s.budget == 3
    assert np.all(s.target_inclusion() >= 0.05 - 1e-12), s.target_inclusion()


@given(sampler_args(rules=("misa", "misa_norm", "optimal"), max_modules=8))
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
    (dict(sizes=[10, 20], delta=0.5, lru_picks=-1), "lru_picks"),
    (dict(sizes=[10, 20], delta=0.5, streams=0), "streams"),
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


# ---------------------------------------------------------------- the paper's rule (misa): the authors' draw
@given(sampler_args(rules=("misa",), max_modules=10))
def test_misa_tries_every_never_used_module_before_the_fill(args: dict) -> None:
    """Each draw holds exactly the never-used modules that first-fit in index order takes; repeats only fill
    what is left.  So every module that fits is used before any module is drawn while one is still unused."""
    s = ModuleSampler(**{**args, "explore": True}, lru_picks=0)
    feed = np.random.default_rng(0)
    for _ in range(12):
        unused = np.flatnonzero(np.asarray(s.state_dict()["last_used"][0]) == -1)
        left, first_fit = s.budget, []
        for b in unused:
            if s.sizes[b] <= left:
                first_fit.append(b)
                left -= s.sizes[b]
        idx = s.draw()
        np.testing.assert_array_equal(np.intersect1d(idx, unused), first_fit)
        assert s.sizes[np.setdiff1d(idx, unused)].sum() <= left
        s.observe(idx, _norms(feed, idx.size))


def test_misa_uses_every_module_once_before_any_repeat() -> None:
    """Equal modules, a budget of three: seven draws use 21 modules once each, no repeat before that."""
    s = ModuleSampler(np.full(21, 10), delta=30.5 / 210, rule="misa", seed=0)
    seen = np.concatenate([s.draw() for _ in range(7)])
    np.testing.assert_array_equal(np.sort(seen), np.arange(21))
    assert not s.exploring


def test_misa_tries_never_used_modules_in_index_order() -> None:
    s = ModuleSampler([10] * 6, delta=30.5 / 60, rule="misa", seed=0, lru_picks=0)
    np.testing.assert_array_equal(s.draw(), [0, 1, 2])
    np.testing.assert_array_equal(s.draw(), [3, 4, 5])


def test_misa_least_recently_used_picks_come_first() -> None:
    """After every module was used, the lru_picks modules drawn longest ago are in every draw, ties by index,
    even when their weight is negligible."""
    sizes = np.full(8, 10)
    s = ModuleSampler(sizes, delta=30.5 / 80, rule="misa", seed=1, lru_picks=2, eta=1.0)
    s.observe(np.arange(8), np.array([0.0, 0.0, 0.0, 0.0, 5.0, 5.0, 5.0, 5.0]))  # all used, at draw 0
    for _ in range(20):
        before = s.state_dict()["last_used"][0]
        order = sorted(range(8), key=lambda b: (before[b], b))
        idx = s.draw()
        assert set(order[:2]) <= set(idx.tolist()), (order, idx)
        assert idx.size == 3


def test_misa_fill_is_weighted_by_the_capped_exponent() -> None:
    """p_b ∝ exp(min(5, η·G_b²)): scores above 5/η all weigh e⁵, so the fill cannot tell them apart."""
    s = ModuleSampler(np.full(4, 10), delta=10.5 / 40, rule="misa", seed=2, lru_picks=0, eta=1.0)
    s.observe(np.arange(4), np.array([0.0, 2.0, 6.0, 600.0]))
    p = s.selection_weights()
    np.testing.assert_allclose(p, np.exp([0.0, 2.0, EXPONENT_CAP, EXPONENT_CAP]) / np.exp(
        [0.0, 2.0, EXPONENT_CAP, EXPONENT_CAP]).sum())
    counts = np.zeros(4)
    r = 4000
    for _ in range(r):
        counts[s.draw()] += 1
    for b in range(4):  # one module per draw, drawn ∝ p
        assert _binomial_ok(int(counts[b]), r, p[b], p[b]), (counts, p)


def test_misa_has_no_closed_form_inclusion() -> None:
    s = ModuleSampler([10, 20, 30], delta=0.5, rule="misa")
    s.draw()
    assert s.last_inclusion is None
    with pytest.raises(ValueError, match="misa"):
        s.target_inclusion()


def test_misa_skips_a_tried_module_that_does_not_fit() -> None:
    """A forced module larger than what is left is skipped for this draw, never squeezed in over budget."""
    s = ModuleSampler([30, 20, 20, 10], delta=35.5 / 80, rule="misa", seed=0, lru_picks=0)
    idx = s.draw()  # tries 0 (30 fits), 1 (20 > 5), 2 (20 > 5), 3 (10 > 5)
    np.testing.assert_array_equal(idx, [0])
    np.testing.assert_array_equal(s.draw(), [1, 3])  # 1 fits, 2 does not (15 left), 3 does


# ---------------------------------------------------------------- load_state_dict refuses bad state by name
@pytest.mark.parametrize(("key", "value"), [
    ("ema", "oops"), ("ema", [[1.0, float("nan"), 0.0]]), ("ema", [[1.0, -2.0, 0.0]]), ("ema", [[1.0, 2.0]]),
    ("count", [[0, 1.5, 0]]), ("count", [[0, -1, 0]]), ("count", None), ("last_used", [[0, 0, -7]]),
    ("cycle_pos", "x"), ("n_draws", -3), ("n_draws", [1, 2]), ("cycle", 5), ("last_inclusion", [[0.5, 2.0, 0]]),
    ("rng", {"bit_generator": "nope"}), ("rng", 17),
])
def test_load_state_dict_names_a_bad_field(key: str, value: object) -> None:
    s = ModuleSampler([10, 20, 30], delta=0.5, rule="optimal")
    s.draw()
    state = json.loads(json.dumps(s.state_dict()))
    state[key] = value
    with pytest.raises(ValueError, match=key):
        ModuleSampler([10, 20, 30], delta=0.5, rule="optimal").load_state_dict(state)


def test_load_state_dict_refuses_a_non_dict() -> None:
    with pytest.raises(ValueError, match="dict"):
        ModuleSampler([10, 20, 30], delta=0.5).load_state_dict([1, 2])


def _first_fit_reference(keys: np.ndarray, sizes: np.ndarray, budget: int) -> np.ndarray:
    """Each row's modules in increasing key order, each taken while it fits what is left: the plain loop."""
    want = np.zeros(keys.shape, dtype=bool)
    for r, row in enumerate(keys):
        left = budget
        for b in np.argsort(row):
            if sizes[b] <= left:
                want[r, b] = True
                left -= sizes[b]
    return want


@given(st.integers(1, 60), st.integers(1, 4), st.sampled_from(["misa", "misa_norm"]), st.data())
def test_a_fill_takes_modules_in_key_order_while_they_fit(n: int, rows: int, rule: str, data: st.DataObject) -> None:
    """The documented fills, against the plain loop over the whole order, with up to 60 modules so that rows pass
    many modules too large to fit (the order is turned into Python ints a chunk at a time): misa's first draw
    without tried modules is the Plackett–Luce order of keys E_b/p_b (E_b ~ Exp(1), all p_b equal before any
    score); misa_norm's first draw explores, packing every module in a uniformly random order."""
    sizes = np.array(data.draw(st.lists(st.sampled_from([1, 7, 40]), min_size=n, max_size=n)), dtype=np.int64)
    budget = data.draw(st.integers(int(sizes.min()), int(sizes.sum())))
    total = 2 * int(sizes.sum())
    seed = data.draw(st.integers(0, 2**31))
    s = ModuleSampler(sizes, delta=(budget + 0.5) / total, total_params=total, rule=rule, seed=seed, streams=rows,
                      explore=rule == "misa_norm", lru_picks=0)
    assert s.budget == budget
    rng = np.random.default_rng(seed)  # the sampler's own generator, as documented
    keys = rng.standard_exponential((rows, n)) if rule == "misa" else rng.random((rows, n))
    np.testing.assert_array_equal(s.draw_mask(), _first_fit_reference(keys, sizes, budget))
