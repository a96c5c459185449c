r"""Block-coordinate Adam on a synthetic :class:`~misa_theory.problems.Problem`, exactly as the trainer runs it.

Definitions (used consistently by the rate check, the CLI, the notebooks and docs/simulator.md)
-----------------------------------------------------------------------------------------------
*Block update* k = 0, …, K−1 is ONE period: one draw B_k = ``sampler.draw()`` followed by T inner Adam
steps on the coordinates of B_k only,

    for t = 0..T−1:  g_t = ∇f(θ_{k,t}) + ξ_t         (ξ_t ~ N(0, σ² diag(noise_std²)), E‖ξ_t‖² = σ²)
                     m ← β₁m + (1−β₁)g_t,  v ← β₂v + (1−β₂)g_t²      (on B_k's coordinates)
                     θ_{k,t+1} = θ_{k,t} − α · m̂/(√v̂ + ε),  m̂ = m/(1−β₁^c), v̂ = v/(1−β₂^c)

with c the step count of that coordinate's state.  Optimizer state is zeroed on every switch (c restarts at
0); with ``keep_state`` a module drawn in two consecutive periods keeps (m, v, c), as the authors' code does.
With ``momentum_flush`` the period ends with θ ← θ − α·β₁/(1−β₁)·m̂/(√v̂+ε) on B_k (the paper's flush of the
momentum that would otherwise be lost).  Then ``sampler.observe(B_k, (1/T)Σ_t ‖g_{t,b}‖²)`` feeds the
*stochastic* squared norms of the active modules (what the trainer sees), and θ_{k+1} = θ_{k,T}.

K is the number of block updates (so K·T gradient evaluations), and the recorded quantity is
‖∇f(θ_k)‖² for k = 0..K (K+1 values, exact gradient, measured at the start of each period at no extra cost:
the first inner step's exact gradient is the one that is noised).  The rate check uses
(1/K)Σ_{k<K}‖∇f(θ_k)‖² and min_{k≤K}‖∇f(θ_k)‖².

Baselines: ``adam`` is full Adam (every module active, state never reset, no flush), ``sgd`` full SGD with
step α_sgd; each of their "block updates" is also T steps, so all rules spend the same number of
gradient evaluations per block update (the sampled rules touch only ⌊δN⌋ parameters of them).

Vectorisation: all seeds advance together as arrays of shape (S, n), and one
:class:`~misa_theory.sampler.ModuleSampler` with ``streams=S`` (seeded ``seed·1000``) draws the active sets
of all seeds in one call per block update (a mask (S, M)) and takes all their observations in one call.  The
active coordinates of all seeds are one concatenation of runs per period (an
:class:`~misa_theory.oracle.Active`: pairs in (module, seed) order, run starts by a cumulative sum, no
per-module loop; its flat index into θ, one ``repeat`` of the run starts, is built only where something needs
it: the dense oracle, kept optimizer state), so the Adam arithmetic and the noise cost O(S·δ·n) per step in
preallocated buffers; each step's noise variates are drawn in that coordinate order.  With
``sampler_process=True`` the sampler runs one draw ahead in a second process
(:mod:`misa_theory.sampler_process`); the observation is handed over as soon as the period's last gradient
is known and ‖∇f(θ_{k+1})‖² is taken at the end of the period, so both overlap the next draw, and the noise
comes from the same stream drawn ahead in chunks: the results are bit-identical.
Gradients come from :func:`~misa_theory.oracle.make_oracle`: dense (O(S·n) per step) for any problem, and
for ``robust`` at δ ≤ 0.3 an exact incremental oracle that recomputes only the modules that moved.  The
oracle changes nothing but rounding (≈1e-15 relative), which the sampler's discrete draws can amplify into a
different but equally distributed trajectory.  Deterministic under ``seed``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .oracle import Active, make_oracle
from .problems import Problem
from .sampler import RULES, ModuleSampler
from .sampler_process import SamplerProcess, available

__all__ = ["ALL_RULES", "BASELINES", "SimConfig", "SimResult", "simulate", "run_rules", "alpha_for",
           "summarize", "rate_fit", "RateFit", "block_updates_to_target"]

#: Baselines without a sampler.
BASELINES: tuple[str, ...] = ("adam", "sgd")
#: Every rule the simulator runs: the sampler's rules, then the full-parameter baselines.
ALL_RULES: tuple[str, ...] = tuple(RULES) + BASELINES


def alpha_for(K: int, alpha0: float) -> float:
    """Step size of the theory, α = α₀/√K, for a run of K block updates."""
    if K <= 0:
        raise ValueError(f"K must be positive, got {K}")
    return float(alpha0) / float(np.sqrt(K))


@dataclass(frozen=True)
class SimConfig:
    """Hyper-parameters of one run (α is absolute; use :func:`alpha_for` for α₀/√K).

    delta: budget fraction δ ∈ (0, 1]; T: inner steps per block update; sigma: total noise std σ
    (E‖ξ‖² = σ²); eta: softmax temperature η ≥ 0 of ``misa``; ema_beta: score EMA β; beta1, beta2, eps:
    Adam's; sgd_alpha: step of the ``sgd`` baseline (default = α); min_inclusion: sampler floor on π.
    """

    alpha: float = 0.01
    T: int = 5
    delta: float = 0.25
    sigma: float = 0.0
    eta: float = 1.0
    ema_beta: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    keep_state: bool = False
    momentum_flush: bool = False
    sgd_alpha: float | None = None
    min_inclusion: float = 0.0
    explore: bool = True

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if not (0.0 < self.delta <= 1.0):
            raise ValueError(f"delta must lie in (0, 1], got {self.delta}")
        if self.T < 1:
            raise ValueError(f"T must be ≥ 1, got {self.T}")
        if not (self.alpha > 0 and np.isfinite(self.alpha)):
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if self.sigma < 0:
            raise ValueError(f"sigma must be ≥ 0, got {self.sigma}")
        if not (self.eta >= 0 and np.isfinite(self.eta)):
            raise ValueError(f"eta must be ≥ 0, got {self.eta}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError("beta1 and beta2 must lie in [0, 1)")


@dataclass
class SimResult:
    """Outcome of one rule: ``grad_sq`` (K+1, S) = ‖∇f(θ_k)‖² per block update and seed.

    ``inclusion_counts`` (S, M): how often each module was active; ``draws``: the active sets of seed 0
    (only with ``record_draws``); ``target_pi``: (K, M) the sampler's π for seed 0 before each draw (only
    with ``record_draws``); ``f_final`` (S,) the objective at θ_K.
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
             record_draws: bool = False, progress: Callable[[int], None] | None = None,
             sampler_process: bool = False) -> SimResult:
    """Run K block updates of ``rule`` on ``problem`` for ``n_seeds`` seeds at once (see module docstring).

    Args:
        problem: the objective (θ ∈ R^n, M modules).
        rule: one of :data:`ALL_RULES`.
        K: number of block updates (periods of T steps).
        n_seeds: S, independent runs (different noise and sampler streams, same θ₀).
        cfg: hyper-parameters (α absolute).
        seed: base seed; the noise Generator is an SFC64 seeded (seed, rule index) (its normals cost ~20% less
            than the default PCG64's, and a run draws one per active coordinate and step), the sampler (one
            stream per seed run) with seed·1000.
        record_draws: keep seed 0's active sets and target π (for heatmaps; memory K·M).
        progress: called with the number of block updates just finished (for a progress bar).
        sampler_process: run the sampler in a second process, one draw ahead
            (:class:`~misa_theory.sampler_process.SamplerProcess`): bit-identical results, faster on a
            machine with a free core (a fork, ≈ 20 ms to start, and it saves ≈ 0.1 ms per block update on the
            bench problem); ignored by the baselines and where :func:`misa_theory.sampler_process.available`
            is false.

    Returns:
        :class:`SimResult` with grad_sq of shape (K+1, S).
    """
    if rule not in ALL_RULES:
        raise ValueError(f"rule must be one of {', '.join(ALL_RULES)}; got {rule!r}")
    if K <= 0:
        raise ValueError(f"K must be positive, got {K}")
    if n_seeds <= 0:
        raise ValueError(f"n_seeds must be positive, got {n_seeds}")
    cfg.validate()
    if rule in BASELINES:
        return _run(problem, rule, K, n_seeds, cfg, seed, None, record_draws, progress)
    kwargs = dict(sizes=problem.sizes, groups=problem.groups, delta=cfg.delta, rule=rule, seed=seed * 1000,
                  eta=cfg.eta, ema_beta=cfg.ema_beta, min_inclusion=cfg.min_inclusion, explore=cfg.explore,
                  streams=n_seeds)
    if sampler_process and available():
        with SamplerProcess(kwargs, K, record=record_draws) as child:
            return _run(problem, rule, K, n_seeds, cfg, seed, child, record_draws, progress)
    return _run(problem, rule, K, n_seeds, cfg, seed, ModuleSampler(**kwargs), record_draws, progress)


def _run(problem: Problem, rule: str, K: int, S: int, cfg: SimConfig, seed: int,
         sampler: ModuleSampler | SamplerProcess | None, record_draws: bool,
         progress: Callable[[int], None] | None) -> SimResult:
    """The loop of :func:`simulate` (arguments validated there); ``sampler`` None for the baselines."""
    n, M = problem.n_params, problem.n_modules
    rng = np.random.Generator(np.random.SFC64([seed, ALL_RULES.index(rule)]))
    full = sampler is None
    child = sampler if isinstance(sampler, SamplerProcess) else None
    oracle = make_oracle(problem, problem.x0(S), active_fraction=1.0 if full else cfg.delta)
    noise_mod = noise_flat = None  # σ·noise_std per module where it is constant on modules (as Problem builds it)
    if cfg.sigma > 0:
        per_module = problem.noise_std[problem.offsets[:-1]]
        if np.array_equal(np.repeat(per_module, problem.sizes), problem.noise_std):
            noise_mod = cfg.sigma * per_module
        else:
            noise_flat = np.tile(cfg.sigma * problem.noise_std, S)
    b1, b2, eps, T = cfg.beta1, cfg.beta2, cfg.eps, cfg.T
    keep = cfg.keep_state or rule == "adam"
    if keep:  # persistent state, read back for modules that stay active
        m_full, v_full = np.zeros(S * n), np.zeros(S * n)
        c1_full, c2_full = np.ones(S * n), np.ones(S * n)  # β₁^c, β₂^c per coordinate
        prev = np.zeros((S, M), dtype=bool)
    sgd = rule == "sgd"
    step = cfg.alpha if not sgd else (cfg.sgd_alpha if cfg.sgd_alpha is not None else cfg.alpha)
    flush = cfg.momentum_flush and not full
    one_b1, one_b2 = 1.0 - b1, 1.0 - b2
    sizes, starts_of = problem.sizes, problem.offsets[:-1]

    def gather(mask: np.ndarray) -> Active:  # the active (seed, module) pairs of a mask (S, M)
        return Active.from_mask(mask, sizes, starts_of, n)

    grad_sq = np.empty((K + 1, S))
    counts = np.zeros((S, M), dtype=np.int64)
    draws: list[np.ndarray] = []
    target_pi = np.empty((K, M)) if record_draws and not full else None
    # work buffers sized for the largest possible active set, so the inner loop allocates nothing big
    cap = S * n if full else S * min(n, sampler.budget)
    buf_g, buf_m, buf_v, buf_t, buf_z = (np.empty(cap) for _ in range(5))
    obs = child.obs if child is not None else np.zeros((S, M))
    all_on = np.ones((S, M), dtype=bool)
    cached = gather(all_on) if full else None  # the baselines never change their active set

    # with a sampler process, the noise variates are drawn ahead, while the child draws (the same stream)
    noisy = noise_mod is not None or noise_flat is not None
    pool = _NormalPool(rng, T * cap) if child is not None and noisy else None
    grad_sq[0] = oracle.grad_sq()
    for k in range(K):
        if pool is not None:
            pool.top_up()
        if full:
            mask = all_on
            active = cached
        else:
            if child is not None:
                mask = child.draw()
                if target_pi is not None:
                    target_pi[k] = child.target
            else:
                if target_pi is not None:
                    target_pi[k] = sampler.target_inclusion()[0]
                mask = sampler.draw()
            active = gather(mask)
        sel_seed, sel_mod, starts = active.seed, active.module, active.starts
        size = active.size
        g, m, v, tmp, z = buf_g[:size], buf_m[:size], buf_v[:size], buf_t[:size], buf_z[:size]

        fresh = True  # m = v = 0 and c = 0 on every active coordinate
        if keep and size:
            act = active.idx
            stay = np.repeat(prev[sel_seed, sel_mod], active.lens)
            np.copyto(m, np.where(stay, m_full[act], 0.0))
            np.copyto(v, np.where(stay, v_full[act], 0.0))
            c1 = np.where(stay, c1_full[act], 1.0)
            c2 = np.where(stay, c2_full[act], 1.0)
            fresh = False
        else:
            c1, c2 = 1.0, 1.0
        noise = None
        if size and noise_mod is not None:
            noise = noise_mod[sel_mod].repeat(active.lens)
        elif size and noise_flat is not None:
            noise = noise_flat[active.idx]
        sq_acc = None

        for t in range(T):
            if size == 0:
                continue
            oracle.grad_at(active, g)
            if noise is not None:
                if pool is not None:
                    pool.take(z)
                else:
                    rng.standard_normal(out=z)
                z *= noise
                g += z
            np.multiply(g, g, z)  # g², reused by the norms and by v
            sq = np.add.reduceat(z, starts)
            if sq_acc is None:
                sq_acc = sq
            else:
                sq_acc += sq
            if t == T - 1 and not full:
                # the observation is complete: hand it over now, so that a sampler process draws the next
                # active set while this one is still stepping
                obs[sel_seed, sel_mod] = sq_acc if T == 1 else sq_acc / T
                if child is not None:
                    child.observe()
                else:
                    sampler.observe(mask, obs)
            if sgd:
                g *= step
                oracle.step(active, g)
                continue
            if fresh and t == 0:
                # β·0 + (1 − β)·x is exactly (1 − β)·x and β·1 is β: the general update below, without the
                # zero fill and the two passes that multiply and add zeros
                np.multiply(g, one_b1, m)
                np.multiply(z, one_b2, v)
                c1, c2 = b1, b2
            else:
                m *= b1
                np.multiply(g, one_b1, tmp)
                m += tmp
                v *= b2
                z *= one_b2
                v += z
                c1 = c1 * b1
                c2 = c2 * b2
            _adam_direction(m, v, c1, c2, eps, step, tmp)
            oracle.step(active, tmp)

        if size and not sgd:
            if flush:
                _adam_direction(m, v, c1, c2, eps, step * b1 / (1.0 - b1), tmp)
                oracle.step(active, tmp)
            if keep:
                act = active.idx
                m_full[act], v_full[act] = m, v
                c1_full[act], c2_full[act] = c1, c2
                prev[:] = mask
        if child is not None and size == 0:
            child.skip()
        # bookkeeping after the observation is handed over (with a sampler process, off the serial path)
        if record_draws:
            draws.append(np.flatnonzero(mask[0]))
        counts += mask
        # ‖∇f(θ_{k+1})‖², the start of the next period, taken here rather than after the next draw: with a
        # sampler process it overlaps the draw
        grad_sq[k + 1] = oracle.grad_sq()
        if progress is not None:
            progress(1)

    return SimResult(rule, grad_sq, problem.f(oracle.theta), counts, draws, target_pi)


class _NormalPool:
    """Standard normals of ``rng`` drawn ahead in chunks and handed out in order: the values are those that
    consecutive ``rng.standard_normal`` calls of the requested sizes would give (a generator's normals do
    not depend on how the stream is cut into calls).

    Args:
        rng: the generator.
        need: the most one block update takes (T × the largest active set); :meth:`top_up` keeps at least that.
    """

    def __init__(self, rng: np.random.Generator, need: int) -> None:
        self._rng, self._need = rng, need
        self._buf = np.empty(3 * need)  # refills of ≥ 2·need: one every block update or two, in the idle time
        self._at = self._buf.size  # empty

    def top_up(self) -> None:
        """Make sure the next block update's normals are in the pool."""
        left = self._buf.size - self._at
        if left < self._need:
            self._buf[:left] = self._buf[self._at:]
            self._rng.standard_normal(out=self._buf[left:])
            self._at = 0

    def take(self, out: np.ndarray) -> None:
        """Fill ``out`` with the next normals of the stream."""
        n = out.size
        out[...] = self._buf[self._at:self._at + n]
        self._at += n


def _adam_direction(m: np.ndarray, v: np.ndarray, c1: np.ndarray | float, c2: np.ndarray | float, eps: float,
                    scale: float, out: np.ndarray) -> np.ndarray:
    """out = scale·m̂/(√v̂ + ε) with m̂ = m/(1 − β₁^c), v̂ = v/(1 − β₂^c) (c1 = β₁^c, c2 = β₂^c), in four passes
    over ``out`` (the bias correction of m and the scale are one multiply) and without temporaries of the active
    set's size when c1 is a scalar."""
    np.divide(v, 1.0 - c2, out=out)
    np.sqrt(out, out=out)
    out += eps
    np.divide(m, out, out=out)
    out *= scale / (1.0 - c1)
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


@dataclass(frozen=True)
class RateFit:
    """Log-log fit of y(K) = C·K^slope over horizons K (y averaged over seeds).

    slope with a 95% interval [lo, hi] (bootstrap over seeds, percentile), the linregress standard error,
    C_fit = exp(intercept) and C_half = max_K y(K)·√K (the constant in y ≤ C/√K over the measured range);
    ``covered`` = lo ≤ −1/2 (the fitted rate is at least as fast as 1/√K within the interval).
    """

    slope: float
    lo: float
    hi: float
    stderr: float
    C_fit: float
    C_half: float
    covered: bool
    Ks: tuple[int, ...]
    y: tuple[float, ...]


def rate_fit(Ks: Sequence[int], per_seed: Sequence[np.ndarray], n_boot: int = 2000, seed: int = 0) -> RateFit:
    """Fit log mean_s y_s(K) = log C + slope·log K; ``per_seed[i]`` holds y over seeds at horizon ``Ks[i]``.

    The bootstrap resamples seed indices (the same resample at every K, since seed s at horizon K and at K'
    share the sampler seed) and refits, giving the 2.5/97.5% percentiles of the slope.
    """
    from scipy.stats import linregress

    Ks_arr = np.asarray(Ks, dtype=float)
    Y = np.stack([np.asarray(y, dtype=float) for y in per_seed])  # (nK, S)
    x = np.log(Ks_arr)
    fit = linregress(x, np.log(Y.mean(axis=1)))
    rng = np.random.default_rng(seed)
    S = Y.shape[1]
    picks = rng.integers(0, S, size=(n_boot, S))
    ym = np.log(Y[:, picks].mean(axis=2))  # (nK, n_boot)
    xc = x - x.mean()
    slopes = (xc @ (ym - ym.mean(axis=0))) / (xc @ xc)
    lo, hi = np.percentile(slopes, [2.5, 97.5])
    y = Y.mean(axis=1)
    return RateFit(float(fit.slope), float(lo), float(hi), float(fit.stderr), float(np.exp(fit.intercept)),
                   float(np.max(y * np.sqrt(Ks_arr))), bool(lo <= -0.5 + 1e-9), tuple(int(k) for k in Ks),
                   tuple(float(v) for v in y))


def block_updates_to_target(grad_sq: np.ndarray, target: float) -> np.ndarray:
    """First k with ‖∇f(θ_k)‖² ≤ target, per seed (shape (S,)); K+1 where never reached (censored)."""
    hit = grad_sq <= target
    first = np.argmax(hit, axis=0)
    return np.where(hit.any(axis=0), first, grad_sq.shape[0]).astype(np.int64)
