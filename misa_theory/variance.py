r"""Variance of the block-sampled gradient as a function of inclusion probabilities.

Notation (used throughout the package):

* B modules, module b owns a disjoint block of coordinates of size n_b;
* g_b its gradient block, a_b = ‖g_b‖² (or the second moment a_b + σ_b² when minibatch noise is modelled);
* S the random active set, π_b = P(b ∈ S) its marginal inclusion probability;
* optional groups (layers) l(b): a layer-wise method switches all modules of a layer together, so
  π_b = π_{l(b)} and 1[b∈S] = 1[l(b)∈S].

The unbiased estimator is ĝ_b = 1[b∈S]·g_b/π_b.  Because blocks are disjoint coordinates,
E‖ĝ − g‖² = Σ_b a_b·E[(1[b∈S]/π_b − 1)²] = Σ_b a_b(1/π_b − 1): only the marginals matter, never the
joint law of S.  The paper's algorithm does not reweight; its analysis uses the captured squared
gradient Σ_b π_b a_b and the deficit Σ_b (1 − π_b) a_b (which add to Σ a_b).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._validate import group_ids, nonnegative, probabilities, same_length


def module_inclusion(inclusion: object, n_modules: int, groups: object | None = None) -> np.ndarray:
    """Per-module inclusion π_b from per-module or per-group probabilities.

    With ``groups`` (an integer id per module), ``inclusion`` may have one entry per group (broadcast to
    its modules) or one per module, in which case it must be constant within each group (a layer-wise
    design has one switch per layer).  Returns float64 of shape (n_modules,), entries in (0, 1].
    """
    pi = probabilities(inclusion, "inclusion")
    if groups is None:
        same_length(n_modules, inclusion=pi)
        return pi
    gid, n_groups = group_ids(groups, n_modules)
    if pi.shape[0] == n_groups and n_groups != n_modules:
        return pi[gid]
    same_length(n_modules, inclusion=pi)
    spread = np.zeros(n_groups)
    np.maximum.at(spread, gid, pi)
    low = np.full(n_groups, np.inf)
    np.minimum.at(low, gid, pi)
    if np.any(spread - low > 1e-12):
        raise ValueError("inclusion must be constant within each group when groups are given")
    return pi


def sampled_gradient_variance(sq_norms: object, inclusion: object, groups: object | None = None) -> float:
    """E‖ĝ − g‖² = Σ_b a_b (1/π_b − 1) for the unbiased estimator ĝ_b = 1[b∈S]·g_b/π_b.

    Args:
        sq_norms: a_b ≥ 0, shape (B,): squared gradient norms (or second moments) per module.
        inclusion: π_b ∈ (0, 1], shape (B,) or (L,) with ``groups``.
        groups: optional layer id per module, shape (B,); all modules of a layer share one switch.

    Returns:
        The variance, in the units of a_b (squared gradient norm).
    """
    a = nonnegative(sq_norms, "sq_norms")
    pi = module_inclusion(inclusion, a.shape[0], groups)
    return float(np.sum(a * (1.0 / pi - 1.0)))


def captured_gradient(sq_norms: object, inclusion: object, groups: object | None = None) -> float:
    """E Σ_{b∈S} a_b = Σ_b π_b a_b: the squared gradient the biased (non-reweighted) update sees."""
    a = nonnegative(sq_norms, "sq_norms")
    pi = module_inclusion(inclusion, a.shape[0], groups)
    return float(np.sum(pi * a))


def gradient_deficit(sq_norms: object, inclusion: object, groups: object | None = None) -> float:
    """E Σ_{b∉S} a_b = Σ_b (1 − π_b) a_b: the squared gradient a biased update misses per period."""
    a = nonnegative(sq_norms, "sq_norms")
    pi = module_inclusion(inclusion, a.shape[0], groups)
    return float(np.sum((1.0 - pi) * a))


@dataclass(frozen=True)
class MonteCarloEstimate:
    """Sample means (and their standard errors) of the three quantities above over R actual draws."""

    variance: float
    variance_se: float
    captured: float
    captured_se: float
    deficit: float
    deficit_se: float
    n_draws: int


def monte_carlo(sq_norms: object, masks: object, inclusion: object) -> MonteCarloEstimate:
    """Estimate variance, captured gradient and deficit from R draws of a sampler.

    Given indicator rows I_r ∈ {0,1}^B (``masks``, shape (R, B), True = module active in draw r), the
    per-draw quantities are Σ_b a_b (I_rb/π_b − 1)², Σ_b I_rb a_b and Σ_b (1 − I_rb) a_b; this returns
    their sample means with standard errors s/√R.  ``inclusion`` is the π_b the estimator reweights by
    (per module, shape (B,)).  The means converge to the closed forms above when the sampler's marginals
    equal π.
    """
    a = nonnegative(sq_norms, "sq_norms")
    m = np.asarray(masks)
    if m.ndim != 2 or m.shape[1] != a.shape[0]:
        raise ValueError(f"masks must have shape (draws, {a.shape[0]}), got {m.shape}")
    if m.shape[0] < 2:
        raise ValueError("masks must hold at least 2 draws for a standard error")
    pi = probabilities(inclusion, "inclusion")
    same_length(a.shape[0], inclusion=pi)
    ind = m.astype(np.float64)
    per_var = ((ind / pi - 1.0) ** 2) @ a
    per_cap = ind @ a
    per_def = a.sum() - per_cap
    r = m.shape[0]

    def mean_se(x: np.ndarray) -> tuple[float, float]:
        return float(x.mean()), float(x.std(ddof=1) / np.sqrt(r))

    v, vse = mean_se(per_var)
    c, cse = mean_se(per_cap)
    d, dse = mean_se(per_def)
    return MonteCarloEstimate(v, vse, c, cse, d, dse, r)
