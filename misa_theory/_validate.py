"""Input checks shared by the theory modules: one place that turns bad input into a named ValueError."""

from __future__ import annotations

import numpy as np


def as_vector(value: object, name: str, *, allow_empty: bool = False) -> np.ndarray:
    """Return ``value`` as a 1-D float64 array, or raise ValueError naming ``name``."""
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence, got shape {arr.shape}")
    if arr.size == 0 and not allow_empty:
        raise ValueError(f"{name} must not be empty")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def nonnegative(value: object, name: str) -> np.ndarray:
    """1-D float64 array with every entry ≥ 0 (squared norms, second moments)."""
    arr = as_vector(value, name)
    if np.any(arr < 0):
        raise ValueError(f"{name} must be non-negative (found {arr.min():g})")
    return arr


def positive(value: object, name: str) -> np.ndarray:
    """1-D float64 array with every entry > 0 (module sizes)."""
    arr = as_vector(value, name)
    if np.any(arr <= 0):
        raise ValueError(f"{name} must be positive (found {arr.min():g})")
    return arr


def probabilities(value: object, name: str) -> np.ndarray:
    """1-D float64 array with entries in (0, 1] (inclusion probabilities of an unbiased estimator)."""
    arr = as_vector(value, name)
    if np.any(arr <= 0) or np.any(arr > 1 + 1e-12):
        raise ValueError(f"{name} must lie in (0, 1] (found range [{arr.min():g}, {arr.max():g}])")
    return np.minimum(arr, 1.0)


def unit_interval(value: object, name: str) -> np.ndarray:
    """1-D float64 array with entries in [0, 1] (inclusion probabilities of a design that may leave a module out)."""
    arr = as_vector(value, name)
    if np.any(arr < 0) or np.any(arr > 1 + 1e-12):
        raise ValueError(f"{name} must lie in [0, 1] (found range [{arr.min():g}, {arr.max():g}])")
    return np.minimum(arr, 1.0)


def group_ids(groups: object, n: int, name: str = "groups") -> tuple[np.ndarray, int]:
    """Map arbitrary integer group labels to dense ids 0..L-1 (order of first appearance kept by value).

    Returns (dense ids of shape (n,), L).
    """
    arr = np.asarray(groups)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name} must have one entry per module ({n}), got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise ValueError(f"{name} must hold integer group ids")
    _, dense = np.unique(arr, return_inverse=True)
    return dense.astype(np.int64), int(dense.max()) + 1 if n else 0


def same_length(n: int, **arrays: np.ndarray) -> None:
    """Raise ValueError naming the first array whose length differs from ``n``."""
    for key, arr in arrays.items():
        if arr.shape[0] != n:
            raise ValueError(f"{key} has length {arr.shape[0]}, expected {n} (one entry per module)")
