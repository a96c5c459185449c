r"""Budgeted inclusion probabilities: the deficit optimum, its KL-regularised softmax, the variance optimum.

Notation as in :mod:`misa_theory.variance`: a_b ≥ 0 squared gradient norms, n_b > 0 module sizes
(parameters), π_b inclusion probabilities, and a parameter budget Σ_b n_b π_b ≤ budget.  A unit u is a
module, or with ``groups`` a whole layer (A_u = Σ_{b∈u} a_b, N_u = Σ_{b∈u} n_b, one π per layer).

The trainer's account (unweighted block-Adam; proofs/07–10):

* deficit optimum — minimise D(π) = Σ_u A_u(1 − π_u) s.t. Σ_u N_u π_u ≤ budget, floor ≤ π ≤ 1.  A
  fractional knapsack: units by density A_u/N_u, highest first, π = 1 while they fit, the next one gets
  the remainder (proofs/08_deficit_optimal.md, an LP duality certificate);
* KL-regularised optimum — maximise Σ_u A_u π_u − (1/η)·Σ_u N_u[π_u log(π_u/δ) − π_u + δ], δ = budget/ΣN_u,
  under the same budget.  On the spent budget the regulariser is budget·KL(p‖u) between the budget shares
  p_u = N_u π_u/budget and the size shares u_u = N_u/ΣN.  Solution π_u = min(1, c·exp(η A_u/N_u)); with
  equal sizes this is the paper's softmax p ∝ exp(η'·a) made into inclusion probabilities ∝ p
  (proofs/09_kl_budgeted_softmax.md); η → ∞ gives the deficit optimum, η → 0 uniform π = δ.

The reweighted variant (``reweight=True``; proofs/02–03):

    minimise   V(π) = Σ_b a_b (1/π_b − 1)
    subject to Σ_b π_b n_b ≤ budget,   floor ≤ π_b ≤ 1.

KKT gives π_b = clip(√(a_b/(λ n_b)), floor, 1) with λ ≥ 0 fixed by the budget, found here exactly by
water-filling over the piecewise-linear map μ = λ^{-1/2} ↦ Σ_b n_b π_b(μ) in O(B log B)
(proofs/02_optimal_inclusion.md).  Layer-wise designs solve the same problem over layers (A_l, N_l).
Uncapped optima: module-wise (Σ_b √(a_b n_b))²/budget − Σa, layer-wise (Σ_l √(A_l N_l))²/budget − Σa;
Cauchy–Schwarz, Σ_{b∈l} √(a_b n_b) ≤ √(A_l N_l), orders them (proofs/03_modulewise_vs_layerwise.md).
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
    r"""Variance-optimal inclusion probabilities of the reweighted variant under a parameter budget.

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

    It is the maximiser over the simplex of Σ_b p_b s_b − (1/η)·KL(p ‖ uniform) (proofs/04_kl_softmax.md):
    the captured score of one module drawn from p.  Under a budget, :func:`kl_deficit_inclusion` is the
    maximiser over inclusion probabilities (proofs/09_kl_budgeted_softmax.md).
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


def _check_eta(eta: float) -> float:
    e = float(eta)
    if np.isnan(e) or e < 0:
        raise ValueError(f"eta must be ≥ 0, got {eta!r}")
    return e


def _validated_units(
    sq_norms: object, sizes: object, budget: float, groups: object | None, floor: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, float]:
    a = nonnegative(sq_norms, "sq_norms")
    n = positive(sizes, "sizes")
    same_length(a.shape[0], sizes=n)
    b = _check_budget(budget, n, floor)
    ua, un, gid = _units(a, n, groups)
    return ua, un, gid, b


def _greedy_fill(density: np.ndarray, sizes: np.ndarray, budget: float) -> np.ndarray:
    """Fractional knapsack: by density, highest first, π = 1 while a unit fits, the next gets the remainder.

    Units of equal density share their level (π equal within a tie), which is the η → ∞ limit of
    :func:`kl_deficit_inclusion`.  Spends min(budget, Σ sizes).  Shapes (U,) in, (U,) out.
    """
    order = np.argsort(-density, kind="stable")
    before = np.concatenate(([0.0], np.cumsum(sizes[order])[:-1]))  # budget used by the units ahead
    pi = np.empty_like(density)
    pi[order] = np.clip((budget - before) / sizes[order], 0.0, 1.0)
    _, tie = np.unique(density, return_inverse=True)
    return (np.bincount(tie, sizes * pi) / np.bincount(tie, sizes))[tie]


def deficit_optimal_inclusion(
    sq_norms: object,
    sizes: object,
    budget: float,
    groups: object | None = None,
    floor: float = 0.0,
) -> np.ndarray:
    r"""argmin D(π) = Σ_b a_b(1 − π_b) s.t. Σ_b n_b π_b ≤ budget, floor ≤ π_b ≤ 1: greedy by a_b/n_b.

    A linear program whose optimum is the fractional knapsack: every unit gets the floor, then units in
    decreasing density a_u/n_u get π = 1 while they fit and the next one the rest of the budget
    (proofs/08_deficit_optimal.md: the dual λ = that unit's density certifies it).  Units of equal
    density share one level; units with a_u = 0 take budget only when nothing else is left to take.
    With ``groups`` the layer-wise optimum: one π per layer, from the same problem on (A_l, N_l).

    Args:
        sq_norms: a_b ≥ 0, shape (B,).
        sizes: n_b > 0 parameters per module, shape (B,).
        budget: parameters that may be active at once (≥ the smallest module).
        groups: optional integer layer id per module, shape (B,).
        floor: lower bound on every π (needs floor·Σn ≤ budget).

    Returns:
        π per module, shape (B,), float64, spending min(budget, Σ n_b).

    Raises:
        ValueError: naming the argument that is malformed.
    """
    ua, un, gid, b = _validated_units(sq_norms, sizes, budget, groups, floor)
    if floor >= 1.0:  # the budget check allowed it: everything fits
        pi = np.ones_like(ua)
    else:
        rest = max(b - floor * un.sum(), 0.0) / (1.0 - floor)
        pi = floor + (1.0 - floor) * _greedy_fill(ua / un, un, rest)
    return pi if gid is None else pi[gid]


def optimal_deficit(
    sq_norms: object,
    sizes: object,
    budget: float,
    groups: object | None = None,
    floor: float = 0.0,
) -> float:
    """min D(π) = Σ_b a_b(1 − π*_b) at π* of :func:`deficit_optimal_inclusion`, in units of a_b."""
    a = nonnegative(sq_norms, "sq_norms")
    return float(np.sum(a * (1.0 - deficit_optimal_inclusion(a, sizes, budget, groups, floor))))


def deficit_gap(sq_norms: object, sizes: object, budget: float, groups: object, floor: float = 0.0) -> float:
    r"""Layer-wise minus module-wise optimal deficit at one budget: D*_layer − D*_module ≥ 0.

    Every layer-wise π is a module-wise π (proofs/10_deficit_modulewise_vs_layerwise.md); the gap is
    zero when a_b/n_b is constant within every layer.
    """
    layer = optimal_deficit(sq_norms, sizes, budget, groups, floor)
    return layer - optimal_deficit(sq_norms, sizes, budget, None, floor)


def _capped_exponential(density: np.ndarray, sizes: np.ndarray, budget: float, eta: float) -> np.ndarray:
    """π_u = min(1, c·exp(η·density_u)) with c > 0 such that Σ_u sizes_u π_u = budget (< Σ sizes).

    With units sorted by density, capping the top j leaves c_j = (budget − Σ_{i<j} n_i)/Σ_{i≥j} n_i e^{η d_i};
    the first j whose unit j stays ≤ 1 is the solution (proofs/09_kl_budgeted_softmax.md).  j is found in
    log space; the uncapped π are then formed from e^{η(d_i − d_j)} ≤ 1, so they spend the budget exactly.
    """
    order = np.argsort(-density, kind="stable")
    d = density[order]
    n = sizes[order]
    z = eta * (d - d[0])
    tail = np.logaddexp.accumulate((z + np.log(n))[::-1])[::-1]  # log Σ_{i≥j} n_i e^{z_i}
    rest = budget - np.concatenate(([0.0], np.cumsum(n)[:-1]))
    with np.errstate(divide="ignore", invalid="ignore"):  # rest ≤ 0 once the capped units overspend
        fits = (rest > 0) & (z + np.log(rest) - tail <= 0.0)
    j = int(np.argmax(fits))
    w = np.exp(eta * (d[j:] - d[j]))  # ≤ 1: the uncapped units relative to the largest of them
    pi = np.ones_like(density)
    pi[order[j:]] = np.minimum(1.0, rest[j] * w / float(n[j:] @ w))
    return pi


#: η·(smallest gap between distinct densities) beyond which exp underflows and the greedy limit is exact
_GREEDY_EXP = 745.0


def kl_deficit_inclusion(
    sq_norms: object,
    sizes: object,
    budget: float,
    eta: float,
    groups: object | None = None,
) -> np.ndarray:
    r"""The KL-regularised budgeted maximiser of captured gradient: π_u = min(1, c·exp(η a_u/n_u)).

    .. math::
        \max_{0 \le π \le 1,\; Σ_u n_u π_u \le \text{budget}}\;
        Σ_u a_u π_u − \frac1η Σ_u n_u\Big[π_u \log\frac{π_u}{δ} − π_u + δ\Big],\qquad δ = \text{budget}/Σ_u n_u .

    On the spent budget the regulariser equals budget·KL(p ‖ s) for the budget shares p_u = n_u π_u/budget
    and the size shares s_u = n_u/Σn; the objective is strictly concave, the solution unique and the budget
    spent exactly; c ∈ (0, δ] is found exactly (proofs/09_kl_budgeted_softmax.md).  With equal sizes n this
    is the paper's softmax p ∝ exp((η/n)·a) turned into inclusion ∝ p, capped at 1.  η = 0 gives uniform
    π = δ; η = ∞ the deficit optimum :func:`deficit_optimal_inclusion`, approached with
    D(π_η) − D* ≤ budget·log(1/δ)/η.  With ``groups``, one π per layer from (A_l, N_l).

    Args:
        sq_norms: a_b ≥ 0, shape (B,).
        sizes: n_b > 0 parameters per module, shape (B,).
        budget: parameters that may be active at once (≥ the smallest module).
        eta: η ≥ 0, inverse temperature, in 1/(squared gradient norm per parameter); ``math.inf`` allowed.
        groups: optional integer layer id per module, shape (B,).

    Returns:
        π per module, shape (B,), float64, in (0, 1] for finite η.

    Raises:
        ValueError: naming the argument that is malformed.
    """
    ua, un, gid, b = _validated_units(sq_norms, sizes, budget, groups, 0.0)
    e = _check_eta(eta)
    if un.sum() <= b:
        pi = np.ones_like(ua)
    else:
        density = ua / un
        levels = np.unique(density)
        if np.isinf(e) or (levels.size > 1 and e * np.diff(levels).min() >= _GREEDY_EXP):
            pi = _greedy_fill(density, un, b)
        else:
            pi = _capped_exponential(density, un, b, e)
    return pi if gid is None else pi[gid]
