"""What a simulator run is given: the rules it can run and :class:`SimConfig`, checked in one place.

α is absolute in :class:`SimConfig`; the theory's step α = α₀/√K for K block updates is :func:`alpha_for`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .sampler import RULES

__all__ = ["ALL_RULES", "BASELINES", "VARIANTS", "SimConfig", "alpha_for", "check_run"]

#: Baselines without a sampler.
BASELINES: tuple[str, ...] = ("adam", "sgd")
#: Named variants: a sampler rule run with fixed optimizer settings (they override the config's).
VARIANTS: dict[str, tuple[str, dict[str, bool]]] = {
    "misa_alg1": ("misa", {"amsgrad": True, "momentum_flush": True, "reset_state": True, "retain_state": False}),
}
#: Every rule the simulator runs: the sampler's rules, the full-parameter baselines, then the variants.
ALL_RULES: tuple[str, ...] = tuple(RULES) + BASELINES + tuple(VARIANTS)


def alpha_for(K: int, alpha0: float) -> float:
    """Step size of the theory, α = α₀/√K, for a run of K block updates."""
    if K <= 0:
        raise ValueError(f"K must be positive, got {K}")
    return float(alpha0) / float(np.sqrt(K))


def _finite_at_least(value: float, low: float, name: str, strict: bool = False) -> None:
    ok = np.isfinite(value) and (value > low if strict else value >= low)
    if not ok:
        raise ValueError(f"{name} must be a finite number {'>' if strict else '≥'} {low:g}, got {value!r}")


@dataclass(frozen=True)
class SimConfig:
    """Hyper-parameters of one run (α is absolute; use :func:`alpha_for` for α₀/√K).

    delta: budget fraction δ ∈ (0, 1]; T: inner steps per block update; sigma: total noise std σ
    (E‖ξ‖² = σ²); eta: η ≥ 0 of ``misa``/``misa_norm``; ema_beta: score EMA β ∈ [0, 1); beta1, beta2, eps:
    Adam's; retain_state: park the moments of modules that leave (the trainer's ``retain_state``);
    reset_state: zero state for every active module at every period (proofs/05); amsgrad: v̂ from the running
    maximum of v; momentum_flush: the paper's end-of-period momentum step; sgd_alpha: step of the ``sgd``
    baseline (default = α); min_inclusion: sampler floor on π ∈ [0, 1]; explore: the sampler's ``explore``;
    optimizer: the sampled rules' inner steps, ``"adam"`` or ``"sgd"``; excluded: module indices never
    activated (a negative control, π = 0).
    """

    alpha: float = 0.01
    T: int = 5
    delta: float = 0.25
    sigma: float = 0.0
    eta: float = 1.0
    ema_beta: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    retain_state: bool = False
    reset_state: bool = False
    amsgrad: bool = False
    momentum_flush: bool = False
    sgd_alpha: float | None = None
    min_inclusion: float = 0.0
    explore: bool = True
    optimizer: str = "adam"
    excluded: tuple[int, ...] = ()

    def validate(self) -> None:
        """Raise ValueError naming the first bad field; the one place the simulator's settings are checked."""
        if not 0.0 < self.delta <= 1.0:
            raise ValueError(f"delta must lie in (0, 1], got {self.delta}")
        if isinstance(self.T, bool) or int(self.T) != self.T or self.T < 1:
            raise ValueError(f"T must be an integer ≥ 1, got {self.T}")
        _finite_at_least(self.alpha, 0.0, "alpha", strict=True)
        if self.sgd_alpha is not None:
            _finite_at_least(self.sgd_alpha, 0.0, "sgd_alpha", strict=True)
        _finite_at_least(self.sigma, 0.0, "sigma")
        _finite_at_least(self.eta, 0.0, "eta")
        _finite_at_least(self.eps, 0.0, "eps", strict=True)
        for name in ("ema_beta", "beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.min_inclusion <= 1.0:
            raise ValueError(f"min_inclusion must lie in [0, 1], got {self.min_inclusion}")
        if self.retain_state and self.reset_state:
            raise ValueError("reset_state and retain_state exclude each other")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if any(isinstance(b, bool) or int(b) != b or b < 0 for b in self.excluded):
            raise ValueError(f"excluded must hold module indices ≥ 0, got {self.excluded!r}")


def check_run(rule: str, K: int, n_seeds: int) -> None:
    """Raise ValueError naming ``rule``, ``K`` or ``n_seeds`` when one of them is not a valid run."""
    if rule not in ALL_RULES:
        raise ValueError(f"rule must be one of {', '.join(ALL_RULES)}; got {rule!r}")
    if K <= 0:
        raise ValueError(f"K must be positive, got {K}")
    if n_seeds <= 0:
        raise ValueError(f"n_seeds must be positive, got {n_seeds}")
