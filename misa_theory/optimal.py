r"""Budgeted inclusion probabilities: the variance optimum, the paper's softmax, and their closed forms.

The design problem (module-wise; see proofs/02_kkt.md):

    minimise   V(π) = Σ_b a_b (1/π_b − 1)
    subject to Σ_b π_b n_b ≤ B,   floor ≤ π_b ≤ 1,

with a_b ≥ 0 squared gradient norms, n_b > 0 module sizes (parameters) and B the parameter budget.
KKT gives π_b = clip(√(a_b/(λ n_b)), floor, 1) with λ ≥ 0 fixed by the budget, found here exactly by
water-filling over the piecewise-linear map μ = λ^{-1/2} ↦ Σ_b n_b π_b(μ) in O(B log B).

Layer-wise designs constrain π constant within a layer l; the problem is then the same one over layers
with A_l = Σ_{b∈l} a_b and N_l = Σ_{b∈l} n_b.  Uncapped optima: module-wise (Σ_b √(a_b n_b))²/B − Σa,
layer-wise (Σ_l √(A_l N_l))²/B − Σa; Cauchy–Schwarz, Σ_{b∈l} √(a_b n_b) ≤ √(A_l N_l), orders them.
"""

from __future__ import annotations

import numpy as np

from ._validate import as_vector, group_ids, nonnegative, positive, same_length


def _check_budget(budget: float, sizes: np.ndarray, floor: float) -> float:
    b = float(budget)
    if not np.isfinite(b) or b <= 0:
        raise ValueError(f"budget must be a positive number of parameters, got {budget!r}")
    if b < sizes.min():
        raise ValueError(f"budget ({b:g}) is smaller than the smallest module ({sizes.min():g} parameters)")
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"floor must lie in [0, 1], got {floor!r}")
    if floor * sizes.sum() > b * (1 + 1e-12):
        raise ValueError(f"floor={floor:g} needs {floor * sizes.sum():g} parameters, more than the budget {b:g}")
    return b


def waterfill(rates: np.ndarray, sizes: np.ndarray, budget: float, floor: float = 0.0) -> np.ndarray:
    r"""Solve Σ_u N_u·clip(μ r_u, floor, 1) = budget for μ ≥ 0 and return π_u = clip(μ r_u, floor, 1).

    ``rates`` r_u ≥ 0 and ``sizes`` N_u > 0 have shape (U,).  Units with r_u = 0 stay at ``floor``.
    If even μ → ∞ cannot spend the budget (Σ N_u ≤ budget, or zero-rate units hold the rest),
    the maximal π is returned.  The map g(μ) = Σ_u N_u·clip(μ r_u, floor, 1) is continuous, piecewise
    linear and non-decreasing with breakpoints floor/r_u and 1/r_u: a bisection over the sorted 2U
    breakpoints (each step one evaluation of g) finds the segment holding the root, on which the floored,
    capped and rising sets are fixed, and one linear solve gives μ exactly.  Every sum is of non-negative
    terms over an explicit set, so rates spanning any dynamic range (softmax rates reach 1e-30 and below)
    are solved to rounding; differences of running sums would cancel there.
    """
    r = np.asarray(rates, dtype=np.float64)
    n = np.asarray(sizes, dtype=np.float64)
    pi = np.full(r.shape, floor, dtype=np.float64)
    pos = r > 0
    if n.sum() <= budget:
        pi[pos] = 1.0
        return pi
    if not pos.any():
        return pi
    rp, nphere = r[pos], n[pos]
    target = budget - floor * n[~pos].sum()
    mu = _active_set_mu(rp, nphere, target, floor)
    pi[pos] = np.clip(mu * rp, floor, 1.0) if mu is not None else _segment_pi(rp, nphere, target, floor)
    return pi


def _segment_pi(r: np.ndarray, n: np.ndarray, target: float, floor: float) -> np.ndarray:
    """π = clip(μr, floor, 1) (r > 0) with Σ nπ = target: bisection over the breakpoints, a linear solve on
    the bracketing segment.  Saturates (π = 1) when even that cannot spend ``target``.

    The breakpoints are taken in log μ (log floor − log r and −log r): a sharp softmax gives rates below
    1e-308 of the largest, whose breakpoints 1/r exceed the float range although the budget may need them;
    and the rising units' π is formed as rest·(r/Σnr), so μ itself is never formed.
    """
    lr = np.log(r)
    cand = np.unique(np.concatenate((np.log(floor) - lr, -lr)) if floor > 0 else -lr)

    def g(log_mu: float) -> float:
        with np.errstate(over="ignore"):  # μr beyond the float range is capped at 1 either way
            return float(n @ np.clip(np.exp(log_mu + lr), floor, 1.0))

    if g(cand[-1]) <= target:
        return np.ones_like(r)
    lo, hi = -1, cand.size - 1  # invariant g(cand[lo]) < target ≤ g(cand[hi]); lo = −1 stands for μ = 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if g(cand[mid]) < target:
            lo = mid
        else:
            hi = mid
    left = -np.inf if lo < 0 else cand[lo]
    right = cand[hi]
    # on (left, right) no breakpoint lies inside: a unit is floored iff its floor breakpoint is ≥ right, capped
    # iff its cap breakpoint is ≤ left
    floored = (np.log(floor) - lr >= right) if floor > 0 else np.zeros(r.shape, dtype=bool)
    capped = -lr <= left
    rising = ~(floored | capped)
    slope = float(n[rising] @ r[rising])
    with np.errstate(over="ignore"):
        if slope <= 0.0:  # no unit rises on the segment: only rounding gets here, g is continuous
            return np.clip(np.exp(right + lr), floor, 1.0)
        pi = np.where(capped, 1.0, floor)
        rest = target - floor * n[floored].sum() - n[capped].sum()
        # μ = rest/slope clamped to the segment, applied as rest·(r/slope): r/slope ≤ 1/n never overflows
        x = rest * (r[rising] / slope)
        x = np.minimum(np.maximum(x, np.exp(left + lr[rising])), np.exp(right + lr[rising]))
    pi[rising] = np.clip(x, floor, 1.0)
    return pi


#: μ beyond which the active-set iteration hands over to the sorted solver (μ·r must stay finite for r ≤ 1)
_MU_MAX = 1e300


def _active_set_mu(r: np.ndarray, n: np.ndarray, budget: float, floor: float, max_iter: int = 30) -> float | None:
    """μ with Σ N·clip(μ r, floor, 1) = budget by active-set iteration (Michelot-style), O(U) per pass.

    Guess which units sit at the cap or the floor, solve the linear equation for μ on the rest, update
    the guess; a fixed point of the guess is the exact solution.  From μ₀ = budget/Σ N r the capped set
    only grows when floor = 0, so it ends in a few passes; returns None if it has not settled (the
    caller then uses the sorting solver, which is always exact).
    """
    nr = n * r
    total = nr.sum()
    if not total > 0.0 or budget / _MU_MAX >= total:  # rates too small for μ to be formed: sorted solver
        return None
    mu = budget / total
    capped = floored = None
    for _ in range(max_iter):
        x = mu * r
        new_capped = x >= 1.0
        new_floored = x <= floor if floor > 0 else None
        if capped is not None and np.array_equal(new_capped, capped) and (
            floor == 0 or np.array_equal(new_floored, floored)
        ):
            return mu
        capped, floored = new_capped, new_floored
        free_nr = nr.sum(where=~capped) if floored is None else nr.sum(where=~(capped | floored))
        rest = budget - n.sum(where=capped)
        if floored is not None:
            rest -= floor * n.sum(where=floored)
        if free_nr <= 0 or rest / _MU_MAX >= free_nr:
            return None
        mu = rest / free_nr
    return None


def _units(a: np.ndarray, n: np.ndarray, groups: object | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    if groups is None:
        return a, n, None
    gid, n_groups = group_ids(groups, a.shape[0])
    return np.bincount(gid, a, n_groups), np.bincount(gid, n, n_groups), gid


def optimal_inclusion(
    sq_norms: object,
    sizes: object,
    budget: float,
    groups: object | None = None,
    floor: float = 0.0,
) -> np.ndarray:
    r"""Variance-optimal inclusion probabilities under a parameter budget.

    Minimises Σ_b a_b(1/π_b − 1) s.t. Σ_b π_b n_b ≤ budget and floor ≤ π_b ≤ 1.  Solution
    π_b = clip(√(a_b/(λ n_b)), floor, 1) (KKT), λ by exact water-filling.  With ``groups`` the
    layer-wise optimum: π constant per group, from the same problem on (A_l, N_l).

    Args:
        sq_norms: a_b ≥ 0, shape (B,).
        sizes: n_b > 0 parameters per module, shape (B,).
        budget: parameters that may be active at once (≥ the smallest module).
        groups: optional integer layer id per module, shape (B,).
        floor: lower bound on every π (keeps every module reachable; needs floor·Σn ≤ budget).

    Returns:
        π per module, shape (B,), float64.
    """
    a = nonnegative(sq_norms, "sq_norms")
    n = positive(sizes, "sizes")
    same_length(a.shape[0], sizes=n)
    b = _check_budget(budget, n, floor)
    ua, un, gid = _units(a, n, groups)
    pi = waterfill(np.sqrt(ua / un), un, b, floor)
    return pi if gid is None else pi[gid]


def proportional_inclusion(weights: object, sizes: object, budget: float, floor: float = 0.0) -> np.ndarray:
    r"""Inclusion π_b = clip(c·w_b, floor, 1) with c fixed by Σ_b π_b n_b = budget.

    This is how a sampling distribution p (e.g. the paper's softmax) becomes marginal inclusion
    probabilities under a parameter budget: inclusion proportional to p, capped at 1 ("π-ps" design).
    ``weights`` w_b ≥ 0 and ``sizes`` n_b > 0 have shape (B,).
    """
    w = nonnegative(weights, "weights")
    n = positive(sizes, "sizes")
    same_length(w.shape[0], sizes=n)
    b = _check_budget(budget, n, floor)
    return waterfill(w, n, b, floor)


def kl_softmax(scores: object, eta: float) -> np.ndarray:
    r"""The paper's distribution p_b ∝ exp(η·s_b).

    It is the maximiser over the simplex of Σ_b p_b s_b − (1/η)·KL(p ‖ uniform) (proofs/04_softmax.md).
    η = 0 gives the uniform distribution, η = ∞ the uniform distribution over argmax s (greedy).  Shifting
    by max s keeps exp from overflowing for any η.
    """
    s = as_vector(scores, "scores")
    eta = float(eta)
    if np.isnan(eta) or eta < 0:
        raise ValueError(f"eta must be ≥ 0, got {eta!r}")
    if np.isinf(eta):
        top = s == s.max()
        return top / top.sum()
    z = np.exp(eta * (s - s.max()))
    return z / z.sum()


def _variance_at(a: np.ndarray, pi: np.ndarray) -> float:
    # 0·(1/0 − 1) := 0: a module with no gradient costs nothing when never drawn
    live = a > 0
    return float(np.sum(a[live] * (1.0 / pi[live] - 1.0)))


def optimal_variance(
    sq_norms: object,
    sizes: object,
    budget: float,
    groups: object | None = None,
    floor: float = 0.0,
) -> float:
    """Σ_b a_b(1/π*_b − 1) at the exact optimum π* of :func:`optimal_inclusion` (caps included)."""
    a = nonnegative(sq_norms, "sq_norms")
    return _variance_at(a, optimal_inclusion(a, sizes, budget, groups, floor))


def uncapped_optimal_variance(
    sq_norms: object, sizes: object, budget: float, groups: object | None = None
) -> float:
    r"""Closed form (Σ_u √(A_u N_u))²/budget − Σ_b a_b over units u (modules, or layers with ``groups``).

    Equals :func:`optimal_variance` (floor 0) whenever no π hits the cap 1; otherwise it is a lower bound.
    """
    a = nonnegative(sq_norms, "sq_norms")
    n = positive(sizes, "sizes")
    same_length(a.shape[0], sizes=n)
    b = _check_budget(budget, n, 0.0)
    ua, un, _ = _units(a, n, groups)
    return float(np.sum(np.sqrt(ua * un)) ** 2 / b - a.sum())


def variance_gap(sq_norms: object, sizes: object, budget: float, groups: object) -> float:
    r"""Layer-wise minus module-wise uncapped optimum: [(Σ_l √(A_l N_l))² − (Σ_b √(a_b n_b))²]/budget ≥ 0.

    Zero exactly when a_b/n_b is constant within every layer (equality in Cauchy–Schwarz).
    """
    layer = uncapped_optimal_variance(sq_norms, sizes, budget, groups)
    module = uncapped_optimal_variance(sq_norms, sizes, budget, None)
    return layer - module
