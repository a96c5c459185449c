r"""Gradient oracles: what the simulator asks of a problem, priced by the active set where the problem allows.

A block-coordinate run needs three things per block update k (all seeds at once, θ of shape (S, n)):

* ``grad_sq()``  — ‖∇f(θ)‖² per seed, shape (S,) (the recorded quantity; exact);
* ``grad_at(a)`` — ∇f(θ) on the active coordinates ``a`` only (what the Adam step consumes);
* ``step(a, d)`` — θ[a] −= d, the update of the active coordinates.

:class:`DenseOracle` answers every call with one dense ``problem.grad`` (cached until θ moves): O(S·n) per
step, for any :class:`~misa_theory.problems.Problem`.

:class:`RobustOracle` exploits the structure of the ``robust`` family,

    f(θ) = Σ_b F_b(θ_b) + λ/r Σ_j φ(⟨c_j, θ⟩ − z_j),       ∇f(θ) = G(θ) + C u,   u_j = λ/r · φ'(⟨c_j, θ⟩ − z_j),

where F_b(θ_b) = s_b/m Σ_i φ(⟨a_bi, θ_b⟩ − y_bi) depends on module b's own coordinates, G = (∇F_b)_b is the
block-separable part, C = [c_1 … c_r] (n × r) and u ∈ R^r.  Module b's block gradient is G_b = A_b·κ_b with
A_b = [a_b1 … a_bm] (n_b × m) and κ_bi = s_b/m · φ'(⟨a_bi, θ_b⟩ − y_bi): m numbers per module.  A step that
moves only the modules in B leaves κ_b unchanged for b ∉ B, so the oracle caches per (seed, module) κ_b,
N_b = ‖G_b‖² = κ_bᵀ(A_bᵀA_b)κ_b, P_b = C_bᵀG_b = (C_bᵀA_b)κ_b ∈ R^r and T_b = C_bᵀθ_b ∈ R^r (the module's
share of the coupling residual Cᵀθ − z = Σ_b T_b − z).  Then

    ‖∇f‖² = ‖G‖² + 2 uᵀ CᵀG + uᵀ (CᵀC) u = Σ_b N_b + 2 uᵀ Σ_b P_b + uᵀ Q u,     Q = CᵀC (r × r, fixed),

costs O(S·M·(m + r)), ∇f on module b of seed s is F_b·(κ_b, u_s) with F_b = [A_b C_b] (n_b × (m + r)), and
a step recomputes only the moved pairs: one product F_bᵀθ_b (giving the residuals and T_b) plus O(m·(m + r))
with the fixed K_b = F_bᵀA_b, i.e. O(S·δ·n·(m + r)) per block update instead of O(S·n·(m + r)).  Every cached
quantity is recomputed from θ (never updated incrementally), so nothing drifts.  The expansion of ‖∇f‖² and
N_b through the Gram matrix lose absolute accuracy ≈ 1e-16·(‖G‖² + ‖Cu‖² + Σ_b‖A_b‖²‖κ_b‖²), far below the
values a run records.

Equal-sized neighbouring modules form a *slab* (``Problem.slab_features``; 3 for a transformer layout: q/o, k/v,
gate/up/down), and an :class:`Active` set lists its pairs by module, so the pairs of one slab are adjacent and
each operation above is one batched product per slab on exact sizes: no padding, no per-module Python loop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from .problems import Problem, RobustFeatures

__all__ = ["Active", "GradientOracle", "DenseOracle", "RobustOracle", "make_oracle"]


class Active:
    """The active coordinates of all seeds: (seed, module) pairs in (module, seed) order, each with its run of
    coordinates.

    ``seed``/``module`` (P,) the selected pairs, sorted by module, then seed; ``lens`` (P,) their sizes n_b;
    ``starts`` (P,) where each pair's run begins in the concatenation of the runs, ``size`` = Σ n_b its length
    A.  Module b of seed s covers the flat indices s·n + offsets[b] + [0, n_b) of θ.reshape(-1); ``idx`` (A,)
    lists them run after run (computed on first use and kept: :class:`RobustOracle` moves θ with it, and the
    simulator gathers per-coordinate Adam state with it under ``retain_state``).  The module-major order puts the
    pairs of equal-sized neighbouring modules next to each other, so :class:`RobustOracle` handles each such slab
    as one batched product; ``ordered`` says the order is known (:meth:`from_mask` builds it so), otherwise
    RobustOracle checks it.
    """

    __slots__ = ("seed", "module", "starts", "lens", "size", "ordered", "_offsets", "_n", "_idx")

    def __init__(self, seed: np.ndarray, module: np.ndarray, starts: np.ndarray, lens: np.ndarray,
                 offsets: np.ndarray, n: int, size: int | None = None, ordered: bool = False) -> None:
        self.seed, self.module, self.starts, self.lens = seed, module, starts, lens
        self.size = size if size is not None else (int(starts[-1] + lens[-1]) if lens.size else 0)
        self._offsets, self._n = offsets, n
        self._idx: np.ndarray | None = None
        self.ordered = ordered  # known to be in module order (from_mask builds it so)

    @classmethod
    def from_mask(cls, mask: np.ndarray, sizes: np.ndarray, offsets: np.ndarray, n: int) -> Active:
        """The pairs of an active mask (S, M) over modules of ``sizes`` starting at ``offsets`` (M,) in rows of
        θ of length n."""
        module, seed = mask.T.nonzero()
        lens = sizes[module]
        ends = lens.cumsum()
        size = int(ends[-1]) if ends.size else 0
        ends -= lens
        return cls(seed, module, ends, lens, offsets, n, size, True)

    @property
    def idx(self) -> np.ndarray:
        """(A,) flat indices into θ.reshape(-1), run after run: one ``repeat`` of the run starts plus a ramp."""
        if self._idx is None:
            shift = self.seed * self._n + self._offsets[self.module] - self.starts
            self._idx = shift.repeat(self.lens) + np.arange(self.size)
        return self._idx


class GradientOracle(ABC):
    """Exact gradient information at the oracle's own θ (shape (S, n), advanced only through :meth:`step`)."""

    def __init__(self, problem: Problem, theta: np.ndarray) -> None:
        self.problem = problem
        self.theta = np.array(theta, dtype=np.float64, order="C")
        self.flat = self.theta.reshape(-1)

    @abstractmethod
    def grad_sq(self) -> np.ndarray:
        """‖∇f(θ)‖² per seed, shape (S,)."""

    @abstractmethod
    def grad_at(self, active: Active, out: np.ndarray) -> np.ndarray:
        """Write ∇f(θ)[active.idx] (shape (A,)) into ``out`` and return it (run after run)."""

    @abstractmethod
    def step(self, active: Active, delta: np.ndarray) -> None:
        """θ[active.idx] −= delta."""


class DenseOracle(GradientOracle):
    """Any problem: one dense ``problem.grad`` per θ, reused until θ moves."""

    def __init__(self, problem: Problem, theta: np.ndarray) -> None:
        super().__init__(problem, theta)
        self._g: np.ndarray | None = None

    def _grad(self) -> np.ndarray:
        if self._g is None:
            self._g = self.problem.grad(self.theta)
        return self._g

    def grad_sq(self) -> np.ndarray:
        g = self._grad()
        return np.einsum("sn,sn->s", g, g)

    def grad_at(self, active: Active, out: np.ndarray) -> np.ndarray:
        return np.take(self._grad().reshape(-1), active.idx, out=out)

    def step(self, active: Active, delta: np.ndarray) -> None:
        self.flat[active.idx] -= delta
        self._g = None


#: What :meth:`RobustOracle._prepare` derives once per active set: the pairs' cache rows (P,), their modules
#: (P,) and per non-empty slab (lo, hi, a0, a1, F_bᵀ gathered).  The module constants the refresh needs are
#: gathered there, after the gradient has been handed out.
_Prepared = tuple[np.ndarray, np.ndarray, list[tuple]]


class RobustOracle(GradientOracle):
    """Incremental oracle for :class:`~misa_theory.problems.RobustFeatures` (see the module docstring).

    θ moves through :meth:`step` only, which also takes the products F_bᵀθ_b of the pairs it moved while their
    coordinates are at hand (:meth:`_products`); the rest of their refresh waits for the next query.  The
    per-step methods are written for few interpreter operations: a block update costs some sixty small array
    operations, so Python overhead is a large part of it."""

    def __init__(self, problem: RobustFeatures, theta: np.ndarray) -> None:
        super().__init__(problem, theta)
        p = problem
        S, M, m, r = self.theta.shape[0], p.n_modules, p.m, p.r
        mr = m + r
        self.S = S
        self._m, self._r, self._mr, self._S = m, r, mr, S
        # per slab (a run of equal-sized modules): its first module and F_bᵀ = [A_b C_b]ᵀ of its modules,
        # (count, m+r, size)
        self._slabs: list[tuple[int, np.ndarray]] = []
        # per module, gathered as one row per pair and padded with r zeros to the m+r columns of F_bᵀθ_b:
        # (y_b, 0), (2·s_b/m, 0) (the 2 of φ'(t) = 2t/(1+t²)² folded in) and K_b = [A_bᵀA_b 0; 2·C_bᵀA_b 0]
        self._const = np.zeros((M, 2 * mr + mr * mr))
        for first, count, size, start, a, a_t, y, w in p.slab_features:
            f_t = np.empty((count, mr, size))
            f_t[:, :m] = a_t
            f_t[:, m:] = p.coupling_features[start:start + count * size].reshape(count, size, r).transpose(0, 2, 1)
            self._slabs.append((first, f_t))
            const = self._const[first:first + count]
            const[:, :m] = y
            const[:, mr:mr + m] = 2.0 * w
            k = np.zeros((count, mr, mr))
            k[:, :, :m] = np.matmul(f_t, a)
            k[:, m:] *= 2.0
            const[:, 2 * mr:] = k.reshape(count, -1)
        self._slab_first = np.array([s[0] for s in self._slabs] + [M])
        self._local = np.arange(M) - np.repeat(self._slab_first[:-1], np.diff(self._slab_first))  # index in slab
        self._q = p.coupling_features.T @ p.coupling_features
        self._two_lam = 2.0 * p.coupling / r  # u = λ/r·φ'(t) = (2λ/r)·t/(1+t²)²
        # The cache, row b·S + s for pair (s, b): (κ_b, 0) (m+r) for grad_at, and the statistics
        # T_b = C_bᵀθ_b (r) | A_bᵀG_b (m) | 2·P_b (r) | N_b for grad_sq.  A last module row holds 0 but T = −z
        # for every seed, so that one product over the module axis gives every seed's Cᵀθ − z, Σ_b N_b and
        # 2·Σ_b P_b at once (the A_bᵀG_b sums are not read; keeping them lets K_b·κ_b land in place).
        width = 2 * r + m + 1
        self._stats = np.zeros((M + 1, S * width))  # module-major: the sum is one matrix-vector product
        self._stats.reshape(M + 1, S, width)[M, :, :r] = -p.coupling_targets
        self._stat_rows = self._stats.reshape((M + 1) * S, width)
        self._kappa = np.zeros(((M + 1) * S, mr))
        self._ones = np.ones(M + 1)
        self._u: np.ndarray | None = None
        self._prep_key: Active | None = None
        self._prep_val: _Prepared | None = None
        everything = Active.from_mask(np.ones((S, M), dtype=bool), p.sizes, p.offsets[:-1], p.n_params)
        prep = self._prepare(everything)
        lin = self._products(prep, self.flat.take(everything.idx))
        # pairs moved but not yet refreshed, in step order: (active, prepared, their F_bᵀθ_b after the step)
        self._pending: list[tuple[Active, _Prepared, np.ndarray]] = [(everything, prep, lin)]

    def _prepare(self, active: Active) -> _Prepared:
        """Cache rows and modules of the pairs, and per non-empty slab: the pairs' range [lo, hi), their
        coordinates' range [a0, a1) in the run concatenation and the gathered F_bᵀ (hi − lo, m+r, size).

        Kept for the last active set seen: grad_at, step and the next refresh all ask about the same one."""
        if active is self._prep_key:
            return self._prep_val
        mods, seeds = active.module, active.seed
        if not active.ordered and (mods[1:] < mods[:-1]).any():
            raise ValueError("Active pairs must be sorted by module (see Active)")
        bounds = mods.searchsorted(self._slab_first).tolist()
        local_all = self._local[mods]
        parts = []
        a0 = 0  # module order: slab after slab, each pair of a slab with `size` coordinates
        for (_first, f_t), lo, hi in zip(self._slabs, bounds[:-1], bounds[1:], strict=True):
            if lo < hi:
                a1 = a0 + (hi - lo) * f_t.shape[2]
                parts.append((lo, hi, a0, a1, f_t.take(local_all[lo:hi], 0)))
                a0 = a1
        val = (mods * self._S + seeds, mods, parts)
        self._prep_key, self._prep_val = active, val
        return val

    def _products(self, prep: _Prepared, theta_runs: np.ndarray) -> np.ndarray:
        """F_bᵀθ_b (P, m+r) of the prepared pairs from their coordinates ``theta_runs`` (A,), run after run."""
        lin = np.empty((prep[0].size, self._mr))
        for lo, hi, a0, a1, f_g in prep[-1]:
            np.matmul(f_g, theta_runs[a0:a1].reshape(hi - lo, -1, 1), lin[lo:hi, :, None])
        return lin

    def _refresh(self, prep: _Prepared, lin: np.ndarray) -> None:
        """Store the cache rows of the prepared pairs, given their products ``lin`` = F_bᵀθ_b (P, m+r).

        (κ_b, 0) = (s_b/m·φ'(A_bᵀθ_b − y_b), 0) is elementwise on (lin − (y_b, 0)); K_b·(κ_b, 0) = (A_bᵀG_b, 2·P_b)
        and N_b = κ_bᵀA_bᵀG_b follow without touching the coordinates again."""
        rows, mods, _parts = prep
        m, r, mr = self._m, self._r, self._mr
        # (y_b, 0), (2·s_b/m, 0) and K_b of the pairs' modules (take: 2-3× cheaper than fancy indexing for rows)
        const = self._const.take(mods, 0)
        y, w, k = const[:, :mr], const[:, mr:2 * mr], const[:, 2 * mr:].reshape(-1, mr, mr)
        res = np.subtract(lin, y, lin)  # (residuals, T_b)
        den = res * res
        den += 1.0
        den *= den
        kappa = np.divide(res, den, den)
        kappa *= w  # (κ_b, 0): the r columns past m are zeroed
        stats = np.empty((rows.size, self._stat_rows.shape[1]))
        stats[:, :r] = res[:, m:]
        kc = np.matmul(k, kappa[:, :, None], stats[:, r:-1, None])
        np.matmul(kappa[:, None, :], kc, stats[:, -1:, None])
        self._stat_rows[rows] = stats
        self._kappa[rows] = kappa

    def _flush(self) -> None:
        """Bring the cache up to date with θ: refresh the pairs moved since the last query, in step order (where
        two pending sets share a pair, the later one's products, taken after both steps, are the ones kept)."""
        for _active, prep, lin in self._pending:
            self._refresh(prep, lin)
        self._pending.clear()
        self._u = None

    def _coupling(self, sums: np.ndarray) -> np.ndarray:
        """u = λ/r·φ'(Cᵀθ − z) per seed (S, r) from the statistics' sums (flushed), kept until θ moves."""
        t = sums[:, :self._r]  # Cᵀθ − z
        den = t * t
        den += 1.0
        den *= den
        u = np.divide(t, den, den)
        u *= self._two_lam
        self._u = u
        return u

    def _sums(self) -> np.ndarray:
        """(S, ·): per seed, Cᵀθ − z, Σ_b A_bᵀG_b, 2·Σ_b P_b, Σ_b N_b (the statistics summed over modules)."""
        return np.matmul(self._ones, self._stats).reshape(self._S, -1)

    def grad_sq(self) -> np.ndarray:
        if self._pending:
            self._flush()
        sums = self._sums()
        u = self._coupling(sums) if self._u is None else self._u
        quad = np.matmul(u, self._q)
        quad += sums[:, self._mr:-1]
        quad *= u
        return np.add.reduce(quad, 1) + sums[:, -1]

    def grad_at(self, active: Active, out: np.ndarray) -> np.ndarray:
        if active.size == 0:
            return out
        if self._pending:
            self._flush()
        prep = self._prepare(active)
        rows, parts = prep[0], prep[-1]
        u = self._u if self._u is not None else self._coupling(self._sums())
        # ∇f on pair (s, b)'s coordinates is F_b·(κ_b, u_s): one coefficient row per pair, one product per slab
        coeff = self._kappa.take(rows, 0)
        coeff[:, self._m:] = u.take(active.seed, 0)
        coeff = coeff[:, None, :]
        dst = out if out.flags.c_contiguous else np.empty(out.shape)
        for lo, hi, a0, a1, f_g in parts:
            np.matmul(coeff[lo:hi], f_g, dst[a0:a1].reshape(hi - lo, 1, -1))
        if dst is not out:
            out[...] = dst
        return out

    def step(self, active: Active, delta: np.ndarray) -> None:
        if active.size == 0:
            return
        prep = self._prepare(active)
        moved = self.flat.take(active.idx)  # the pairs' θ, run after run
        moved -= delta
        self.flat[active.idx] = moved
        lin = self._products(prep, moved)
        pending = self._pending
        if pending and pending[-1][0] is active:
            pending.pop()  # the same pairs again: this step's products supersede the last one's
        pending.append((active, prep, lin))
        self._u = None


#: Largest active fraction δ for which :func:`make_oracle` picks :class:`RobustOracle`.  Measured with whole
#: simulator block updates on the 10⁴-parameter bench problem, 16 seeds, misa, sampler replayed, incremental
#: vs dense: 161 vs 480 µs at δ = 0.03, 357 vs 727 at 0.1, 939 vs 1394 at 0.25, 1749 vs 1872 at 0.45, about
#: equal at 0.5; with the real sampler at δ = 0.25 (K = 800, twice): 1,188/1,214 vs 1,997/1,628 µs.  0.3 keeps
#: a margin below the crossing and covers the CLI's default δ = 0.25.
INCREMENTAL_MAX_FRACTION = 0.3


def make_oracle(problem: Problem, theta: np.ndarray, active_fraction: float = 1.0) -> GradientOracle:
    """The fastest exact oracle for ``problem`` when a fraction ``active_fraction`` of it moves per step:
    incremental for ``robust`` up to :data:`INCREMENTAL_MAX_FRACTION`, dense otherwise (same values)."""
    if isinstance(problem, RobustFeatures) and active_fraction <= INCREMENTAL_MAX_FRACTION:
        return RobustOracle(problem, theta)
    return DenseOracle(problem, theta)
