"""ModuleSampler(streams=S): S independent samplers as one object (draw_mask / observe_mask).

Checks the same guarantees as tests/test_sampler_props.py on the stream axis: never over budget, marginals
= π (up to the documented leftover-class bias), deterministic under a seed, JSON state round trip, and that
the single-stream API (draw / observe) is the S = 1 case of the same code.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import misa_theory.simulate as sim
from misa_theory.problems import make_problem
from misa_theory.sampler import ModuleSampler
from misa_theory.sim_config import SimConfig
from misa_theory.simulate import simulate

from .test_sampler_props import _class_bias_bound, _llama_like, sampler_args


def _feed(s: ModuleSampler, mask: np.ndarray, rng: np.random.Generator) -> None:
    x = rng.gamma(0.5, 10.0, mask.shape) * (rng.random(mask.shape) > 0.1)
    s.observe_mask(mask, x)


@settings(max_examples=60)
@given(sampler_args(), st.integers(1, 4))
def test_streams_never_over_budget_and_whole_layers(args: dict, S: int) -> None:
    s = ModuleSampler(**args, streams=S)
    if args["rule"] == "badam":
        unit = np.bincount(np.unique(args["groups"], return_inverse=True)[1], args["sizes"])
        reach = unit[unit <= s.budget]
        if s.budget // reach.max() > reach.size:  # known badam width bug (xfail in test_sampler_props)
            return
    rng = np.random.default_rng(0)
    assert s.n_streams == S
    for _ in range(10):
        if args["rule"] != "misa":
            pi = s.target_inclusion()
            assert pi.shape == (S, s.n_modules)
            assert np.all((pi * s.sizes).sum(axis=1) <= s.budget * (1 + 1e-9))
        mask = s.draw_mask()
        assert mask.dtype == bool and mask.shape == (S, s.n_modules)
        assert np.all(mask @ s.sizes <= s.budget)
        if args["rule"] in ("lisa", "badam"):
            for row in mask:
                for g in np.unique(s.groups[row]):
                    assert row[s.groups == g].all()
        _feed(s, mask, rng)
        assert s.scores.shape == (S, s.n_modules) and np.all(s.scores >= 0)


@settings(max_examples=40)
@given(sampler_args())
def test_single_stream_is_the_one_stream_case(args: dict) -> None:
    """streams=None and streams=1 run the same code: same seed, same observations -> the same sets and π."""
    a, b = ModuleSampler(**args), ModuleSampler(**args, streams=1)
    fa, fb = np.random.default_rng(7), np.random.default_rng(7)
    for _ in range(8):
        idx, mask = a.draw(), b.draw_mask()
        np.testing.assert_array_equal(idx, np.flatnonzero(mask[0]))
        if a.last_inclusion is None:
            assert b.last_inclusion is None
        else:
            np.testing.assert_array_equal(a.last_inclusion, b.last_inclusion[0])
        x = fa.gamma(0.5, 10.0, a.n_modules)
        fb.gamma(0.5, 10.0, a.n_modules)
        a.observe(idx, x[idx])
        b.observe_mask(mask, x[None, :])
        np.testing.assert_array_equal(a.scores, b.scores[0])
        if a.rule != "misa":
            np.testing.assert_array_equal(a.target_inclusion(), b.target_inclusion()[0])


@settings(max_examples=30)
@given(sampler_args(rules=("misa_norm", "optimal", "uniform", "lisa")), st.integers(2, 4))
def test_each_stream_targets_what_a_single_sampler_would(args: dict, S: int) -> None:
    """Row s's π depends only on row s's observations (the vectorised water-filling and capacities per row)."""
    s = ModuleSampler(**args, streams=S)
    rng = np.random.default_rng(1)
    mask = rng.random((S, s.n_modules)) < 0.6
    x = rng.gamma(0.5, 10.0, (S, s.n_modules))
    s.observe_mask(mask, x)
    pi = s.target_inclusion()
    for r in range(S):
        one = ModuleSampler(**args)
        one.observe(np.flatnonzero(mask[r]), x[r, mask[r]])
        np.testing.assert_allclose(pi[r], one.target_inclusion(), rtol=0, atol=1e-12)


def test_same_seed_same_masks_and_streams_differ() -> None:
    sizes, groups = _llama_like(4)
    runs = []
    for _ in range(2):
        s = ModuleSampler(sizes, groups, delta=0.2, rule="misa", seed=3, streams=6)
        rng = np.random.default_rng(0)
        out = []
        for _ in range(30):
            mask = s.draw_mask()
            out.append(mask)
            _feed(s, mask, rng)
        runs.append(np.stack(out))
    np.testing.assert_array_equal(runs[0], runs[1])
    assert len({runs[0][:, r].tobytes() for r in range(6)}) == 6


@pytest.mark.parametrize("rule", ["misa_norm", "optimal", "uniform", "lisa"])
def test_stream_marginals_match_target(rule: str) -> None:
    """40 streams × 250 draws with fixed scores: each stream's frequency within z ≤ 5 of its own π
    (documented bias allowed), pooled over streams that share π."""
    sizes, groups = _llama_like(4)
    S, r = 40, 250
    delta = 0.41 if rule == "lisa" else 0.2  # a layer is a quarter of this model
    s = ModuleSampler(sizes, groups, delta=delta, rule=rule, seed=11, explore=False, streams=S)
    a = np.random.default_rng(5).gamma(1.0, 1.0, sizes.size) * sizes
    s.observe_mask(np.ones((S, sizes.size), dtype=bool), np.tile(a, (S, 1)))
    pi = s.target_inclusion()
    np.testing.assert_allclose(pi, np.tile(pi[0], (S, 1)), rtol=0, atol=1e-12)
    freq = np.zeros(sizes.size)
    for _ in range(r):
        freq += s.draw_mask().sum(axis=0)
    freq /= S * r
    ref = ModuleSampler(sizes, groups, delta=delta, rule=rule, explore=False)
    bias = _class_bias_bound(ref, pi[0])
    se = np.sqrt(np.maximum(pi[0] * (1 - pi[0]), 1e-12) / (S * r))
    excess = np.maximum(np.abs(freq - pi[0]) - bias * pi[0], 0.0)
    assert np.all(excess <= 5 * se + 1e-12), np.round((freq - pi[0]) / se, 1)


@pytest.mark.parametrize("rule", ["misa", "badam", "lisa"])
def test_streams_state_round_trip_through_json(rule: str) -> None:
    sizes, groups = _llama_like(5)
    delta = 0.2 if rule == "misa" else 0.41
    s = ModuleSampler(sizes, groups, delta=delta, rule=rule, seed=4, streams=3)
    rng = np.random.default_rng(2)
    for _ in range(4):
        _feed(s, s.draw_mask(), rng)
    state = json.loads(json.dumps(s.state_dict()))
    fresh = ModuleSampler(sizes, groups, delta=delta, rule=rule, seed=99, streams=3)
    fresh.load_state_dict(state)
    f1, f2 = np.random.default_rng(3), np.random.default_rng(3)
    for _ in range(12):
        m1, m2 = s.draw_mask(), fresh.draw_mask()
        np.testing.assert_array_equal(m1, m2)
        _feed(s, m1, f1)
        _feed(fresh, m2, f2)
    np.testing.assert_array_equal(s.scores, fresh.scores)
    np.testing.assert_array_equal(s.last_inclusion, fresh.last_inclusion)
    np.testing.assert_array_equal(s.exploring, fresh.exploring)
    with pytest.raises(ValueError, match="streams"):
        ModuleSampler(sizes, groups, delta=delta, rule=rule, streams=2).load_state_dict(state)
    with pytest.raises(ValueError, match="streams"):
        ModuleSampler(sizes, groups, delta=delta, rule=rule).load_state_dict(state)


def test_bad_streams_input_names_the_argument() -> None:
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="streams"):
            ModuleSampler([10, 20, 30], delta=0.5, streams=bad)
    s = ModuleSampler([10, 20, 30], delta=0.5, streams=2)
    with pytest.raises(ValueError, match="mask"):
        s.observe_mask(np.array([0, 1]), np.ones(2))
    with pytest.raises(ValueError, match="sq_norms"):
        s.observe_mask(np.ones((2, 3), dtype=bool), np.ones((2, 2)))
    with pytest.raises(ValueError, match="sq_norms"):
        s.observe_mask(np.ones((2, 3), dtype=bool), -np.ones((2, 3)))
    with pytest.raises(ValueError, match="draw_mask"):
        s.draw()
    with pytest.raises(ValueError, match="observe_mask"):
        s.observe([0], [1.0])


def test_simulator_draws_all_seeds_in_one_call(monkeypatch) -> None:
    """One streams sampler per run: one draw and one observe per block update, every set within budget."""
    made: list[ModuleSampler] = []
    calls = {"draw": 0, "observe": 0}

    class Spy(ModuleSampler):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

        def draw_mask(self):
            calls["draw"] += 1
            return super().draw_mask()

        def observe_mask(self, mask, sq):
            calls["observe"] += 1
            assert np.all(np.asarray(sq)[mask] >= 0)
            return super().observe_mask(mask, sq)

    monkeypatch.setattr(sim, "ModuleSampler", Spy)
    p = make_problem("robust")
    res = simulate(p, "misa", 7, 3, SimConfig(alpha=0.01, T=2, delta=0.2), record_draws=True)
    assert len(made) == 1 and made[0].streams == 3 and calls["draw"] == 7 and calls["observe"] == 7
    budget = made[0].budget
    assert all(p.sizes[d].sum() <= budget for d in res.draws)
    assert np.all((res.inclusion_counts * p.sizes).sum(axis=1) <= 7 * budget)


@pytest.mark.parametrize("rule", ["misa_norm", "optimal", "uniform"])
def test_depth_bias_tilts_inclusion_towards_upper_layers_and_keeps_the_budget(rule):
    """γ > 0 raises π with depth among equal-score, equal-size modules; γ = 0 is the paper's rule exactly."""
    sizes, groups = [10] * 12, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    plain = ModuleSampler(sizes, groups, delta=0.25, rule=rule, seed=3, explore=False)
    zero = ModuleSampler(sizes, groups, delta=0.25, rule=rule, seed=3, explore=False, depth_bias=0.0)
    tilted = ModuleSampler(sizes, groups, delta=0.25, rule=rule, seed=3, explore=False, depth_bias=2.0)
    for s in (plain, zero, tilted):
        s.observe(np.arange(12), np.ones(12))
    np.testing.assert_array_equal(plain.target_inclusion(), zero.target_inclusion())
    pi = tilted.target_inclusion()
    per_layer = pi.reshape(6, 2).mean(axis=1)
    assert np.all(np.diff(per_layer) > 0) and pi.min() > 0
    assert abs(pi @ np.asarray(sizes) - plain.budget) < 1e-9
    for _ in range(200):
        assert np.asarray(sizes)[tilted.draw()].sum() <= tilted.budget


def test_depth_bias_tilts_the_papers_weights():
    """misa: p_b ∝ exp(min(5, η·G_b²))·exp(γ(d_b − 1)), so equal scores weigh more in upper layers."""
    s = ModuleSampler([10] * 4, [0, 1, 2, 3], delta=0.5, rule="misa", depth_bias=3.0)
    s.observe(np.arange(4), np.ones(4))
    w = np.exp(3.0 * (np.arange(4) / 3 - 1.0))
    np.testing.assert_allclose(s.selection_weights(), w / w.sum())


def test_depth_bias_is_refused_for_layer_rules_and_when_negative():
    with pytest.raises(ValueError, match="module-wise"):
        ModuleSampler([4] * 4, [0, 0, 1, 1], delta=0.5, rule="lisa", depth_bias=1.0)
    with pytest.raises(ValueError, match="depth_bias"):
        ModuleSampler([4] * 4, [0, 0, 1, 1], delta=0.5, rule="misa", depth_bias=-1.0)
