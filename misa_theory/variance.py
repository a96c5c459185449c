r"""What a sampled active set captures of the gradient, and what it misses, as functions of π.

Notation (used throughout the package):

* B modules, module b owns a disjoint block of coordinates of size n_b; N = Σ_b n_b;
* g_b its gradient block, a_b = ‖g_b‖² (or the second moment a_b + σ_b² when minibatch noise is modelled);
* S the random active set, π_b = P(b ∈ S) its marginal inclusion probability;
* a parameter budget: every draw has Σ_{b∈S} n_b ≤ δN, hence Σ_b n_b π_b ≤ δN in expectation;
* optional groups (layers) l(b): a layer-wise method switches all modules of a layer together, so
  π_b = π_{l(b)} and 1[b∈S] = 1[l(b)∈S]; A_l = Σ_{b∈l} a_b, N_l = Σ_{b∈l} n_b.

The trainer's update (the primary account).  The trainer runs Adam on the masked gradient
g_S, (g_S)_b = 1[b∈S]·g_b, without reweighting (``reweight=False``).  Adam's step m̂/(√v̂ + ε) on c·g equals
the step on g with ε/c for any constant c > 0 (proofs/07_deficit.md), so dividing g_b by π_b — constant while
the block's moments live — only changes ε to π_b·ε (global gradient clipping aside): what the sampler
controls is *which* blocks move, not their scale.  The matching quantities are, for any joint law of S,

    captured  C(π) = E⟨g, g_S⟩ = E‖g_S‖² = Σ_b π_b a_b,
    deficit   D(π) = E‖g − g_S‖²          = Σ_b (1 − π_b) a_b,     C + D = ‖g‖²,

the squared gradient the active set does and does not reach.  proofs/08 minimises D under the budget
(greedy by a_b/n_b), proofs/09 adds a KL regulariser whose maximiser is π ∝ exp(η a_b/n_b) capped at 1 —
the paper's softmax made into inclusion probabilities when the modules have equal sizes.

The reweighted variant (``reweight=True``).  The Horvitz–Thompson estimator ĝ_b = 1[b∈S]·g_b/π_b is unbiased
and E‖ĝ − g‖² = Σ_b a_b(1/π_b − 1): only the marginals matter, never the joint law of S (proofs/01).  This
variance, and its optimum π ∝ √(a/n) (proofs/02), describe an SGD-type update on ĝ; under Adam with
constant π the reweighting cancels and the deficit above is the account that applies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._validate import group_ids, nonnegative, probabilities, same_length, unit_interval


def module_inclusion(
    inclusion: object, n_modules: int, groups: object | None = None, *, allow_zero: bool = False
) -> np.ndarray:
    """Per-module inclusion π_b from per-module or per-group probabilities.

    With ``groups`` (an integer id per module), ``inclusion`` may have one entry per group (broadcast to
    its modules) or one per module, in which case it must be constant within each group (a layer-wise
    design has one switch per layer).  Returns float64 of shape (n_modules,), entries in (0, 1], or in
    [0, 1] with ``allow_zero`` (the captured/deficit account allows a module that is never drawn; the
    reweighted estimator divides by π and does not).
    """
    pi = unit_interval(inclusion, "inclusion") if allow_zero else probabilities(inclusion, "inclusion")
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


def gradient_deficit(sq_norms: object, inclusion: object, groups: object | None = None) -> float:
    r"""D(π) = E‖g − g_S‖² = Σ_b (1 − π_b) a_b: the squared gradient the unweighted update misses per period.

    g_S is the masked gradient, (g_S)_b = 1[b∈S]·g_b, which the trainer's block-Adam follows
    (proofs/07_deficit.md); D depends only on the marginals π, never on the joint law of S.

    Args:
        sq_norms: a_b ≥ 0, shape (B,): squared gradient norms (or second moments) per module.
        inclusion: π_b ∈ [0, 1], shape (B,) or (L,) with ``groups``.
        groups: optional layer id per module, shape (B,); all modules of a layer share one switch.

    Returns:
        The deficit, in the units of a_b (squared gradient norm); 0 ≤ D ≤ Σ_b a_b.

    Raises:
        ValueError: naming the argument that is malformed.
    """
    a = nonnegative(sq_norms, "sq_norms")
    pi = module_inclusion(inclusion, a.shape[0], groups, allow_zero=True)
    return float(np.sum((1.0 - pi) * a))


def captured_gradient(sq_norms: object, inclusion: object, groups: object | None = None) -> float:
    r"""C(π) = E⟨g, g_S⟩ = E‖g_S‖² = Σ_b π_b a_b: the squared gradient the unweighted update reaches.

    C(π) + D(π) = Σ_b a_b = ‖g‖² for every π (proofs/07_deficit.md).  Arguments as :func:`gradient_deficit`.
    """
    a = nonnegative(sq_norms, "sq_norms")
    pi = module_inclusion(inclusion, a.shape[0], groups, allow_zero=True)
    return float(np.sum(pi * a))


def reweighted_variance(sq_norms: object, inclusion: object, groups: object | None = None) -> float:
    r"""E‖ĝ − g‖² = Σ_b a_b (1/π_b − 1) for the reweighted (Horvitz–Thompson) estimator ĝ_b = 1[b∈S]·g_b/π_b.

    The theory of the trainer's ``reweight=True`` variant (proofs/01_variance.md).  The default unweighted
    block-Adam is described by :func:`gradient_deficit` instead.

    Args:
        sq_norms: a_b ≥ 0, shape (B,): squared gradient norms (or second moments) per module.
        inclusion: π_b ∈ (0, 1], shape (B,) or (L,) with ``groups``.
        groups: optional layer id per module, shape (B,); all modules of a layer share one switch.

    Returns:
        The variance, in the units of a_b (squared gradient norm).

    Raises:
        ValueError: naming the argument that is malformed (π_b = 0 included: ĝ divides by it).
    """
    a = nonnegative(sq_norms, "sq_norms")
    pi = module_inclusion(inclusion, a.shape[0], groups)
    return float(np.sum(a * (1.0 / pi - 1.0)))


#: The name this quantity had before the deficit became the primary account; kept for existing callers.
sampled_gradient_variance = reweighted_variance


@dataclass(frozen=True)
class MonteCarloEstimate:
    """Sample means (and standard errors) over R actual draws of the reweighted variance, captured and deficit."""

    variance: float
    variance_se: float
    captured: float
    captured_se: float
    deficit: float
    deficit_se: float
    n_draws: int


def monte_carlo(sq_norms: object, masks: object, inclusion: object) -> MonteCarloEstimate:
    """Estimate the reweighted variance, captured gradient and deficit from R draws of a sampler.

    Given indicator rows I_r ∈ {0,1}^B (``masks``, shape (R, B), True = module active in draw r), the
    per-draw quantities are Σ_b a_b (I_rb/π_b − 1)² (reweighted variant), Σ_b I_rb a_b (captured) and
    Σ_b (1 − I_rb) a_b (deficit); this returns their sample means with standard errors s/√R.  ``inclusion``
    is the π_b the reweighted estimator divides by (per module, shape (B,), in (0, 1]).  The means converge
    to the closed forms above when the sampler's marginals equal π.
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
