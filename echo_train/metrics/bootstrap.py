"""Percentile bootstrap confidence intervals, shared by the report metrics and paired F1 differences."""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np


def bootstrap_ci(stat: Callable[[np.ndarray], dict], n: int, n_boot: int, seed: int, ci: float = 0.95,
                 idx: Optional[np.ndarray] = None) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap CIs of every value `stat(indices)` returns."""
    if n == 0 or n_boot <= 0:
        return {}
    if idx is None:
        idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    samples: dict[str, list[float]] = {}
    for row in idx:
        for k, v in stat(row).items():
            samples.setdefault(k, []).append(v)
    lo, hi = (1 - ci) / 2 * 100, (1 + ci) / 2 * 100
    return {k: (float(np.percentile(v, lo)), float(np.percentile(v, hi))) for k, v in samples.items()}
