r"""`ModuleSampler`: importance scores → inclusion probabilities → an active set within a hard budget.

This is the only implementation of the sampling rules; the simulator and the torch trainer both call it.

Streams
-------
``ModuleSampler(..., streams=S)`` runs S independent samplers over the same modules as one object: scores,
targets and inclusion probabilities are arrays of shape (S, B), :meth:`ModuleSampler.draw` returns a boolean
mask (S, B) and :meth:`ModuleSampler.observe` takes a mask and squared norms of shape (S, B).  Every step
below is array code over the stream axis (a per-stream loop only for exploration draws and the badam cycle),
and the default ``streams=None`` is the same code with S = 1, squeezed to today's 1-D API (sorted indices).
All streams share one PCG64 generator that always consumes the same number of variates per draw for a given
state, so a draw is a deterministic function of (seed, history) and streams never share a variate.

Rules
-----
Module-wise (a unit is one module):

* ``misa``     the paper's rule: p = softmax(η·s) over scale-free scores s_b = score_b / mean(score), turned
               into inclusion probabilities proportional to p under the budget, π_b = clip(c·p_b, floor, 1);
* ``optimal``  the variance-optimal π of :func:`misa_theory.optimal.optimal_inclusion` on the scores;
* ``uniform``  equal inclusion probability for every module.

Layer-wise (a unit is a whole group, i.e. a layer; every module of a layer shares one switch):

* ``lisa``     uniform random layers;
* ``badam``    layers in a cycle through a permutation reshuffled after every pass.

Scores are exponential moving averages of the observed squared gradient norms with Adam-style bias
correction, score_b = m_b / (1 − β^{c_b}) after c_b observations; only modules that were active are
updated.  With ``explore=True`` the score-driven rules first cycle through every unit once (shuffled, packed
into the budget) so that no score is trusted before it was observed.

The draw (π-exact sampling under a hard budget)
----------------------------------------------
Targets are water-filled row by row (:mod:`misa_theory.waterfill_rows`) under the per-size-class
capacities described in :meth:`ModuleSampler._target_units`, and drawn by
:class:`misa_theory.budget_draw.BudgetDraw`: units with π = 1 always in, the expected count of each size
class rounded dependently so the budget spent stays fixed (weighted pipage rounding), then conditional
systematic sampling inside each class over a fresh random order.  So no draw ever exceeds the budget, and
marginals equal π exactly except in the one class the rounding may leave fractional when the budget is
saturated (relative bias ≤ 1/E_s there).  Layer-wise rules have a single size class (equal layers), for
which the budget is first rounded down to a whole number of layers, so they are exact.  The authors'
sequential weighted draw (add modules by p until the budget is full) does not control its marginals at
all; docs/sampler.md has the measured comparison with π (benchmarks/bench_marginals.py).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._validate import group_ids, nonnegative, positive
from .budget_draw import BudgetDraw
from .waterfill_rows import waterfill_rows, waterfill_rows_floor0

RULES: tuple[str, ...] = ("misa", "optimal", "uniform", "lisa", "badam")
LAYER_RULES: tuple[str, ...] = ("lisa", "badam")
SCORE_RULES: tuple[str, ...] = ("misa", "optimal")
_TOL = 1e-9


class ModuleSampler:
    """Draws the active set of modules for each period of T steps; see the module docstring for the math.

    Args:
        sizes: n_b > 0, parameters per module, shape (B,).
        groups: integer layer id per module, shape (B,); default: every module its own group.
        delta: budget as a fraction of ``total_params``, in (0, 1]; budget = ⌊δ·total_params⌋ parameters.
        rule: one of :data:`RULES`.
        seed: seed of the sampler's own ``numpy.random.Generator`` (PCG64), shared by all streams.
        total_params: parameters the fraction refers to; default Σ n_b (the trainer passes the whole model).
        eta: η ≥ 0 of the softmax rule.
        ema_beta: β ∈ [0, 1) of the score EMA.
        min_inclusion: floor on every reachable unit's π (keeps every module drawable; needs floor·Σn ≤ budget).
            A size class pinned at its capacity scales its own π, floor included; when the budget left
            after pinning cannot pay the floor of every free unit, their floor drops to an equal share.
        explore: visit every unit once before score-driven rules trust the scores.
        streams: None for one sampler with the 1-D API (indices in, indices out); an int S ≥ 1 for S
            independent samplers whose scores, targets and draws are arrays (S, B) (see the module docstring).
        depth_bias: γ ≥ 0, opt-in and module-wise rules only: every rate is multiplied by exp(γ·(d_b − 1)),
            d_b = rank of b's group / (number of groups − 1) ∈ [0, 1] (groups in depth order: 0 = the bottom
            layer), which tilts π towards upper layers so backward, which must reach the lowest active
            layer, is shorter.  For ``misa`` this adds γ·(d_b − 1) to the softmax logit.  0 (the default)
            is the paper's rule; every reachable module keeps π > 0.
    """

    _share_passes = True  # the shared-bookkeeping shortcut of _target_units (False: per row; for tests)

    def __init__(
        self,
        sizes: Any,
        groups: Any = None,
        delta: float = 0.03,
        rule: str = "misa",
        seed: int = 0,
        total_params: int | None = None,
        eta: float = 1.0,
        ema_beta: float = 0.9,
        min_inclusion: float = 0.0,
        explore: bool = True,
        streams: int | None = None,
        depth_bias: float = 0.0,
    ) -> None:
        n = positive(sizes, "sizes")
        if np.any(n != np.round(n)):
            raise ValueError("sizes must be whole numbers of parameters")
        self.sizes = n.astype(np.int64)
        self.n_modules = int(n.shape[0])
        if groups is None:
            groups = np.arange(self.n_modules)
        self.groups, self.n_groups = group_ids(groups, self.n_modules)
        if rule not in RULES:
            raise ValueError(f"rule must be one of {', '.join(RULES)}; got {rule!r}")
        self.rule = rule
        delta = float(delta)
        if not (0.0 < delta <= 1.0):
            raise ValueError(f"delta must lie in (0, 1], got {delta!r}")
        self.delta = delta
        total = int(self.sizes.sum()) if total_params is None else int(total_params)
        if total < self.sizes.sum():
            raise ValueError(f"total_params ({total}) is smaller than the sum of module sizes ({self.sizes.sum()})")
        self.total_params = total
        if not (np.isfinite(eta) and eta >= 0):
            raise ValueError(f"eta must be a finite number ≥ 0, got {eta!r}")
        self.eta = float(eta)
        if not 0.0 <= ema_beta < 1.0:
            raise ValueError(f"ema_beta must lie in [0, 1), got {ema_beta!r}")
        self.ema_beta = float(ema_beta)
        self.explore = bool(explore)
        self.seed = int(seed)
        if streams is not None and (isinstance(streams, bool) or int(streams) != streams or streams < 1):
            raise ValueError(f"streams must be None or an integer ≥ 1, got {streams!r}")
        self.streams = None if streams is None else int(streams)
        self._n_streams = 1 if streams is None else int(streams)

        layer = rule in LAYER_RULES
        self._unit_of = self.groups if layer else np.arange(self.n_modules)
        self._unit_sizes = np.bincount(self._unit_of, self.sizes, int(self._unit_of.max()) + 1).astype(np.int64)
        self.n_units = int(self._unit_sizes.shape[0])
        budget = math.floor(delta * total)
        smallest = int(self._unit_sizes.min())
        what = "layer" if layer else "module"
        if budget < smallest:
            raise ValueError(
                f"delta={delta:g} gives a budget of {budget} parameters, smaller than the smallest {what} "
                f"({smallest}); raise delta to at least {smallest / total:.3g}"
            )
        if layer and np.unique(self._unit_sizes).size == 1:
            # one size class: only whole layers can be active, so aim for exactly that many
            budget = (budget // smallest) * smallest
        self.budget = int(budget)
        self._reachable = self._unit_sizes <= self.budget
        # few distinct sizes (q/o, k/v, MLP): class ids are fixed, so everything per class is computed once
        self._drawer = BudgetDraw(self._unit_sizes, self.budget)
        self._class_sizes = self._drawer.class_sizes.astype(np.float64)
        self._onehot_t = np.ascontiguousarray(self._drawer.onehot.T)  # (C, U): a per-class row → per unit
        self._capacity = np.floor(self.budget / self._class_sizes + _TOL)
        self._capacity_limit = self._capacity + 1e-9  # E_s above this is over capacity
        self._shared_pass: dict[tuple[bytes, ...], tuple[Any, ...]] = {}  # see _target_units
        self._shared_end: dict[tuple[bytes, ...], tuple[np.ndarray, ...] | None] = {}  # see _shared_ends
        self._warm: dict[int, np.ndarray] = {}  # each target pass's capped set at the last draw (warm start)
        self._fsizes = self._unit_sizes.astype(np.float64)
        self._inv_sizes = 1.0 / self._fsizes
        self._n_reachable = float(self._reachable.sum())
        self._held_reachable = float(self._fsizes[self._reachable].sum())
        self._all_reachable = bool(self._reachable.all())
        self._reachable_rows = np.tile(self._reachable, (self._n_streams, 1))
        # a class is reachable iff its (common) size fits the budget; inf marks one that never holds a unit
        self._class_sizes_reachable = np.where(self._class_sizes <= self.budget, self._class_sizes, np.inf)
        if not (np.isfinite(depth_bias) and depth_bias >= 0):
            raise ValueError(f"depth_bias must be a finite number ≥ 0, got {depth_bias!r}")
        if depth_bias > 0 and layer:
            raise ValueError(f"depth_bias applies to the module-wise rules, not {rule!r}")
        self.depth_bias = float(depth_bias)
        depth = self.groups / max(self.n_groups - 1, 1)
        self._tilt = np.exp(self.depth_bias * (depth - 1.0)) if self.depth_bias > 0 else None
        if not 0.0 <= min_inclusion <= 1.0:
            raise ValueError(f"min_inclusion must lie in [0, 1], got {min_inclusion!r}")
        if min_inclusion * self._unit_sizes[self._reachable].sum() > self.budget:
            raise ValueError(
                f"min_inclusion={min_inclusion:g} cannot be met within the budget of {self.budget} parameters"
            )
        self.min_inclusion = float(min_inclusion)

        S = self._n_streams
        self.rng = np.random.default_rng(self.seed)
        self._ema = np.zeros((S, self.n_modules))
        self._count = np.zeros((S, self.n_modules), dtype=np.int64)
        self._observed_calls = 0  # an upper bound on every count
        self._scores = np.zeros((S, self.n_modules))
        self._bias = np.zeros(0)
        self._all_explored = False
        self._visited = np.tile(~self._reachable, (S, 1))
        self._cycle: list[np.ndarray] = [np.zeros(0, dtype=np.int64) for _ in range(S)]
        self._cycle_pos = np.zeros(S, dtype=np.int64)
        self.n_draws = 0
        self._prefetched: tuple[np.ndarray, np.ndarray] | None = None
        self._last = self._target_rows()

    def _squeeze(self, a: np.ndarray) -> np.ndarray:
        return a[0] if self.streams is None else a

    # ------------------------------------------------------------------ scores
    def _refresh_scores(self) -> None:
        """score = m/(1 − β^c) where c > 0, 0 elsewhere, on every entry (after a state is loaded)."""
        self._cover_counts()
        self._scores = np.zeros(self._ema.shape)
        np.divide(self._ema, self._bias.take(self._count), out=self._scores, where=self._count > 0)

    def _cover_counts(self) -> None:
        """Extend the table 1 − β^c to every count so far (by the same power as elementwise).  An observe adds
        at most 1 to a count, so the largest count needs looking at only once the number of observe calls
        reaches the table's length."""
        if self._observed_calls >= self._bias.size:
            top = int(self._count.max(initial=0))
            if top >= self._bias.size:
                self._bias = 1.0 - np.power(self.ema_beta, np.arange(max(2 * top, 64)))

    @property
    def scores(self) -> np.ndarray:
        """Bias-corrected EMA of observed squared norms per module, m_b/(1 − β^{c_b}); 0 if never observed.

        Shape (B,), or (S, B) with ``streams``.
        """
        return self._squeeze(self._scores)

    @property
    def last_inclusion(self) -> np.ndarray:
        """π used by the most recent draw per module (an exploration draw reports its fill); (B,) or (S, B)."""
        return self._squeeze(self._last)

    def _exploring_rows(self) -> np.ndarray:
        if self._all_explored or not (self.explore and self.rule in SCORE_RULES):
            return np.zeros(self._n_streams, dtype=bool)
        rows = ~self._visited.all(axis=1)
        self._all_explored = not rows.any()  # visits are never undone, so this stays true
        return rows

    @property
    def exploring(self) -> bool | np.ndarray:
        """True while a score-driven rule is still visiting units it has never drawn (per stream: (S,) bool)."""
        rows = self._exploring_rows()
        return bool(rows[0]) if self.streams is None else rows

    def observe(self, indices: Any, sq_norms: Any) -> None:
        """Fold observed squared gradient norms of active modules into their EMA scores.

        Single stream: ``indices`` are module indices (shape (k,), unique), ``sq_norms`` the matching
        ‖g_b‖² ≥ 0 (e.g. the mean over the period's steps).  With ``streams=S``: ``indices`` is a boolean mask
        (S, B) of the observed modules and ``sq_norms`` an array (S, B) read only where the mask is set.
        m_b ← β m_b + (1 − β) x_b and c_b ← c_b + 1 for the observed b only.
        """
        if self.streams is None:
            idx = np.asarray(indices, dtype=np.int64).reshape(-1)
            x = nonnegative(sq_norms, "sq_norms") if idx.size else np.zeros(0)
            if x.shape[0] != idx.shape[0]:
                raise ValueError(f"sq_norms has length {x.shape[0]}, expected {idx.shape[0]} (one per index)")
            if idx.size == 0:
                return
            if idx.min() < 0 or idx.max() >= self.n_modules:
                raise ValueError(f"indices must lie in [0, {self.n_modules})")
            if np.unique(idx).size != idx.size:
                raise ValueError("indices must be unique")
            mask = np.zeros((1, self.n_modules), dtype=bool)
            mask[0, idx] = True
            values = np.zeros((1, self.n_modules))
            values[0, idx] = x
        else:
            shape = (self._n_streams, self.n_modules)
            mask = np.asarray(indices)
            if mask.shape != shape or mask.dtype != bool:
                raise ValueError(f"indices must be a boolean mask of shape {shape} with streams, got "
                                 f"{mask.dtype} {mask.shape}")
            values = np.asarray(sq_norms, dtype=np.float64)
            if values.shape != shape:
                raise ValueError(f"sq_norms must have shape {shape}, got {values.shape}")
        # the observed entries only (a few per row): gathered once, checked, folded in, scattered back
        at = mask.reshape(-1).nonzero()[0]
        seen = values.reshape(-1).take(at)
        # min ≥ 0 and max < ∞, both false on NaN: two reductions instead of three passes and an all()
        if seen.size and not (np.minimum.reduce(seen) >= 0 and np.maximum.reduce(seen) < np.inf):
            raise ValueError("sq_norms must be finite and non-negative where the mask is set")
        self._observe_at(mask, at, seen)

    def _observe_at(self, mask: np.ndarray, at: np.ndarray, seen: np.ndarray) -> None:
        """m ← βm + (1 − β)x, c ← c + 1 and the score m/(1 − β^c) at the flat entries ``at`` of the (S, B)
        state, x = ``seen`` (overwritten); ``mask`` is the same set as a boolean (S, B)."""
        b = self.ema_beta
        ema, count = self._ema.reshape(-1), self._count.reshape(-1)
        m = ema.take(at)
        m *= b
        seen *= 1.0 - b
        m += seen
        ema.put(at, m)
        c = count.take(at)
        c += 1
        count.put(at, c)
        self._observed_calls += 1
        self._cover_counts()
        self._scores.reshape(-1).put(at, m / self._bias.take(c))
        if self.rule in LAYER_RULES:
            rows, cols = np.nonzero(mask)
            self._visited[rows, self._unit_of[cols]] = True
        elif not self._all_explored:
            self._visited |= mask

    # ------------------------------------------------------------------ targets
    def _rates_rows(self, scores: np.ndarray, free: np.ndarray, all_free: bool = False,
                    count: float | None = None) -> np.ndarray:
        """The rule's water-filling rates, 0 off the ``free`` units of each row (scale-free: μ absorbs the
        scale).  ``all_free`` promises that every unit is free (skips the masking); ``count``, if given, is the
        number of free units in every row."""
        if self.rule not in SCORE_RULES:
            rates = free.astype(np.float64)
            if self._tilt is not None:
                rates *= self._tilt
            return rates
        # ufunc reductions and count_nonzero rather than the ndarray methods: this runs on every draw, on
        # arrays so small that the methods' Python wrappers cost more than the arithmetic
        score = scores if all_free else scores * free
        top = np.maximum.reduce(score, axis=1)
        all_live = np.minimum.reduce(top) > 0  # some positive score in every row (live rows: top > 0)
        if self.rule == "misa":
            # p ∝ exp(η·s/mean_free(s)), the mean over the free units as the scores are scale-free there;
            # shifted by the largest logit (overflow) and left unnormalised (μ absorbs the scale)
            # (dividing the shifted scores by the mean cannot overflow: |s − top| ≤ top ≤ count·mean)
            total = np.add.reduce(score, axis=1)
            if count is None:
                count = free.sum(axis=1)
            if all_live:
                mean = total / count
            else:
                mean = np.ones(top.shape)
                np.divide(total, count, out=mean, where=top > 0)
            score = np.subtract(score, top[:, None], out=None if all_free else score)
            score /= mean[:, None]
            if self.eta != 1.0:
                score *= self.eta
            rates = np.exp(score, out=score)
        else:
            rates = np.multiply(score, self._inv_sizes, out=None if all_free else score)
            np.sqrt(rates, out=rates)
        if self._tilt is not None:  # scale-free rates: multiplying is adding log-tilt to the logit
            rates *= self._tilt
        if not all_free:
            rates *= free
        if all_live:
            return rates
        # no positive score among a row's free units: equal rates (tilted) over them
        flat = free if self._tilt is None else free * self._tilt
        return np.where((top > 0)[:, None], rates, flat)

    def _target_units(self, rows: np.ndarray | None) -> np.ndarray:
        """π per unit (R, U) for the current scores of ``rows`` (all streams if None; 0 for units larger than
        the budget).

        A size class can never hold more than ⌊budget/n_s⌋ units at once, so a class whose expected count
        E_s exceeds that capacity is scaled down to it (π ∝ the rule's π inside the class, which is the KKT
        solution with the extra constraint Σ_{b∈s} π_b ≤ cap_s for the optimal rule) and the rest of the
        budget is re-spread over the other classes by the same rule; each row does this independently.
        Every pass takes at least one class out, so there are at most (number of classes) + 1 passes, each
        a fixed number of whole-array operations over all rows (rows already settled take no free units).

        Two shortcuts change the cost, not the result.  While every row takes out the same classes (the
        usual case: the largest class alone is over its capacity everywhere), the rest budget, capacities,
        free units and stuck test are the same for every row, so they are looked up per sequence of classes
        taken out.  With all streams at floor 0, each pass's water-filling starts from the capped set that
        pass found at the previous draw (:func:`~misa_theory.waterfill_rows.waterfill_rows_floor0`'s warm
        start): scores move little between draws, so that set is usually already the answer.
        """
        scores = None
        if self.rule in SCORE_RULES:  # score rules are module-wise: units are modules
            scores = self._scores if rows is None else self._scores[rows]
        R = self._n_streams if rows is None else rows.size
        free = self._reachable_rows if rows is None else self._reachable_rows[rows]  # never written in place
        budget: float | np.ndarray = float(self.budget)  # one number while every row took out the same classes
        capacity, limit = self._capacity, self._capacity_limit  # (C,) likewise, then (R, C)
        count: float | None = self._n_reachable  # free units per row while they are the same (None: count them)
        held = self._held_reachable  # their Σ n_u (read while count is not None)
        all_free = self._all_reachable
        gone = None  # classes taken out, per row
        going = None  # rows still re-spreading (None: all)
        # the classes every row took out, pass by pass (None: rows differ, or the shortcut is off)
        shared: tuple[bytes, ...] | None = () if self._share_passes else None
        pi = None
        floor = self.min_inclusion
        warm = self._warm if rows is None and floor == 0.0 else None
        onehot, onehot_t = self._drawer.onehot, self._onehot_t
        n_pass = 0
        while True:
            work = free if going is None else free & going[:, None]
            rates = self._rates_rows(scores, work, all_free, count)
            if floor == 0.0:
                # every row's free units all with a positive rate (no underflow): Σ n over them is `held`
                known = None
                if warm is not None and count is not None and np.count_nonzero(rates) == R * count:
                    known = held
                p = waterfill_rows_floor0(rates, self._fsizes, budget, None if warm is None else warm.get(n_pass),
                                          known)
                if warm is not None:
                    warm[n_pass] = p >= 1.0
            else:
                # after a class is pinned the rest of the budget may not pay the floor of every free unit: the
                # floor drops to what it can pay, an equal share (the budget binds; validated in the first pass)
                row_budget = np.broadcast_to(budget, (R,))
                share = row_budget / np.maximum(work @ self._fsizes, 1.0)
                p = waterfill_rows(rates, self._fsizes, work, row_budget, np.minimum(floor, share))
            n_pass += 1
            if pi is None:
                pi = p
            else:
                np.copyto(pi, p, where=work)  # pi is this call's own array (scaled in place below)
            expected = p @ onehot  # E_s; 0 on classes taken out earlier and on settled rows
            over = expected > limit
            n_over = np.count_nonzero(over)
            if not n_over:
                return pi
            # classes over capacity: scale to capacity, take them and their budget out, re-spread the rest
            scale = np.ones(over.shape)
            np.divide(capacity, expected, out=scale, where=over)
            pi *= scale @ onehot_t  # scale per unit's class (x·1 + 0 + … is exact; cheaper than indexing)
            if shared is not None:
                col = np.logical_or.reduce(over, axis=0)
                if n_over == R * np.count_nonzero(col):  # every row took out exactly these classes
                    shared += (col.tobytes(),)
                    step = self._shared_pass.get(shared)
                    if step is None:
                        step = self._shared_pass[shared] = self._shared_step(shared, col, budget, capacity, gone)
                    budget, capacity, limit, gone, keep, count, held, stuck = step
                    free = free & keep
                    all_free = False
                    if stuck:  # the rest of the budget fits no free unit: they stay at 0
                        return np.where(free, 0.0, pi)
                    continue
                # rows took out different classes; where each row's take-out leaves it stuck (the usual end of
                # the second pass), the rows finish by a look-up on their pattern of classes
                ends = self._shared_ends(shared, budget, capacity, gone, free[0])
                if ends is not None:
                    row_pattern = (over @ ends[0]).astype(np.intp)
                    if np.logical_and.reduce(ends[1].take(row_pattern)):
                        return np.where(ends[2].take(row_pattern, 0), 0.0, pi)
                shared = None
            count = None  # rows may differ from here on
            hit = np.logical_or.reduce(over, axis=1)
            budget = budget - (over * capacity) @ self._class_sizes
            gone = over if gone is None else gone | over
            free = free & ((over @ onehot_t) == 0.0)
            all_free = False
            # a row whose budget no longer fits any free unit is done, its free units at 0 (inf: none left)
            stuck = hit & (budget < np.minimum.reduce(np.where(gone, np.inf, self._class_sizes_reachable), axis=1))
            if np.count_nonzero(stuck):
                pi = np.where(stuck[:, None] & free, 0.0, pi)
            going = hit & ~stuck
            if not np.count_nonzero(going):
                return pi
            capacity = np.floor(budget[:, None] / self._class_sizes + _TOL)
            limit = capacity + 1e-9

    def _shared_ends(self, key: tuple[bytes, ...], budget: float, capacity: np.ndarray, gone: np.ndarray | None,
                     free: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """For a pass after which rows take out different classes, every row having had the same passes
        before (``key``; the same ``budget``, ``capacity``, ``gone`` and free units ``free`` (U,)): per pattern
        q of classes taken out, whether the row then ends (q empty, or the rest of the budget fits no free
        unit) and which units that end sets to 0, by :meth:`_shared_step`'s arithmetic.  Returns (the pattern code
        of each class (C,), ends (2^C,) bool, units set to 0 (2^C, U) bool), cached per key; None for more than
        8 classes."""
        if key in self._shared_end:
            return self._shared_end[key]
        C = self._class_sizes.size
        if C > 8:
            self._shared_end[key] = None
            return None
        codes = 2.0 ** np.arange(C)
        patterns = ((np.arange(2 ** C)[:, None] >> np.arange(C)) & 1).astype(bool)  # row q: the bits of q
        done = np.zeros(2 ** C, dtype=bool)
        zero = np.zeros((2 ** C, self.n_units), dtype=bool)
        for q, over in enumerate(patterns):
            if not over.any():
                done[q] = True
                continue
            # the take-out of `over` by the shared step's arithmetic (not cached: most patterns never occur)
            step = self._shared_step(key + (over.tobytes(),), over, budget, capacity, gone)
            if step[-1]:  # stuck
                done[q] = True
                zero[q] = free & step[4]  # the free units outside the classes taken out
        ends = self._shared_end[key] = (codes, done, zero)
        return ends

    def _shared_step(self, key: tuple[bytes, ...], col: np.ndarray, budget: float, capacity: np.ndarray,
                     gone: np.ndarray | None) -> tuple[Any, ...]:
        """The bookkeeping of :meth:`_target_units` after every row took out the classes ``col`` (C,) bool, with
        the same arithmetic as the per-row path: (budget, capacity, limit, gone, free-unit mask (U,), free
        units per row, their Σ n_u, stuck)."""
        budget = budget - (col * capacity) @ self._class_sizes
        gone = col if gone is None else gone | col
        out = np.zeros(self.n_units, dtype=bool)
        for taken in key:  # every class taken out so far
            out |= (np.frombuffer(taken, dtype=bool) @ self._onehot_t) != 0.0
        keep = (col @ self._onehot_t) == 0.0
        count = float(np.count_nonzero(self._reachable & ~out))
        held = float(self._fsizes[self._reachable & ~out].sum())
        stuck = bool(budget < np.minimum.reduce(np.where(gone, np.inf, self._class_sizes_reachable)))
        capacity = np.floor(budget / self._class_sizes + _TOL)
        return budget, capacity, capacity + 1e-9, gone, keep, count, held, stuck

    def _target_rows(self) -> np.ndarray:
        if self.rule == "badam":
            per_pass = self._cycle_width()
            pi = np.where(self._reachable, per_pass / self._reachable.sum(), 0.0)
            return np.tile(pi[self._unit_of], (self._n_streams, 1))
        return self._target_units(None)[:, self._unit_of]

    def target_inclusion(self) -> np.ndarray:
        """π_b per module that the next (non-exploration) draw aims for; Σ_b π_b n_b ≤ budget.

        Shape (B,), or (S, B) with ``streams``.
        """
        return self._squeeze(self._target_rows())

    # ------------------------------------------------------------------ drawing
    def draw(self) -> np.ndarray:
        """The next period's active set; the sizes of every stream's set sum to ≤ ``budget``.

        Single stream: sorted int64 module indices.  With ``streams=S``: a boolean mask of shape (S, B).
        """
        S = self._n_streams
        if self.rule == "badam":
            units = np.zeros((S, self.n_units), dtype=bool)
            for s in range(S):
                units[s, self._draw_cycle(s)] = True
            self._last = self._target_rows()
        else:
            exploring = None if self._all_explored else self._exploring_rows()
            if exploring is None or not exploring.any():  # every stream draws from its target: no row bookkeeping
                pi = self._target_units(None)
                units = self._drawer(pi, self.rng, self._prefetched)
                self._prefetched = None
                self._last = pi[:, self._unit_of] if self.rule in LAYER_RULES else pi
            else:
                units = np.zeros((S, self.n_units), dtype=bool)
                rows = np.flatnonzero(~exploring)
                if rows.size:
                    pi = self._target_units(rows)
                    units[rows] = self._drawer(pi, self.rng)
                    self._last[rows] = pi[:, self._unit_of]
                for s in np.flatnonzero(exploring):
                    units[s, self._draw_explore(s)] = True
        if not self._all_explored:  # afterwards every unit is visited
            self._visited |= units
        self.n_draws += 1
        if np.maximum.reduce(units @ self._fsizes) > self.budget:  # guaranteed by construction; keep memory safe
            raise AssertionError("ModuleSampler drew over budget; please report this as a bug")
        modules = units[:, self._unit_of] if self.rule in LAYER_RULES else units
        return np.flatnonzero(modules[0]).astype(np.int64) if self.streams is None else modules

    def prefetch(self) -> None:
        """Take the next draw's random input now, if it is known to be a target draw of every stream (no
        exploration left, not badam).  The generator advances exactly as that draw would advance it, so the
        draws are unchanged; :class:`~misa_theory.sampler_process.SamplerProcess` calls this while it waits
        for the observation.  No other use of the generator may come between this and the draw."""
        if self.rule == "badam" or self._prefetched is not None:
            return
        if self._all_explored or not (self.explore and self.rule in SCORE_RULES):
            self._prefetched = self._drawer.variates(self.rng, self._n_streams)

    def _pack(self, candidates: np.ndarray) -> np.ndarray:
        """First-fit of ``candidates`` (in the given order) into the budget."""
        sizes = self._unit_sizes[candidates]
        fits = np.cumsum(sizes) <= self.budget
        if fits.all():
            return candidates
        chosen, used = [], 0
        for u, s in zip(candidates.tolist(), sizes.tolist(), strict=True):
            if used + s <= self.budget:
                chosen.append(u)
                used += s
        return np.asarray(chosen, dtype=np.int64)

    def _draw_explore(self, s: int) -> np.ndarray:
        todo = np.flatnonzero(~self._visited[s])
        units = self._pack(self.rng.permutation(todo))
        # a cycle, not a π design: report its fill
        self._last[s] = self._unit_sizes[units].sum() / self.budget
        return units

    def _cycle_width(self) -> int:
        reachable = self._unit_sizes[self._reachable]
        # a pass cannot hold more layers than there are
        return min(max(1, int(self.budget // reachable.max())), reachable.size)

    def _draw_cycle(self, s: int) -> np.ndarray:
        chosen: list[int] = []
        used = 0
        width = self._cycle_width()
        while len(chosen) < width:
            if self._cycle_pos[s] >= self._cycle[s].size:
                order = self.rng.permutation(np.flatnonzero(self._reachable))
                # a pass that starts mid-draw puts this draw's layers last, so a draw never repeats a layer
                taken = np.isin(order, chosen)
                self._cycle[s] = np.concatenate((order[~taken], order[taken]))
                self._cycle_pos[s] = 0
            u = int(self._cycle[s][self._cycle_pos[s]])
            if used + self._unit_sizes[u] > self.budget or u in chosen:
                break
            chosen.append(u)
            used += int(self._unit_sizes[u])
            self._cycle_pos[s] += 1
        return np.asarray(chosen, dtype=np.int64)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue identically, as JSON-serialisable Python values (RNG included).

        Per-stream entries are nested one level deeper with ``streams`` (lists of S rows).
        """
        if self._prefetched is not None:
            raise RuntimeError("state_dict() between prefetch() and draw(): the generator is a draw ahead")
        one = self.streams is None
        return {
            "rule": self.rule,
            "delta": self.delta,
            "budget": self.budget,
            "n_modules": self.n_modules,
            "sizes_sum": int(self.sizes.sum()),
            "streams": self.streams,
            "ema": self._squeeze(self._ema).tolist(),
            "count": self._squeeze(self._count).tolist(),
            "visited": self._squeeze(self._visited).astype(int).tolist(),
            "cycle": self._cycle[0].tolist() if one else [c.tolist() for c in self._cycle],
            "cycle_pos": int(self._cycle_pos[0]) if one else self._cycle_pos.tolist(),
            "n_draws": int(self.n_draws),
            "last_inclusion": self._squeeze(self._last).tolist(),
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; refuses state from a sampler over different modules, rule or streams."""
        for key, mine in (("rule", self.rule), ("n_modules", self.n_modules), ("sizes_sum", int(self.sizes.sum())),
                          ("streams", self.streams)):
            if state.get(key) != mine:
                raise ValueError(f"sampler state is for {key}={state.get(key)!r}, this sampler has {mine!r}")
        S = self._n_streams
        self._ema = np.asarray(state["ema"], dtype=np.float64).reshape(S, self.n_modules)
        self._count = np.asarray(state["count"], dtype=np.int64).reshape(S, self.n_modules)
        self._observed_calls = int(self._count.max(initial=0))
        self._refresh_scores()
        self._visited = np.asarray(state["visited"], dtype=bool).reshape(S, self.n_units)
        self._all_explored = False
        cycles = [state["cycle"]] if self.streams is None else state["cycle"]
        self._cycle = [np.asarray(c, dtype=np.int64) for c in cycles]
        self._cycle_pos = np.asarray(state["cycle_pos"], dtype=np.int64).reshape(S)
        self.n_draws = int(state["n_draws"])
        self._last = np.asarray(state["last_inclusion"], dtype=np.float64).reshape(S, self.n_modules)
        self.rng.bit_generator.state = state["rng"]
        self._prefetched = None
        self._warm = {}
