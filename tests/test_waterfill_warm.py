"""The sampler's two shortcuts change its cost, never its result.

* ``waterfill_rows_floor0(..., warm=C)`` starts the capped-set iteration from a guess of the capped set; any
  guess (right, wrong, empty, everything) must give the same bits as no guess.
* ``ModuleSampler`` keeps each target pass's capped set from the last draw as that guess and looks up the
  bookkeeping of passes in which every stream takes out the same classes; a sampler without either (its
  guesses thrown away before every draw, its bookkeeping per row) must give the same targets and draws.

Also the regression for the closed form's 0·inf: a capped unit that takes the whole budget next to rates so
small that r/t overflows gave π = NaN.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from misa_theory.sampler import ModuleSampler
from misa_theory.waterfill_rows import waterfill_rows_floor0, waterfill_sorted

from .test_sampler_props import _llama_like, sampler_args


def _problem(seed: int, R: int, U: int, kind: str, rows: str = "plain") -> tuple[np.ndarray, np.ndarray, float]:
    """Rates (R, U), sizes and a budget.  ``rows``: "spend" zeroes rates in row 0 until its positive units fit
    the budget whole (π = 1 on them), "dead" zeroes row 0 (a settled row of a later pass: π = 0)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 60, U).astype(float)
    if kind == "spread":  # a few dominant rates: several units capped
        rates = np.exp(rng.normal(0.0, 3.0, (R, U)))
    elif kind == "coarse":  # ties
        rates = np.round(rng.random((R, U)), 1) + 0.05
    elif kind == "equal":  # every rate tied (η = 0, or scores equal): μ·r lands on 1 within rounding
        rates = np.full((R, U), 0.7)
    else:  # rates down to the subnormal range, as exp(η·s) gives for large η
        rates = np.exp(-rng.integers(0, 750, (R, U)).astype(float))
    budget = float(rng.uniform(0.05, 0.95) * sizes.sum())
    if rows == "spend":  # row 0's positive units take exactly the budget (the tie that rounding may blur)
        budget = float(np.cumsum(sizes)[rng.integers(0, U - 1)])
        rates[0, np.cumsum(sizes) > budget] = 0.0
    elif rows == "dead" and R > 1:
        rates[0] = 0.0
    return rates, sizes, budget


@settings(max_examples=400, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), R=st.integers(1, 6), U=st.integers(2, 40),
       kind=st.sampled_from(["spread", "coarse", "tiny", "equal"]),
       guess=st.sampled_from(["true", "random", "all", "none"]), rows=st.sampled_from(["plain", "spend", "dead"]))
def test_any_warm_start_gives_the_cold_bits(seed: int, R: int, U: int, kind: str, guess: str, rows: str) -> None:
    rates, sizes, budget = _problem(seed, R, U, kind, rows)
    cold = waterfill_rows_floor0(rates, sizes, budget)
    assert np.all(np.isfinite(cold)) and np.all((cold >= 0) & (cold <= 1))
    spends = (rates > 0) @ sizes <= budget  # these rows take all their positive units and no more
    np.testing.assert_allclose(cold[~spends] @ sizes, budget, rtol=1e-9)
    np.testing.assert_allclose(cold[spends], (rates[spends] > 0).astype(float), rtol=1e-12)
    rng = np.random.default_rng(seed + 1)
    warm = {"true": cold >= 1.0, "random": rng.random((R, U)) < 0.3, "all": np.ones((R, U), dtype=bool),
            "none": np.zeros((R, U), dtype=bool)}[guess]
    np.testing.assert_array_equal(waterfill_rows_floor0(rates, sizes, budget, warm), cold)


def test_a_capped_unit_that_takes_the_whole_budget_next_to_subnormal_rates_is_not_nan() -> None:
    """exp(−720) ≈ 2e−313 beside a rate of 1 whose unit is exactly the budget: π = 1 there, 0 elsewhere."""
    sizes = np.array([15.0, 6.0, 10.0, 58.0, 41.0, 9.0, 37.0] * 5)
    rates = np.full((1, sizes.size), np.exp(-720.0))
    rates[0, 7] = 1.0  # a unit of size 15
    want = np.zeros((1, sizes.size))
    want[0, 7] = 1.0
    np.testing.assert_array_equal(waterfill_sorted(rates, sizes, np.array([15.0])), want)
    np.testing.assert_array_equal(waterfill_rows_floor0(rates, sizes, 15.0), want)


def test_a_capped_unit_that_takes_the_whole_budget_ahead_of_far_smaller_rates_keeps_it() -> None:
    """The same tie with rates 1e35 times smaller behind the capped unit (not subnormal): r/t stays finite, so
    rem = 0 gave the capped unit π = 0·(r/t) = 0 and the whole target was 0, where π = (1, ≈0) spends it."""
    rates = np.array([[5.10908903e-12, 1.24794646e-47]])
    sizes = np.array([28.0, 31.0])
    want = np.array([[1.0, 0.0]])
    np.testing.assert_array_equal(waterfill_sorted(rates, sizes, np.array([28.0])), want)
    np.testing.assert_array_equal(waterfill_rows_floor0(rates, sizes, 28.0), want)


def test_a_sharp_misa_sampler_keeps_drawing_the_module_that_fills_its_budget() -> None:
    """η = 20 and one module far ahead whose size is the whole budget: its rivals' rates are ~1e-52 of its
    own.  The sampler used to aim for π = 0 everywhere and draw empty sets for ever."""
    sizes = np.array([28, 14, 14, 14, 14, 14])
    s = ModuleSampler(sizes, delta=28 / sizes.sum() + 1e-12, rule="misa", eta=20.0, explore=False, seed=0)
    assert s.budget == 28
    s.observe(np.arange(6), np.array([100.0] + [1e-9] * 5))
    np.testing.assert_array_equal(s.target_inclusion(), [1.0, 0, 0, 0, 0, 0])
    assert all(s.draw().tolist() == [0] for _ in range(5))


def _feed(rng: np.random.Generator, shape: tuple[int, ...], spread: float) -> np.ndarray:
    return np.exp(rng.normal(0.0, spread, shape))


@settings(max_examples=40, deadline=None)
@given(sampler_args(rules=("misa", "optimal", "uniform", "lisa")), st.integers(1, 5), st.floats(0.5, 4.0))
def test_sampler_with_its_shortcuts_equals_one_without(args: dict, S: int, spread: float) -> None:
    a, b = ModuleSampler(**args, streams=S), ModuleSampler(**args, streams=S)
    b._share_passes = False  # every pass's bookkeeping per row
    rng = np.random.default_rng(3)
    for _ in range(12):
        b._warm.clear()  # no warm start
        np.testing.assert_array_equal(a.target_inclusion(), b.target_inclusion())
        b._warm.clear()
        ma, mb = a.draw(), b.draw()
        np.testing.assert_array_equal(ma, mb)
        np.testing.assert_array_equal(a.last_inclusion, b.last_inclusion)
        x = _feed(rng, ma.shape, spread)
        a.observe(ma, x)
        b.observe(mb, x)


def test_transformer_shape_run_reuses_warm_sets_and_matches_a_cold_sampler() -> None:
    """A long misa run at δ = 3% on a transformer layout (the largest class over capacity in every stream):
    the warm start and the shared bookkeeping are in use, and every draw equals a cold sampler's."""
    sizes, groups = _llama_like(6)
    kw = dict(delta=0.03, rule="misa", seed=5, streams=8)
    a, b = ModuleSampler(sizes, groups, **kw), ModuleSampler(sizes, groups, **kw)
    b._share_passes = False
    rng = np.random.default_rng(9)
    for _ in range(300):
        b._warm.clear()
        ma, mb = a.draw(), b.draw()
        np.testing.assert_array_equal(ma, mb)
        np.testing.assert_array_equal(a.last_inclusion, b.last_inclusion)
        x = _feed(rng, ma.shape, 2.0) * sizes
        a.observe(ma, x)
        b.observe(mb, x)
    assert a._warm and any(np.count_nonzero(w) for w in a._warm.values())
    assert a._shared_pass  # some pass took the same classes out of every stream
    assert any(v is not None for v in a._shared_end.values())  # and then rows ended by the look-up table
