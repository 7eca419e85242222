"""The one home of range -> (scale, zero point) arithmetic, and of quantize/dequantize, in pure numpy.

Conventions (those of ONNX QuantizeLinear / DequantizeLinear):
``q = saturate(round_half_to_even(x / scale) + zero_point)`` and ``x' = (q - zero_point) * scale``.
Every range is widened to include 0, so that 0.0 is exactly representable (zero padding stays exact).

4-bit values (``int4`` / ``uint4``): numpy has no 4-bit dtype, so they are held *unpacked*, one value per
element, in ``int8`` (int4, -8..7) or ``uint8`` (uint4, 0..15) arrays; the type name (``qtype``) says that they
are 4-bit, and :data:`ONNX_TYPES` maps it to the ONNX data type. :func:`quantize` saturates to the 4-bit range
only when it is given ``qtype=`` (from an int8 zero point alone it cannot tell int4 from int8). Only
serialization packs them: :func:`pack_4bit` / :func:`unpack_4bit` (two values a byte, low nibble first, as the
ONNX spec stores INT4/UINT4) and :func:`make_initializer`.

Block-wise ("blocked", ONNX opset 21) scales: along ``axis`` every ``block_size`` consecutive elements share a
scale; the scale (and zero point) has the input's rank and shape except ``ceil(dim[axis] / block_size)`` on
``axis`` (the last block may be shorter), see :func:`blocked_shape`.
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

#: integer type name -> (numpy dtype, qmin, qmax)
INT_TYPES: dict[str, tuple[type, int, int]] = {
    "int8": (np.int8, -128, 127),
    "uint8": (np.uint8, 0, 255),
    "int16": (np.int16, -32768, 32767),
    "uint16": (np.uint16, 0, 65535),
    "int32": (np.int32, -(2**31), 2**31 - 1),
    # 4-bit types: unpacked, one value per int8 / uint8 element (see the module docstring)
    "int4": (np.int8, -8, 7),
    "uint4": (np.uint8, 0, 15),
    # 2-bit: unpacked, one value per int8 element (ternary weights use -1..1 of it; DequantizeLinear from opset 25)
    "int2": (np.int8, -2, 1),
}

#: the 4-bit types, whose numpy dtype is wider than the type (the range is the one in INT_TYPES)
FOUR_BIT_TYPES = ("int4", "uint4")

#: integer type name -> ONNX TensorProto data type
ONNX_TYPES: dict[str, int] = {
    "int8": TensorProto.INT8,
    "uint8": TensorProto.UINT8,
    "int16": TensorProto.INT16,
    "uint16": TensorProto.UINT16,
    "int32": TensorProto.INT32,
    "int4": TensorProto.INT4,
    "uint4": TensorProto.UINT4,
    "int2": TensorProto.INT2,
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


def compute_qparams(rmin, rmax, qtype: str, *, symmetric: bool, full_range: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32) and zero point (``qtype``) covering ``[rmin, rmax]`` (scalars or arrays, per channel).

    Symmetric: zero point is 0 for signed types and the midpoint (128) for unsigned ones;
    scale = max(|rmin|, |rmax|) / half-range. Asymmetric: scale = (rmax - rmin) / (qmax - qmin),
    zero point = round(qmin - rmin / scale), so rmin and rmax map to the ends of the integer range.
    A zero range gets scale 1.0, so 0.0 maps exactly to the zero point and the scale is never 0.
    ``full_range`` (signed symmetric only): zero point 0 on the type's whole grid, scale = max(rmax / qmax,
    -rmin / -qmin) with qmin = -2^(b-1), so a block whose largest magnitude is negative uses level -2^(b-1) too
    (int4: 16 levels instead of 15).
    """
    dtype, _, _ = INT_TYPES[qtype]
    rmin = np.minimum(np.asarray(rmin, dtype=np.float64), 0.0)
    rmax = np.maximum(np.asarray(rmax, dtype=np.float64), 0.0)
    if not (np.all(np.isfinite(rmin)) and np.all(np.isfinite(rmax))):
        raise ValueError("range is not finite")
    qmin, qmax = qrange(qtype, symmetric=symmetric)
    if symmetric and full_range and INT_TYPES[qtype][1] < 0:
        _, lo, hi = INT_TYPES[qtype]
        qmin, qmax = lo, hi
        scale = np.maximum(rmax / hi, rmin / lo)
        zero_point = np.zeros_like(scale)
    elif symmetric:
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


def blocked_shape(shape, axis: int, block_size: int) -> tuple[int, ...]:
    """Shape of a block-wise scale / zero point for an input of ``shape``: ``shape`` with ``dim[axis]`` replaced
    by ``ceil(dim[axis] / block_size)`` (ONNX opset-21 blocked quantization; the last block may be shorter)."""
    shape = tuple(int(d) for d in shape)
    if not isinstance(block_size, (int, np.integer)) or isinstance(block_size, bool) or block_size <= 0:
        raise ValueError(f"block_size must be a positive integer, not {block_size!r}")
    if not shape:
        raise ValueError("block-wise quantization needs an input of rank >= 1")
    axis = _check_axis(axis, len(shape))
    out = list(shape)
    out[axis] = -(-shape[axis] // int(block_size))
    return tuple(out)


def _check_axis(axis: int, rank: int) -> int:
    if not -rank <= axis < rank:
        raise ValueError(f"axis {axis} out of range for rank {rank}")
    return axis % rank


def _broadcast(param: np.ndarray, x: np.ndarray, axis: int | None, block_size: int | None = None) -> np.ndarray:
    param = np.asarray(param)
    if block_size is not None:
        return _expand_blocks(param, x.shape, axis, block_size)
    if param.ndim == 0 or axis is None:
        return param
    axis = axis % x.ndim
    shape = [1] * x.ndim
    shape[axis] = param.shape[0]
    return param.reshape(shape)


def _expand_blocks(param: np.ndarray, shape: tuple[int, ...], axis: int | None, block_size: int) -> np.ndarray:
    """A block-wise ``param`` repeated ``block_size`` times along ``axis`` and trimmed to ``shape``."""
    if axis is None:
        raise ValueError("block-wise quantization needs an axis")
    want = blocked_shape(shape, axis, block_size)
    if param.shape != want:
        raise ValueError(f"block-wise scale / zero point has shape {list(param.shape)}, expected {list(want)} "
                         f"for input shape {list(shape)}, axis {axis}, block_size {block_size}")
    axis = axis % len(shape)
    return np.take(np.repeat(param, block_size, axis=axis), np.arange(shape[axis]), axis=axis)


def _int_bounds(zero_point: np.ndarray, qtype: str | None) -> tuple[int, int]:
    if qtype is None:
        info = np.iinfo(zero_point.dtype)
        return info.min, info.max
    dtype, qmin, qmax = INT_TYPES[qtype]
    if zero_point.dtype != dtype:
        raise ValueError(f"{qtype} zero point must be held as {np.dtype(dtype).name}, not {zero_point.dtype.name}")
    if zero_point.size and (zero_point.min() < qmin or zero_point.max() > qmax):
        raise ValueError(f"zero point outside the {qtype} range [{qmin}, {qmax}]")
    return qmin, qmax


#: elements :func:`quantize` converts at a time (its float64 temporaries: 8 MB each)
QUANTIZE_SLICE = 1 << 20


def quantize(x, scale, zero_point, *, axis: int | None = None, block_size: int | None = None,
             qtype: str | None = None) -> np.ndarray:
    """ONNX QuantizeLinear in numpy: round half to even, then saturate to ``zero_point``'s dtype.

    ``qtype`` (an :data:`INT_TYPES` name) saturates to that type's range instead; it is needed for int4 / uint4,
    whose values and zero point are held in int8 / uint8 (the zero point must have that dtype). ``block_size``
    makes ``scale`` and ``zero_point`` block-wise along ``axis`` (shape :func:`blocked_shape`)."""
    zero_point = np.asarray(zero_point)
    qmin, qmax = _int_bounds(zero_point, qtype)
    x = np.asarray(x, dtype=np.float32)
    s = _broadcast(np.asarray(scale, dtype=np.float32), x, axis, block_size)
    z = _broadcast(zero_point, x, axis, block_size).astype(np.float64)

    def rows(a: np.ndarray, i: slice) -> np.ndarray:  # the rows of a parameter that varies along axis 0
        return a[i] if a.ndim == x.ndim and a.ndim and a.shape[0] == x.shape[0] and a.shape[0] > 1 else a

    def run(x: np.ndarray, s: np.ndarray, z: np.ndarray) -> np.ndarray:
        q = np.rint(x.astype(np.float64) / s.astype(np.float64)) if zero_point.dtype == np.int32 \
            else np.rint((x / s).astype(np.float32)).astype(np.float64)
        return np.clip(q + z, qmin, qmax).astype(zero_point.dtype)

    if x.ndim == 0 or x.size <= QUANTIZE_SLICE or x.shape[0] < 2:
        return run(x, s, z)
    # elementwise, so the same values a block of rows at a time: the float64 temporaries of a whole 28M-element
    # weight (a language model's head) reached 0.7 GB
    out = np.empty(x.shape, dtype=zero_point.dtype)
    step = max(1, QUANTIZE_SLICE // (x.size // x.shape[0]))
    for start in range(0, x.shape[0], step):
        i = slice(start, start + step)
        out[i] = run(x[i], rows(s, i), rows(z, i))
    return out


def dequantize(q, scale, zero_point=None, *, axis: int | None = None, block_size: int | None = None) -> np.ndarray:
    """ONNX DequantizeLinear in numpy: ``(q - zero_point) * scale`` as float32.

    ``block_size`` makes ``scale`` and ``zero_point`` block-wise along ``axis`` (shape :func:`blocked_shape`).
    4-bit values are given unpacked (int8 / uint8), as :func:`quantize` returns them."""
    q = np.asarray(q)
    s = _broadcast(np.asarray(scale, dtype=np.float32), q, axis, block_size)
    if zero_point is None:
        z = np.zeros((), dtype=q.dtype)
    else:
        z = _broadcast(np.asarray(zero_point), q, axis, block_size)
    return ((q.astype(np.int64) - z.astype(np.int64)).astype(np.float32) * s).astype(np.float32)


def weight_qparams(w: np.ndarray, axis: int | None, qtype: str = "int8", *,
                   block_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric scale/zero point for a weight, per channel along ``axis`` or per tensor (None), or with
    ``block_size`` one per block of ``block_size`` elements along ``axis`` (see :func:`block_qparams`)."""
    if block_size is not None:
        return block_qparams(w, axis, block_size, qtype, symmetric=True)
    w = np.asarray(w, dtype=np.float32)
    if axis is None:
        return compute_qparams(float(w.min(initial=0.0)), float(w.max(initial=0.0)), qtype, symmetric=True)
    axis = axis % w.ndim
    other = tuple(i for i in range(w.ndim) if i != axis)
    if w.size == 0:
        zeros = np.zeros(w.shape[axis])
        return compute_qparams(zeros, zeros, qtype, symmetric=True)
    return compute_qparams(w.min(axis=other), w.max(axis=other), qtype, symmetric=True)


def block_qparams(w: np.ndarray, axis: int, block_size: int, qtype: str = "int8", *,
                  symmetric: bool = True, full_range: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Block-wise scale/zero point: one per ``block_size`` consecutive elements along ``axis`` and per position
    on the other axes, shaped :func:`blocked_shape` (``w``'s shape with ``ceil(dim[axis] / block_size)`` on
    ``axis``; the last block may be shorter). Each block gets what :func:`compute_qparams` gives its range."""
    w = np.asarray(w, dtype=np.float32)
    if axis is None:
        raise ValueError("block-wise quantization needs an axis")
    shape = blocked_shape(w.shape, axis, block_size)
    axis = axis % w.ndim
    if w.size == 0:
        zeros = np.zeros(shape)
        return compute_qparams(zeros, zeros, qtype, symmetric=symmetric, full_range=full_range)
    starts = np.arange(0, w.shape[axis], block_size)
    lo = np.minimum.reduceat(w, starts, axis=axis).astype(np.float64)
    hi = np.maximum.reduceat(w, starts, axis=axis).astype(np.float64)
    return compute_qparams(lo, hi, qtype, symmetric=symmetric, full_range=full_range)


# ---------------------------------------------------------------------------------------------- 4-bit packing
def pack_4bit(values, *, signed: bool | None = None) -> np.ndarray:
    """4-bit values packed as ONNX stores INT4 / UINT4: flattened (C order), two values a byte, the first in the
    low nibble; an odd count is padded with a 0 high nibble. Returns ``uint8`` of length ``ceil(n / 2)``.

    ``values`` must fit int4 (-8..7) when ``signed`` (default: when their dtype is signed) else uint4 (0..15);
    anything else raises ValueError rather than being truncated to its low 4 bits."""
    values = np.asarray(values)
    if values.dtype.kind not in "iu":
        raise ValueError(f"4-bit values must be integers, not {values.dtype}")
    signed = values.dtype.kind == "i" if signed is None else signed
    qtype = "int4" if signed else "uint4"
    _, qmin, qmax = INT_TYPES[qtype]
    flat = values.reshape(-1).astype(np.int64)
    if flat.size and (flat.min() < qmin or flat.max() > qmax):
        raise ValueError(f"values outside the {qtype} range [{qmin}, {qmax}]")
    nibbles = (flat & 0x0F).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8)


def unpack_4bit(packed, count: int, signed: bool) -> np.ndarray:
    """Inverse of :func:`pack_4bit`: the first ``count`` 4-bit values of ``packed`` (uint8, ``ceil(count / 2)``
    bytes), as int8 (``signed``, int4 sign-extended) or uint8 (uint4), flat."""
    packed = np.frombuffer(packed, dtype=np.uint8) if isinstance(packed, (bytes, bytearray)) else np.asarray(packed)
    if packed.dtype != np.uint8 or packed.ndim != 1:
        raise ValueError("packed 4-bit data must be a flat uint8 array")
    if count < 0 or packed.size != (count + 1) // 2:
        raise ValueError(f"{packed.size} bytes hold {2 * packed.size - 1} or {2 * packed.size} 4-bit values, "
                         f"not {count}")
    nibbles = np.empty(2 * packed.size, dtype=np.uint8)
    nibbles[0::2] = packed & 0x0F
    nibbles[1::2] = packed >> 4
    nibbles = nibbles[:count]
    if not signed:
        return nibbles
    return (nibbles.astype(np.int8) ^ np.int8(8)) - np.int8(8)  # sign-extend bit 3


def pack_2bit(values) -> np.ndarray:
    """int2 values (-2..1) packed as ONNX stores INT2: flattened (C order), four values a byte, the first in the
    lowest two bits; padded with 0. Returns ``uint8`` of length ``ceil(n / 4)``; values out of range raise."""
    flat = np.asarray(values).reshape(-1).astype(np.int64)
    if flat.size and (flat.min() < -2 or flat.max() > 1):
        raise ValueError("values outside the int2 range [-2, 1]")
    crumbs = np.zeros(-(-flat.size // 4) * 4, dtype=np.uint8)
    crumbs[:flat.size] = flat & 0x03
    return (crumbs[0::4] | (crumbs[1::4] << 2) | (crumbs[2::4] << 4) | (crumbs[3::4] << 6)).astype(np.uint8)


def make_initializer(name: str, values, qtype: str) -> TensorProto:
    """An ONNX initializer holding integer ``values`` as ``qtype`` (a name in :data:`INT_TYPES`), shape
    ``values.shape``. int4 / uint4 values (unpacked, in range) are packed with :func:`pack_4bit` into
    ``raw_data``; ``onnx.numpy_helper.to_array`` reads them back. Values outside ``qtype``'s range raise."""
    values = np.asarray(values)
    dtype, qmin, qmax = INT_TYPES[qtype]
    if values.dtype.kind not in "iu":
        raise ValueError(f"{qtype} values must be integers, not {values.dtype}")
    if values.size and (values.min() < qmin or values.max() > qmax):
        raise ValueError(f"values outside the {qtype} range [{qmin}, {qmax}]")
    if qtype in FOUR_BIT_TYPES:
        raw = pack_4bit(values, signed=qtype == "int4").tobytes()
    elif qtype == "int2":
        raw = pack_2bit(values).tobytes()
    else:
        raw = values.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    return helper.make_tensor(name, ONNX_TYPES[qtype], values.shape, raw, raw=True)


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
