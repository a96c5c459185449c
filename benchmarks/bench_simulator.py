"""Simulator throughput: K block updates × S seeds on a ~10^4-parameter problem; prints the median of 3 runs.

Default: K = 10^5, S = 16, T = 1, rule misa, δ = 0.03 (the paper's budget), RobustFeatures(12 layers, d=8, kv=4,
ff=28) = 10,368 parameters, 84 modules.  ``--K`` / ``--seeds`` / ``--T`` / ``--rule`` / ``--delta`` /
``--repeats`` override.  The cost split at the end times, in the same process, the two parts of a block update
that are not the simulator's own arithmetic: one ``ModuleSampler(streams=S)`` draw + observe, and the oracle
the simulator uses (``make_oracle``) on one drawn active set: the gradient there, the step, and ‖∇f‖².
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from misa_theory.oracle import Active, make_oracle
from misa_theory.problems import RobustFeatures
from misa_theory.sampler import ModuleSampler
from misa_theory.sim_config import SimConfig, alpha_for
from misa_theory.simulate import simulate


def cost_split(prob: RobustFeatures, cfg: SimConfig, rule: str, seeds: int, n: int = 500) -> tuple[float, float]:
    """Mean µs of one all-seeds draw+observe, and of the oracle's gradient + step + ‖∇f‖² on one drawn set."""
    s = ModuleSampler(prob.sizes, prob.groups, delta=cfg.delta, rule=rule, seed=0, streams=seeds)
    x = np.random.default_rng(0).random((seeds, prob.n_modules))
    for _ in range(50):  # past exploration, as in a long run
        s.observe_mask(s.draw_mask(), x)
    t0 = time.perf_counter()
    for _ in range(n):
        s.observe_mask(s.draw_mask(), x)
    draw = (time.perf_counter() - t0) / n
    oracle = make_oracle(prob, prob.x0(seeds), active_fraction=cfg.delta)
    active = Active.from_mask(s.draw_mask(), prob.sizes, prob.offsets[:-1], prob.n_params)
    g = np.empty(active.size)
    t0 = time.perf_counter()
    for _ in range(n):
        oracle.grad_at(active, g)
        oracle.step(active, 1e-6 * g)
        oracle.grad_sq()
    return 1e6 * draw, 1e6 * (time.perf_counter() - t0) / n


def main(argv: list[str] | None = None) -> None:
    """Time ``simulate`` and print per-run seconds, the median, and the cost split."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--K", type=int, default=100_000)
    p.add_argument("--seeds", type=int, default=16)
    p.add_argument("--T", type=int, default=1)
    p.add_argument("--rule", default="misa")
    p.add_argument("--delta", type=float, default=0.03)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    prob = RobustFeatures(n_layers=12, d=8, kv=4, ff=28)
    cfg = SimConfig(alpha=alpha_for(a.K, 0.3), T=a.T, delta=a.delta, sigma=0.05)
    times = []
    for i in range(a.repeats):
        t0 = time.perf_counter()
        res = simulate(prob, a.rule, a.K, a.seeds, cfg, seed=i)
        times.append(time.perf_counter() - t0)
        print(f"run {i}: {times[-1]:.2f} s  (final mean ‖∇f‖² {res.grad_sq[-1].mean():.6g})", flush=True)
    med = statistics.median(times)
    print(f"{a.rule}: K={a.K} block updates × {a.seeds} seeds × T={a.T}, n={prob.n_params}, M={prob.n_modules}, "
          f"δ={a.delta}: median {med:.2f} s ({med / a.K * 1e6:.0f} µs per block update)")
    if a.rule not in ("adam", "sgd"):
        draw, grad = cost_split(prob, cfg, a.rule, a.seeds)
        print(f"cost split: draw+observe of all {a.seeds} seeds {draw:.0f} µs, oracle gradient + step + ‖∇f‖² "
              f"{grad:.0f} µs (gradient and step × T per block update), the rest is gather/noise/Adam")


if __name__ == "__main__":
    main()
