"""The evaluation's statistics: bootstrap intervals of a mean, and of a paired difference."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def bootstrap_ci(values: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean."""
    if not values:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    arr = np.asarray(values, dtype=np.float64)
    means = arr[rng.integers(0, len(arr), size=(n, len(arr)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def paired_bootstrap(a: list[float], b: list[float], n: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Mean of a - b over the same tasks, with its 95% percentile bootstrap interval (tasks resampled
    together, so what both methods get right or wrong alike cancels out)."""
    if len(a) != len(b) or not a:
        raise ValueError("paired bootstrap needs two equally long, non-empty lists")
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    means = d[np.random.default_rng(seed).integers(0, len(d), size=(n, len(d)))].mean(axis=1)
    return {"diff": float(d.mean()), "ci95": [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]}
