"""Round to nearest: W [K, N] -> (q, scale, zero point), block-wise along an axis, scale from each block's range."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..qparams import block_qparams, quantize, weight_qparams


class QuantizedWeight(NamedTuple):
    """The integer weight (unpacked: int4 in int8, uint4 in uint8), its float32 scale and its zero point, such that
    ``qparams.dequantize(q, scale, zero_point, axis=axis, block_size=block_size)`` is the weight used."""

    q: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None
    block_size: int | None


def rtn(w: np.ndarray, qtype: str, *, symmetric: bool, axis: int | None = 0,
        block_size: int | None = None, full_range: bool = False) -> QuantizedWeight:
    """Each block of ``block_size`` values along ``axis`` (or the whole axis when None; the whole tensor when
    ``axis`` is None) gets the scale of its range, values round half to even and saturate."""
    w = np.asarray(w, dtype=np.float32)
    if block_size:
        scale, zp = block_qparams(w, axis, block_size, qtype, symmetric=symmetric, full_range=full_range)
    else:
        if not symmetric:
            raise ValueError("asymmetric round to nearest is block-wise only here; give a block_size")
        scale, zp = weight_qparams(w, axis, qtype)
    q = quantize(w, scale, zp, axis=axis, block_size=block_size, qtype=qtype)
    return QuantizedWeight(q, np.asarray(scale, np.float32), zp, axis, block_size)
