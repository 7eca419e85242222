"""Data-free per-block scale search: shrink each block's range and keep the (importance-weighted) error minimiser.

A weight W [K, N] (ONNX MatMul orientation, ``y = x @ W``) is quantized block-wise along axis 0: every
``block_size`` consecutive rows share one scale (and zero point) per column, as ``qparams.block_qparams`` lays
them out. The plain min/max range is not the error-minimising one when a block holds an outlier: clipping the
outlier costs less than the rounding error a wide scale puts on every other value. This is the ``mse=True`` grid
of the GPTQ reference's quantizer (``xmin * p, xmax * p``) and, with an activation-aware ``importance``, the idea
of llama.cpp's importance matrix (imatrix).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ..qparams import block_qparams, compute_qparams, dequantize, quantize


def search_block_qparams(w: np.ndarray, block_size: int, qtype: str, *, symmetric: bool,
                         importance: np.ndarray | None = None, grid: int = 20,
                         max_shrink: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Per (block, column) scale / zero point minimising the importance-weighted squared quantization error.

    For factors ``p = 1, 1 - max_shrink / grid, ..., 1 - max_shrink`` the block range ``[p * min, p * max]`` gives
    a candidate ``(s, z)`` (``qparams.compute_qparams``: min and max shrink towards each other around 0, the zero
    point stays an integer in range); each (block b, column n) keeps the one minimising
    ``sum_{k in b} importance_k * (w_kn - dequantize(quantize(w_kn; s, z); s, z))^2``.
    ``p = 1`` is the plain ``qparams.block_qparams`` result and a later candidate replaces it only when strictly
    better, so the error is never worse than the plain one.

    ``w`` [K, N]; ``importance`` [K], >= 0 (default ones; e.g. ``diag(x^T x) / rows``, the mean ``x^2`` of each
    input channel). Returns ``(scale float32, zero_point of qtype's array type)``, both ``[ceil(K / B), N]``.
    """
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"search_block_qparams needs a 2-D weight [K, N], not shape {list(w.shape)}")
    scale, zero_point = block_qparams(w, 0, block_size, qtype, symmetric=symmetric)  # validates block_size
    if isinstance(grid, bool) or not isinstance(grid, (int, np.integer)) or grid < 1:
        raise ValueError(f"grid must be a positive integer, not {grid!r}")
    if not 0.0 <= float(max_shrink) < 1.0:
        raise ValueError(f"max_shrink must be in [0, 1), not {max_shrink!r}")
    k, n = w.shape
    if importance is None:
        importance = np.ones(k)
    importance = np.asarray(importance, dtype=np.float64)
    if importance.shape != (k,):
        raise ValueError(f"importance has shape {list(importance.shape)}, expected [{k}]")
    if not np.all(np.isfinite(importance)) or np.any(importance < 0):
        raise ValueError("importance must be finite and >= 0")
    if w.size == 0 or max_shrink == 0.0:
        return scale, zero_point

    # [blocks, B, N] with the last block zero-padded; padded rows get importance 0 (and quantize to 0 exactly)
    nb = scale.shape[0]
    pad = nb * block_size - k
    blocks = np.pad(w, ((0, pad), (0, 0))).reshape(nb, block_size, n)
    imp = np.pad(importance, (0, pad)).reshape(nb, block_size, 1)
    starts = np.arange(0, k, block_size)
    lo = np.minimum.reduceat(w, starts, axis=0).astype(np.float64)
    hi = np.maximum.reduceat(w, starts, axis=0).astype(np.float64)

    def error(s: np.ndarray, z: np.ndarray) -> np.ndarray:
        # qparams' own quantize / dequantize (ONNX semantics), broadcast over the rows of each block
        s3, z3 = s[:, None, :], z[:, None, :]
        dq = dequantize(quantize(blocks, s3, z3, qtype=qtype), s3, z3)
        return np.sum(imp * (blocks.astype(np.float64) - dq.astype(np.float64)) ** 2, axis=1)

    return shrink_search(error, scale, zero_point, lo, hi, qtype, symmetric=symmetric, grid=grid,
                         max_shrink=max_shrink)


def shrink_search(error: Callable[[np.ndarray, np.ndarray], np.ndarray], scale: np.ndarray, zero_point: np.ndarray,
                  lo: np.ndarray, hi: np.ndarray, qtype: str, *, symmetric: bool, grid: int, max_shrink: float,
                  full_range: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The grid search both block searches share: for ``p = 1 - max_shrink * step / grid`` (step 1..grid) the range
    ``[p * lo, p * hi]`` gives candidate ``(s, z)``; each (block, column) keeps a candidate only where ``error(s, z)``
    is strictly below the best so far, starting from ``(scale, zero_point)``. Returns ``(scale float32, zero_point)``."""
    best = error(scale, zero_point)
    for step in range(1, grid + 1):
        p = 1.0 - float(max_shrink) * step / grid
        s, z = compute_qparams(p * lo, p * hi, qtype, symmetric=symmetric, full_range=full_range)
        err = error(s, z)
        better = err < best
        if better.any():
            best = np.where(better, err, best)
            scale = np.where(better, s, scale)
            zero_point = np.where(better, z, zero_point)
    return scale.astype(np.float32), zero_point
