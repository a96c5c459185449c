"""Module-wise Importance SAmpling, the theory: variance, optimal distributions, the sampler (numpy/scipy only)."""
