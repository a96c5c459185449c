"""Module-wise Importance SAmpling, the theory: captured gradient and deficit, optimal distributions, the sampler.

numpy/scipy only — importing this package never imports torch.
"""

from .budget_draw import budgeted_inclusion, draw_within_budget
from .optimal import (
    deficit_gap,
    deficit_optimal_inclusion,
    kl_deficit_inclusion,
    kl_softmax,
    optimal_deficit,
    optimal_inclusion,
    optimal_variance,
    proportional_inclusion,
    uncapped_optimal_variance,
    variance_gap,
)
from .sampler import RULES, ModuleSampler
from .variance import (
    MonteCarloEstimate,
    captured_gradient,
    gradient_deficit,
    monte_carlo,
    reweighted_variance,
    sampled_gradient_variance,
)

__all__ = [
    "RULES",
    "ModuleSampler",
    "MonteCarloEstimate",
    "budgeted_inclusion",
    "captured_gradient",
    "deficit_gap",
    "deficit_optimal_inclusion",
    "draw_within_budget",
    "gradient_deficit",
    "kl_deficit_inclusion",
    "kl_softmax",
    "monte_carlo",
    "optimal_deficit",
    "optimal_inclusion",
    "optimal_variance",
    "proportional_inclusion",
    "reweighted_variance",
    "sampled_gradient_variance",
    "uncapped_optimal_variance",
    "variance_gap",
]
