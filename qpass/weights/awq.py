"""Activation-aware weight scaling (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM
Compression and Acceleration") with its clipping search, for ONNX MatMul weights W [K, N] (``y = x @ W``).

Scaling input channel k of the weights by ``s_k`` and the input by ``1 / s_k`` leaves ``x @ W`` unchanged in
exact arithmetic, but moves quantization error away from the channels whose inputs are large:
``W_hat = diag(1/s) Q(diag(s) W)``. The scales are ``s = mean|x|^alpha`` normalised by ``sqrt(max * min)`` (the
reference's form), alpha searched on a grid in [0, 1]; a candidate's loss is the output error computed exactly
from the input's second moment ``H = x^T x / rows`` (the Gram matrix calibration collects for GPTQ):
``tr((W - W_hat)^T H (W - W_hat))``, summed over the weights that read the same input (q/k/v, gate/up).
``alpha = 0`` gives ``s = 1``, plain round to nearest, so the chosen loss is never above it. The clipping search
then shrinks each block's range and keeps, per (block, column), the range minimising the error weighted by the
block's diagonal block of H (the reference measures the same per-group output error; cross-block terms are left
out so that blocks are chosen independently).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..qparams import INT_TYPES, block_qparams, compute_qparams
from .search import shrink_search

#: smallest mean |x| a channel's scale is computed from, as a share of the largest (a dead channel's scale stays finite)
FLOOR = 1e-4


#: one weight's block-wise quantization along K: (block_size, qtype, symmetric)
WeightSpec = tuple[int, str, bool]


def _check(w: np.ndarray, hessian: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    w = np.asarray(w, dtype=np.float32)
    h = np.asarray(hessian, dtype=np.float64)
    if w.ndim != 2:
        raise ValueError(f"needs a 2-D weight [K, N], not shape {list(w.shape)}")
    if h.shape != (w.shape[0], w.shape[0]):
        raise ValueError(f"hessian has shape {list(h.shape)}, expected [{w.shape[0]}, {w.shape[0]}]")
    if not (np.all(np.isfinite(w)) and np.all(np.isfinite(h))):
        raise ValueError("weight and hessian must be finite")
    return w, h


def rtn_dequantized(w: np.ndarray, block_size: int, qtype: str, *, symmetric: bool) -> np.ndarray:
    """``w`` [K, N] rounded to nearest with block-wise scales along K (each block's full range, as the weight-only
    pass writes round to nearest), dequantized (float32): what ``qparams.quantize`` / ``dequantize`` with
    ``block_qparams(..., full_range=True)`` give, computed on the blocks directly (the search calls it often)."""
    w = np.asarray(w, dtype=np.float32)
    k, n = w.shape
    nb = -(-k // block_size) if k else 0
    blocks = np.pad(w, ((0, nb * block_size - k), (0, 0))).reshape(nb, block_size, n)
    # the padded zeros change no range: compute_qparams widens every range to include 0
    scale, zp = compute_qparams(blocks.min(axis=1, initial=0.0), blocks.max(axis=1, initial=0.0), qtype,
                                symmetric=symmetric, full_range=True)
    _, qmin, qmax = INT_TYPES[qtype]
    s3, z3 = scale[:, None, :], zp.astype(np.float32)[:, None, :]
    q = np.clip(np.rint(blocks / s3) + z3, qmin, qmax)
    return ((q - z3) * s3).reshape(nb * block_size, n)[:k]


def output_error(w: np.ndarray, w_hat: np.ndarray, hessian: np.ndarray) -> float:
    """``tr((w - w_hat)^T H (w - w_hat))``: the mean squared output error ``||x w - x w_hat||^2 / rows`` for inputs
    with second moment ``H = x^T x / rows``."""
    d = np.asarray(w, dtype=np.float64) - np.asarray(w_hat, dtype=np.float64)
    return float(np.sum(d * (np.asarray(hessian, dtype=np.float64) @ d)))


def scales_for(absmean: np.ndarray, alpha: float) -> np.ndarray:
    """``s = a^alpha / sqrt(max(a^alpha) * min(a^alpha))`` with ``a = max(mean|x|, FLOOR * max mean|x|)``, float32;
    ``alpha = 0`` gives ones exactly."""
    a = np.asarray(absmean, dtype=np.float64)
    if a.ndim != 1 or not np.all(np.isfinite(a)) or np.any(a < 0):
        raise ValueError("absmean must be a finite, non-negative vector")
    top = float(a.max(initial=0.0))
    if top == 0.0 or alpha == 0.0:
        return np.ones(a.shape, dtype=np.float32)
    s = np.maximum(a, FLOOR * top) ** float(alpha)
    return (s / np.sqrt(s.max() * s.min())).astype(np.float32)


def scaled_error(weights: Sequence[np.ndarray], specs: Sequence[WeightSpec], s: np.ndarray,
                 hessian: np.ndarray) -> float:
    """The group's output error with input scales ``s``: the sum over its weights of ``tr(D^T H D)``,
    ``D = W - diag(1/s) Q(diag(s) W)``, Q round to nearest with the weight's block spec."""
    s32 = np.asarray(s, dtype=np.float32)[:, None]
    h32 = np.asarray(hessian, dtype=np.float32)
    total = 0.0
    for w, (block, qtype, symmetric) in zip(weights, specs):
        w = np.asarray(w, dtype=np.float32)
        d = w - rtn_dequantized(w * s32, block, qtype, symmetric=symmetric) / s32
        total += float(np.sum(d * (h32 @ d), dtype=np.float64))  # float32 products: the search's cost
    return total


def search_scales(weights: Sequence[np.ndarray], specs: Sequence[WeightSpec], absmean: np.ndarray,
                  hessian: np.ndarray, *, grid: int = 20) -> tuple[np.ndarray, float, dict[float, float]]:
    """Per-input-channel scales for the weights (each [K, N_i]) that read one input (mean |x| ``absmean`` [K],
    second moment ``hessian`` [K, K]): ``alpha`` in ``0, 1/grid, ..., 1``, the one with the smallest
    :func:`scaled_error` (a later alpha replaces an earlier one only when strictly better, so ties keep plain round
    to nearest). Returns ``(s float32 [K], alpha, {alpha: loss})``."""
    if len(weights) != len(specs) or not weights:
        raise ValueError("give one spec per weight, and at least one weight")
    if isinstance(grid, bool) or not isinstance(grid, (int, np.integer)) or grid < 1:
        raise ValueError(f"grid must be a positive integer, not {grid!r}")
    ws = [_check(w, hessian)[0] for w in weights]
    h = np.asarray(hessian, dtype=np.float64)
    if np.shape(absmean) != (ws[0].shape[0],):
        raise ValueError(f"absmean has shape {list(np.shape(absmean))}, expected [{ws[0].shape[0]}]")
    losses: dict[float, float] = {}
    best = (np.ones(ws[0].shape[0], dtype=np.float32), 0.0, np.inf)
    for i in range(grid + 1):
        alpha = i / grid
        s = scales_for(absmean, alpha)
        loss = scaled_error(ws, specs, s, h)
        losses[alpha] = loss
        if loss < best[2]:
            best = (s, alpha, loss)
    return best[0], best[1], losses


def search_clip(w: np.ndarray, hessian: np.ndarray, block_size: int, qtype: str, *, symmetric: bool,
                grid: int = 20, max_shrink: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Per (block, column) scale / zero point of ``w`` [K, N] minimising ``d^T H_bb d``, ``d`` the column's
    quantization error in block b and ``H_bb`` the block's diagonal block of ``hessian``: candidate ranges
    ``[p * min, p * max]`` for ``p = 1, 1 - max_shrink / grid, ..., 1 - max_shrink``; ``p = 1`` is the plain full
    range (round to nearest) and a later candidate replaces it only when strictly better. Returns ``(scale
    float32, zero_point)`` ``[ceil(K / B), N]``."""
    w, h = _check(w, hessian)
    if isinstance(grid, bool) or not isinstance(grid, (int, np.integer)) or grid < 1:
        raise ValueError(f"grid must be a positive integer, not {grid!r}")
    if not 0.0 <= float(max_shrink) < 1.0:
        raise ValueError(f"max_shrink must be in [0, 1), not {max_shrink!r}")
    scale, zero_point = block_qparams(w, 0, block_size, qtype, symmetric=symmetric, full_range=True)
    if w.size == 0 or max_shrink == 0.0:
        return scale, zero_point
    k, n = w.shape
    nb = scale.shape[0]
    pad = nb * block_size - k
    blocks = np.pad(w, ((0, pad), (0, 0))).reshape(nb, block_size, n)
    hp = np.pad(h, ((0, pad), (0, pad)))
    hb = np.stack([hp[b * block_size:(b + 1) * block_size, b * block_size:(b + 1) * block_size]
                   for b in range(nb)]).astype(np.float32)
    starts = np.arange(0, k, block_size)
    lo = np.minimum.reduceat(w, starts, axis=0).astype(np.float64)
    hi = np.maximum.reduceat(w, starts, axis=0).astype(np.float64)

    _, qmin, qmax = INT_TYPES[qtype]

    def error(s: np.ndarray, z: np.ndarray) -> np.ndarray:
        # qparams.quantize / dequantize (ONNX semantics, float32) on the blocks directly
        s3, z3 = s.astype(np.float32)[:, None, :], z.astype(np.float32)[:, None, :]
        q = np.clip(np.rint(blocks / s3) + z3, qmin, qmax)
        d = blocks - (q - z3) * s3
        return np.sum(d * np.matmul(hb, d), axis=1, dtype=np.float64)  # [nb, N]; float32 products (speed)

    return shrink_search(error, scale, zero_point, lo, hi, qtype, symmetric=symmetric, grid=grid,
                         max_shrink=max_shrink, full_range=True)
