r"""π-exact draws of units under a hard parameter budget, for many independent rows (streams) at once.

Given inclusion probabilities π (R, U) with Σ_u n_u π_su ≤ budget per row, :class:`BudgetDraw` returns a
boolean mask (R, U) whose chosen sizes never exceed the budget and whose marginals are π.  Transformer
modules come in very few distinct sizes (q/o, k/v and the three MLP matrices), so a draw is:

1. units with π = 1 are always in;
2. the others are split into size classes s with expected counts E_s = Σ_{u∈s} π_u = K_s + f_s;
3. the fractional parts are rounded *dependently*, two classes at a time, along the direction that keeps
   Σ_s n_s f_s (the budget spent) constant, choosing between the two end points with the probabilities that
   keep E[f_s] unchanged (weighted pipage rounding).  Classes are visited largest size first; the class
   still fractional is paired with the next fractional one, so every class but at most one ends integral;
   the last fractional class is rounded up only if a whole extra unit of it still fits;
4. inside each class, k_s units are picked by systematic sampling over a fresh uniformly random order, with
   the offset V drawn conditionally on the class being rounded up (V < f_s) or down (V ≥ f_s).  With C_j the
   cumulative π along the order, unit j is picked iff one of V, V+1, …, V+k_s−1 lies in [C_{j−1}, C_j), i.e.
   iff min(⌈C_j − V⌉⁺, k_s) > min(⌈C_{j−1} − V⌉⁺, k_s); the cap k_s makes "at most k_s units" hold even
   under rounding.  Unconditionally V is uniform, so every unit's marginal is exactly π_u.

So no draw exceeds the budget, and marginals equal π exactly except in the one class left fractional at
step 3 when the budget is saturated: its expected count is short by at most f < 1 unit, a relative bias of
at most f/E_s ≤ 1/E_s for its members (docs/sampler.md has the measured marginals).

The random order of step 4 is one integer sort per row: each unit's key holds its class id in the top bits
(so classes stay in fixed blocks), ≥ 32 random bits below, and its own index in the lowest bits, which the
sort carries along instead of a separate argsort.  Two units of a class tie only if their random bits agree
(probability ≤ U²·2⁻³³ per draw, then ordered by index), which moves no marginal: V alone makes each
marginal exact for any fixed order.  Every row uses fixed-shape variates, so the generator state after a
draw depends only on the number of rows.
"""

from __future__ import annotations

import numpy as np

__all__ = ["BudgetDraw"]

_TOL = 1e-9
_MIN_RANDOM_BITS = 32


class BudgetDraw:
    """The draw of the module docstring for units of fixed sizes and a fixed budget.

    Args:
        sizes: n_u > 0 parameters per unit, integers, shape (U,).
        budget: parameters a draw may hold.
    """

    def __init__(self, sizes: np.ndarray, budget: int) -> None:
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.budget = int(budget)
        U = self.sizes.size
        self.class_sizes, class_of = np.unique(self.sizes, return_inverse=True)
        self.class_of = class_of.reshape(-1).astype(np.int64)
        C = self.class_sizes.size
        self.onehot = np.zeros((U, C))
        self.onehot[np.arange(U), self.class_of] = 1.0
        self._pipage_order = np.argsort(-self.class_sizes, kind="stable")  # largest class first
        self._fsizes = self.sizes.astype(np.float64)
        self._fclass_sizes = self.class_sizes.astype(np.float64)
        self._offsets = np.zeros((0, 1), dtype=np.intp)
        self._visits: dict[bytes, np.ndarray] = {}  # pipage visiting order per set of fractional classes
        self._class_ids = np.arange(C)
        self._arange = np.zeros(0, dtype=np.intp)
        # the random order lays the classes out as fixed blocks (class 0 first): per position its class, and
        # where each block starts (an index into the cumulative sums, which carry a leading 0)
        self._class_at = np.sort(self.class_of)
        self._block_starts = np.searchsorted(self._class_at, np.arange(C), side="left")
        self._block_spread = np.zeros((C, U))  # (C, U): row c is 1 on the positions of class c's block
        self._block_spread[self._class_at, np.arange(U)] = 1.0
        idx_bits = max(1, (U - 1).bit_length())
        cls_bits = max(1, (C - 1).bit_length())
        rand_bits = 64 - idx_bits - cls_bits
        self._int_keys = rand_bits >= _MIN_RANDOM_BITS
        if self._int_keys:
            self._idx_mask = np.uint64((1 << idx_bits) - 1)
            self._clear_low = np.uint64(~((1 << idx_bits) - 1) & 0xFFFFFFFFFFFFFFFF)
            self._cls_shift = np.uint64(cls_bits)
            self._template = (self.class_of.astype(np.uint64) << np.uint64(64 - cls_bits)) | np.arange(
                U, dtype=np.uint64)

    def _order(self, rng: np.random.Generator, R: int) -> np.ndarray:
        """(R, U) unit indices: class blocks in class order, uniformly shuffled inside each block."""
        U = self.sizes.size
        if self._int_keys:
            raw = rng.bit_generator.random_raw((R, U))
            raw >>= self._cls_shift  # room for the class id on top
            raw &= self._clear_low  # room for the index below
            raw |= self._template
            raw.sort(axis=1)
            raw &= self._idx_mask
            return raw.view(np.int64)  # unit indices after the mask: reinterpreting them copies nothing
        return np.argsort(self.class_of + rng.random((R, U)), axis=1)

    def variates(self, rng: np.random.Generator, R: int) -> tuple[np.ndarray, np.ndarray]:
        """The random input of one draw of R rows, which does not depend on π: the uniforms (R, 2C+1) and the
        random order (R, U), drawn in that order, the order as flat indices r·U + unit.  A caller may take
        them ahead of time and pass them to :meth:`__call__`; the generator advances exactly as if the draw
        had taken them itself."""
        C = self.class_sizes.size
        # fixed shapes: pipage steps (C−1, padded to C), the lift of the last class, the C systematic offsets
        u = rng.random((R, 2 * C + 1))
        order = self._order(rng, R)
        order += self._row_offsets(R)
        return u, order

    def __call__(self, pi: np.ndarray, rng: np.random.Generator,
                 variates: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """One draw per row of ``pi`` (R, U): a boolean mask (R, U) with Σ_u n_u mask_su ≤ budget.

        ``variates``: this draw's :meth:`variates`, if the caller took them ahead (else drawn here)."""
        R, U = pi.shape
        C = self.class_sizes.size
        u, flat = self.variates(rng, R) if variates is None else variates
        # count_nonzero, ufunc reductions and products with one-hot matrices instead of the ndarray methods
        # and column indexing: the arrays are small enough that numpy's per-call cost is the whole cost
        forced = pi >= 1.0 - _TOL
        any_forced = np.count_nonzero(forced)
        p, left = pi, float(self.budget)
        if any_forced:
            p = np.where(forced, 0.0, pi)
            left = left - forced @ self._fsizes
        expected = p @ self.onehot
        counts = np.floor(expected + _TOL)
        frac = expected - counts  # in [−TOL, 1 − TOL]
        frac *= frac >= _TOL  # below TOL: 0 (−0 where negative, which compares and adds as 0)
        up, last, leftover = self._round_classes(frac, u[:, :C])
        counts += up
        has = last >= 0
        if np.count_nonzero(has):
            # the one class left fractional goes up only if a whole extra unit of it fits (else: documented bias)
            c = np.maximum(last, 0)
            spent = counts @ self._fclass_sizes + self._fclass_sizes.take(c)
            lift = has & (spent <= left) & (u[:, C] < leftover)
            lifted = (c[:, None] == self._class_ids) & lift[:, None]  # (R, C): the class that goes up
            up |= lifted
            counts += lifted
        # V | rounded up ~ U(0, f), V | rounded down ~ U(f, 1) (= U(0, 1) when f = 0)
        v = u[:, C + 1:]
        v = np.where(up, v * frac, frac + v * (1.0 - frac))

        cum = np.zeros((R, U + 1))
        np.add.accumulate(p.take(flat), axis=1, out=cum[:, 1:])  # cumsum's own loop, without its wrapper
        # systematic points V + i counted from the start of each class block, spread to the block's positions
        # (a product with the (C, U) block indicator: x·1 + 0 + … is exact)
        v += cum[:, self._block_starts]
        off = v @ self._block_spread
        hits = np.subtract(cum[:, 1:], off, out=off)
        np.ceil(hits, out=hits)
        np.maximum(hits, 0.0, out=hits)
        np.minimum(hits, counts @ self._block_spread, out=hits)
        # points before position j: the previous position's count inside a block, 0 at a block's start
        before = np.empty((R, U))
        before[:, 1:] = hits[:, :-1]
        before[:, self._block_starts] = 0.0
        chosen = np.empty((R, U), dtype=bool)
        chosen.reshape(-1)[flat.reshape(-1)] = (hits > before).reshape(-1)
        if any_forced:
            chosen |= forced
        return chosen

    def _rows(self, R: int) -> np.ndarray:
        """arange(R), cached."""
        if self._arange.size != R:
            self._arange = np.arange(R)
        return self._arange

    def _row_offsets(self, R: int) -> np.ndarray:
        """(R, 1) offsets r·U that turn per-row unit indices into flat ones (cached per R)."""
        if self._offsets.shape[0] != R:
            self._offsets = (np.arange(R) * self.sizes.size)[:, None]
        return self._offsets

    def _round_classes(self, frac: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Weighted pipage rounding of class fractions f_s ∈ [0, 1) with weights n_s, on every row at once.

        Classes are visited largest first; the *carry* is the one visited class that may still be fractional.
        Pairing it with the next fractional class s moves both by d along n_carry·f_carry + n_s·f_s = const,
        to the end point where one of them is integral: d = +up (raise the carry, lower s) with probability
        down/(up + down), else d = −down, so E[d] = 0 and E[f] is unchanged; u[:, s−1] is that step's
        U(0, 1).  Values within TOL of 0 or 1 count as integral.  Returns (rounded up? per row and class,
        the class left fractional or −1, its remaining fraction).
        """
        R, C = frac.shape
        up = np.zeros((R, C), dtype=bool)
        frac_any = np.logical_or.reduce(frac > _TOL, axis=0)
        key = frac_any.tobytes()
        order = self._visits.get(key)
        if order is None:  # only classes fractional in some row, largest first (few patterns: cached)
            order = self._visits[key] = self._pipage_order[frac_any[self._pipage_order]]
        if order.size == 0:
            return up, np.full(R, -1), np.zeros(R)
        if order.size == 2:  # the usual case (the largest class pinned at its capacity leaves two)
            return self._round_pair(frac, u, order, up)
        return self._round_loop(frac, u, order, up)

    def _round_loop(self, frac: np.ndarray, u: np.ndarray, order: np.ndarray,
                    up: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`_round_classes` over the classes ``order`` (visiting order), ``up`` all False (R, C)."""
        R = frac.shape[0]
        f = frac.T[order]  # (K, R): class rows in visiting order
        n = self._fclass_sizes[order]
        rows = self._rows(R)
        fc = f[0].copy()  # the carry's fraction and its position in the visiting order
        pc = np.zeros(R, dtype=np.intp)
        live = fc > _TOL
        for s in range(1, order.size):
            fs = f[s]
            both = live & (fs > _TOL)
            if np.count_nonzero(both):
                ratio = n[pc] / n[s]
                up_c = np.minimum(1.0 - fc, fs / ratio)
                down_c = np.minimum(fc, (1.0 - fs) / ratio)
                d = np.where(u[:, s - 1] * (up_c + down_c) < down_c, up_c, -down_c)
                d *= both
                fc = fc + d
                fs = fs - d * ratio
                f[s] = fs
                f[pc, rows] = fc
                live = (fc > _TOL) & (fc < 1.0 - _TOL)
            # the carry moves on to s unless it is still fractional
            pc = np.where(live, pc, s)
            fc = np.where(live, fc, fs)
            live = (fc > _TOL) & (fc < 1.0 - _TOL)
        up[:, order] = (f > 1.0 - _TOL).T
        return up, np.where(live, order[pc], -1), np.where(live, fc, 0.0)

    def _round_pair(self, frac: np.ndarray, u: np.ndarray, order: np.ndarray,
                    up: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`_round_loop` for two classes, one step, without its bookkeeping of the carry (same bits)."""
        a, b = int(order[0]), int(order[1])
        fa, fb = frac[:, a], frac[:, b]
        ratio = self._fclass_sizes[a] / self._fclass_sizes[b]
        both = np.minimum(fa, fb) > _TOL
        if np.count_nonzero(both):
            up_c = np.minimum(1.0 - fa, fb / ratio)
            down_c = np.minimum(fa, (1.0 - fb) / ratio)
            d = np.where(u[:, 0] * (up_c + down_c) < down_c, up_c, -down_c)
            d *= both  # rows where one of them is integral already do not move
            fa = fa + d
            fb = fb - d * ratio
            stays = (fa > _TOL) & (fa < 1.0 - _TOL)  # a is still fractional: it stays the carry, else b is
        else:  # no step (as the loop: the carry stays where it is fractional)
            stays = fa > _TOL
        fc = np.where(stays, fa, fb)
        live = (fc > _TOL) & (fc < 1.0 - _TOL)
        up[:, a] = fa > 1.0 - _TOL
        up[:, b] = fb > 1.0 - _TOL
        return up, np.where(live, np.where(stays, a, b), -1), np.where(live, fc, 0.0)
