"""Synthetic non-convex objectives with the block structure of a transformer, for testing sampling rules.

Every problem is a function f: R^n -> R of a flat parameter vector theta that is cut into M contiguous
*modules* (the weight matrices of a model). Each module b has a size n_b, a *kind* (``q``, ``k``, ``v``,
``o``, ``gate``, ``up``, ``down`` for the transformer layout) and a *group* (its layer id). Modules are
stored kind-major (all ``q`` of every layer, then all ``o``, ...): modules of equal size are then one
contiguous slab, so a gradient is a handful of batched matrix products instead of M small ones. The
order is invisible to a sampler, which only sees ``sizes`` and ``groups``.

All evaluation is vectorised over a leading seeds axis: ``theta`` has shape (S, n), ``f`` returns (S,),
``grad`` returns (S, n). ``f_star`` is a lower bound of f (0 for all families here: every loss term is
non-negative). The stochastic oracle is ``grad(theta) + xi`` with xi Gaussian, zero mean and
E||xi||^2 = sigma^2, spread over modules in proportion to their gradient scale (big modules of important
kinds are also the noisy ones, as in an LLM).

Families
--------
``robust``   (a) f(θ) = Σ_b s_b/m Σ_i φ(<a_bi, θ_b> - y_bi) + λ/r Σ_j φ(<c_j, θ> - z_j),  φ(t) = t²/(1+t²).
``mlp``      (b) f(θ) = 1/(2N) Σ_i ||Σ_l c_l W2_l tanh(W1_l x_i) - y_i||²  (teacher-student regression).
``sensing``  (c) f(θ) = 1/(2m) Σ_i (<A_i, Σ_l c_l U_l V_lᵀ> - y_i)²  with y_i = <A_i, M*>, rank(M*) = r.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "PROBLEMS",
    "Problem",
    "RobustFeatures",
    "TwoLayerRegression",
    "MatrixSensing",
    "make_problem",
    "transformer_layout",
    "llama3_8b_layout",
    "synthetic_sq_norms",
]

#: Llama-style module kinds of one decoder layer, in attention-then-MLP order.
KINDS = ("q", "k", "v", "o", "gate", "up", "down")
#: How much each kind's gradient is scaled relative to the others (v/o/down matter most, as measured on LLMs).
_KIND_SCALE = {"q": 0.4, "k": 0.3, "v": 1.6, "o": 1.2, "gate": 0.7, "up": 0.8, "down": 1.5}


def transformer_layout(n_layers: int, d: int, kv: int, ff: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Sizes, layer ids and kinds of the 7 weight matrices per layer of a Llama-style decoder.

    q, o: d×d; k, v: d×kv; gate, up, down: d×ff. Returned kind-major (all q, all o, all k, all v, all
    gate, all up, all down), so that equal-sized modules are adjacent.

    Returns ``(sizes (M,) int64, groups (M,) int64 layer ids in [0, n_layers), kinds list of M str)``.
    """
    if min(n_layers, d, kv, ff) <= 0:
        raise ValueError("n_layers, d, kv, ff must be positive")
    per_kind = {"q": d * d, "o": d * d, "k": d * kv, "v": d * kv, "gate": d * ff, "up": d * ff, "down": ff * d}
    order = ("q", "o", "k", "v", "gate", "up", "down")
    sizes, groups, kinds = [], [], []
    for kind in order:
        for layer in range(n_layers):
            sizes.append(per_kind[kind])
            groups.append(layer)
            kinds.append(kind)
    return np.asarray(sizes, dtype=np.int64), np.asarray(groups, dtype=np.int64), kinds


def _importance_profile(groups: np.ndarray, kinds: list[str], rng: np.random.Generator,
                        heterogeneity: float) -> np.ndarray:
    """Per-module gradient scale s_b > 0: U-shaped over depth (first/last layers matter most) × kind factor
    × log-normal jitter, all raised to ``heterogeneity`` (0 = every module equally important)."""
    n_layers = int(groups.max()) + 1
    depth = groups / max(n_layers - 1, 1)
    layer_factor = 0.3 + 2.0 * (2.0 * depth - 1.0) ** 4
    kind_factor = np.array([_KIND_SCALE.get(k, 1.0) for k in kinds])
    jitter = np.exp(0.5 * rng.standard_normal(groups.size))
    raw = layer_factor * kind_factor * jitter
    return (raw / np.exp(np.mean(np.log(raw)))) ** heterogeneity


def llama3_8b_layout() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Module sizes of Llama-3-8B's decoder (32 layers, d = 4096, kv = 1024, ff = 14336), kind-major."""
    return transformer_layout(32, 4096, 1024, 14336)


def synthetic_sq_norms(sizes: np.ndarray, groups: np.ndarray, kinds: list[str], seed: int = 0,
                       heterogeneity: float = 1.0) -> np.ndarray:
    """A heterogeneous profile of squared gradient norms a_b = n_b · s_b², shape (M,).

    s_b is the per-parameter gradient scale of :func:`_importance_profile` (U-shaped over depth, kind
    factors with v/o/down largest, log-normal jitter), so big modules are not automatically the important
    ones per parameter; this is the shape the variance comparison needs (a_b/n_b varying inside a layer).
    """
    s = _importance_profile(np.asarray(groups), list(kinds), np.random.default_rng(seed), heterogeneity)
    return np.asarray(sizes, dtype=float) * s * s


@dataclass
class Problem(ABC):
    """Common interface of the synthetic objectives (see module docstring for the maths).

    Attributes: ``sizes`` (M,) module sizes n_b; ``groups`` (M,) layer ids; ``kinds`` module kinds;
    ``offsets`` (M+1,) so module b is ``theta[:, offsets[b]:offsets[b+1]]``; ``n_params`` = Σ n_b;
    ``f_star`` a lower bound of f; ``scales`` (M,) the designed importance of each module;
    ``noise_std`` (n,) per-coordinate noise std for σ = 1 (Σ noise_std² = 1).
    """

    name: str
    sizes: np.ndarray
    groups: np.ndarray
    kinds: list[str]
    scales: np.ndarray
    f_star: float = 0.0
    offsets: np.ndarray = field(init=False)
    n_params: int = field(init=False)
    noise_std: np.ndarray = field(init=False)
    _x0: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.sizes = np.asarray(self.sizes, dtype=np.int64)
        self.groups = np.asarray(self.groups, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.n_params = int(self.offsets[-1])
        w = np.repeat(np.asarray(self.scales, dtype=float), self.sizes)
        self.noise_std = w / np.sqrt(np.sum(w * w))

    # --- to be provided by each family -------------------------------------------------------------------
    @abstractmethod
    def f(self, theta: np.ndarray) -> np.ndarray:
        """Objective f(θ) for each seed: (S, n) -> (S,)."""

    @abstractmethod
    def grad(self, theta: np.ndarray) -> np.ndarray:
        """Exact gradient ∇f(θ): (S, n) -> (S, n)."""

    # --- shared -------------------------------------------------------------------------------------------
    @property
    def n_modules(self) -> int:
        """M, the number of modules."""
        return int(self.sizes.size)

    @property
    def module_slices(self) -> list[slice]:
        """Slice of the flat vector holding each module."""
        return [slice(int(a), int(b)) for a, b in zip(self.offsets[:-1], self.offsets[1:], strict=True)]

    def x0(self, n_seeds: int) -> np.ndarray:
        """Common starting point θ_0 repeated over seeds, shape (S, n) (seeds differ by noise and sampling)."""
        return np.repeat(self._x0[None, :], n_seeds, axis=0)

    def stoch_grad(self, theta: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
        """Unbiased stochastic gradient ∇f(θ) + ξ, ξ ~ N(0, σ² diag(noise_std²)) so E||ξ||² = σ²: (S, n)."""
        g = self.grad(theta)
        if sigma > 0:
            g += (sigma * self.noise_std) * rng.standard_normal(theta.shape)
        return g

    def module_sq_norms(self, g: np.ndarray) -> np.ndarray:
        """Squared norm of each module's slice ||g_b||²: (S, n) -> (S, M)."""
        return np.add.reduceat(g * g, self.offsets[:-1], axis=-1)

    def grad_sq(self, theta: np.ndarray) -> np.ndarray:
        """||∇f(θ)||² per seed: (S, n) -> (S,)."""
        g = self.grad(theta)
        return np.einsum("sn,sn->s", g, g)

    def _slabs(self) -> list[tuple[int, int, int, int]]:
        """Runs of consecutive equal-sized modules as (first module, count, size, start offset)."""
        runs, b = [], 0
        while b < self.n_modules:
            e = b
            while e + 1 < self.n_modules and self.sizes[e + 1] == self.sizes[b]:
                e += 1
            runs.append((b, e - b + 1, int(self.sizes[b]), int(self.offsets[b])))
            b = e + 1
        return runs


def _phi(t: np.ndarray) -> np.ndarray:
    """Robust loss φ(t) = t²/(1+t²) ∈ [0, 1); |φ''| ≤ 2 so it is 2-smooth."""
    t2 = t * t
    return t2 / (1.0 + t2)


def _dphi(t: np.ndarray) -> np.ndarray:
    """φ'(t) = 2t/(1+t²)²."""
    u = 1.0 + t * t
    return 2.0 * t / (u * u)


class RobustFeatures(Problem):
    """Family (a): per-module robust regression on m random features plus a weak global coupling.

    f(θ) = Σ_b s_b/m Σ_{i<m} φ(<a_bi, θ_b> - y_bi) + λ/r Σ_{j<r} φ(<c_j, θ> - z_j), with a_bi ~ N(0, I/n_b),
    c_j ~ N(0, I/n), targets y, z ~ N(0, 4) so that most terms start in φ's non-convex region (|t| > 1/√3).
    f ≥ 0 = f_star. Cost of one gradient ≈ 4 S n (m + r) flops.
    """

    def __init__(self, n_layers: int = 4, d: int = 8, kv: int = 4, ff: int = 24, m: int = 4, r: int = 2,
                 coupling: float = 0.5, heterogeneity: float = 1.0, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        sizes, groups, kinds = transformer_layout(n_layers, d, kv, ff)
        scales = _importance_profile(groups, kinds, rng, heterogeneity)
        super().__init__("robust", sizes, groups, kinds, scales, 0.0)
        self.m, self.r, self.coupling = m, r, coupling
        self._feat = []  # per slab: (first, count, size, start, A (count, size, m), y (count, m), s (count, 1))
        for first, count, size, start in self._slabs():
            a = rng.standard_normal((count, size, m)) / np.sqrt(size)
            y = 2.0 * rng.standard_normal((count, m))
            # the transposed copy keeps the backward product on BLAS's contiguous fast path
            self._feat.append((first, count, size, start, a, np.ascontiguousarray(a.transpose(0, 2, 1)), y,
                               scales[first:first + count, None] / m))
        self._c = rng.standard_normal((self.n_params, r)) / np.sqrt(self.n_params)
        self._c_t = np.ascontiguousarray(self._c.T)
        self._z = 2.0 * rng.standard_normal(r)
        self._x0 = 0.5 * rng.standard_normal(self.n_params)

    @property
    def slab_features(self) -> list[tuple]:
        """Per slab (a run of equal-sized modules): (first module, count, size n, first coordinate, A (count, n, m),
        Aᵀ (count, m, n), y (count, m), s_b/m (count, 1)) of f's module terms; read-only, for exact oracles."""
        return self._feat

    @property
    def coupling_features(self) -> np.ndarray:
        """C (n, r): the coupling term's directions c_j as columns; read-only, for exact oracles."""
        return self._c

    @property
    def coupling_targets(self) -> np.ndarray:
        """z (r,): the coupling term's targets; read-only, for exact oracles."""
        return self._z

    def smoothness(self) -> float:
        """An upper bound of L = sup‖∇²f‖₂: max_b 2 s_b/m ‖A_b‖₂² + 2λ/r ‖C‖₂² (|φ''| ≤ 2, blocks + coupling)."""
        per_module = max(float((2.0 * w[:, 0] * np.linalg.norm(a, ord=2, axis=(1, 2)) ** 2).max())
                         for *_, a, _a_t, _y, w in self._feat)
        return per_module + 2.0 * self.coupling / self.r * float(np.linalg.norm(self._c, ord=2)) ** 2

    def gradient_bound(self) -> float:
        """An upper bound of sup‖∇f‖: √(Σ_b (s_b/m)² ‖A_b‖₂² m) φ'_max + λ/r ‖C‖₂ √r φ'_max, φ'_max = 9/(8√3)."""
        dphi_max = 9.0 / (8.0 * np.sqrt(3.0))
        blocks = sum(float((w[:, 0] ** 2 * np.linalg.norm(a, ord=2, axis=(1, 2)) ** 2).sum()) * self.m
                     for *_, a, _a_t, _y, w in self._feat)
        coupling = self.coupling / self.r * float(np.linalg.norm(self._c, ord=2)) * np.sqrt(self.r)
        return float(dphi_max * (np.sqrt(blocks) + coupling))

    def _residuals(self, theta: np.ndarray):
        s = theta.shape[0]
        for first, count, size, start, a, a_t, y, w in self._feat:
            block = theta[:, start:start + count * size].reshape(s, count, size)
            # (count, S, size) @ (count, size, m): one BLAS batch instead of `count` small products
            t = np.matmul(block.transpose(1, 0, 2), a).transpose(1, 0, 2) - y
            yield first, count, size, start, a_t, w, t

    def f(self, theta: np.ndarray) -> np.ndarray:
        out = np.zeros(theta.shape[0])
        for *_, w, t in self._residuals(theta):
            out += np.einsum("cm,scm->s", np.broadcast_to(w, t.shape[1:]), _phi(t))
        tc = theta @ self._c - self._z
        out += self.coupling / self.r * _phi(tc).sum(axis=1)
        return out

    def grad(self, theta: np.ndarray) -> np.ndarray:
        s = theta.shape[0]
        g = np.empty_like(theta)
        for _first, count, size, start, a_t, w, t in self._residuals(theta):
            coef = np.ascontiguousarray((_dphi(t) * w).transpose(1, 0, 2))  # (count, S, m)
            g[:, start:start + count * size] = np.matmul(coef, a_t).transpose(1, 0, 2).reshape(s, count * size)
        tc = theta @ self._c - self._z
        g += (_dphi(tc) * (self.coupling / self.r)) @ self._c_t
        return g


class TwoLayerRegression(Problem):
    """Family (b): teacher-student regression with a sum of L two-layer tanh networks.

    ŷ(x) = Σ_l c_l W2_l tanh(W1_l x), modules W1_l (h×p, kind ``in``) and W2_l (o×h, kind ``out``),
    f(θ) = 1/(2N) Σ_i ||ŷ(x_i) - y_i||² on a fixed data set (x_i ~ N(0, I_p), y from a random teacher of the
    same shape). f ≥ 0 = f_star; c_l (the importance) is U-shaped over l times log-normal jitter.
    """

    def __init__(self, n_layers: int = 6, p: int = 12, h: int = 16, o: int = 4, n_data: int = 64,
                 heterogeneity: float = 1.0, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        sizes = [h * p] * n_layers + [o * h] * n_layers
        groups = np.concatenate([np.arange(n_layers), np.arange(n_layers)])
        kinds = ["in"] * n_layers + ["out"] * n_layers
        layer_scale = _importance_profile(np.arange(n_layers), ["v"] * n_layers, rng, heterogeneity)
        super().__init__("mlp", sizes, groups, kinds, np.concatenate([layer_scale, layer_scale]), 0.0)
        self.L, self.p, self.h, self.o, self.N = n_layers, p, h, o, n_data
        self.c = layer_scale
        self.X = rng.standard_normal((n_data, p))
        w1 = rng.standard_normal((n_layers, h, p)) / np.sqrt(p)
        w2 = rng.standard_normal((n_layers, o, h)) / np.sqrt(h)
        self.Y = (w2 @ np.tanh(w1 @ self.X.T)).sum(axis=0).T / np.sqrt(n_layers)  # (N, o)
        self._x0 = np.concatenate([(rng.standard_normal((n_layers, h, p)) / np.sqrt(p)).ravel(),
                                   (0.1 * rng.standard_normal((n_layers, o, h)) / np.sqrt(h)).ravel()])
        self._split = n_layers * h * p

    def _unpack(self, theta: np.ndarray):
        s = theta.shape[0]
        w1 = theta[:, : self._split].reshape(s, self.L, self.h, self.p)
        w2 = theta[:, self._split:].reshape(s, self.L, self.o, self.h)
        return w1, w2

    def _forward(self, theta: np.ndarray):
        w1, w2 = self._unpack(theta)
        a = np.tanh(w1 @ self.X.T)  # (S, L, h, N)
        pred = np.einsum("l,slon->son", self.c, w2 @ a)
        return w1, w2, a, pred - self.Y.T

    def f(self, theta: np.ndarray) -> np.ndarray:
        *_, res = self._forward(theta)
        return 0.5 / self.N * np.einsum("son,son->s", res, res)

    def grad(self, theta: np.ndarray) -> np.ndarray:
        _w1, w2, a, res = self._forward(theta)
        cres = (res / self.N)[:, None] * self.c[None, :, None, None]  # (S, L, o, N): c_l·r/N per layer
        g2 = cres @ a.transpose(0, 1, 3, 2)
        back = (w2.transpose(0, 1, 3, 2) @ cres) * (1.0 - a * a)
        g1 = back @ self.X
        s = theta.shape[0]
        return np.concatenate([g1.reshape(s, -1), g2.reshape(s, -1)], axis=1)


class MatrixSensing(Problem):
    """Family (c): low-rank matrix sensing with a factorisation split into L rank-k "layers".

    X(θ) = Σ_l c_l U_l V_lᵀ (d1×d2), modules U_l (d1×k, kind ``U``) and V_l (d2×k, kind ``V``),
    f(θ) = 1/(2m) Σ_i (<A_i, X(θ)> - y_i)², y_i = <A_i, M*>, A_i Gaussian / √(d1 d2), rank M* = r ≤ L k.
    f ≥ 0 = f_star, reached at any exact factorisation of M* (non-convex: rotations, saddles at 0).
    """

    def __init__(self, n_layers: int = 6, d1: int = 20, d2: int = 12, k: int = 2, rank: int = 3,
                 n_meas: int = 200, heterogeneity: float = 1.0, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        sizes = [d1 * k] * n_layers + [d2 * k] * n_layers
        groups = np.concatenate([np.arange(n_layers), np.arange(n_layers)])
        kinds = ["U"] * n_layers + ["V"] * n_layers
        layer_scale = _importance_profile(np.arange(n_layers), ["v"] * n_layers, rng, heterogeneity)
        super().__init__("sensing", sizes, groups, kinds, np.concatenate([layer_scale, layer_scale]), 0.0)
        self.L, self.d1, self.d2, self.k, self.m = n_layers, d1, d2, k, n_meas
        self.c = layer_scale
        self.A = rng.standard_normal((n_meas, d1 * d2)) / np.sqrt(d1 * d2)
        mstar = rng.standard_normal((d1, rank)) @ rng.standard_normal((rank, d2)) / np.sqrt(rank)
        self.y = self.A @ mstar.ravel()
        self._x0 = 0.3 * rng.standard_normal(self.n_params)
        self._split = n_layers * d1 * k

    def _factors(self, theta: np.ndarray):
        s = theta.shape[0]
        u = theta[:, : self._split].reshape(s, self.L, self.d1, self.k)
        v = theta[:, self._split:].reshape(s, self.L, self.d2, self.k)
        return u, v

    def _residual(self, theta: np.ndarray):
        u, v = self._factors(theta)
        s = theta.shape[0]
        cu = (u * self.c[None, :, None, None]).transpose(0, 2, 1, 3).reshape(s, self.d1, self.L * self.k)
        x = cu @ v.transpose(0, 2, 1, 3).reshape(s, self.d2, self.L * self.k).transpose(0, 2, 1)
        return u, v, x.reshape(s, -1) @ self.A.T - self.y

    def f(self, theta: np.ndarray) -> np.ndarray:
        *_, res = self._residual(theta)
        return 0.5 / self.m * np.einsum("si,si->s", res, res)

    def grad(self, theta: np.ndarray) -> np.ndarray:
        u, v, res = self._residual(theta)
        s = theta.shape[0]
        r = ((res / self.m) @ self.A).reshape(s, 1, self.d1, self.d2)
        cc = self.c[None, :, None, None]
        gu = cc * (r @ v)
        gv = cc * (r.transpose(0, 1, 3, 2) @ u)
        return np.concatenate([gu.reshape(s, -1), gv.reshape(s, -1)], axis=1)


#: Problem families by CLI name, each with small defaults (a few hundred to a few thousand parameters).
PROBLEMS: dict[str, type[Problem]] = {
    "robust": RobustFeatures,
    "mlp": TwoLayerRegression,
    "sensing": MatrixSensing,
}


def make_problem(name: str, **kwargs) -> Problem:
    """Instantiate a family by name (``robust``, ``mlp``, ``sensing``); kwargs go to its constructor."""
    if name not in PROBLEMS:
        raise ValueError(f"problem must be one of {sorted(PROBLEMS)}, got {name!r}")
    return PROBLEMS[name](**kwargs)
