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
block-separable part, C = [c_1 … c_r] (n × r) and u ∈ R^r.  A step that moves only the modules in B leaves
∇F_b unchanged for b ∉ B, so the oracle caches per (seed, module) the block gradient G_b, its squared norm
N_b = ‖G_b‖² and its projection P_b = C_bᵀ G_b ∈ R^r, and keeps the coupling residual t = Cᵀθ − z up to
date from the steps themselves (Cᵀ(θ − d) = Cᵀθ − C_aᵀ d).  Then

    ‖∇f‖² = ‖G‖² + 2 uᵀ CᵀG + uᵀ (CᵀC) u = Σ_b N_b + 2 uᵀ Σ_b P_b + uᵀ Q u,     Q = CᵀC (r × r, fixed),

costs O(S·M·r), and a block update recomputes only the modules that moved: O(S·δ·n·m) instead of
O(S·n·(m + r)).  Block gradients are recomputed from θ (never updated incrementally), so they carry no drift;
t is re-derived from θ every ``resync`` steps so its rounding cannot accumulate.  The expansion of ‖∇f‖²
loses absolute accuracy ≈ 1e-16·(‖G‖² + ‖Cu‖²), far below the values a run records.

Modules are handled padded to the largest module size ``n_max`` (zero feature rows on the padding), so a
refresh of any set of (seed, module) pairs is a fixed handful of batched array operations whatever their
sizes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from .problems import Problem, RobustFeatures, _dphi

__all__ = ["Active", "GradientOracle", "DenseOracle", "RobustOracle", "make_oracle"]


@dataclass(frozen=True)
class Active:
    """The active coordinates of all seeds, in (seed, module, coordinate) order.

    ``idx`` (A,) flat indices into θ.reshape(-1) (seed s, coordinate c ↦ s·n + c); ``seed``/``module`` (P,)
    the selected (seed, module) pairs in the same order; ``starts`` (P,) where each pair's run begins in
    ``idx``.
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


class RobustOracle(GradientOracle):
    """Incremental oracle for :class:`~misa_theory.problems.RobustFeatures` (see the module docstring)."""

    def __init__(self, problem: RobustFeatures, theta: np.ndarray, resync: int = 1024) -> None:
        super().__init__(problem, theta)
        p = problem
        M, m, r = p.n_modules, p.m, p.r
        self.S = self.theta.shape[0]
        self.n_max = k = int(p.sizes.max())
        # padded per-module data: features A (M, k, m) and their transpose, targets y (M, m), weights w (M, 1),
        # coupling rows C (M, k, r); padded rows are zero so they add nothing to any product
        self._a = np.zeros((M, k, m))
        self._y = np.zeros((M, m))
        self._w = np.zeros((M, 1))
        for first, count, size, _start, a, _a_t, y, w in p._feat:
            self._a[first:first + count, :size] = a
            self._y[first:first + count] = y
            self._w[first:first + count] = w
        self._a_t = np.ascontiguousarray(self._a.transpose(0, 2, 1))
        ramp = np.arange(k)
        self._valid = ramp[None, :] < p.sizes[:, None]  # (M, k)
        # coordinate of every padded slot; padding points at the module's last coordinate (its A rows are 0)
        self._coord = p.offsets[:-1, None] + np.minimum(ramp[None, :], p.sizes[:, None] - 1)
        self._c_pad = np.where(self._valid[..., None], p._c[self._coord], 0.0)  # (M, k, r)
        self._q = p._c.T @ p._c
        self._lam = p.coupling / r
        self._resync = int(resync)
        self._steps = 0
        self._G = np.zeros((self.S, M, k))
        self._N = np.zeros((self.S, M))
        self._P = np.zeros((self.S, M, r))
        self._dirty = np.ones((self.S, M), dtype=bool)
        self._t = self.theta @ p._c - p._z

    def _refresh(self, seeds: np.ndarray, mods: np.ndarray) -> None:
        """Recompute G_b, N_b, P_b of the given (seed, module) pairs from θ."""
        if seeds.size == 0:
            return
        theta_blk = np.take(self.flat, seeds[:, None] * self.problem.n_params + self._coord[mods])  # (P, k)
        t = np.matmul(theta_blk[:, None, :], self._a[mods])[:, 0, :] - self._y[mods]  # (P, m)
        coef = _dphi(t) * self._w[mods]
        g = np.matmul(coef[:, None, :], self._a_t[mods])[:, 0, :]  # (P, k), zero on padding
        self._G[seeds, mods] = g
        self._N[seeds, mods] = np.einsum("pk,pk->p", g, g)
        self._P[seeds, mods] = np.einsum("pk,pkr->pr", g, self._c_pad[mods])
        self._dirty[seeds, mods] = False

    def _u(self) -> np.ndarray:
        return self._lam * _dphi(self._t)  # (S, r)

    def grad_sq(self) -> np.ndarray:
        self._refresh(*np.nonzero(self._dirty))
        u = self._u()
        return self._N.sum(axis=1) + 2.0 * np.einsum("sr,sr->s", u, self._P.sum(axis=1)) + np.einsum(
            "sr,rq,sq->s", u, self._q, u)

    def grad_at(self, active: Active, out: np.ndarray) -> np.ndarray:
        seeds, mods = active.seed, active.module
        stale = self._dirty[seeds, mods]
        if stale.any():
            self._refresh(seeds[stale], mods[stale])
        g = self._G[seeds, mods] + np.einsum("pr,pkr->pk", self._u()[seeds], self._c_pad[mods])
        return np.compress(self._valid[mods].reshape(-1), g.reshape(-1), out=out)

    def step(self, active: Active, delta: np.ndarray) -> None:
        if active.idx.size == 0:
            return
        self.flat[active.idx] -= delta
        self._dirty[active.seed, active.module] = True
        self._steps += 1
        p = self.problem
        if self._steps % self._resync == 0:
            self._t = self.theta @ p._c - p._z
            return
        # Cᵀ(θ − d) − z = t − C_aᵀ d, summed per pair, then per seed
        per_pair = np.add.reduceat(delta[:, None] * p._c[active.idx % p.n_params], active.starts, axis=0)
        np.subtract.at(self._t, active.seed, per_pair)


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
