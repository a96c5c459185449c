r"""Block-coordinate Adam on a synthetic :class:`~misa_theory.problems.Problem`, as the trainer runs it.

Definitions (used by the rate check, the CLI, the notebooks and docs/simulator.md)
---------------------------------------------------------------------------------
*Block update* k = 0, …, K−1 is ONE period: one draw B_k of the sampler followed by T inner Adam steps on the
coordinates of B_k only,

    for t = 0..T−1:  g_t = ∇f(θ_{k,t}) + ξ_t         (ξ_t ~ N(0, σ² diag(noise_std²)), E‖ξ_t‖² = σ²)
                     m ← β₁m + (1−β₁)g_t,  v ← β₂v + (1−β₂)g_t²      (on B_k's coordinates)
                     θ_{k,t+1} = θ_{k,t} − α · m̂/(√v̂ + ε),  m̂ = m/(1−β₁^c), v̂ = v/(1−β₂^c)

with c the step count of that module's state (one count per (seed, module) pair).  Optimizer state follows the
trainer's ``ActiveAdamW`` (misa_train/optim.py): a module active in two consecutive periods keeps (m, v, c); a
module that leaves loses them and enters again with zeros and c = 0; with ``retain_state`` a module that leaves
keeps them parked and gets them back when drawn again; with ``reset_state`` every period starts every active
module from zero state (the algorithm of proofs/05_convergence.md).  With ``amsgrad`` the denominator uses the
running maximum v̄ ← max(v̄, v) of the raw second moment, v̂ = v̄/(1−β₂^c) (torch's ``amsgrad``; v̄ is part of
the module's state). With ``momentum_flush`` the period ends with θ ← θ − α·β₁/(1−β₁)·m̂/(√v̂+ε) on B_k (the
paper's flush of the momentum that would otherwise be lost).  ``misa_alg1`` is the paper's Algorithm 1: rule
``misa`` with ``amsgrad``, ``momentum_flush`` and ``reset_state`` (:data:`VARIANTS`).  ``optimizer="sgd"``
replaces the inner Adam steps by SGD steps θ ← θ − α·g_t (block SGD: every constant of proofs/05 is known,
ρ = 1).  Then the sampler observes (1/T)Σ_t ‖g_{t,b}‖² of the active modules, the *stochastic* squared norms (what
the trainer sees), and θ_{k+1} = θ_{k,T}.

K is the number of block updates (K·T gradient evaluations); the recorded quantity is ‖∇f(θ_k)‖² for
k = 0..K (exact gradient).  The rate check uses (1/K)Σ_{k<K}‖∇f(θ_k)‖² and min_{k≤K}‖∇f(θ_k)‖².

``excluded`` modules are taken out of every drawn set (π = 0 for them): the negative control of the rate check,
whose guarantee needs π_min > 0.

Baselines: ``adam`` is full Adam (every module active, state kept, no flush), ``sgd`` full SGD with step
α_sgd; each of their block updates is also T steps.

All seeds advance together as arrays (S, n); one :class:`~misa_theory.sampler.ModuleSampler` with
``streams=S`` (seeded ``seed·1000``) draws the active sets of all seeds (a mask (S, M)) in one call per block
update.  Gradients come from :func:`~misa_theory.oracle.make_oracle` (dense, or incremental for ``robust`` at
small δ; the same values up to rounding).  Deterministic under ``seed``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from .oracle import Active, GradientOracle, make_oracle
from .problems import Problem
from .sampler import ModuleSampler
from .sim_config import ALL_RULES, BASELINES, VARIANTS, SimConfig, check_run

__all__ = ["SimResult", "simulate", "run_rules", "summarize"]

@dataclass
class SimResult:
    """Outcome of one rule: ``grad_sq`` (K+1, S) = ‖∇f(θ_k)‖² per block update and seed.

    ``inclusion_counts`` (S, M): how often each module was active; ``draws``: the active sets of seed 0
    (only with ``record_draws``); ``target_pi``: (K, M) the sampler's π for seed 0 before each draw (only
    with ``record_draws`` and a rule with a π design); ``f_final`` (S,) the objective at θ_K.
    """

    rule: str
    grad_sq: np.ndarray
    f_final: np.ndarray
    inclusion_counts: np.ndarray
    draws: list[np.ndarray] = field(default_factory=list)
    target_pi: np.ndarray | None = None

    @property
    def K(self) -> int:
        """Number of block updates run."""
        return self.grad_sq.shape[0] - 1

    def avg_grad_sq(self) -> np.ndarray:
        """(1/K)Σ_{k<K}‖∇f(θ_k)‖² per seed, shape (S,)."""
        return self.grad_sq[:-1].mean(axis=0)

    def min_grad_sq(self) -> np.ndarray:
        """min_{k≤K}‖∇f(θ_k)‖² per seed, shape (S,)."""
        return self.grad_sq.min(axis=0)


def simulate(problem: Problem, rule: str, K: int, n_seeds: int, cfg: SimConfig, seed: int = 0,
             record_draws: bool = False, progress: Callable[[int], None] | None = None) -> SimResult:
    """Run K block updates of ``rule`` on ``problem`` for ``n_seeds`` seeds at once (see module docstring).

    Args:
        problem: the objective (θ ∈ R^n, M modules).
        rule: one of :data:`ALL_RULES`.
        K: number of block updates (periods of T steps).
        n_seeds: S, independent runs (different noise and sampler streams, same θ₀).
        cfg: hyper-parameters (α absolute).
        seed: base seed: the noise generator is SFC64 seeded (seed, rule index), the sampler seed·1000.
        record_draws: keep seed 0's active sets and target π (for heatmaps; memory K·M).
        progress: called with the number of block updates just finished (for a progress bar).

    Returns:
        :class:`SimResult` with grad_sq of shape (K+1, S).

    Raises:
        ValueError: naming a bad argument (:func:`check_run`, :meth:`SimConfig.validate`, the sampler's).
    """
    check_run(rule, K, n_seeds)
    sampler_rule, cfg = (VARIANTS[rule][0], replace(cfg, **VARIANTS[rule][1])) if rule in VARIANTS else (rule, cfg)
    cfg.validate()
    if any(b >= problem.n_modules for b in cfg.excluded):
        raise ValueError(f"excluded must hold module indices < {problem.n_modules}, got {cfg.excluded!r}")
    sampler = None
    if rule not in BASELINES:
        sampler = ModuleSampler(problem.sizes, problem.groups, delta=cfg.delta, rule=sampler_rule, seed=seed * 1000,
                                eta=cfg.eta, ema_beta=cfg.ema_beta, min_inclusion=cfg.min_inclusion,
                                explore=cfg.explore, streams=n_seeds)
    state = _init_state(problem, rule, n_seeds, cfg, seed, sampler)
    grad_sq = np.empty((K + 1, n_seeds))
    counts = np.zeros((n_seeds, problem.n_modules), dtype=np.int64)
    draws: list[np.ndarray] = []
    record_pi = record_draws and sampler is not None and sampler_rule != "misa"
    target_pi = np.empty((K, problem.n_modules)) if record_pi else None
    grad_sq[0] = state.oracle.grad_sq()
    for k in range(K):
        if target_pi is not None:
            target_pi[k] = sampler.target_inclusion()[0]
        mask = state.all_on if sampler is None else sampler.draw_mask()
        if cfg.excluded:
            mask[:, list(cfg.excluded)] = False
        sq = _period(state, mask, cfg)
        if sampler is not None:
            sampler.observe_mask(mask, sq)
        if record_draws:
            draws.append(np.flatnonzero(mask[0]))
        counts += mask
        grad_sq[k + 1] = state.oracle.grad_sq()
        if progress is not None:
            progress(1)
    return SimResult(rule, grad_sq, problem.f(state.oracle.theta), counts, draws, target_pi)


@dataclass
class _State:
    """What a run carries between block updates: the iterate (in the oracle), noise, and Adam's state."""

    problem: Problem
    oracle: GradientOracle
    rng: np.random.Generator
    # σ·noise_std: per (seed, module) pair (S·M,) where it is constant on every module, else per coordinate of
    # every seed (S·n,); None without noise
    noise_std: np.ndarray | None
    noise_per_module: bool
    step: float  # α (sgd: α_sgd)
    sgd: bool
    retain: bool  # park the moments of modules that leave
    reset: bool  # zero state at every period
    amsgrad: bool
    flush: bool
    all_on: np.ndarray  # (S, M) all True: the baselines' active set
    betas: np.ndarray  # (2, 1): β₁, β₂, so that one operation updates both moments or both β^c
    # Adam's state with retain_state (and for the adam baseline), per coordinate of every seed:
    m: np.ndarray  # (S·n,) first moments; read only where a module kept its state
    v: np.ndarray  # (S·n,) second moments
    # rows β₁^c and β₂^c per (seed, module) pair, (2, S·M): the step count c is one number per module, as in
    # ActiveAdamW
    bias: np.ndarray
    vmax: np.ndarray  # (S·n,) running maximum of v (amsgrad)
    # Without retain_state only the last period's pairs can keep their state, so it stays in that period's run
    # order (a few percent of it is read again) instead of being scattered into per-coordinate arrays:
    last: _LastPeriod


@dataclass
class _LastPeriod:
    """The last period's Adam state, in its run order: pairs ``pair`` (P,) = seed·M + module with runs at
    ``starts`` (P,), moments ``mv`` (2, A), β^c ``bias`` (2, P), ``vmax`` (A,) (amsgrad); ``position`` (S·M,) is each
    pair's position in ``pair``, −1 for pairs that were not active."""

    position: np.ndarray
    pair: np.ndarray
    starts: np.ndarray
    mv: np.ndarray
    bias: np.ndarray
    vmax: np.ndarray | None


def _init_state(problem: Problem, rule: str, S: int, cfg: SimConfig, seed: int,
                sampler: ModuleSampler | None) -> _State:
    """θ₀ for every seed, the oracle, the noise generator and zero Adam state."""
    n, M = problem.n_params, problem.n_modules
    full = sampler is None
    oracle = make_oracle(problem, problem.x0(S), active_fraction=1.0 if full else cfg.delta)
    sgd = rule == "sgd" or (not full and cfg.optimizer == "sgd")
    step = cfg.sgd_alpha if rule == "sgd" and cfg.sgd_alpha is not None else cfg.alpha
    rng = np.random.Generator(np.random.SFC64([seed, ALL_RULES.index(rule)]))
    scaled = cfg.sigma * problem.noise_std
    first = scaled[problem.offsets[:-1]]
    # a per-module scale is repeated over the active runs: cheaper than gathering a per-coordinate table
    per_module = bool(np.array_equal(scaled, np.repeat(first, problem.sizes)))
    noise_std = None if cfg.sigma == 0 else np.tile(first if per_module else scaled, S)
    retain = cfg.retain_state or rule == "adam"
    coords, pairs = (S * n, S * M) if retain else (0, 0)  # the per-coordinate state serves retain_state only
    return _State(problem=problem, oracle=oracle, rng=rng, noise_std=noise_std, noise_per_module=per_module,
                  step=float(step), sgd=sgd,
                  retain=retain, reset=cfg.reset_state and not full,
                  amsgrad=cfg.amsgrad, flush=cfg.momentum_flush and not full,
                  all_on=np.ones((S, M), dtype=bool), betas=np.array([[cfg.beta1], [cfg.beta2]]),
                  m=np.zeros(coords), v=np.zeros(coords), bias=np.ones((2, pairs)),
                  vmax=np.zeros(coords if cfg.amsgrad else 0), last=_no_last_period(S * M))


def _no_last_period(pairs: int) -> _LastPeriod:
    """No pair active in the last period (before the first one)."""
    return _LastPeriod(np.full(pairs, -1), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64),
                       np.zeros((2, 0)), np.ones((2, 0)), None)


def _period(state: _State, mask: np.ndarray, cfg: SimConfig) -> np.ndarray:
    """One block update on the active set ``mask`` (S, M); returns (1/T)Σ_t ‖g_{t,b}‖² as an (S, M) array."""
    p = state.problem
    active = Active.from_mask(mask, p.sizes, p.offsets[:-1], p.n_params)
    sq = np.zeros(mask.size)
    pair = active.seed * p.n_modules + active.module  # flat index of each active pair in (S, M) arrays
    # the trainer's ActiveAdamW: a module keeps (m, v, c) if it stayed active (or with retain_state)
    keep = np.full(pair.size, not state.reset) if state.reset or state.retain else state.last.position.take(pair) >= 0
    if active.size == 0:
        state.last = _no_last_period(mask.size)
    else:
        sq[pair] = _inner_steps(state, active, pair, keep, cfg) / cfg.T
    return sq.reshape(mask.shape)


def _inner_steps(state: _State, active: Active, pair: np.ndarray, keep: np.ndarray, cfg: SimConfig) -> np.ndarray:
    """T steps of Adam (or SGD) on the active coordinates; returns Σ_t ‖g_{t,b}‖² per active pair.

    ``pair`` (P,) = seed·M + module of the active pairs; ``keep`` (P,) says which of them continue their Adam
    state, the others start from zero state."""
    lens = active.lens
    noise = _noise_scale(state, active, pair)
    g = np.empty(active.size)
    sq = np.zeros(lens.size)
    if state.sgd:
        for _ in range(cfg.T):
            _noisy_grad(state, active, noise, g, sq)
            state.oracle.step(active, state.step * g)
        return sq
    # the pairs' (m, v), one row each so that one operation updates both; β₁^c and β₂^c (2, P); the v̄ of amsgrad
    mv, bias, vbar = (_retained if state.retain else _carried)(state, active, pair, keep)
    m, v = mv
    vbar = v if vbar is None else vbar  # the v the denominator uses
    betas, one_minus = state.betas, 1.0 - state.betas
    for _ in range(cfg.T):
        _noisy_grad(state, active, noise, g, sq)
        new = one_minus * g  # m ← β₁m + (1−β₁)g, v ← β₂v + (1−β₂)g·g
        new[1] *= g
        mv *= betas
        mv += new
        bias *= betas
        vbar = np.maximum(vbar, v) if state.amsgrad else v
        state.oracle.step(active, _adam_direction(m, vbar, bias, lens, cfg.eps, state.step))
    if state.flush:  # the momentum that would otherwise be lost, in one step
        state.oracle.step(active, _adam_direction(m, vbar, bias, lens, cfg.eps,
                                                  state.step * cfg.beta1 / (1.0 - cfg.beta1)))
    if state.retain:
        idx = active.idx
        state.m[idx], state.v[idx] = m, v
        state.bias[:, pair] = bias
        if state.amsgrad:
            state.vmax[idx] = vbar
    else:
        state.last.position[state.last.pair] = -1
        state.last.position[pair] = np.arange(pair.size)
        state.last = _LastPeriod(state.last.position, pair, active.starts, mv, bias, vbar if state.amsgrad else None)
    return sq


def _retained(state: _State, active: Active, pair: np.ndarray,
              keep: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(m, v) (2, A), β^c (2, P) and v̄ (A,) or None of the active pairs from the per-coordinate state; pairs not
    in ``keep`` start from zero state."""
    idx = active.idx
    mv = np.empty((2, active.size))
    state.m.take(idx, out=mv[0])
    state.v.take(idx, out=mv[1])
    bias = state.bias.take(pair, axis=1)
    vbar = state.vmax.take(idx) if state.amsgrad else None
    if not keep.all():  # pairs that enter: zero moments (by a 0/1 factor: cheaper than a mask), step count 0
        kept = keep.astype(np.float64).repeat(active.lens)
        mv *= kept
        bias[:, ~keep] = 1.0
        if vbar is not None:
            vbar *= kept
    return mv, bias, vbar


def _carried(state: _State, active: Active, pair: np.ndarray,
             keep: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """As :func:`_retained`, from the last period's state (:class:`_LastPeriod`): zero state except for the ``keep``
    pairs, which were active in the last period."""
    mv = np.zeros((2, active.size))
    bias = np.ones((2, pair.size))
    vbar = np.zeros(active.size) if state.amsgrad else None
    if keep.any():
        last = state.last
        here = np.flatnonzero(keep)
        there = last.position.take(pair.take(here))  # the kept pairs' positions in the last period
        bias[:, here] = last.bias.take(there, axis=1)
        lens, starts = active.lens.take(here), active.starts.take(here)
        ends = lens.cumsum()
        dst = (starts - ends + lens).repeat(lens) + np.arange(int(ends[-1]))  # their coordinates, run after run
        src = dst + (last.starts.take(there) - starts).repeat(lens)
        mv[:, dst] = last.mv.take(src, axis=1)
        if vbar is not None:
            vbar[dst] = last.vmax.take(src)
    return mv, bias, vbar


def _noise_scale(state: _State, active: Active, pair: np.ndarray) -> np.ndarray | None:
    """σ·noise_std on the active coordinates (A,), run after run; ``pair`` (P,) = seed·M + module."""
    if state.noise_std is None:
        return None
    if state.noise_per_module:
        return state.noise_std[pair].repeat(active.lens)
    return state.noise_std.take(active.idx)


def _noisy_grad(state: _State, active: Active, noise: np.ndarray | None, g: np.ndarray, sq: np.ndarray) -> None:
    """g ← ∇f(θ) + ξ on the active coordinates, and sq += ‖g_b‖² per active pair."""
    state.oracle.grad_at(active, g)
    if noise is not None:
        xi = state.rng.standard_normal(active.size)
        xi *= noise
        g += xi
    sq += np.add.reduceat(g * g, active.starts)


def _adam_direction(m: np.ndarray, v: np.ndarray, bias: np.ndarray, lens: np.ndarray, eps: float,
                    scale: float) -> np.ndarray:
    """scale·m̂/(√v̂ + ε) with m̂ = m/(1 − β₁^c), v̂ = v/(1 − β₂^c); ``bias`` (2, P) holds β₁^c and β₂^c per pair,
    each on its pair's ``lens`` coordinates."""
    per_pair = np.subtract(1.0, bias)
    np.divide(scale, per_pair[0], out=per_pair[0])
    c1, c2 = per_pair.repeat(lens, axis=1)  # one repeat for both factors
    den = np.divide(v, c2, out=c2)
    np.sqrt(den, out=den)
    den += eps
    out = np.multiply(c1, m, out=c1)
    out /= den
    return out


def run_rules(problem: Problem, rules: Sequence[str], K: int, n_seeds: int, cfg: SimConfig, seed: int = 0,
              progress: Callable[[int], None] | None = None, record_draws: bool = False) -> dict[str, SimResult]:
    """:func:`simulate` for each rule with the same problem, seeds and config; returns {rule: result}."""
    return {r: simulate(problem, r, K, n_seeds, cfg, seed, record_draws=record_draws, progress=progress)
            for r in rules}


def summarize(res: SimResult) -> dict[str, float]:
    """Seed statistics of a run: mean, std (ddof=1) and standard error over seeds of the average and the
    minimum squared gradient norm, plus the mean final objective."""
    out: dict[str, float] = {"K": res.K, "seeds": int(res.grad_sq.shape[1])}
    for key, vals in (("avg_grad_sq", res.avg_grad_sq()), ("min_grad_sq", res.min_grad_sq())):
        sd = float(vals.std(ddof=1)) if vals.size > 1 else 0.0
        out[key] = float(vals.mean())
        out[key + "_std"] = sd
        out[key + "_stderr"] = sd / float(np.sqrt(vals.size))
    out["final_grad_sq"] = float(res.grad_sq[-1].mean())
    out["f_final"] = float(res.f_final.mean())
    return out
