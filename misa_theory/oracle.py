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

Equal-sized neighbouring modules form a *slab* (``Problem._slabs``; 3 for a transformer layout: q/o, k/v,
gate/up/down), and an :class:`Active` set lists its pairs by module, so the pairs of one slab are adjacent and
each operation above is one batched product per slab on exact sizes: no padding, no per-module Python loop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .problems import Problem, RobustFeatures

__all__ = ["Active", "GradientOracle", "DenseOracle", "RobustOracle", "make_oracle"]


@dataclass(frozen=True)
class Active:
    """The active coordinates of all seeds, in (module, seed, coordinate) order.

    ``idx`` (A,) flat indices into θ.reshape(-1) (seed s, coordinate c ↦ s·n + c); ``module``/``seed`` (P,)
    the selected (seed, module) pairs in the same order, sorted by module, then seed; ``starts`` (P,) where
    each pair's run (its module's coordinates in increasing order) begins in ``idx``.  The module-major order
    puts the pairs of equal-sized neighbouring modules next to each other, so :class:`RobustOracle` handles
    each such slab as one batched product.
    """

    idx: np.ndarray
    seed: np.ndarray
    module: np.ndarray
    starts: np.ndarray


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
        """Write ∇f(θ)[active.idx] (shape (A,)) into ``out`` and return it."""

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


class _Prepared(NamedTuple):
    """What :class:`RobustOracle` derives once per active set (see :meth:`RobustOracle._prepare`)."""

    rows: np.ndarray  # (P,) cache row s·M + b of each pair
    const: np.ndarray  # (P, ·) the pairs' module constants
    parts: list[tuple]  # per non-empty slab: (lo, hi, a0, a1, seeds, local, F_bᵀ gathered, θ view)


class RobustOracle(GradientOracle):
    """Incremental oracle for :class:`~misa_theory.problems.RobustFeatures` (see the module docstring).

    θ is moved through :meth:`step` only; the pairs it moved are refreshed lazily, at the next query."""

    def __init__(self, problem: RobustFeatures, theta: np.ndarray) -> None:
        super().__init__(problem, theta)
        p = problem
        S, M, m, r = self.theta.shape[0], p.n_modules, p.m, p.r
        self.S = S
        self._mr = m + r
        # per slab (a run of equal-sized modules): F_bᵀ = [A_b C_b]ᵀ of its modules, (count, m+r, size), and the
        # view θ[:, slab].reshape(S, count, size) in which pair (s, b)'s coordinates are one row
        self._slabs: list[tuple[int, int, np.ndarray, np.ndarray]] = []
        # per module, gathered as one row per pair: y_b (m), 2·s_b/m (1), K_b = F_bᵀA_b ((m+r)·m, row-major)
        self._const = np.empty((M, m + 1 + (m + r) * m))
        for first, count, size, start, a, a_t, y, w in p._feat:
            f_t = np.empty((count, m + r, size))
            f_t[:, :m] = a_t
            f_t[:, m:] = p._c[start:start + count * size].reshape(count, size, r).transpose(0, 2, 1)
            self._slabs.append((first, size, f_t, self.theta[:, start:start + count * size].reshape(S, count, size)))
            self._const[first:first + count, :m] = y
            self._const[first:first + count, m] = 2.0 * w[:, 0]  # the 2 of φ'(t) = 2t/(1+t²)², folded in once
            self._const[first:first + count, m + 1:] = np.matmul(f_t, a).reshape(count, -1)
        self._slab_first = np.array([s[0] for s in self._slabs] + [M])
        self._q = p._c.T @ p._c
        self._two_lam = 2.0 * p.coupling / r
        # cache row s·M + b of pair (s, b): κ_b (m) | N_b | 2·P_b (r) | residuals A_bᵀθ_b − y_b (m) | T_b (r).
        # grad_sq sums whole rows per seed (one product); the κ and residual sums are simply not read.
        self._n_col, self._p_col, self._t_col = m, m + 1, 2 * m + 1 + r
        self._table = np.zeros((S, M, 2 * m + 1 + 2 * r))
        self._rows = self._table.reshape(S * M, -1)
        self._ones = np.ones(M)
        self._u: np.ndarray | None = None
        self._prep_key: Active | None = None
        self._prep_val: _Prepared | None = None
        # pairs moved but not yet refreshed, in step order: (active, prepared, their θ rows after the step, or None
        # to read them from θ)
        self._pending: list[tuple[Active, _Prepared, list[np.ndarray] | None]] = []
        mods, seeds = np.nonzero(np.ones((M, S), dtype=bool))
        lens = p.sizes[mods]
        starts = np.cumsum(lens) - lens
        idx = np.repeat(seeds * p.n_params + p.offsets[mods] - starts, lens) + np.arange(S * p.n_params)
        everything = Active(idx, seeds, mods, starts)
        self._pending.append((everything, self._prepare(everything), None))

    def _prepare(self, active: Active) -> _Prepared:
        """Cache rows and module constants of the pairs, and per non-empty slab: the pairs' range [lo, hi), their
        coordinates' range [a0, a1) in ``active.idx``, their seeds and module indices within the slab, the
        gathered F_bᵀ (hi − lo, m+r, size) and the slab's θ view.

        Kept for the last active set seen: grad_at, step and the next refresh all ask about the same one."""
        if active is self._prep_key:
            return self._prep_val
        mods, seeds = active.module, active.seed
        if (mods[1:] < mods[:-1]).any():
            raise ValueError("Active pairs must be sorted by module (see Active)")
        bounds = np.searchsorted(mods, self._slab_first).tolist()
        parts = []
        for j, (first, size, f_t, view) in enumerate(self._slabs):
            lo, hi = bounds[j], bounds[j + 1]
            if lo < hi:
                local = mods[lo:hi] - first
                a0 = int(active.starts[lo])
                parts.append((lo, hi, a0, a0 + (hi - lo) * size, seeds[lo:hi], local, f_t[local], view))
        val = _Prepared(seeds * self.problem.n_modules + mods, self._const[mods], parts)
        self._prep_key, self._prep_val = active, val
        return val

    def _refresh(self, prep: _Prepared, blocks: list[np.ndarray] | None) -> None:
        """Recompute the cache rows of the prepared pairs from θ (``blocks``: their θ rows per slab, if current).

        The residuals and T_b are one batched product F_bᵀθ_b per slab; N_b = κ_bᵀ(A_bᵀA_b)κ_b and
        P_b = (C_bᵀA_b)κ_b then come from K_b = F_bᵀA_b without touching the coordinates again."""
        rows, const, parts = prep
        m, mr = self.problem.m, self._mr
        new = np.empty((rows.size, self._rows.shape[1]))
        lin = new[:, self._t_col - m:]  # (P, m+r): A_bᵀθ_b (made residuals in place), then T_b = C_bᵀθ_b
        for j, (lo, hi, _a0, _a1, seeds, local, f_g, view) in enumerate(parts):
            blk = view[seeds, local] if blocks is None else blocks[j]
            np.matmul(f_g, blk[:, :, None], out=lin[lo:hi, :, None])
        res = lin[:, :m]
        res -= const[:, :m]
        den = res * res
        den += 1.0
        den *= den
        kappa = np.divide(res, den, out=new[:, :m])
        kappa *= const[:, m:m + 1]  # κ_b = s_b/m · φ'(residual)
        kc = np.matmul(const[:, m + 1:].reshape(-1, mr, m), kappa[:, :, None])  # (A_bᵀG_b, C_bᵀG_b)
        np.einsum("pm,pm->p", kappa, kc[:, :m, 0], out=new[:, self._n_col])
        np.multiply(kc[:, m:, 0], 2.0, out=new[:, self._p_col:self._t_col - m])
        self._rows[rows] = new

    def _flush(self) -> None:
        """Bring the cache up to date with θ: refresh the pairs moved since the last query."""
        if self._pending:
            for _active, prep, blocks in self._pending:
                self._refresh(prep, blocks)
            self._pending.clear()
            self._u = None

    def _coupling(self, sums: np.ndarray | None = None) -> np.ndarray:
        """u = λ/r·φ'(Cᵀθ − z) per seed (S, r), from Cᵀθ = Σ_b T_b; kept until the cache changes."""
        if self._u is None:
            if sums is None:
                sums = np.matmul(self._ones, self._table)
            t = sums[:, self._t_col:] - self.problem._z
            den = t * t
            den += 1.0
            den *= den
            u = np.divide(t, den)
            u *= self._two_lam
            self._u = u
        return self._u

    def grad_sq(self) -> np.ndarray:
        self._flush()
        sums = np.matmul(self._ones, self._table)  # (S, columns): Σ_b of every cache column
        u = self._coupling(sums)
        quad = u @ self._q
        quad += sums[:, self._p_col:self._t_col - self.problem.m]
        return sums[:, self._n_col] + np.einsum("sr,sr->s", u, quad)

    def grad_at(self, active: Active, out: np.ndarray) -> np.ndarray:
        if active.idx.size == 0:
            return out
        self._flush()
        rows, _const, parts = self._prepare(active)
        m = self.problem.m
        # ∇f on pair (s, b)'s coordinates is F_b·(κ_b, u_s): one coefficient row per pair, one product per slab
        coeff = np.empty((rows.size, 1, self._mr))
        coeff[:, 0, :m] = self._rows[rows, :m]
        coeff[:, 0, m:] = self._coupling()[active.seed]
        dst = out if out.flags.c_contiguous else np.empty(out.shape)
        for lo, hi, a0, a1, _seeds, _local, f_g, _view in parts:
            np.matmul(coeff[lo:hi], f_g, out=dst[a0:a1].reshape(hi - lo, 1, -1))
        if dst is not out:
            out[...] = dst
        return out

    def step(self, active: Active, delta: np.ndarray) -> None:
        if active.idx.size == 0:
            return
        prep = self._prepare(active)
        blocks = []
        for lo, hi, a0, a1, seeds, local, _f_g, view in prep.parts:
            blk = view[seeds, local]  # the pairs' θ rows, kept for the refresh
            blk -= delta[a0:a1].reshape(hi - lo, -1)
            view[seeds, local] = blk
            blocks.append(blk)
        # refreshes run in step order, so where an earlier pending set overlaps this one its stale rows are
        # overwritten by this one's; the same set again simply replaces its entry
        if self._pending and self._pending[-1][0] is active:
            self._pending.pop()
        self._pending.append((active, prep, blocks))
        self._u = None


#: Largest active fraction δ at which :class:`RobustOracle` beats the dense gradient (measured on the
#: 10⁴-parameter bench problem, 16 seeds: a refresh of 2% of the (seed, module) pairs costs 0.4× a dense
#: gradient, of 10% about 1×, of 25% 3×; see docs/simulator.md).
INCREMENTAL_MAX_FRACTION = 0.1


def make_oracle(problem: Problem, theta: np.ndarray, active_fraction: float = 1.0) -> GradientOracle:
    """The fastest exact oracle for ``problem`` when a fraction ``active_fraction`` of it moves per step:
    incremental for ``robust`` up to :data:`INCREMENTAL_MAX_FRACTION`, dense otherwise (same values)."""
    if isinstance(problem, RobustFeatures) and active_fraction <= INCREMENTAL_MAX_FRACTION:
        return RobustOracle(problem, theta)
    return DenseOracle(problem, theta)
