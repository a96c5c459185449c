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
Transformer modules come in very few distinct sizes (q/o, k/v and the three MLP matrices), so a draw is:

1. units with π = 1 are always in;
2. the others are split into size classes s with expected counts E_s = Σ_{b∈s} π_b = K_s + f_s;
3. the fractional parts are rounded *dependently*, two classes at a time, along the direction that keeps
   Σ_s n_s f_s (the budget spent) constant, choosing between the two end points with the probabilities that
   keep E[f_s] unchanged (weighted pipage rounding).  Every class but at most one ends integral; the last
   fractional class is rounded up only if a whole extra module of it still fits;
4. inside each class, k_s units are picked by systematic sampling over a fresh random permutation (the
   argsort of i.i.d. uniform keys), with the offset U drawn conditionally on the class being rounded up
   (U < f_s) or down (U ≥ f_s).  With C_j the cumulative π along the permutation, unit j is picked iff one
   of the points U, U+1, …, U+k_s−1 lies in [C_{j−1}, C_j), i.e. iff min(⌈C_j − U⌉⁺, k_s) > min(⌈C_{j−1} − U⌉⁺,
   k_s); the cap k_s makes "at most k_s units" hold even under rounding.  Unconditionally U is uniform, so
   every unit's marginal is exactly π_b.

So no draw ever exceeds the budget, and marginals equal π exactly except in the one class left fractional
at step 3 when the budget is saturated: its expected count is short by at most f < 1 module, i.e. the
relative bias of its members is at most f/E_s ≤ 1/E_s (it falls on the smallest-size class when the rounding
leaves it last, which is typical: classes are processed largest first).  Layer-wise rules have a single size
class (equal layers), for which the budget is first rounded down to a whole number of layers, so they are
exact.  The authors' sequential weighted draw (add modules by p until the budget is full) does not control
its marginals at all; docs/sampler.md has the measured comparison with π (benchmarks/bench_marginals.py).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._validate import group_ids, nonnegative, positive
from .optimal import waterfill

RULES: tuple[str, ...] = ("misa", "optimal", "uniform", "lisa", "badam")
LAYER_RULES: tuple[str, ...] = ("lisa", "badam")
SCORE_RULES: tuple[str, ...] = ("misa", "optimal")
_TOL = 1e-9
_ACTIVE_SET_ITERS = 30


def _waterfill_sorted(rates: np.ndarray, sizes: np.ndarray, budget: np.ndarray) -> np.ndarray:
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
    nr = n * r
    capped = np.zeros((R, U + 1))
    np.cumsum(n, axis=1, out=capped[:, 1:])  # Σ_{i≤j} N_(i), j = 0..U
    tail = np.zeros((R, U + 1))
    np.cumsum(nr[:, ::-1], axis=1, out=tail[:, 1:])
    tail = tail[:, ::-1]  # Σ_{i>j} N_(i) r_(i), j = 0..U
    live = tail[:, :U] > 0
    # where no positive rate is left uncapped (tail 0), every positive unit is in: μ = ∞
    mu = np.where(live, (budget[:, None] - capped[:, :U]) / np.where(live, tail[:, :U], 1.0), np.inf)
    with np.errstate(invalid="ignore"):  # ∞·0 on zero rates, masked either way
        j = np.argmax(~live | (mu * r < 1.0), axis=1)
        return np.where(rates > 0, np.minimum(1.0, mu[np.arange(R), j][:, None] * rates), 0.0)


def _waterfill_rows(rates: np.ndarray, sizes: np.ndarray, free: np.ndarray, budget: np.ndarray,
                    floor: float) -> np.ndarray:
    r"""Row-wise :func:`misa_theory.optimal.waterfill` restricted to the units marked in ``free``.

    For every row s solve Σ_{u∈free_s} N_u·clip(μ_s r_su, floor, 1) = budget_s (zero-rate units stay at the
    floor, π = 1 on positive rates when Σ_{free} N ≤ budget) and return π (R, U), 0 outside ``free``.  μ_s
    comes from the active-set iteration (guess the capped and floored sets, solve the linear equation for
    μ on the rest, repeat until the sets are a fixed point, which is then exact) run on all rows at once;
    a row that has not settled after a few passes is solved by ``waterfill`` itself, which is always exact.
    """
    pos = free & (rates > 0)
    pi = np.where(free, floor, 0.0)
    spend_all = (free * sizes).sum(axis=1) <= budget
    pi[spend_all] = np.where(pos[spend_all], 1.0, pi[spend_all])
    rows = np.flatnonzero(~spend_all & pos.any(axis=1))
    if rows.size == 0:
        return pi
    r = np.where(pos[rows], rates[rows], 0.0)
    p = pos[rows]
    if floor == 0.0:
        pi[rows] = _waterfill_sorted(r, sizes, budget[rows])
        return pi
    nr = r * sizes
    target = budget[rows] - floor * ((free[rows] & ~p) * sizes).sum(axis=1)
    mu = target / nr.sum(axis=1)
    settled = np.zeros(rows.size, dtype=bool)
    failed = np.zeros(rows.size, dtype=bool)
    capped = floored = None
    for _ in range(_ACTIVE_SET_ITERS):
        x = mu[:, None] * r
        new_capped = p & (x >= 1.0)
        new_floored = p & (x <= floor) if floor > 0 else np.zeros_like(p)
        if capped is not None:
            same = (new_capped == capped).all(axis=1) & (new_floored == floored).all(axis=1)
            settled |= same & ~failed
        todo = ~(settled | failed)
        if not todo.any():
            break
        capped, floored = new_capped, new_floored
        free_nr = np.where(capped | floored, 0.0, nr).sum(axis=1)
        rest = target - (capped * sizes).sum(axis=1) - floor * (floored * sizes).sum(axis=1)
        failed |= todo & (free_nr <= 0)
        step = todo & ~failed
        mu = np.where(step, rest / np.where(free_nr > 0, free_nr, 1.0), mu)
    out = np.where(p, np.clip(mu[:, None] * r, floor, 1.0), pi[rows])
    for i in np.flatnonzero(~settled):
        members = np.flatnonzero(free[rows[i]])
        out[i, members] = waterfill(rates[rows[i], members], sizes[members], float(budget[rows[i]]), floor)
    pi[rows] = out
    return pi


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
        explore: visit every unit once before score-driven rules trust the scores.
        streams: None for one sampler with the 1-D API (indices in, indices out); an int S ≥ 1 for S
            independent samplers whose scores, targets and draws are arrays (S, B) (see the module docstring).
        depth_bias: γ ≥ 0, opt-in and module-wise rules only: every rate is multiplied by exp(γ·(d_b − 1)),
            d_b = rank of b's group / (number of groups − 1) ∈ [0, 1] (groups in depth order: 0 = the bottom
            layer), which tilts π towards upper layers so backward, which must reach the lowest active
            layer, is shorter.  For ``misa`` this adds γ·(d_b − 1) to the softmax logit.  0 (the default)
            is the paper's rule; every reachable module keeps π > 0.
    """

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
        order = np.argsort(self._unit_of, kind="stable")
        self._members = np.split(order, np.cumsum(np.bincount(self._unit_of, minlength=self.n_units))[:-1])
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
        self._class_sizes, self._class_of = np.unique(self._unit_sizes, return_inverse=True)
        self._class_of = self._class_of.reshape(-1).astype(np.int64)
        n_classes = self._class_sizes.size
        self._class_onehot = np.zeros((self.n_units, n_classes))
        self._class_onehot[np.arange(self.n_units), self._class_of] = 1.0
        # sorting units by (class + uniform key) lays the classes out in this fixed order of blocks
        self._class_at = np.sort(self._class_of)
        starts = np.searchsorted(self._class_at, np.arange(n_classes))
        self._block_prev = np.where(starts > 0, starts - 1, -1)  # last position of the previous block
        self._pipage_order = np.argsort(-self._class_sizes, kind="stable")  # largest class first
        self._fsizes = self._unit_sizes.astype(np.float64)
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
        self._visited = np.tile(~self._reachable, (S, 1))
        self._cycle: list[np.ndarray] = [np.zeros(0, dtype=np.int64) for _ in range(S)]
        self._cycle_pos = np.zeros(S, dtype=np.int64)
        self.n_draws = 0
        self._last = self._target_rows()

    def _squeeze(self, a: np.ndarray) -> np.ndarray:
        return a[0] if self.streams is None else a

    # ------------------------------------------------------------------ scores
    def _score_rows(self) -> np.ndarray:
        out = np.zeros(self._ema.shape)
        seen = self._count > 0
        np.divide(self._ema, 1.0 - self.ema_beta ** self._count, out=out, where=seen)
        return out

    @property
    def scores(self) -> np.ndarray:
        """Bias-corrected EMA of observed squared norms per module, m_b/(1 − β^{c_b}); 0 if never observed.

        Shape (B,), or (S, B) with ``streams``.
        """
        return self._squeeze(self._score_rows())

    @property
    def last_inclusion(self) -> np.ndarray:
        """π used by the most recent draw per module (an exploration draw reports its fill); (B,) or (S, B)."""
        return self._squeeze(self._last)

    def _exploring_rows(self) -> np.ndarray:
        if not (self.explore and self.rule in SCORE_RULES):
            return np.zeros(self._n_streams, dtype=bool)
        return ~self._visited.all(axis=1)

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
            seen = values[mask]
            if not np.all(np.isfinite(seen)) or np.any(seen < 0):
                raise ValueError("sq_norms must be finite and non-negative where the mask is set")
        self._observe_rows(mask, values)

    def _observe_rows(self, mask: np.ndarray, values: np.ndarray) -> None:
        b = self.ema_beta
        np.copyto(self._ema, b * self._ema + (1.0 - b) * values, where=mask)
        self._count += mask
        if self.rule in LAYER_RULES:
            rows, cols = np.nonzero(mask)
            self._visited[rows, self._unit_of[cols]] = True
        else:
            self._visited |= mask

    # ------------------------------------------------------------------ targets
    def _rates_rows(self, scores: np.ndarray, free: np.ndarray) -> np.ndarray:
        """The rule's water-filling rates over the ``free`` units of each row (scale-free: μ absorbs scale)."""
        ones = np.ones(free.shape) if self._tilt is None else np.broadcast_to(self._tilt, free.shape)
        if self.rule not in SCORE_RULES:
            return ones
        score = np.where(free, scores, 0.0)
        live = (score > 0).any(axis=1)
        if self.rule == "misa":
            # p ∝ exp(η·s/mean_free(s)); the mean is over the free units, as the scores are scale-free there
            mean = score.sum(axis=1) / free.sum(axis=1)
            z = self.eta * score / np.where(live, mean, 1.0)[:, None]
            z = np.where(free, z, -np.inf)
            rates = np.exp(z - z.max(axis=1, keepdims=True))
            rates /= rates.sum(axis=1, keepdims=True)
        else:
            rates = np.sqrt(score / self._fsizes)
        if self._tilt is not None:  # scale-free rates: multiplying is adding log-tilt to the logit
            rates = rates * self._tilt
        return np.where(live[:, None], rates, ones)

    def _target_units(self, rows: np.ndarray) -> np.ndarray:
        """π per unit (len(rows), U) for the current scores of ``rows`` (0 for units larger than the budget).

        A size class can never hold more than ⌊budget/n_s⌋ units at once, so a class whose expected count
        E_s exceeds that capacity is scaled down to it (π ∝ the rule's π inside the class, which is the KKT
        solution with the extra constraint Σ_{b∈s} π_b ≤ cap_s for the optimal rule) and the rest of the
        budget is re-spread over the other classes by the same rule; each row does this independently.
        """
        R = rows.size
        scores = self._score_rows()[rows] if self.rule in SCORE_RULES else None  # score rules are module-wise
        pi = np.zeros((R, self.n_units))
        free = np.tile(self._reachable, (R, 1))
        budget = np.full(R, float(self.budget))
        cls_sizes = self._class_sizes.astype(np.float64)
        going = np.arange(R)
        while going.size:
            fr = free[going]
            rates = self._rates_rows(scores[going] if scores is not None else None, fr)
            p = _waterfill_rows(rates, self._fsizes, fr, budget[going], self.min_inclusion)
            pi[going] = np.where(fr, p, pi[going])
            expected = p @ self._class_onehot
            capacity = np.floor(budget[going, None] / cls_sizes + _TOL)
            over = expected > capacity + 1e-9
            hit = over.any(axis=1)
            going, over, expected, capacity = going[hit], over[hit], expected[hit], capacity[hit]
            if not going.size:
                break
            scale = np.where(over, capacity / np.where(over, expected, 1.0), 1.0)
            pi[going] *= scale[:, self._class_of]  # scale is 1 on units fixed earlier: their class is not over
            budget[going] -= (capacity * cls_sizes * over).sum(axis=1)
            free[going] &= ~over[:, self._class_of]
            fr = free[going]
            smallest = np.where(fr, self._fsizes, np.inf).min(axis=1)
            stuck = fr.any(axis=1) & (budget[going] < smallest)
            pi[going[stuck]] = np.where(fr[stuck], 0.0, pi[going[stuck]])
            going = going[fr.any(axis=1) & ~stuck]
        return pi

    def _target_rows(self) -> np.ndarray:
        if self.rule == "badam":
            per_pass = self._cycle_width()
            pi = np.where(self._reachable, per_pass / self._reachable.sum(), 0.0)
            return np.tile(pi[self._unit_of], (self._n_streams, 1))
        return self._target_units(np.arange(self._n_streams))[:, self._unit_of]

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
        units = np.zeros((S, self.n_units), dtype=bool)
        if self.rule == "badam":
            for s in range(S):
                units[s, self._draw_cycle(s)] = True
            self._last = self._target_rows()
        else:
            exploring = self._exploring_rows()
            rows = np.flatnonzero(~exploring)
            if rows.size:
                pi = self._target_units(rows)
                units[rows] = self._draw_pi(pi)
                self._last[rows] = pi[:, self._unit_of]
            for s in np.flatnonzero(exploring):
                units[s, self._draw_explore(s)] = True
        self._visited |= units
        self.n_draws += 1
        modules = units[:, self._unit_of]
        if np.any(modules @ self.sizes > self.budget):  # the construction guarantees this; keep memory safe anyway
            raise AssertionError("ModuleSampler drew over budget; please report this as a bug")
        return np.flatnonzero(modules[0]).astype(np.int64) if self.streams is None else modules

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

    def _draw_pi(self, pi: np.ndarray) -> np.ndarray:
        """π-exact draws under the hard budget, one per row of ``pi`` (R, U): a boolean unit mask (R, U).

        Forced units, weighted pipage rounding of the class counts, then conditional systematic sampling of
        every class of every row at once (see the module docstring).
        """
        R = pi.shape[0]
        forced = pi >= 1.0 - _TOL
        p = np.where((pi > _TOL) & ~forced, pi, 0.0)
        left = self.budget - forced @ self._unit_sizes
        expected = p @ self._class_onehot
        whole = np.floor(expected + _TOL)
        frac = np.clip(expected - whole, 0.0, 1.0)
        frac[frac < _TOL] = 0.0
        # every variate is drawn up front in fixed shapes, so the stream consumed depends only on R
        n_cls = self._class_sizes.size
        u_pipage, u_last = self.rng.random((R, n_cls)), self.rng.random(R)
        keys, u_sys = self.rng.random((R, self.n_units)), self.rng.random((R, n_cls))

        up, last, leftover = self._round_classes(frac, u_pipage)
        counts = whole.astype(np.int64) + up
        rows = np.flatnonzero(last >= 0)
        if rows.size:
            # the one class left fractional goes up only if a whole extra unit of it fits (else: documented bias)
            c = last[rows]
            spent = (counts[rows] * self._class_sizes).sum(axis=1) + self._class_sizes[c]
            lift = (spent <= left[rows]) & (u_last[rows] < leftover[rows])
            up[rows, c] = lift
            counts[rows, c] += lift

        u = np.where(frac <= 0.0, u_sys, np.where(up > 0, u_sys * frac, frac + u_sys * (1.0 - frac)))
        perm = np.argsort(self._class_of + keys, axis=1)  # classes in fixed blocks, shuffled inside each
        cum = np.cumsum(np.take_along_axis(p, perm, axis=1), axis=1)
        before = np.concatenate((np.zeros((R, 1)), cum[:, :-1]), axis=1)
        base = np.where(self._block_prev >= 0, cum[:, np.maximum(self._block_prev, 0)], 0.0)[:, self._class_at]
        off, cap = u[:, self._class_at] + base, counts[:, self._class_at]
        hits_to = np.clip(np.ceil(cum - off), 0, cap)
        hits_before = np.clip(np.ceil(before - off), 0, cap)
        chosen = np.zeros((R, self.n_units), dtype=bool)
        np.put_along_axis(chosen, perm, hits_to > hits_before, axis=1)
        return chosen | forced

    def _round_classes(self, frac: np.ndarray, uniforms: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Weighted pipage rounding of class fractions f_s ∈ [0, 1) with weights n_s, on every row at once.

        Each step moves the first two fractional classes (largest size first) along the direction that keeps
        Σ n_s f_s fixed, to one of the two end points, with the probabilities that keep E[f_s] fixed; every
        step makes at least one of them integral, so C − 1 steps leave at most one class fractional.
        ``uniforms`` (R, C) supplies one U(0,1) per row and step.  Returns (0/1 per row and class, index of the
        class left fractional or −1 per row, its remaining fraction or 0), for the caller to round if it fits.
        """
        order = self._pipage_order
        f = frac[:, order].copy()
        ratio_of = self._class_sizes[order].astype(np.float64)
        for step in range(order.size - 1):
            live = (f > 0.0) & (f < 1.0)
            rows = np.flatnonzero(live.sum(axis=1) >= 2)
            if rows.size == 0:
                break
            lv = live[rows]
            i = np.argmax(lv, axis=1)
            lv[np.arange(rows.size), i] = False
            j = np.argmax(lv, axis=1)
            fi, fj = f[rows, i], f[rows, j]
            ratio = ratio_of[i] / ratio_of[j]
            up_i = np.minimum(1.0 - fi, fj / ratio)  # raise i, lower j
            down_i = np.minimum(fi, (1.0 - fj) / ratio)  # lower i, raise j
            raise_i = uniforms[rows, step] * (up_i + down_i) < down_i
            fi_new = np.where(raise_i, fi + up_i, fi - down_i)
            fj_new = np.where(raise_i, fj - up_i * ratio, fj + down_i * ratio)
            for col, val in ((i, fi_new), (j, fj_new)):
                f[rows, col] = np.where(val < _TOL, 0.0, np.where(val > 1.0 - _TOL, 1.0, val))
        live = (f > 0.0) & (f < 1.0)
        has = live.any(axis=1)
        first = np.argmax(live, axis=1)
        up = np.zeros(frac.shape, dtype=np.int64)
        up[:, order] = f >= 1.0
        last = np.where(has, order[first], -1)
        leftover = np.where(has, f[np.arange(f.shape[0]), first], 0.0)
        return up, last, leftover

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue identically, as JSON-serialisable Python values (RNG included).

        Per-stream entries are nested one level deeper with ``streams`` (lists of S rows).
        """
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
        self._visited = np.asarray(state["visited"], dtype=bool).reshape(S, self.n_units)
        cycles = [state["cycle"]] if self.streams is None else state["cycle"]
        self._cycle = [np.asarray(c, dtype=np.int64) for c in cycles]
        self._cycle_pos = np.asarray(state["cycle_pos"], dtype=np.int64).reshape(S)
        self.n_draws = int(state["n_draws"])
        self._last = np.asarray(state["last_inclusion"], dtype=np.float64).reshape(S, self.n_modules)
        self.rng.bit_generator.state = state["rng"]
