"""The sampler in a second process: the same trajectories bit for bit, failures surface, nothing hangs."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from misa_theory.problems import make_problem
from misa_theory.sampler import ModuleSampler
from misa_theory.sampler_process import SamplerProcess, available
from misa_theory.simulate import SimConfig, simulate

pytestmark = pytest.mark.skipif(not available(), reason="the spin hand-off needs x86-64 and two cores")


@pytest.mark.parametrize(("problem", "rule", "cfg"), [
    ("robust", "misa", SimConfig(alpha=0.02, T=1, delta=0.1, sigma=0.1)),
    ("robust", "optimal", SimConfig(alpha=0.02, T=2, delta=0.25, sigma=0.1, min_inclusion=0.005, eta=2.0)),
    ("robust", "uniform", SimConfig(alpha=0.02, T=3, delta=0.1, sigma=0.1, keep_state=True, momentum_flush=True)),
    ("robust", "lisa", SimConfig(alpha=0.02, T=2, delta=0.25, sigma=0.1)),
    ("robust", "badam", SimConfig(alpha=0.02, T=1, delta=0.25, sigma=0.0)),
    ("sensing", "misa", SimConfig(alpha=0.02, T=2, delta=0.2, sigma=0.05, keep_state=True)),
])
def test_a_sampler_process_gives_the_same_run_bit_for_bit(problem, rule, cfg):
    p = make_problem(problem)
    here = simulate(p, rule, 60, 3, cfg, seed=2, record_draws=True)
    there = simulate(p, rule, 60, 3, cfg, seed=2, record_draws=True, sampler_process=True)
    np.testing.assert_array_equal(here.grad_sq, there.grad_sq)
    np.testing.assert_array_equal(here.f_final, there.f_final)
    np.testing.assert_array_equal(here.inclusion_counts, there.inclusion_counts)
    np.testing.assert_array_equal(here.target_pi, there.target_pi)
    assert all(np.array_equal(a, b) for a, b in zip(here.draws, there.draws, strict=True))


def test_prefetched_randomness_leaves_the_draws_unchanged():
    sizes, groups = np.tile([64, 16, 16, 64, 128, 128, 128], 6), np.repeat(np.arange(6), 7)
    rng = np.random.default_rng(0)
    a = ModuleSampler(sizes, groups, delta=0.1, rule="misa", seed=3, streams=4)
    b = ModuleSampler(sizes, groups, delta=0.1, rule="misa", seed=3, streams=4)
    for _ in range(80):  # through exploration, where prefetch must do nothing, and past it
        b.prefetch()
        ma, mb = a.draw(), b.draw()
        np.testing.assert_array_equal(ma, mb)
        x = rng.random(ma.shape)
        a.observe(ma, x)
        b.observe(mb, x)
    assert a.rng.bit_generator.state == b.rng.bit_generator.state
    b.prefetch()
    with pytest.raises(RuntimeError, match="between prefetch"):
        b.state_dict()


def test_a_failure_in_the_child_is_raised_in_the_parent():
    """A run that diverges feeds the sampler non-finite norms: the same ValueError with or without a process."""
    p = make_problem("sensing")
    cfg = SimConfig(alpha=1e100, T=1, delta=0.2, sigma=0.0)
    with np.errstate(all="ignore"), pytest.raises(ValueError, match="finite") as here:
        simulate(p, "misa", 30, 2, cfg)
    with np.errstate(all="ignore"), pytest.raises(ValueError, match="finite") as there:
        simulate(p, "misa", 30, 2, cfg, sampler_process=True)
    assert str(here.value) == str(there.value)


def test_bad_sampler_arguments_fail_before_a_process_starts():
    with pytest.raises(ValueError, match="delta"):
        SamplerProcess(dict(sizes=[4, 4], delta=2.0, streams=1), K=3)


def test_a_dead_child_does_not_hang_the_parent():
    kwargs = dict(sizes=np.full(8, 10), delta=0.3, rule="uniform", streams=2)
    with SamplerProcess(kwargs, K=5) as child:
        child.draw()
        child._proc.kill()
        child._proc.join()
        t0 = time.perf_counter()
        with pytest.raises(RuntimeError, match="gone|made for"):
            child.observe()
            child.draw()
        assert time.perf_counter() - t0 < 10


def test_draws_past_the_agreed_number_are_refused():
    kwargs = dict(sizes=np.full(8, 10), delta=0.3, rule="uniform", streams=2)
    with SamplerProcess(kwargs, K=1) as child:
        child.draw()
        child.observe()
        with pytest.raises(RuntimeError, match="made for 1 draws"):
            child.draw()


def test_cli_single_run_with_two_jobs_gives_the_same_summary(tmp_path):
    from tests.test_cli_theory import run

    common = ("simulate", "--rule", "misa", "--K", "80", "--T", "1", "--seeds", "3", "--no-plots")
    one = run(*common, "--out", str(tmp_path / "one"))
    two = run(*common, "--out", str(tmp_path / "two"), "--jobs", "2")
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    a = json.loads((tmp_path / "one" / "summary.json").read_text())
    b = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert a == b
