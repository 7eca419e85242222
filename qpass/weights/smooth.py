"""SmoothQuant (Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language
Models"): per-input-channel scales that migrate activation outliers into the weights of a MatMul ``y = x @ W``
(W [K, N]) before static int8 quantization of both.

``x @ W = (x / s) @ (diag(s) W)`` exactly; with ``s_j = max|x_j|^a / max|W_j|^(1 - a)`` (``max|W_j|``: the
largest magnitude in input row j over every weight of the group) the activation's channels are flattened by
``max|x_j|^a`` and the weights' rows grow by as much, so a per-tensor activation grid loses less to a few outlier
channels and a per-output-channel weight grid absorbs the change. The strength ``a`` is searched per group of
weights reading one input, by the group's output error on a sample of input rows with both operands
fake-quantized as a static run would quantize them: the activation per tensor on the min-max range of ``x / s``
(exact from the per-channel min and max of ``x``: ``[min_j min(x_j) / s_j, max_j max(x_j) / s_j]``), each weight
symmetric per output channel (or per tensor). The candidate "no migration" (``s = 1``) is scored too, and wins
ties, so the chosen scales never score worse than leaving the layer alone. ``a = 0`` denotes that candidate here
(the formula's ``a = 0``, ``s = 1 / max|W_j|``, is not tried).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..qparams import compute_qparams, dequantize, qrange, quantize, weight_qparams

#: smallest max|x_j| (max|W_j|) a scale is computed from, as a share of the largest: a dead channel's scale stays finite
FLOOR = 1e-5


def smooth_scales(xmax: np.ndarray, wmax: np.ndarray, alpha: float) -> np.ndarray:
    """``s_j = max|x_j|^alpha / max|W_j|^(1 - alpha)`` (float32), each maximum floored at ``FLOOR`` times its
    largest; ``alpha = 0`` gives ones (no migration)."""
    a, w = np.asarray(xmax, dtype=np.float64), np.asarray(wmax, dtype=np.float64)
    if a.ndim != 1 or a.shape != w.shape:
        raise ValueError(f"xmax and wmax are one value per input channel, not shapes {list(a.shape)}, {list(w.shape)}")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(w))) or np.any(a < 0) or np.any(w < 0):
        raise ValueError("xmax and wmax must be finite and non-negative")
    if alpha == 0.0 or a.max(initial=0.0) == 0.0 or w.max(initial=0.0) == 0.0:
        return np.ones(a.shape, dtype=np.float32)
    a = np.maximum(a, FLOOR * a.max())
    w = np.maximum(w, FLOOR * w.max())
    return (a ** float(alpha) / w ** (1.0 - float(alpha))).astype(np.float32)


def fake_quant_error(rows: np.ndarray, weights: Sequence[np.ndarray], s: np.ndarray, cmin: np.ndarray,
                     cmax: np.ndarray, act_type: str, *, act_symmetric: bool, weight_type: str = "int8",
                     per_channel: bool = True, reference: Sequence[np.ndarray] | None = None) -> float:
    """``sum_i ||Q_a(rows / s) Q_w(diag(s) W_i) - rows W_i||^2`` over the group's weights: ``Q_a`` quantizes per
    tensor to ``act_type`` on the range ``[min_j cmin_j / s_j, max_j cmax_j / s_j]`` (the min-max range of the
    smoothed input), ``Q_w`` symmetric ``weight_type`` per output channel (axis 1 of ``[K, N]``) or per tensor.
    ``reference``: the float outputs ``rows @ W_i``, when the caller has them. Both quantizers are ONNX's
    QuantizeLinear / DequantizeLinear (:mod:`qpass.qparams`), the weight's computed on the array directly in float32
    (the search calls it often)."""
    s = np.asarray(s, dtype=np.float32)
    x = np.asarray(rows, dtype=np.float32)
    lo = float(np.min(np.asarray(cmin, dtype=np.float64) / s))
    hi = float(np.max(np.asarray(cmax, dtype=np.float64) / s))
    scale, zp = compute_qparams(lo, hi, act_type, symmetric=act_symmetric)
    xq = dequantize(quantize(x / s, scale, zp, qtype=act_type), scale, zp)
    qmin, qmax = qrange(weight_type, symmetric=True)
    total = 0.0
    for i, w in enumerate(weights):
        w = np.asarray(w, dtype=np.float32)
        ws = w * s[:, None]
        w_scale, _ = weight_qparams(ws, 1 if per_channel else None, weight_type)  # symmetric: zero point 0
        wq = np.clip(np.rint(ws / w_scale), qmin, qmax).astype(np.float32) * w_scale
        y = reference[i] if reference is not None else x @ w
        d = xq @ wq - y
        total += float(np.sum(d * d, dtype=np.float64))
    return total


def search_strength(rows: np.ndarray, weights: Sequence[np.ndarray], cmin: np.ndarray, cmax: np.ndarray,
                    act_type: str, *, act_symmetric: bool, weight_type: str = "int8", per_channel: bool = True,
                    grid: int = 10, alpha: float | None = None) -> tuple[np.ndarray, float, dict[float, float]]:
    """The scales of the strength with the smallest :func:`fake_quant_error`: ``a`` in ``0 (no migration), 1/grid,
    ..., 1``, or ``0`` and ``alpha`` alone when given (a later candidate replaces an earlier one only when strictly
    better). Returns ``(s float32 [K], a, {a: error})``."""
    if not weights:
        raise ValueError("give at least one weight")
    k = np.asarray(weights[0]).shape[0]
    if any(np.ndim(w) != 2 or np.shape(w)[0] != k for w in weights):
        raise ValueError(f"weights must be 2-D with {k} input rows")
    if np.shape(rows)[-1:] != (k,) or np.shape(cmin) != (k,) or np.shape(cmax) != (k,):
        raise ValueError(f"rows, cmin and cmax must have {k} channels")
    if isinstance(grid, bool) or not isinstance(grid, (int, np.integer)) or grid < 1:
        raise ValueError(f"grid must be a positive integer, not {grid!r}")
    xmax = np.maximum(np.abs(np.asarray(cmin, dtype=np.float64)), np.abs(np.asarray(cmax, dtype=np.float64)))
    wmax = np.max(np.abs(np.concatenate([np.asarray(w, dtype=np.float32) for w in weights], axis=1)), axis=1)
    candidates = [0.0] + ([float(alpha)] if alpha is not None else [i / grid for i in range(1, grid + 1)])
    x = np.asarray(rows, dtype=np.float32)
    reference = [x @ np.asarray(w, dtype=np.float32) for w in weights]
    errors: dict[float, float] = {}
    best = (np.ones(k, dtype=np.float32), 0.0, np.inf)
    for a in candidates:
        s = smooth_scales(xmax, wmax, a)
        err = fake_quant_error(x, weights, s, cmin, cmax, act_type, act_symmetric=act_symmetric,
                               weight_type=weight_type, per_channel=per_channel, reference=reference)
        errors[a] = err
        if err < best[2]:
            best = (s, a, err)
    return best[0], best[1], errors
