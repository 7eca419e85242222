"""The one home of range -> (scale, zero point) arithmetic, and of quantize/dequantize, in pure numpy.

Conventions (those of ONNX QuantizeLinear / DequantizeLinear):
``q = saturate(round_half_to_even(x / scale) + zero_point)`` and ``x' = (q - zero_point) * scale``.
Every range is widened to include 0, so that 0.0 is exactly representable (zero padding stays exact).
"""
from __future__ import annotations

import numpy as np

#: integer type name -> (numpy dtype, qmin, qmax)
INT_TYPES: dict[str, tuple[type, int, int]] = {
    "int8": (np.int8, -128, 127),
    "uint8": (np.uint8, 0, 255),
    "int16": (np.int16, -32768, 32767),
    "uint16": (np.uint16, 0, 65535),
    "int32": (np.int32, -(2**31), 2**31 - 1),
}

#: smallest scale written; keeps 1/scale finite for tensors whose range is (nearly) zero
MIN_SCALE = float(np.finfo(np.float32).tiny)
#: largest float32: a scale, or a dequantized end of the integer grid, beyond it would be inf
F32_MAX = float(np.finfo(np.float32).max)


def qrange(qtype: str, *, symmetric: bool) -> tuple[int, int]:
    """Integer range used for ``qtype``. Symmetric signed types drop the most negative value
    (int8 uses [-127, 127]) so that the range is symmetric around the zero point 0."""
    _, qmin, qmax = INT_TYPES[qtype]
    if symmetric and qmin < 0:
        qmin = -qmax
    return qmin, qmax


def compute_qparams(rmin, rmax, qtype: str, *, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32) and zero point (``qtype``) covering ``[rmin, rmax]`` (scalars or arrays, per channel).

    Symmetric: zero point is 0 for signed types and the midpoint (128) for unsigned ones;
    scale = max(|rmin|, |rmax|) / half-range. Asymmetric: scale = (rmax - rmin) / (qmax - qmin),
    zero point = round(qmin - rmin / scale), so rmin and rmax map to the ends of the integer range.
    A zero range gets scale 1.0, so 0.0 maps exactly to the zero point and the scale is never 0.
    """
    dtype, _, _ = INT_TYPES[qtype]
    rmin = np.minimum(np.asarray(rmin, dtype=np.float64), 0.0)
    rmax = np.maximum(np.asarray(rmax, dtype=np.float64), 0.0)
    if not (np.all(np.isfinite(rmin)) and np.all(np.isfinite(rmax))):
        raise ValueError("range is not finite")
    qmin, qmax = qrange(qtype, symmetric=symmetric)
    if symmetric:
        absmax = np.maximum(np.abs(rmin), np.abs(rmax))
        if qmin < 0:
            scale = absmax / qmax
            zero_point = np.zeros_like(absmax)
        else:  # unsigned symmetric: zero at the middle of the range
            half = (qmax - qmin) / 2.0
            scale = absmax / half
            zero_point = np.full_like(absmax, np.round((qmax + qmin + 1) / 2.0))
    else:
        scale = (rmax - rmin) / float(qmax - qmin)
        zero_point = None
    scale = np.where(scale == 0.0, 1.0, scale)
    scale = np.maximum(scale, MIN_SCALE)
    if np.any(scale > F32_MAX):
        raise ValueError("range is too large for a float32 scale")
    scale = scale.astype(np.float32)
    if zero_point is None:
        zero_point = np.round(qmin - rmin / scale.astype(np.float64))
    zero_point = np.clip(zero_point, qmin, qmax)
    # the dequantized ends of the grid, (qmin - zp) * scale and (qmax - zp) * scale, must be finite float32
    ends = np.maximum(np.abs(qmin - zero_point), np.abs(qmax - zero_point)) * scale.astype(np.float64)
    if np.any(ends > F32_MAX):
        raise ValueError("range is too large: its dequantized ends overflow float32")
    return scale, zero_point.astype(dtype)


def _broadcast(param: np.ndarray, x: np.ndarray, axis: int | None) -> np.ndarray:
    param = np.asarray(param)
    if param.ndim == 0 or axis is None:
        return param
    axis = axis % x.ndim
    shape = [1] * x.ndim
    shape[axis] = param.shape[0]
    return param.reshape(shape)


def quantize(x, scale, zero_point, *, axis: int | None = None) -> np.ndarray:
    """ONNX QuantizeLinear in numpy: round half to even, then saturate to ``zero_point``'s dtype."""
    zero_point = np.asarray(zero_point)
    info = np.iinfo(zero_point.dtype)
    x = np.asarray(x, dtype=np.float32)
    s = _broadcast(np.asarray(scale, dtype=np.float32), x, axis)
    z = _broadcast(zero_point, x, axis).astype(np.float64)
    q = np.rint(x.astype(np.float64) / s.astype(np.float64)) if zero_point.dtype == np.int32 \
        else np.rint((x / s).astype(np.float32)).astype(np.float64)
    return np.clip(q + z, info.min, info.max).astype(zero_point.dtype)


def dequantize(q, scale, zero_point=None, *, axis: int | None = None) -> np.ndarray:
    """ONNX DequantizeLinear in numpy: ``(q - zero_point) * scale`` as float32."""
    q = np.asarray(q)
    s = _broadcast(np.asarray(scale, dtype=np.float32), q, axis)
    if zero_point is None:
        zero_point = np.zeros((), dtype=q.dtype)
    z = _broadcast(np.asarray(zero_point), q, axis)
    return ((q.astype(np.int64) - z.astype(np.int64)).astype(np.float32) * s).astype(np.float32)


def weight_qparams(w: np.ndarray, axis: int | None, qtype: str = "int8") -> tuple[np.ndarray, np.ndarray]:
    """Symmetric scale/zero point for a weight, per channel along ``axis`` or per tensor (None)."""
    w = np.asarray(w, dtype=np.float32)
    if axis is None:
        return compute_qparams(float(w.min(initial=0.0)), float(w.max(initial=0.0)), qtype, symmetric=True)
    axis = axis % w.ndim
    other = tuple(i for i in range(w.ndim) if i != axis)
    if w.size == 0:
        zeros = np.zeros(w.shape[axis])
        return compute_qparams(zeros, zeros, qtype, symmetric=True)
    return compute_qparams(w.min(axis=other), w.max(axis=other), qtype, symmetric=True)


#: the largest int32, the bound of an int32 bias
INT32_MAX = 2**31 - 1


def int32_bias(values, act_scale, w_scale, axis: int | None = None) -> tuple[np.ndarray, np.ndarray, int | None] | str:
    """A bias quantized as int32 at ``act_scale x w_scale`` (zero point 0): ``(q, scale, axis)``, ``axis`` being the
    DequantizeLinear's (None for one scale, which is then 0-d), or why it cannot be.

    ``w_scale`` is a scalar or one scale per output channel along ``axis`` of ``values``. The reason strings
    are the ones the report shows ("bias kept in float: ...")."""
    values = np.asarray(values, dtype=np.float32)
    if not np.all(np.isfinite(values)):
        return "bias kept in float: it holds NaN or Inf"
    scale = np.asarray((np.float64(act_scale) * np.asarray(w_scale).astype(np.float64)).astype(np.float32))
    per_channel = scale.ndim == 1 and scale.size > 1
    axis = axis if per_channel else None
    if per_channel and values.shape[axis] != scale.size:
        return f"bias kept in float: {values.shape[axis]} values for {scale.size} output channels"
    if np.any(scale <= 0) or not np.all(np.isfinite(scale)):
        return "bias kept in float: input scale x weight scale is not a positive finite number"
    shape = [1] * values.ndim
    if per_channel:
        shape[axis] = scale.size
    exact = values.astype(np.float64) / scale.reshape(shape if per_channel else ()).astype(np.float64)
    if np.any(np.abs(np.rint(exact)) > INT32_MAX):
        worst = int(np.unravel_index(np.argmax(np.abs(exact)), exact.shape)[axis if per_channel else 0]) \
            if exact.ndim else 0
        return f"bias kept in float: overflows int32 at channel {worst}"
    q = np.asarray(np.rint(exact)).astype(np.int32)  # an ndarray also for a 0-d (scalar) bias
    return (q, scale, axis) if per_channel else (q, scale.reshape(()), None)
