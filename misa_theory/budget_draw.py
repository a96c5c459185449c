r"""Inclusion probabilities under a hard parameter budget, and one draw that realises them.

Units u (modules, or whole layers) have sizes n_u, and a draw may hold at most ``budget`` parameters.
Transformer modules come in a few distinct sizes (q/o, k/v, the MLP matrices), called *size classes* s.

Targets (:func:`budgeted_inclusion`).  π_u = clip(μ·r_u, floor, 1) with Σ_u n_u π_u = budget, solved exactly
by :func:`misa_theory.optimal.waterfill`.  A class can never hold more than cap_s = ⌊budget/n_s⌋ units at once,
so a class whose expected count E_s = Σ_{u∈s} π_u exceeds cap_s is scaled down to cap_s (π stays ∝ the rule
inside the class), taken out with the budget it spends, and the rest of the budget is water-filled again over
the other classes; units that no longer fit get 0.  Every pass takes out at least one class.

Draw (:func:`draw_within_budget`).

1. units with π = 1 are always in;
2. the other units' classes have expected counts E_s = K_s + f_s; the fractions f_s are rounded *dependently*
   (weighted pipage rounding, largest class first): two fractional classes a, b move along
   n_a·Δf_a + n_b·Δf_b = 0 to the nearer end point where one of them is integral, with the probabilities
   that keep E[f] unchanged, until at most one class is fractional.  So Σ_s n_s·(rounded count) never
   exceeds Σ_s n_s E_s ≤ the budget left;
3. the last fractional class goes up with probability f only if a whole extra unit of it still fits;
4. inside each class the k_s units are drawn by systematic sampling over a random order: with C_j the
   cumulative π along the order, unit j is in iff one of V, V+1, …, V+k_s−1 lies in [C_{j−1}, C_j), the
   offset V ~ U(0, f_s) if the class went up and V ~ U(f_s, 1) if it went down.  Unconditionally V is
   uniform, so every unit's marginal is exactly π_u.

Marginals therefore equal π exactly, except in the class of step 3 when the extra unit does not fit: its
members fall short by a relative bias of at most f_s/E_s.  A single class (equal layers, whole-layer
budget) is always exact.
"""

from __future__ import annotations

import numpy as np

from .optimal import waterfill

__all__ = ["budgeted_inclusion", "draw_within_budget"]

_TOL = 1e-9


def budgeted_inclusion(rates: np.ndarray, sizes: np.ndarray, budget: float, floor: float = 0.0) -> np.ndarray:
    """π_u = clip(μ_s·r_u, floor, 1) with Σ n_u π_u ≤ budget and every class within its capacity (module docstring).

    Args:
        rates: r_u ≥ 0 (scale-free), shape (U,).
        sizes: n_u > 0 integers, shape (U,).
        budget: parameters a draw may hold.
        floor: lower bound on π of every unit that fits; where the budget left after a class was taken out
            cannot pay it for every remaining unit, it drops to an equal share of that rest.

    Returns:
        π, shape (U,), float64; 0 for units larger than the budget.
    """
    n = sizes.astype(np.float64)
    pi = np.zeros(n.shape)
    free = n <= budget
    left = float(budget)
    while free.any():
        share = min(floor, left / n[free].sum())
        pi[free] = waterfill(rates[free], n[free], left, share)
        over_classes = [c for c in np.unique(n[free]) if pi[free & (n == c)].sum() > _capacity(left, c) + _TOL]
        if not over_classes:
            return pi
        for c in over_classes:  # scale to capacity and take the class out with the budget it spends
            members = free & (n == c)
            cap = _capacity(left, c)
            pi[members] *= cap / pi[members].sum()
            free &= ~members
        left -= sum(_capacity(left, c) * c for c in over_classes)
        gone = free & (n > left + _TOL)
        pi[gone] = 0.0
        free &= ~gone
    return pi


def _capacity(left: float, size: float) -> float:
    """⌊left/size⌋: the most units of that size a draw can hold."""
    return float(np.floor(left / size + _TOL))


def draw_within_budget(pi: np.ndarray, sizes: np.ndarray, budget: int, rng: np.random.Generator) -> np.ndarray:
    """One draw with Σ_u n_u·1[u drawn] ≤ budget and P(u drawn) = π_u (up to the documented bias).

    Args:
        pi: π_u ∈ [0, 1] with Σ n_u π_u ≤ budget, shape (U,) (e.g. from :func:`budgeted_inclusion`).
        sizes: n_u > 0 integers, shape (U,).
        budget: parameters the draw may hold.
        rng: the generator the draw consumes.

    Returns:
        Boolean mask (U,) of the drawn units.
    """
    chosen = pi >= 1.0 - _TOL
    left = budget - int(sizes[chosen].sum())
    rest = ~chosen & (pi > _TOL)
    classes = np.unique(sizes[rest])[::-1]  # largest first
    expected = np.array([pi[rest & (sizes == c)].sum() for c in classes])
    counts = np.floor(expected + _TOL)
    frac = np.clip(expected - counts, 0.0, 1.0)
    frac[frac < _TOL] = 0.0
    rounded, last = _pipage(frac, classes.astype(np.float64), rng)
    up = rounded > 1.0 - _TOL
    if last is not None:  # the one class left fractional goes up only if a whole extra unit of it fits
        spent = float(classes @ (counts + up)) + classes[last]
        up[last] = spent <= left and rng.random() < rounded[last]
    for c, size in enumerate(classes):
        members = np.flatnonzero(rest & (sizes == size))
        k = int(counts[c] + up[c])
        v = rng.random()
        v = v * frac[c] if up[c] else frac[c] + v * (1.0 - frac[c])
        chosen[_systematic(members, pi, k, v, rng)] = True
    return chosen


def _pipage(frac: np.ndarray, weights: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, int | None]:
    """Weighted pipage rounding of f ∈ [0, 1)^C keeping w·f fixed; returns (rounded f, the class left fractional)."""
    f = frac.copy()
    carry = None
    for c in range(f.size):
        if not _TOL < f[c] < 1.0 - _TOL:
            continue
        if carry is None:
            carry = c
            continue
        ratio = weights[carry] / weights[c]  # moving f_carry by d moves f_c by −d·ratio
        rise = min(1.0 - f[carry], f[c] / ratio)
        fall = min(f[carry], (1.0 - f[c]) / ratio)
        d = rise if rng.random() * (rise + fall) < fall else -fall  # E[d] = 0
        f[carry] += d
        f[c] -= d * ratio
        carry = next((x for x in (carry, c) if _TOL < f[x] < 1.0 - _TOL), None)
    return f, carry


def _systematic(members: np.ndarray, pi: np.ndarray, k: int, v: float, rng: np.random.Generator) -> np.ndarray:
    """The members hit by the points v, v+1, …, v+k−1 on the cumulative π of a random order of ``members``."""
    order = rng.permutation(members)
    cum = np.concatenate(([0.0], np.cumsum(pi[order])))
    hits = np.minimum(np.maximum(np.ceil(cum - v), 0.0), k)  # points below each cumulative value
    return order[hits[1:] > hits[:-1]]
