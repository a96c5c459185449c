r"""Row-wise water-filling: many budgeted inclusion problems at once, one per row (the sampler's streams).

For every row s of ``rates`` (R, U) solve

    Σ_u N_u·clip(μ_s r_su, floor, 1) = budget_s  over the units u in ``free``,  π_su = clip(μ_s r_su, floor, 1),

which is :func:`misa_theory.optimal.waterfill` applied to each row (zero-rate units stay at the floor, π = 1 on
every positive rate when the free units fit the budget whole).  The sampler solves this on every draw for
S streams × U units of a few dozen to a few hundred entries, where numpy's per-call overhead, not arithmetic,
is the cost; so each path below is a fixed, small number of whole-array operations:

* floor 0 (the paper's rules): the *capped-set iteration* μ_{i+1} = (budget − Σ_{u∈C_i} N_u)/Σ_{u∉C_i} N_u r_u
  with C_i = {u: μ_i r_u ≥ 1}, from C_0 = ∅. It is Newton's method on the concave, piecewise-linear h(μ) = Σ_u
  N_u min(1, μ r_u) started left of the root, so C_i only grows (in exact arithmetic: where rounding caps
  units that take the whole budget, μ(C) = 0 and C shrinks, so the sets are compared whole) and a fixed point
  is exact; in the common case nothing is capped and the first μ is the answer. Rows still moving after a few
  passes are finished by the sorted closed form :func:`waterfill_sorted`. A caller that solves a slowly
  changing problem again and again (the sampler, draw after draw) may pass the last capped set as a *warm
  start*: the iteration first runs from that set alone, before μ_0 is even formed; it is usually C* itself, so
  one pass confirms it instead of the two or more from C_0 (where it fails to settle, the cold route runs). A
  fixed point of the iteration is the solution whatever the start (below), and a warm start that has not
  settled after a few passes is dropped for the cold iteration, so the warm start changes the cost, not the
  answer (up to the rounding of a unit whose μ·r lies within rounding of 1);
* floor > 0: the active-set iteration over (capped, floored) sets, each row finished by ``waterfill`` if it
  does not settle.
"""

from __future__ import annotations

import numpy as np

from .optimal import waterfill

__all__ = ["waterfill_rows", "waterfill_rows_floor0", "waterfill_sorted"]

_CAPPED_SET_PASSES = 4
_WARM_PASSES = 3
_ACTIVE_SET_ITERS = 30


def waterfill_sorted(rates: np.ndarray, sizes: np.ndarray, budget: np.ndarray) -> np.ndarray:
    r"""Row-wise π = min(1, μ_s r_su) with Σ_u N_u π_su = budget_s, floor 0, in closed form (R, U).

    Requires rates ≥ 0 with some positive rate in every row and Σ_u N_u > budget.  With the rates of a row
    sorted decreasingly, r_(1) ≥ r_(2) ≥ …, capping the j largest gives
    μ_j = (budget − Σ_{i≤j} N_(i)) / Σ_{i>j} N_(i) r_(i); the solution is the first j with μ_j·r_(j+1) < 1
    (the (j+1)-th stays uncapped; the j-th is then capped, since j−1 failed the test).  A fixed number of
    array operations, whatever the rows.
    """
    R, U = rates.shape
    order = np.argsort(-rates, axis=1, kind="stable")
    r = np.take_along_axis(rates, order, axis=1)
    n = sizes[order]
    capped = np.zeros((R, U + 1))
    np.cumsum(n, axis=1, out=capped[:, 1:])  # Σ_{i≤j} N_(i), j = 0..U
    tail = np.zeros((R, U + 1))
    np.cumsum((n * r)[:, ::-1], axis=1, out=tail[:, 1:])
    tail = tail[:, ::-1]  # Σ_{i>j} N_(i) r_(i), j = 0..U (summed from the smallest: no cancellation)
    rem = budget[:, None] - capped[:, :U]
    live = tail[:, :U] > 0
    # μ_j·r_(j+1) = rem_j·(r_(j+1)/tail_j), and r_(j+1)/tail_j ≤ 1/N_(j+1): no overflow however small the rates;
    # where no positive rate is left uncapped (tail 0), every positive unit is in: μ = ∞
    ratio = r / np.where(live, tail[:, :U], 1.0)
    j = np.argmax(~live | (rem * ratio < 1.0), axis=1)
    rows = np.arange(R)
    t_j = tail[rows, j]
    pos = rates > 0
    # π = min(1, rem_j·(r/t_j)) on the uncapped units, 1 on the j capped ones: set by position, as the formula
    # gives them 0 where they take the whole budget (rem_j = 0) and rounding put a unit 1e16 times smaller
    # behind them.  r/t_j overflows to inf only for capped units (0·inf = NaN there: fmin skips it); μ itself
    # is never formed, as it exceeds the float range when the budget reaches rates below ~1e-308 of the largest
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        pi = np.fmin(1.0, rem[rows, j][:, None] * (rates / t_j[:, None]))
    capped_at = np.empty((R, U), dtype=bool)
    np.put_along_axis(capped_at, order, np.arange(U) < j[:, None], axis=1)
    pi[capped_at] = 1.0
    return np.where(pos & (t_j > 0)[:, None], pi, pos.astype(np.float64))


def _mu_of(capped: np.ndarray, nr: np.ndarray, sizes: np.ndarray, budget: np.ndarray | float) -> np.ndarray:
    """μ(C) = (budget − Σ_{u∈C} N_u) / Σ_{u∉C} N_u r_u per row (``nr`` = N·r): the one formula every route to the
    capped set C* (cold, warm, closed form) evaluates, so they all give the same bits."""
    return (budget - capped @ sizes) / np.add.reduce(np.where(capped, 0.0, nr), axis=1)


def _from_warm(rates: np.ndarray, sizes: np.ndarray, budget: np.ndarray | float, warm: np.ndarray,
               held: float | None = None) -> np.ndarray | None:
    """The capped-set iteration started from ``warm`` alone, before anything else is computed: π if no row's positive
    units fit the budget whole, every row reaches a fixed point within _WARM_PASSES and some row caps a unit,
    else None (the caller goes the cold way).

    Such a fixed point is the answer of every other route, bit for bit, since they all evaluate :func:`_mu_of`
    at C*, except for two answers that are not of that form. With no unit capped in any row, π = μ₀·r with μ₀
    from a product: hence "some row caps". A row whose positive units fit the budget whole gets π = 1 on them;
    it has no exact fixed point (h(μ) < Σ_{r>0} N ≤ budget while a positive unit is uncapped, and μ(C) is not
    finite once none is), but equal rates can make one within rounding (μ·r = 1 − 1 ulp): hence the test up
    front. Rows without a positive rate (settled rows of a later pass, 0 on every route) are the only others
    without a finite μ. From a start right of the root, one step lands left of it (h is concave) and the
    iteration goes on as from the left; sets may also shrink here, so they are compared whole. So a settled warm
    start skips μ₀ and the "nothing capped" test, and agrees with the other routes except for a unit within
    rounding of μ·r = 1, as any warm start.
    ``held``: as in :func:`waterfill_rows_floor0`."""
    if held is None:
        held_rows = (rates > 0) @ sizes  # Σ N over a row's positive units
        dead = held_rows == 0.0
        if np.count_nonzero(held_rows <= budget) != np.count_nonzero(dead):  # a live row that spends all
            return None
    elif held <= budget:  # every row spends all
        return None
    else:
        dead = None  # every row has positive rates
    nr = rates * sizes
    at = warm
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        for _ in range(_WARM_PASSES):
            mu = _mu_of(at, nr, sizes, budget)
            x = mu[:, None] * rates
            last, at = at, x >= 1.0
            if not np.count_nonzero(at ^ last):
                if not np.count_nonzero(at):
                    return None
                if not np.isfinite(np.add.reduce(mu)):
                    # only rows without a positive rate (settled rows of a later pass: π = 0) may lack a finite μ
                    lost = ~np.isfinite(mu)
                    if dead is None or np.count_nonzero(lost & ~dead):
                        return None
                    x[lost] = 0.0
                return np.minimum(x, 1.0, out=x)
    return None


def _capped_set(rates: np.ndarray, sizes: np.ndarray, budget: np.ndarray | float, mu: np.ndarray,
                x: np.ndarray) -> np.ndarray:
    """Floor-0 rows with zero rates off the free units and Σ_{r>0} N > budget: the capped-set iteration of
    the module docstring on all rows at once from its first iterate μ = budget/Σ N r, x = μ·r (the caller's),
    rows left moving finished by :func:`waterfill_sorted`."""
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):  # μ may overflow: checked below
        capped = x >= 1.0
        if not np.count_nonzero(capped) and np.isfinite(mu).all():  # μ = budget/Σ N r caps nothing
            return x
        nr = rates * sizes
        for _ in range(_CAPPED_SET_PASSES):
            mu = _mu_of(capped, nr, sizes, budget)
            x = mu[:, None] * rates
            last, capped = capped, x >= 1.0
            # the sets themselves are compared, not their sizes: C only grows in exact arithmetic, but where
            # rounding caps a unit that then takes the whole budget, μ(C) = 0 and C shrinks (the closed form
            # below settles that row), while another row's C may grow by as much
            if not np.count_nonzero(capped ^ last) and np.isfinite(np.add.reduce(mu)):  # an overflowing sum
                return np.minimum(x, 1.0, out=x)  # only costs passes
    # rows still moving, and rows whose μ left the float range (rates below ~1e-308 of the largest take budget)
    moving = np.logical_or.reduce(capped != last, axis=1) | ~np.isfinite(mu)
    x = np.minimum(x, 1.0)
    rows = np.flatnonzero(moving)
    row_budget = np.broadcast_to(budget, mu.shape)[rows]
    sub = waterfill_sorted(rates[rows], sizes, row_budget)
    # the closed form's capped set, evaluated as the iteration evaluates its fixed point, so that every way
    # to C* (cold, warm, sorted) gives the same bits; rows whose μ leaves the float range keep the closed form
    at = sub >= 1.0
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        mu_at = _mu_of(at, nr[rows], sizes, row_budget)
        x_at = np.minimum(mu_at[:, None] * rates[rows], 1.0)
    same = np.isfinite(mu_at) & np.logical_and.reduce((x_at >= 1.0) == at, axis=1)
    sub[same] = x_at[same]
    x[rows] = sub
    return x


def waterfill_rows_floor0(rates: np.ndarray, sizes: np.ndarray, budget: np.ndarray | float,
                          warm: np.ndarray | None = None, held: float | None = None) -> np.ndarray:
    r""":func:`waterfill_rows` at floor 0 with the free set given by the rates: r_su > 0 exactly on the units
    row s may spend on (zero elsewhere), so there is no mask to apply.  Shapes as there; ``budget`` may also
    be one number for every row.  ``warm`` (R, U) bool, optional: a guess of the capped set {π = 1}, e.g. the
    last solution's ``π >= 1`` (the module docstring's warm start).  ``held``, optional, with ``warm`` and one
    ``budget``: Σ N_u over the positive rates, the same in every row (a caller that knows it spares the
    warm start its own sum)."""
    if warm is not None:
        settled = _from_warm(rates, sizes, budget, warm, held)
        if settled is not None:
            return settled
    den = rates @ sizes
    # rows without a positive rate give NaN (fixed below); μ overflows where every rate is below ~1e-308·budget
    # (inf, which the capped-set route hands to the closed form)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        mu = budget / den
        x = mu[:, None] * rates
    if np.fmax.reduce(x, axis=None) < 1.0:  # nothing capped (fmax skips NaN): π ∝ r, Σ_{r>0} N > budget
        if np.count_nonzero(den) != den.size:
            x[den == 0.0] = 0.0  # rows with no free unit (settled rows of a later pass)
        return x
    pos = rates > 0
    spend = (pos @ sizes) <= budget  # every positive rate fits whole: π = 1 there, 0 elsewhere
    if not np.count_nonzero(spend):
        return _capped_set(rates, sizes, budget, mu, x)
    pi = pos.astype(np.float64)
    rows = np.flatnonzero(~spend)
    if rows.size:
        pi[rows] = _capped_set(rates[rows], sizes, np.broadcast_to(budget, den.shape)[rows], mu[rows], x[rows])
    return pi


def waterfill_rows(rates: np.ndarray, sizes: np.ndarray, free: np.ndarray, budget: np.ndarray,
                   floor: float | np.ndarray) -> np.ndarray:
    r"""π (R, U) of the module docstring's problem for every row; 0 outside ``free``.

    Args:
        rates: r_su ≥ 0, shape (R, U) (read only on ``free``).
        sizes: N_u > 0, shape (U,), float.
        free: bool (R, U), the units each row may spend on.
        budget: (R,) parameters per row.
        floor: lower bound on π of free units, in [0, 1]; a number, or one per row (R,).
    """
    pos = free & (rates > 0)
    R = rates.shape[0]
    fl = np.broadcast_to(np.asarray(floor, dtype=np.float64), (R,))
    if not fl.any():
        return waterfill_rows_floor0(np.where(pos, rates, 0.0), sizes, budget)
    pi = np.where(free, fl[:, None], 0.0)
    spend_all = (free @ sizes) <= budget
    pi[spend_all] = np.where(pos[spend_all], 1.0, pi[spend_all])
    rows = np.flatnonzero(~spend_all & pos.any(axis=1))
    if rows.size == 0:
        return pi
    r = np.where(pos[rows], rates[rows], 0.0)
    p = pos[rows]
    f = fl[rows]
    fc = f[:, None]
    nr = r * sizes
    target = budget[rows] - f * ((free[rows] & ~p) * sizes).sum(axis=1)
    settled = np.zeros(rows.size, dtype=bool)
    capped = floored = None
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):  # μ may leave the float range: checked
        mu = target / nr.sum(axis=1)
        failed = ~np.isfinite(mu)
        for _ in range(_ACTIVE_SET_ITERS):
            x = mu[:, None] * r
            new_capped = p & (x >= 1.0)
            new_floored = p & (x <= fc)
            if capped is not None:
                same = (new_capped == capped).all(axis=1) & (new_floored == floored).all(axis=1)
                settled |= same & ~failed
            todo = ~(settled | failed)
            if not todo.any():
                break
            capped, floored = new_capped, new_floored
            free_nr = np.where(capped | floored, 0.0, nr).sum(axis=1)
            rest = target - (capped * sizes).sum(axis=1) - f * (floored * sizes).sum(axis=1)
            failed |= todo & (free_nr <= 0)
            step = todo & ~failed
            mu = np.where(step, rest / np.where(free_nr > 0, free_nr, 1.0), mu)
            failed |= ~np.isfinite(mu)  # rates below ~1e-308 of the largest take budget: optimal.waterfill
        out = np.where(p, np.clip(mu[:, None] * r, fc, 1.0), pi[rows])
    for i in np.flatnonzero(~settled):
        members = np.flatnonzero(free[rows[i]])
        out[i, members] = waterfill(rates[rows[i], members], sizes[members], float(budget[rows[i]]), float(f[i]))
    pi[rows] = out
    return pi
