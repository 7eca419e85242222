"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers")
for an ONNX MatMul weight W [K, N] (``y = x @ W``), with block-wise scales along K in the ONNX layout.

GPTQ minimises the output error ``||x W - x W_hat||^2 = tr((W - W_hat)^T H (W - W_hat))`` (times rows),
``H = x^T x / rows`` [K, K], greedily: it quantizes W one input row k at a time (the reference's "columns" of
its [out, in] weight are our rows) and spreads the row's error over the rows not yet quantized with the inverse
Hessian, ``W[j] -= U[k, j] * (W[k] - Q[k]) / U[k, k]`` for ``j > k``, ``U`` the upper Cholesky factor of
``(H + damp * mean(diag H) * I)^-1`` (the inverse restricted to the remaining rows is read off ``U`` for free).

The ONNX layout fixes the groups: original row k uses the scale of block ``k // block_size``. With act order
(rows processed by decreasing ``diag(H)``) a block's rows are scattered over the processing order; its scale is
computed when its first row is reached, from the current (error-updated, not yet quantized) weights of all its
rows, pending lazy-batch updates included. (The reference instead groups consecutive rows of the *permuted*
order and records a per-row group index, a layout DequantizeLinear's ``block_size`` cannot express.)
"""
from __future__ import annotations

import numpy as np

from ..qparams import INT_TYPES, block_qparams, blocked_shape, dequantize, quantize
from .search import search_block_qparams


def gptq(w: np.ndarray, hessian: np.ndarray, block_size: int, qtype: str, *, symmetric: bool,
         damp: float = 0.01, act_order: bool = True, lazy_batch: int = 128, static_groups: bool = False,
         scale_search: bool = False, full_range: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ-quantize ``w`` [K, N] (float32) for inputs with second moment ``hessian`` [K, K] (``x^T x / rows``).

    Row by row (in order of decreasing ``diag(H)`` when ``act_order``): ``q_k = quantize(w_k)`` with its block's
    scale, then ``w_j -= U_kj * (w_k - dequantize(q_k)) / U_kk`` for the rows j after k, ``U = chol_upper((H +
    damp * mean(diag H) I)^-1)``; this minimises ``tr(dW^T H dW)`` greedily (the output error of ``x @ W``).

    Dead inputs (``H_kk == 0``) get ``H_kk = 1`` and their weight rows zeroed, as the reference does. The
    updates of a batch of ``lazy_batch`` rows reach the later rows in one matrix product (same result, fewer
    passes over W). Block scales: with ``static_groups`` all from the dead-zeroed input weight up front;
    otherwise each block's when its first row is processed, from the current weights of its rows (see the
    module docstring for act order). ``scale_search`` picks each block's scale with
    :func:`~qpass.weights.search.search_block_qparams` (importance ``diag(H)``) instead of its min/max.
    Hessian math is float64.

    Returns ``(q, scale, zero_point)``: q [K, N] in ``qtype``'s array type (original row order), scale float32
    and zero point [ceil(K / block_size), N], such that ``qparams.dequantize(q, scale, zero_point, axis=0,
    block_size=block_size)`` is the GPTQ weight.
    """
    w32 = np.asarray(w, dtype=np.float32)
    if w32.ndim != 2:
        raise ValueError(f"gptq needs a 2-D weight [K, N], not shape {list(w32.shape)}")
    k, n = w32.shape
    h = np.array(hessian, dtype=np.float64)  # a copy: it is modified below
    if h.shape != (k, k):
        raise ValueError(f"hessian has shape {list(h.shape)}, expected [{k}, {k}] for a weight of shape {[k, n]}")
    if not (np.all(np.isfinite(h)) and np.all(np.isfinite(w32))):
        raise ValueError("weight and hessian must be finite")
    if isinstance(lazy_batch, bool) or not isinstance(lazy_batch, (int, np.integer)) or lazy_batch < 1:
        raise ValueError(f"lazy_batch must be a positive integer, not {lazy_batch!r}")
    if not float(damp) >= 0.0:
        raise ValueError(f"damp must be >= 0, not {damp!r}")
    dtype = INT_TYPES[qtype][0]
    n_groups = blocked_shape((k, n), 0, block_size)[0]  # validates block_size
    if w32.size == 0:
        scale, zp = block_qparams(w32, 0, block_size, qtype, symmetric=symmetric, full_range=full_range)
        return np.zeros((k, n), dtype=dtype), scale, zp

    W = w32.astype(np.float64)
    diag = np.diag(h).copy()
    dead = diag == 0.0
    h[dead, dead] = 1.0
    W[dead] = 0.0
    importance = np.diag(h).copy()

    def group_qparams(rows: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """scale / zero point [N] of one block from its rows' current ``values`` [len(rows), N]"""
        values = values.astype(np.float32)
        if scale_search:
            s, z = search_block_qparams(values, len(rows), qtype, symmetric=symmetric, importance=importance[rows])
        else:
            s, z = block_qparams(values, 0, len(rows), qtype, symmetric=symmetric, full_range=full_range)
        return s[0], z[0]

    groups = [np.arange(g * block_size, min((g + 1) * block_size, k)) for g in range(n_groups)]
    scale = np.zeros((n_groups, n), dtype=np.float32)
    zero_point = np.zeros((n_groups, n), dtype=dtype)
    ready = np.zeros(n_groups, dtype=bool)
    if static_groups:
        for g, rows in enumerate(groups):
            scale[g], zero_point[g] = group_qparams(rows, W[rows])
        ready[:] = True

    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    inv_perm = np.empty(k, dtype=np.int64)
    inv_perm[perm] = np.arange(k)
    W = W[perm]  # processing order from here on
    h = h[np.ix_(perm, perm)]
    h[np.diag_indices(k)] += float(damp) * float(np.mean(np.diag(h)))
    try:
        lower = np.linalg.cholesky(h)
        lower_inv = np.linalg.inv(lower)
        U = np.linalg.cholesky(lower_inv.T @ lower_inv).T  # upper factor of H^-1: H^-1 = U^T U
    except np.linalg.LinAlgError as exc:
        raise ValueError(f"the dampened Hessian is not positive definite (damp={damp}); increase damp") from exc

    Q = np.zeros((k, n), dtype=dtype)  # original row order
    for i1 in range(0, k, lazy_batch):
        i2 = min(i1 + lazy_batch, k)
        err = np.zeros((i2 - i1, n))
        for j in range(i1, i2):
            g = perm[j] // block_size
            if not ready[g]:
                pos = inv_perm[groups[g]]  # processing positions of the block's rows, all >= j
                current = W[pos]
                later = pos >= i2  # not yet reached by this batch's updates
                if later.any():
                    current[later] -= U[i1:j, pos[later]].T @ err[:j - i1]
                scale[g], zero_point[g] = group_qparams(groups[g], current)
                ready[g] = True
            q = quantize(W[j].astype(np.float32), scale[g], zero_point[g], qtype=qtype)
            Q[perm[j]] = q
            e = (W[j] - dequantize(q, scale[g], zero_point[g]).astype(np.float64)) / U[j, j]
            W[j + 1:i2] -= np.outer(U[j, j + 1:i2], e)
            err[j - i1] = e
        W[i2:] -= U[i1:i2, i2:].T @ err
    return Q, scale, zero_point
