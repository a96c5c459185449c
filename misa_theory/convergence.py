r"""The convergence check: the measured (1/K)Σ‖∇f(θ_k)‖² against proofs/05_convergence.md, slope AND constant.

For block SGD (``SimConfig(optimizer="sgd")``, or the full ``sgd`` baseline with π_min = 1) every constant of
the proof is known:

    ρ = 1 (A6),   R² = G₂² + σ² (A4, G₂ ≥ sup‖∇f‖),   L (A1),   Δ₀ = f(θ₀) − f* (A2),   π_min (A5),

and step 6 of the proof bounds, for any step size α and K block updates of T steps,

    (1/K)Σ_{k<K} E‖∇f(θ_k)‖² ≤ Δ₀/(c₁αK) + (c₂/c₁)α + (c₃/c₁)α²,
    c₁ = ρTπ_min/2,  c₂ = TLR²/2,  c₃ = ρL²R²S_T,  S_T = (T−1)T(2T−1)/6.

With α = α₀/√K this is ≤ C/√K (step 7).  For Adam ρ is an assumption, not a constant (proofs/05, A6), so for
Adam-type runs only the slope part of the check applies.

:func:`rate_check` says ``"pass"`` when the fitted slope's 95% interval reaches −1/2 (a rate at least as fast as
1/√K is not excluded) and, where a bound is given, the seed mean stays under it at every horizon; otherwise
``"fail"``.  A bound of +∞ (π_min = 0: the theorem promises nothing) fails.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .problems import Problem
from .sim_config import SimConfig
from .sim_stats import RateFit

__all__ = ["ProofConstants", "proof_constants", "proof_bound", "rate_check"]


@dataclass(frozen=True)
class ProofConstants:
    """The constants of proofs/05 for one problem and configuration (see the module docstring)."""

    L: float
    R2: float
    rho: float
    pi_min: float
    delta0: float
    T: int

    def c(self) -> tuple[float, float, float]:
        """(c₁, c₂, c₃) of step 5."""
        s_t = (self.T - 1) * self.T * (2 * self.T - 1) / 6.0
        c1 = self.rho * self.T * self.pi_min / 2.0
        return c1, self.T * self.L * self.R2 / 2.0, self.rho * self.L**2 * self.R2 * s_t


def proof_constants(problem: Problem, cfg: SimConfig, pi_min: float) -> ProofConstants:
    """ρ = 1, R² = G₂² + σ², L, Δ₀ = f(θ₀) − f* and π_min for block SGD on ``problem``.

    Args:
        problem: needs ``smoothness()`` (an upper bound of L) and ``gradient_bound()`` (of sup‖∇f‖).
        cfg: the run's configuration; its ``optimizer`` must be ``"sgd"``.
        pi_min: a lower bound of every module's inclusion probability, in [0, 1].

    Raises:
        ValueError: for Adam inner steps (ρ unknown), a problem without the bounds, or π_min outside [0, 1].
    """
    if cfg.optimizer != "sgd":
        raise ValueError("optimizer: the proof's constant needs ρ, known for SGD inner steps only (proofs/05, A6)")
    if not (hasattr(problem, "smoothness") and hasattr(problem, "gradient_bound")):
        raise ValueError(f"problem {problem.name!r} gives no bounds of L and sup‖∇f‖")
    if not 0.0 <= pi_min <= 1.0:
        raise ValueError(f"pi_min must lie in [0, 1], got {pi_min}")
    delta0 = float(problem.f(problem.x0(1))[0]) - problem.f_star
    return ProofConstants(L=problem.smoothness(), R2=problem.gradient_bound() ** 2 + cfg.sigma**2, rho=1.0,
                          pi_min=float(pi_min), delta0=delta0, T=int(cfg.T))


def proof_bound(consts: ProofConstants, alpha: float, K: int) -> float:
    """Δ₀/(c₁αK) + (c₂/c₁)α + (c₃/c₁)α² (proofs/05, step 6); +∞ when π_min = 0."""
    c1, c2, c3 = consts.c()
    if c1 <= 0.0:
        return float("inf")
    return consts.delta0 / (c1 * alpha * K) + c2 / c1 * alpha + c3 / c1 * alpha**2


def rate_check(fit: RateFit, bounds: Sequence[float] | None = None) -> str:
    """``"pass"`` or ``"fail"``: the slope interval reaches −1/2 and, with ``bounds`` (one per horizon of
    ``fit.Ks``), the seed mean of (1/K)Σ‖∇f‖² is at most the proof's bound at every horizon."""
    if not fit.covered:
        return "fail"
    if bounds is not None:
        b = np.asarray(bounds, dtype=float)
        if b.shape != (len(fit.y),):
            raise ValueError(f"bounds must hold one value per horizon ({len(fit.y)}), got shape {b.shape}")
        if not (np.all(np.isfinite(b)) and np.all(np.asarray(fit.y) <= b)):
            return "fail"
    return "pass"
