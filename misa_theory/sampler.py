r"""`ModuleSampler`: importance scores → the active set of modules of each period, within a hard budget.

This is the only implementation of the sampling rules; the simulator and the torch trainer both call it.

Notation: B modules b with sizes n_b, groups (layers), budget = ⌊δ·total_params⌋ parameters per draw.
Scores: G_b² = m_b/(1 − β^{c_b}), the bias-corrected exponential moving average of the squared gradient norms
x_b observed for b (m_b ← β m_b + (1 − β) x_b, c_b ← c_b + 1, only for observed modules; 0 before any).

Rules
-----
``misa``       the paper's rule as the authors' code runs it (github.com/pkumelon/MISA, ``misa/optimizer.py``):
               p_b ∝ exp(min(5, η·G_b²)).  A draw first tries, in this order, every module never used yet
               (by index), then the ``lru_picks`` least recently used modules (ties by index); then it fills the
               budget by drawing modules one at a time ∝ p among those not yet tried, without replacement.  A
               module tried that does not fit what is left of the budget is skipped for this draw.  The fill is
               a Plackett–Luce order (keys E_b/p_b, E_b ~ Exp(1)) packed first-fit.  Its inclusion
               probabilities have no closed form, so this rule has no :meth:`~ModuleSampler.target_inclusion`.
               Differences from the authors' code: they average ‖g_b‖ over a period and keep the EMA of those
               norms, G_b, dividing the stored EMA itself by (1 − β^c) at every update; here the EMA is of the
               observed squared norms and the bias correction is Adam's.  They redraw after every step while a
               module is unused; here draws happen when the caller asks (the trainer: once per period).  A
               module counts as used once it was drawn or observed.
``misa_norm``  the toolkit's variant: p = softmax(η·G²/mean(G²)) over the modules that fit, inclusion
               proportional to p under the budget, π_b = clip(μ·p_b, floor, 1).
``optimal``    the Horvitz–Thompson-variance optimum π_b = clip(√(G_b²/(λ n_b)), floor, 1) of
               :func:`misa_theory.optimal.optimal_inclusion`: the theory of the reweighted estimator.
``uniform``    equal rates for every module.
``lisa``       layer-wise (a unit is a whole layer): uniform random layers.
``badam``      layer-wise: layers in a cycle through a permutation reshuffled after every pass.

The π rules (all but ``misa`` and ``badam``) turn rates into π under the budget and per-size-class capacities
and draw with :mod:`misa_theory.budget_draw` (never over the budget; marginals = π except in the one size
class the rounding leaves fractional, which can fall short — measured in docs/sampler.md).  With
``explore=True`` ``misa_norm`` and ``optimal`` first visit every module once (unvisited modules in a random
order, packed first-fit) so that no score is trusted before it was observed.

Streams
-------
``streams=S`` runs S independent samplers over the same modules as one object (the simulator: one per seed).
:meth:`draw` / :meth:`observe` take and return module indices and need ``streams=None``;
:meth:`draw_mask` / :meth:`observe_mask` take and return boolean masks (S, B) and work for any S (S = 1
without streams).  All streams share one PCG64 generator, so a draw is a deterministic function of
(seed, history).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._validate import group_ids, positive
from .budget_draw import budgeted_inclusion, draw_within_budget

RULES: tuple[str, ...] = ("misa", "misa_norm", "optimal", "uniform", "lisa", "badam")
LAYER_RULES: tuple[str, ...] = ("lisa", "badam")
SCORE_RULES: tuple[str, ...] = ("misa", "misa_norm", "optimal")
EXPONENT_CAP = 5.0  # the authors' clip of η·G² in misa's exponent
_NEVER = -1  # last_used of a module never drawn nor observed
_CHUNK = 16  # modules of a first-fit order converted to Python ints at a time


@dataclass(frozen=True)
class _Layout:
    """What the constructor derives from its arguments: units (modules, or layers for layer rules) and budget."""

    sizes: np.ndarray
    groups: np.ndarray
    n_groups: int
    unit_of: np.ndarray
    unit_sizes: np.ndarray
    budget: int
    total: int


def _check_args(sizes: Any, groups: Any, delta: float, rule: str, total_params: int | None, eta: float,
                ema_beta: float, min_inclusion: float, streams: int | None, depth_bias: float,
                lru_picks: int) -> _Layout:
    """Validate the constructor's arguments (ValueError naming the argument) and derive the layout."""
    n = positive(sizes, "sizes")
    if np.any(n != np.round(n)):
        raise ValueError("sizes must be whole numbers of parameters")
    n = n.astype(np.int64)
    gid, n_groups = group_ids(np.arange(n.size) if groups is None else groups, n.size)
    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(RULES)}; got {rule!r}")
    if not 0.0 < float(delta) <= 1.0:
        raise ValueError(f"delta must lie in (0, 1], got {delta!r}")
    total = int(n.sum()) if total_params is None else int(total_params)
    if total < n.sum():
        raise ValueError(f"total_params ({total}) is smaller than the sum of module sizes ({n.sum()})")
    for name, value in (("eta", eta), ("depth_bias", depth_bias)):
        if not (np.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number ≥ 0, got {value!r}")
    if not 0.0 <= ema_beta < 1.0:
        raise ValueError(f"ema_beta must lie in [0, 1), got {ema_beta!r}")
    if streams is not None and (isinstance(streams, bool) or int(streams) != streams or streams < 1):
        raise ValueError(f"streams must be None or an integer ≥ 1, got {streams!r}")
    if isinstance(lru_picks, bool) or int(lru_picks) != lru_picks or lru_picks < 0:
        raise ValueError(f"lru_picks must be an integer ≥ 0, got {lru_picks!r}")
    layer = rule in LAYER_RULES
    if depth_bias > 0 and layer:
        raise ValueError(f"depth_bias applies to the module-wise rules, not {rule!r}")
    unit_of = gid if layer else np.arange(n.size)
    unit_sizes = np.bincount(unit_of, n).astype(np.int64)
    budget = math.floor(float(delta) * total)
    smallest = int(unit_sizes.min())
    if budget < smallest:
        raise ValueError(f"delta={delta:g} gives a budget of {budget} parameters, smaller than the smallest "
                         f"{'layer' if layer else 'module'} ({smallest}); raise delta to at least "
                         f"{smallest / total:.3g}")
    if layer and np.unique(unit_sizes).size == 1:  # only whole equal layers fit: aim for exactly that many
        budget = (budget // smallest) * smallest
    if not 0.0 <= min_inclusion <= 1.0:
        raise ValueError(f"min_inclusion must lie in [0, 1], got {min_inclusion!r}")
    if min_inclusion * unit_sizes[unit_sizes <= budget].sum() > budget:
        raise ValueError(f"min_inclusion={min_inclusion:g} cannot be met within the budget of {budget} parameters")
    return _Layout(n, gid, n_groups, unit_of, unit_sizes, int(budget), total)


class ModuleSampler:
    """Draws the active set of modules for each period; see the module docstring for the rules' math.

    Args:
        sizes: n_b > 0, parameters per module, shape (B,).
        groups: integer layer id per module in depth order, shape (B,); default: every module its own group.
        delta: budget as a fraction of ``total_params``, in (0, 1]; budget = ⌊δ·total_params⌋ parameters.
        rule: one of :data:`RULES`.
        seed: seed of the sampler's own ``numpy.random.Generator`` (PCG64), shared by all streams.
        total_params: parameters the fraction refers to; default Σ n_b (the trainer passes the whole model).
        eta: η ≥ 0 of ``misa`` and ``misa_norm``.
        ema_beta: β ∈ [0, 1) of the score EMA.
        min_inclusion: floor on every reachable unit's π for the π rules (needs floor·Σn ≤ budget).
        explore: ``misa``: try never-used modules first; ``misa_norm``/``optimal``: visit every module once
            before trusting the scores.
        streams: None for one sampler (:meth:`draw`, :meth:`observe`), or S ≥ 1 independent samplers
            (:meth:`draw_mask`, :meth:`observe_mask`; scores and π of shape (S, B)).
        depth_bias: γ ≥ 0, module-wise rules only: every rate (for ``misa``: every weight p_b) is multiplied
            by exp(γ·(d_b − 1)), d_b = rank of b's group / (number of groups − 1), which favours upper layers
            so backward is shorter.  0 (the default) is the paper's rule.
        lru_picks: how many least recently used modules ``misa`` tries before its fill (the authors' 2).

    Raises:
        ValueError: naming the first bad argument.
    """

    def __init__(self, sizes: Any, groups: Any = None, delta: float = 0.03, rule: str = "misa", seed: int = 0,
                 total_params: int | None = None, eta: float = 1.0, ema_beta: float = 0.9,
                 min_inclusion: float = 0.0, explore: bool = True, streams: int | None = None,
                 depth_bias: float = 0.0, lru_picks: int = 2) -> None:
        lay = _check_args(sizes, groups, delta, rule, total_params, eta, ema_beta, min_inclusion, streams,
                          depth_bias, lru_picks)
        self.sizes, self.groups, self.n_groups = lay.sizes, lay.groups, lay.n_groups
        self.n_modules = int(lay.sizes.size)
        self.rule, self.delta, self.budget, self.total_params = rule, float(delta), lay.budget, lay.total
        self.eta, self.ema_beta, self.min_inclusion = float(eta), float(ema_beta), float(min_inclusion)
        self.explore, self.seed, self.streams = bool(explore), int(seed), streams
        self.depth_bias, self.lru_picks = float(depth_bias), int(lru_picks)
        self._unit_of, self._unit_sizes = lay.unit_of, lay.unit_sizes
        self._size_list, self._smallest = lay.sizes.tolist(), int(lay.sizes.min())  # for the first-fit loop
        self.n_units = int(lay.unit_sizes.size)
        depth = self.groups / max(self.n_groups - 1, 1)
        self._tilt = np.exp(self.depth_bias * (depth - 1.0))  # (B,), all ones at γ = 0
        S = self.n_streams
        self.rng = np.random.default_rng(self.seed)
        self._ema = np.zeros((S, self.n_modules))
        self._count = np.zeros((S, self.n_modules), dtype=np.int64)
        self._last_used = np.full((S, self.n_modules), _NEVER, dtype=np.int64)
        self._refresh_scores()
        self._cycle: list[np.ndarray] = [np.zeros(0, dtype=np.int64) for _ in range(S)]
        self._cycle_pos = np.zeros(S, dtype=np.int64)
        self.n_draws = 0
        self._last: np.ndarray | None = None

    # ------------------------------------------------------------------ views
    @property
    def n_streams(self) -> int:
        """S, the number of independent samplers (1 without ``streams``)."""
        return 1 if self.streams is None else int(self.streams)

    def _squeeze(self, a: np.ndarray) -> np.ndarray:
        return a[0] if self.streams is None else a

    @property
    def scores(self) -> np.ndarray:
        """G_b² = m_b/(1 − β^{c_b}), 0 if never observed; shape (B,), or (S, B) with ``streams``."""
        return self._squeeze(self._score)

    def _refresh_scores(self) -> None:
        """G² = m/(1 − β^c) where c > 0, 0 elsewhere, and ``misa``'s weights of them (both kept up to date by
        every observation)."""
        self._score = np.zeros(self._ema.shape)
        np.divide(self._ema, 1.0 - self.ema_beta ** self._count, out=self._score, where=self._count > 0)
        self._weight = self._weights(self._score)

    def _weights(self, scores: np.ndarray, modules: Any = slice(None)) -> np.ndarray:
        """``misa``'s unnormalised p_b = exp(min(5, η·G_b²))·tilt_b of ``scores`` (those of ``modules``)."""
        w = np.exp(np.minimum(EXPONENT_CAP, self.eta * scores))
        return w * self._tilt[modules] if self.depth_bias else w  # the tilt is all ones at γ = 0

    @property
    def last_inclusion(self) -> np.ndarray | None:
        """π the most recent draw was made from; None before any draw, after an exploration draw in any stream,
        and for ``misa`` (no π design).  Shape (B,), or (S, B) with ``streams``."""
        return None if self._last is None else self._squeeze(self._last)

    @property
    def exploring(self) -> bool:
        """True while ``misa_norm``/``optimal`` (with ``explore``) have a module that fits but was never used in
        some stream, or ``misa`` (with ``explore``) has such a module: its next draw tries it first."""
        if not (self.explore and self.rule in SCORE_RULES):
            return False
        return bool(self._unused_rows().any())

    def _unused_rows(self) -> np.ndarray:
        """(S,) bool: the stream has a module that fits the budget and was never drawn nor observed."""
        return ((self._last_used == _NEVER) & (self.sizes <= self.budget)).any(axis=1)

    # ------------------------------------------------------------------ observations
    def observe(self, indices: Any, sq_norms: Any) -> None:
        """Fold ‖g_b‖² ≥ 0 of the modules ``indices`` (unique, shape (k,)) into their scores (no ``streams``)."""
        self._single_stream("observe")
        idx = np.asarray(indices).reshape(-1)
        x = np.asarray(sq_norms, dtype=np.float64).reshape(-1)
        if idx.size and (idx.dtype.kind not in "iu" or idx.min() < 0 or idx.max() >= self.n_modules):
            raise ValueError(f"indices must be integers in [0, {self.n_modules})")
        if np.unique(idx).size != idx.size:
            raise ValueError("indices must be unique")
        if x.shape != idx.shape:
            raise ValueError(f"sq_norms has length {x.shape[0]}, expected {idx.shape[0]} (one per index)")
        mask = np.zeros((1, self.n_modules), dtype=bool)
        mask[0, idx] = True
        values = np.zeros((1, self.n_modules))
        values[0, idx] = x
        self.observe_mask(mask, values)

    def observe_mask(self, mask: Any, sq_norms: Any) -> None:
        """m_b ← β m_b + (1 − β) x_b, c_b ← c_b + 1 where ``mask`` (S, B) bool is set; x = ``sq_norms`` (S, B).

        Raises:
            ValueError: a mask of the wrong shape or type, or x negative or not finite where the mask is set.
        """
        shape = (self.n_streams, self.n_modules)
        mask = np.asarray(mask)
        if mask.shape != shape or mask.dtype != bool:
            raise ValueError(f"mask must be a boolean array of shape {shape}, got {mask.dtype} {mask.shape}")
        x = np.asarray(sq_norms, dtype=np.float64)
        if x.shape != shape:
            raise ValueError(f"sq_norms must have shape {shape}, got {x.shape}")
        at = np.flatnonzero(mask)  # flat indices s·B + b into the (S, B) state, all C-contiguous
        seen = x.reshape(-1).take(at)
        if seen.size and not (seen.min() >= 0 and seen.max() < np.inf):  # a NaN makes the minimum NaN
            raise ValueError("sq_norms must be finite and non-negative where the mask is set")
        b = self.ema_beta
        ema_all, count_all, last_all = self._ema.reshape(-1), self._count.reshape(-1), self._last_used.reshape(-1)
        ema = b * ema_all.take(at) + (1.0 - b) * seen
        count = count_all.take(at) + 1
        ema_all[at], count_all[at] = ema, count
        self._score.reshape(-1)[at] = score = ema / (1.0 - b ** count)
        self._weight.reshape(-1)[at] = self._weights(score, at % self.n_modules)
        last_all[at] = np.maximum(last_all.take(at), 0)  # observed counts as used

    # ------------------------------------------------------------------ targets
    def _rates(self, scores: np.ndarray) -> np.ndarray:
        """The π rule's water-filling rates of one stream (scale-free, tilted), shape (B,)."""
        fits = self.sizes <= self.budget
        if self.rule == "uniform" or not (scores[fits] > 0).any():
            return self._tilt.copy()
        if self.rule == "misa_norm":
            z = self.eta * scores / scores[fits].mean()
            return np.exp(z - z[fits].max()) * self._tilt
        return np.sqrt(scores / self.sizes) * self._tilt  # optimal

    def _target_row(self, s: int) -> np.ndarray:
        """π per unit of stream s (units: modules, or layers for the layer rules)."""
        if self.rule == "badam":
            fits = self._unit_sizes <= self.budget
            return np.where(fits, self._cycle_width() / fits.sum(), 0.0)
        if self.rule == "lisa":
            return budgeted_inclusion(np.ones(self.n_units), self._unit_sizes, self.budget, self.min_inclusion)
        return budgeted_inclusion(self._rates(self._score[s]), self.sizes, self.budget, self.min_inclusion)

    def target_inclusion(self) -> np.ndarray:
        """π_b per module that the next non-exploration draw aims for; Σ_b π_b n_b ≤ budget.

        Shape (B,), or (S, B) with ``streams``.

        Raises:
            ValueError: for ``misa``, whose sequential draw has no closed-form inclusion probabilities.
        """
        if self.rule == "misa":
            raise ValueError("rule 'misa' draws sequentially ∝ p and has no closed-form inclusion probabilities "
                             "(see selection_weights(); misa_norm is its π design)")
        return self._squeeze(np.stack([self._target_row(s)[self._unit_of] for s in range(self.n_streams)]))

    def selection_weights(self) -> np.ndarray:
        """``misa``'s p_b = exp(min(5, η·G_b²))·tilt_b / Σ (sums to 1); shape (B,), or (S, B) with ``streams``."""
        return self._squeeze(self._weight / self._weight.sum(axis=1, keepdims=True))

    # ------------------------------------------------------------------ drawing
    def draw(self) -> np.ndarray:
        """The next period's active set: sorted int64 module indices, sizes summing to ≤ ``budget`` (no streams)."""
        self._single_stream("draw")
        return np.flatnonzero(self.draw_mask()[0]).astype(np.int64)

    def draw_mask(self) -> np.ndarray:
        """The next period's active set of every stream: a boolean mask (S, B), each row within ``budget``."""
        exploring = self._unused_rows() if self.explore and self.rule in ("misa_norm", "optimal") else None
        if self.rule == "misa":
            modules = self._draw_misa()
            self._last = None
        elif exploring is not None and exploring.any():
            modules = self._draw_pi_rows(np.flatnonzero(~exploring))
            modules[exploring] = self._explore_pack(exploring)
            self._last = None
        elif self.rule == "badam":
            units = np.zeros((self.n_streams, self.n_units), dtype=bool)
            for s in range(self.n_streams):
                units[s, self._draw_cycle(s)] = True
            modules = units[:, self._unit_of]
            self._last = np.stack([self._target_row(s)[self._unit_of] for s in range(self.n_streams)])
        else:
            modules = self._draw_pi_rows(np.arange(self.n_streams))
        # guaranteed by construction; misa's first-fit checks every module against what is left as it takes it
        if self.rule != "misa" and np.dot(modules, self.sizes).max() > self.budget:
            raise AssertionError("ModuleSampler drew over budget; please report this as a bug")
        self._last_used[modules] = self.n_draws + 1
        self.n_draws += 1
        return modules

    def _draw_pi_rows(self, rows: np.ndarray) -> np.ndarray:
        """Draws of the π rules for ``rows`` (others left empty); records π as :attr:`last_inclusion`."""
        modules = np.zeros((self.n_streams, self.n_modules), dtype=bool)
        last = np.zeros((self.n_streams, self.n_modules))
        for s in rows:
            pi = self._target_row(s)
            modules[s] = draw_within_budget(pi, self._unit_sizes, self.budget, self.rng)[self._unit_of]
            last[s] = pi[self._unit_of]
        self._last = last
        return modules

    def _draw_misa(self) -> np.ndarray:
        """The authors' draw for every stream: tried-first modules, then a weighted order, packed first-fit."""
        B = self.n_modules
        keys = self.rng.standard_exponential((self.n_streams, B))
        keys /= self._weight  # Plackett–Luce ∝ p
        # least recently used first (never-used modules, stamp −1, ahead of all), ties by index
        recency = (self._last_used + 1) * B + np.arange(B)
        k = min(self.lru_picks, B)
        tried = recency <= np.partition(recency, k - 1, axis=1)[:, k - 1:k] if k else np.zeros(keys.shape, bool)
        if self.explore:
            tried |= self._last_used == _NEVER
        # negative: before every weighted key, in LRU order
        return self._first_fit(np.where(tried, recency - (self.n_draws + 2.0) * B, keys))

    def _explore_pack(self, rows: np.ndarray) -> np.ndarray:
        """First-fit of the never-used modules of ``rows`` in a random order: the exploration draw."""
        keys = self.rng.random((int(rows.sum()), self.n_modules))
        used = self._last_used[rows] != _NEVER
        keys[used] = np.inf
        return self._first_fit(keys, self.n_modules - used.sum(axis=1))

    def _first_fit(self, keys: np.ndarray, candidates: np.ndarray | None = None) -> np.ndarray:
        """Modules in increasing ``keys`` (R, B) order, each taken if it fits what is left; with ``candidates``
        (R,) only the first candidates[r] modules of row r's order are tried (the others have key inf)."""
        sizes, smallest, R, B = self._size_list, self._smallest, keys.shape[0], keys.shape[1]
        order = keys.argsort(axis=1)  # keys are distinct except inf (never tried), so the sort need not be stable
        ends = [B] * R if candidates is None else candidates.tolist()
        # a row is full after a few modules: turn the order into Python ints a chunk at a time
        chunk = min(B, _CHUNK)
        heads = order[:, :chunk].tolist()
        taken = []  # flat indices r·B + b
        for r in range(R):
            left, start, todo = self.budget, 0, heads[r]
            while True:
                for b in todo[:ends[r] - start]:
                    if sizes[b] <= left:
                        taken.append(r * B + b)
                        left -= sizes[b]
                        if left < smallest:  # nothing fits any more
                            break
                start += chunk
                if start >= ends[r] or left < smallest:
                    break
                todo = order[r, start:start + chunk].tolist()
        chosen = np.zeros(keys.size, dtype=bool)
        chosen[taken] = True
        return chosen.reshape(keys.shape)

    def _cycle_width(self) -> int:
        fits = self._unit_sizes[self._unit_sizes <= self.budget]
        return min(max(1, int(self.budget // fits.max())), fits.size)  # a pass cannot hold more layers than exist

    def _draw_cycle(self, s: int) -> np.ndarray:
        """badam: the next layers of stream s's cycle; a pass that starts mid-draw puts this draw's layers last."""
        chosen: list[int] = []
        used = 0
        while len(chosen) < self._cycle_width():
            if self._cycle_pos[s] >= self._cycle[s].size:
                order = self.rng.permutation(np.flatnonzero(self._unit_sizes <= self.budget))
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

    def _single_stream(self, what: str) -> None:
        if self.streams is not None:
            raise ValueError(f"{what}() takes and returns indices of one sampler; with streams={self.streams} "
                             f"use {what}_mask()")

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue identically, as JSON-serialisable Python values (RNG included)."""
        return {
            "rule": self.rule, "delta": self.delta, "budget": self.budget, "n_modules": self.n_modules,
            "sizes_sum": int(self.sizes.sum()), "streams": self.streams,
            "ema": self._ema.tolist(), "count": self._count.tolist(), "last_used": self._last_used.tolist(),
            "cycle": [c.tolist() for c in self._cycle], "cycle_pos": self._cycle_pos.tolist(),
            "n_draws": int(self.n_draws), "last_inclusion": None if self._last is None else self._last.tolist(),
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`.

        Raises:
            ValueError: naming the field, for state of a sampler over other modules, rule or streams, or a
                field of the wrong type or shape, or scores that are negative or not finite.
        """
        parsed = _parse_state(state, self)
        # C-contiguous, as observe_mask writes through flat views
        self._ema, self._count, self._last_used = (np.ascontiguousarray(parsed[key])
                                                   for key in ("ema", "count", "last_used"))
        self._cycle, self._cycle_pos = parsed["cycle"], parsed["cycle_pos"]
        self.n_draws, self._last = parsed["n_draws"], parsed["last_inclusion"]
        self.rng.bit_generator.state = parsed["rng"]
        self._refresh_scores()


def _parse_state(state: Any, sampler: ModuleSampler) -> dict[str, Any]:
    """The fields of a :meth:`ModuleSampler.state_dict` as arrays, checked against ``sampler``."""
    if not isinstance(state, dict):
        raise ValueError(f"sampler state must be a dict, got {type(state).__name__}")
    for key, mine in (("rule", sampler.rule), ("n_modules", sampler.n_modules),
                      ("sizes_sum", int(sampler.sizes.sum())), ("streams", sampler.streams)):
        if state.get(key) != mine:
            raise ValueError(f"sampler state is for {key}={state.get(key)!r}, this sampler has {mine!r}")
    S, B = sampler.n_streams, sampler.n_modules
    out: dict[str, Any] = {
        "ema": _field(state, "ema", (S, B), np.float64, lambda a: np.all(np.isfinite(a) & (a >= 0))),
        "count": _field(state, "count", (S, B), np.int64, lambda a: np.all(a >= 0)),
        "last_used": _field(state, "last_used", (S, B), np.int64, lambda a: np.all(a >= _NEVER)),
        "cycle_pos": _field(state, "cycle_pos", (S,), np.int64, lambda a: np.all(a >= 0)),
        "n_draws": int(_field(state, "n_draws", (), np.int64, lambda a: a >= 0)),
    }
    cycles = state.get("cycle")
    if not (isinstance(cycles, list) and len(cycles) == S):
        raise ValueError(f"sampler state field 'cycle' must be a list of {S} lists of layer indices")
    out["cycle"] = [_field({"cycle": c}, "cycle", None, np.int64, lambda a: np.all((a >= 0) & (a < sampler.n_units)))
                    for c in cycles]
    last = state.get("last_inclusion")
    out["last_inclusion"] = None if last is None else _field(
        state, "last_inclusion", (S, B), np.float64, lambda a: np.all((a >= 0) & (a <= 1)))
    try:
        np.random.default_rng().bit_generator.state = state.get("rng")
    except (TypeError, ValueError, KeyError):
        raise ValueError("sampler state field 'rng' is not a PCG64 generator state") from None
    out["rng"] = state["rng"]
    return out


def _field(state: dict[str, Any], key: str, shape: tuple[int, ...] | None, dtype: type, ok: Any) -> np.ndarray:
    """``state[key]`` as an array of ``dtype`` and ``shape`` (None: any 1-D) passing ``ok``, else ValueError."""
    value = state.get(key)
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        arr = None
    if arr is None or value is None or isinstance(value, (str, bytes)):
        raise ValueError(f"sampler state field {key!r} must hold numbers, got {type(value).__name__}")
    if (shape is None and arr.ndim != 1) or (shape is not None and arr.shape != shape):
        raise ValueError(f"sampler state field {key!r} must have shape {shape or '(k,)'}, got {arr.shape}")
    if dtype is np.int64 and not np.all(np.isfinite(arr) & (arr == np.round(arr))):
        raise ValueError(f"sampler state field {key!r} must hold integers")
    if not ok(arr):
        raise ValueError(f"sampler state field {key!r} holds values out of range (negative, NaN or infinite)")
    return arr.astype(dtype)
