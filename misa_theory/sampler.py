r"""`ModuleSampler`: importance scores → inclusion probabilities → an active set within a hard budget.

This is the only implementation of the sampling rules; the simulator and the torch trainer both call it.

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
4. inside each class, k_s units are picked by systematic sampling over a fresh random permutation, with the
   offset U drawn conditionally on the class being rounded up (U < f_s) or down (U ≥ f_s).  Unconditionally
   U is uniform, so every unit's marginal is exactly π_b.

So no draw ever exceeds the budget, and marginals equal π exactly except in the one class left fractional
at step 3 when the budget is saturated: its expected count is short by at most f < 1 module, i.e. the
relative bias of its members is at most f/E_s ≤ 1/E_s (it falls on the smallest-size class when the rounding
leaves it last, which is typical: classes are processed largest first).  Layer-wise rules have a single size
class (equal layers), for which the budget is first rounded down to a whole number of layers, so they are
exact.  The authors' sequential weighted draw (add modules by p until the budget is full) does not control
its marginals at all; see tests/test_sampler_props.py for the measured comparison with π.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._validate import group_ids, nonnegative, positive
from .optimal import kl_softmax, waterfill

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
        seed: seed of the sampler's own ``numpy.random.Generator`` (PCG64).
        total_params: parameters the fraction refers to; default Σ n_b (the trainer passes the whole model).
        eta: η ≥ 0 of the softmax rule.
        ema_beta: β ∈ [0, 1) of the score EMA.
        min_inclusion: floor on every reachable unit's π (keeps every module drawable; needs floor·Σn ≤ budget).
        explore: visit every unit once before score-driven rules trust the scores.
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
        # few distinct sizes (q/o, k/v, MLP): class ids are fixed, so compute them once
        self._class_sizes, self._class_of = np.unique(self._unit_sizes, return_inverse=True)
        if not 0.0 <= min_inclusion <= 1.0:
            raise ValueError(f"min_inclusion must lie in [0, 1], got {min_inclusion!r}")
        if min_inclusion * self._unit_sizes[self._reachable].sum() > self.budget:
            raise ValueError(
                f"min_inclusion={min_inclusion:g} cannot be met within the budget of {self.budget} parameters"
            )
        self.min_inclusion = float(min_inclusion)

        self.rng = np.random.default_rng(self.seed)
        self._ema = np.zeros(self.n_modules)
        self._count = np.zeros(self.n_modules, dtype=np.int64)
        self._visited = ~self._reachable.copy()
        self._cycle: np.ndarray = np.zeros(0, dtype=np.int64)
        self._cycle_pos = 0
        self.n_draws = 0
        self._leftover = 0.0
        self.last_inclusion = self.target_inclusion()

    # ------------------------------------------------------------------ scores
    @property
    def scores(self) -> np.ndarray:
        """Bias-corrected EMA of observed squared norms per module, m_b/(1 − β^{c_b}); 0 if never observed."""
        out = np.zeros(self.n_modules)
        seen = self._count > 0
        out[seen] = self._ema[seen] / (1.0 - self.ema_beta ** self._count[seen])
        return out

    @property
    def exploring(self) -> bool:
        """True while a score-driven rule is still visiting units it has never drawn."""
        return self.explore and self.rule in SCORE_RULES and not bool(self._visited.all())

    def observe(self, indices: Any, sq_norms: Any) -> None:
        """Fold observed squared gradient norms of active modules into their EMA scores.

        ``indices`` are module indices (shape (k,), unique), ``sq_norms`` the matching ‖g_b‖² ≥ 0 (e.g. the
        mean over the period's steps).  m_b ← β m_b + (1 − β) x_b and c_b ← c_b + 1 for those b only.
        """
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
        self._ema[idx] = self.ema_beta * self._ema[idx] + (1.0 - self.ema_beta) * x
        self._count[idx] += 1
        self._visited[self._unit_of[idx]] = True

    # ------------------------------------------------------------------ targets
    def _rule_pi(self, units: np.ndarray, budget: float) -> np.ndarray:
        """The rule's π over ``units`` (reachable unit ids) for a budget, before class capacities."""
        # inputs were validated once in __init__/observe, so call the solvers' cores directly
        sizes = self._unit_sizes[units].astype(np.float64)
        score = self._unit_scores[units]
        if self.rule not in SCORE_RULES or not np.any(score > 0):
            rates = np.ones(units.size)
        elif self.rule == "misa":
            rates = kl_softmax(score / score.mean(), self.eta)
        else:
            rates = np.sqrt(score / sizes)
        return waterfill(rates, sizes, budget, self.min_inclusion)

    def _unit_target(self) -> np.ndarray:
        """π per unit for the current scores (0 for units larger than the budget).

        A size class can never hold more than ⌊budget/n_s⌋ units at once, so a class whose expected count
        E_s exceeds that capacity is scaled down to it (π ∝ the rule's π inside the class, which is the KKT
        solution with the extra constraint Σ_{b∈s} π_b ≤ cap_s for the optimal rule) and the rest of the
        budget is re-spread over the other classes by the same rule.
        """
        self._unit_scores = np.bincount(self._unit_of, self.scores, self.n_units)
        pi = np.zeros(self.n_units)
        free = np.flatnonzero(self._reachable)
        budget = float(self.budget)
        while free.size:
            pi[free] = self._rule_pi(free, budget)
            classes, cls = self._class_sizes, self._class_of[free]
            expected = np.bincount(cls, pi[free], classes.size)
            capacity = np.floor(budget / classes + _TOL)
            over = expected > capacity + 1e-9
            if not over.any():
                break
            for c in np.flatnonzero(over):
                members = free[cls == c]
                pi[members] *= capacity[c] / expected[c]
                budget -= capacity[c] * classes[c]
            free = free[~over[cls]]
            if free.size and budget < self._unit_sizes[free].min():
                pi[free] = 0.0
                break
        return pi

    def target_inclusion(self) -> np.ndarray:
        """π_b per module that the next (non-exploration) draw aims for; Σ_b π_b n_b ≤ budget."""
        if self.rule == "badam":
            per_pass = self._cycle_width()
            pi = np.where(self._reachable, per_pass / self._reachable.sum(), 0.0)
            return pi[self._unit_of]
        return self._unit_target()[self._unit_of]

    # ------------------------------------------------------------------ drawing
    def draw(self) -> np.ndarray:
        """Active module indices for the next period (sorted int64); their sizes sum to ≤ ``budget``."""
        if self.rule == "badam":
            units = self._draw_cycle()
        elif self.exploring:
            units = self._draw_explore()
        else:
            pi = self._unit_target()
            units = self._draw_pi(pi)
            self.last_inclusion = pi[self._unit_of]
        self._visited[units] = True
        self.n_draws += 1
        modules = np.sort(np.concatenate([self._members[u] for u in units])) if units.size else units
        if self.sizes[modules].sum() > self.budget:  # the construction guarantees this; keep memory safe anyway
            raise AssertionError("ModuleSampler drew over budget; please report this as a bug")
        return modules.astype(np.int64)

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

    def _draw_explore(self) -> np.ndarray:
        todo = np.flatnonzero(~self._visited)
        units = self._pack(self.rng.permutation(todo))
        frac = self._unit_sizes[units].sum() / self.budget
        self.last_inclusion = np.full(self.n_modules, frac)  # a cycle, not a π design: report its fill
        return np.sort(units)

    def _cycle_width(self) -> int:
        reachable = self._unit_sizes[self._reachable]
        return max(1, int(self.budget // reachable.max()))

    def _draw_cycle(self) -> np.ndarray:
        chosen: list[int] = []
        used = 0
        width = self._cycle_width()
        while len(chosen) < width:
            if self._cycle_pos >= self._cycle.size:
                order = self.rng.permutation(np.flatnonzero(self._reachable))
                # a pass that starts mid-draw puts this draw's layers last, so a draw never repeats a layer
                taken = np.isin(order, chosen)
                self._cycle = np.concatenate((order[~taken], order[taken]))
                self._cycle_pos = 0
            u = int(self._cycle[self._cycle_pos])
            if used + self._unit_sizes[u] > self.budget or u in chosen:
                break
            chosen.append(u)
            used += int(self._unit_sizes[u])
            self._cycle_pos += 1
        self.last_inclusion = self.target_inclusion()
        return np.sort(np.asarray(chosen, dtype=np.int64))

    def _draw_pi(self, pi: np.ndarray) -> np.ndarray:
        """π-exact draw under the hard budget (forced units, pipage rounding of class counts, systematic)."""
        forced = np.flatnonzero(pi >= 1.0 - _TOL)
        rest = np.flatnonzero((pi > _TOL) & (pi < 1.0 - _TOL))
        left = self.budget - int(self._unit_sizes[forced].sum())
        if rest.size == 0:
            return forced
        class_sizes, cls = self._class_sizes, self._class_of[rest]
        expected = np.bincount(cls, pi[rest], class_sizes.size)
        whole = np.floor(expected + _TOL)
        frac = np.clip(expected - whole, 0.0, 1.0)
        frac[frac < _TOL] = 0.0
        up, last = self._round_classes(frac, class_sizes.astype(np.float64))
        counts = whole.astype(np.int64) + up
        if last >= 0:
            # the one class left fractional goes up only if a whole extra unit of it fits (else: documented bias)
            fits = int((counts * class_sizes).sum()) + int(class_sizes[last]) <= left
            up[last] = int(fits and self.rng.random() < self._leftover)
            counts[last] += up[last]
        picked = [forced]
        for c in range(class_sizes.size):
            members = rest[cls == c]
            if counts[c] == 0:
                continue
            picked.append(self._systematic(members, pi[members], frac[c], bool(up[c]), int(counts[c])))
        return np.concatenate(picked)

    def _round_classes(self, frac: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, int]:
        """Weighted pipage rounding of class fractions f_s ∈ [0, 1) with weights n_s.

        Each step moves two fractional classes along the direction that keeps Σ n_s f_s fixed, to one of the
        two end points, with the probabilities that keep E[f_s] fixed, until at most one class is fractional.
        Returns (0/1 per class, index of the class left fractional or −1); its remaining fraction is kept
        in ``self._leftover`` for the caller, which rounds it only if it fits.
        """
        f = frac.copy()
        live = [int(i) for i in np.argsort(-sizes, kind="stable") if 0.0 < f[i] < 1.0]
        while len(live) >= 2:
            i, j = live[0], live[1]
            ratio = sizes[i] / sizes[j]
            up_i = min(1.0 - f[i], f[j] / ratio)  # raise i, lower j
            down_i = min(f[i], (1.0 - f[j]) / ratio)  # lower i, raise j
            if self.rng.random() * (up_i + down_i) < down_i:
                f[i] += up_i
                f[j] -= up_i * ratio
            else:
                f[i] -= down_i
                f[j] += down_i * ratio
            for k in (i, j):
                f[k] = 0.0 if f[k] < _TOL else (1.0 if f[k] > 1.0 - _TOL else f[k])
            live = [k for k in live if 0.0 < f[k] < 1.0]
        out = (f >= 1.0).astype(np.int64)
        self._leftover = float(f[live[0]]) if live else 0.0
        return out, (live[0] if live else -1)

    def _systematic(self, members: np.ndarray, pi: np.ndarray, frac: float, rounded_up: bool, k: int) -> np.ndarray:
        """Systematic πps sample of ``k`` units; U conditioned on the class's rounding keeps marginals π."""
        perm = self.rng.permutation(members.size)
        cum = np.cumsum(pi[perm])
        if frac <= 0.0:
            u = self.rng.random()
        elif rounded_up:
            u = self.rng.random() * frac
        else:
            u = frac + self.rng.random() * (1.0 - frac)
        points = u + np.arange(k)
        hit = np.searchsorted(cum, points, side="right")
        hit = np.minimum(hit, members.size - 1)
        return members[perm[np.unique(hit)]]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue identically, as JSON-serialisable Python values (RNG included)."""
        return {
            "rule": self.rule,
            "delta": self.delta,
            "budget": self.budget,
            "n_modules": self.n_modules,
            "sizes_sum": int(self.sizes.sum()),
            "ema": self._ema.tolist(),
            "count": self._count.tolist(),
            "visited": self._visited.astype(int).tolist(),
            "cycle": self._cycle.tolist(),
            "cycle_pos": int(self._cycle_pos),
            "n_draws": int(self.n_draws),
            "last_inclusion": np.asarray(self.last_inclusion).tolist(),
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; refuses state from a sampler over different modules or rule."""
        for key, mine in (("rule", self.rule), ("n_modules", self.n_modules), ("sizes_sum", int(self.sizes.sum()))):
            if state.get(key) != mine:
                raise ValueError(f"sampler state is for {key}={state.get(key)!r}, this sampler has {mine!r}")
        self._ema = np.asarray(state["ema"], dtype=np.float64)
        self._count = np.asarray(state["count"], dtype=np.int64)
        self._visited = np.asarray(state["visited"], dtype=bool)
        self._cycle = np.asarray(state["cycle"], dtype=np.int64)
        self._cycle_pos = int(state["cycle_pos"])
        self.n_draws = int(state["n_draws"])
        self.last_inclusion = np.asarray(state["last_inclusion"], dtype=np.float64)
        self.rng.bit_generator.state = state["rng"]
