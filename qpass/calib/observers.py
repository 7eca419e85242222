"""Observers only accumulate statistics per batch; :mod:`qpass.qparams` turns them into scales."""
from __future__ import annotations

import numpy as np


class MinMaxObserver:
    """Running min and max; memory is O(1) whatever the number or shape of the batches."""

    method = "minmax"

    def __init__(self) -> None:
        self.min = np.inf
        self.max = -np.inf
        self.count = 0

    def update(self, x: np.ndarray, lo: float | None = None, hi: float | None = None) -> None:
        """Add a batch. ``lo``/``hi`` may pass its min/max when the caller already computed them."""
        if x.size == 0:
            return
        self.min = min(self.min, float(np.min(x)) if lo is None else lo)
        self.max = max(self.max, float(np.max(x)) if hi is None else hi)
        self.count += 1

    def merge(self, other: "MinMaxObserver") -> "MinMaxObserver":
        out = MinMaxObserver()
        out.min, out.max, out.count = min(self.min, other.min), max(self.max, other.max), self.count + other.count
        return out

    @property
    def seen(self) -> bool:
        return self.count > 0

    def range(self) -> tuple[float, float]:
        return self.min, self.max
