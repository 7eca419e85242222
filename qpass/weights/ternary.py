"""Ternary weights (BitNet b1.58's absmean rounding): each block of weights along the input features gets the scale
s = mean |w| and values q = clip(round(w / s), -1, 1), so the weight is {-1, 0, +1} x s."""
from __future__ import annotations

import numpy as np

from ..qparams import MIN_SCALE
from .rtn import QuantizedWeight


def block_absmean(w: np.ndarray, block_size: int) -> np.ndarray:
    """mean |w| of each ``block_size`` rows of W [K, N]: [ceil(K / B), N] float32 (the last block may be shorter;
    an all-zero block gets the smallest positive scale)."""
    a = np.abs(np.asarray(w, dtype=np.float64))
    starts = np.arange(0, a.shape[0], block_size)
    counts = np.diff(np.append(starts, a.shape[0])).reshape(-1, 1)
    return np.maximum(np.add.reduceat(a, starts, axis=0) / counts, MIN_SCALE).astype(np.float32)


def ternary(w: np.ndarray, block_size: int, scale: np.ndarray | None = None) -> QuantizedWeight:
    """W [K, N] -> int2 values (in int8) in {-1, 0, 1}, scale [ceil(K / B), N] (absmean, or the given ``scale``),
    zero point 0, blocked along axis 0; rounding half to even."""
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"ternary quantizes 2-D weights, not rank {w.ndim}")
    scale = block_absmean(w, block_size) if scale is None else np.asarray(scale, dtype=np.float32)
    full = np.repeat(scale, block_size, axis=0)[: w.shape[0]]
    q = np.clip(np.rint(w / full), -1, 1).astype(np.int8)
    return QuantizedWeight(q, scale, np.zeros(scale.shape, np.int8), 0, block_size)
