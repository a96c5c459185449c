"""Statistics of simulator runs over horizons and seeds: the log-log rate fit and block updates to a target."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["RateFit", "rate_fit", "block_updates_to_target"]


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
