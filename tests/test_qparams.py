"""Property tests and known answers for qpass.qparams (range -> scale/zero point, quantize/dequantize).

The numeric truth is ONNX's own reference implementation (onnx.reference.ReferenceEvaluator) of
QuantizeLinear / DequantizeLinear at opset 13, and at opset 21 for int4 / uint4 and block-wise scales.
"""
from __future__ import annotations

import functools
import warnings
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from qpass.qparams import (INT_TYPES, MIN_SCALE, ONNX_TYPES, block_qparams, blocked_shape, compute_qparams,
                           dequantize, make_initializer, pack_4bit, qrange, quantize, unpack_4bit, weight_qparams)

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
F32_MAX = float(np.finfo(np.float32).max)

#: (qtype, symmetric) combinations qpass uses: uint8 asymmetric activations, int8 symmetric weights,
#: and the two other combinations compute_qparams supports
MODES = [("uint8", False), ("int8", True), ("int8", False), ("uint8", True)]

finite32 = st.floats(allow_nan=False, allow_infinity=False, width=32)
finite64 = st.floats(allow_nan=False, allow_infinity=False)


def f32(lo: float, hi: float):
    """float32 values in [lo, hi] (the bounds rounded inwards to float32)."""
    a, b = np.float32(lo), np.float32(hi)
    if float(a) < lo:
        a = np.nextafter(a, np.float32(np.inf))
    if float(b) > hi:
        b = np.nextafter(b, np.float32(-np.inf))
    return st.floats(float(a), float(b), width=32)


@st.composite
def ranges(draw, elements=finite32):
    a, b = draw(elements), draw(elements)
    return (min(a, b), max(a, b))


def _zero_roundtrip(scale, zp) -> np.ndarray:
    return dequantize(quantize(np.float32(0.0), scale, zp), scale, zp)


# ---------------------------------------------------------------------------------------------- zero is exact
@pytest.mark.parametrize("qtype,symmetric", MODES)
@SETTINGS
@given(r=ranges())
@example(r=(-5.0, -2.0))      # all negative, does not contain 0
@example(r=(2.0, 3.0))        # all positive, does not contain 0
@example(r=(0.0, 0.0))
@example(r=(-1e-45, 1e-45))
@example(r=(-F32_MAX, F32_MAX))
@example(r=(-0.1, 12345.678))
def test_zero_is_exactly_representable_float32_ranges(qtype, symmetric, r):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an overflow while computing the scale is a failure too
        try:
            scale, zp = compute_qparams(r[0], r[1], qtype, symmetric=symmetric)
        except ValueError:
            # refusing a range whose grid does not fit float32 (near float32 max) is acceptable
            assert max(abs(r[0]), abs(r[1])) > 1e37, f"ordinary range {r} refused"
            return
    assert np.isfinite(scale) and scale > 0
    assert zp.dtype == INT_TYPES[qtype][0]
    assert quantize(np.float32(0.0), scale, zp) == zp
    out = _zero_roundtrip(scale, zp)
    assert out.dtype == np.float32 and out == 0.0 and not np.signbit(out)


@pytest.mark.parametrize("qtype,symmetric", MODES)
@SETTINGS
@given(r=ranges(finite64))
@example(r=(-1e300, 1e300))
@example(r=(-1e41, 0.0))
@example(r=(0.0, 1e39))
def test_zero_is_exactly_representable_or_range_refused_float64_ranges(qtype, symmetric, r):
    """Python floats are float64: a finite range beyond float32 must either work or be refused with
    ValueError, never give an inf scale (with which 0 dequantizes to NaN)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            scale, zp = compute_qparams(r[0], r[1], qtype, symmetric=symmetric)
        except ValueError:
            assert max(abs(r[0]), abs(r[1])) > 1e37, f"ordinary range {r} refused"
            return
        assert np.isfinite(scale) and scale > 0, f"range {r}: scale {scale}"
        assert _zero_roundtrip(scale, zp) == 0.0


# ---------------------------------------------------------------------------------------------- symmetric
@SETTINGS
@given(r=ranges())
def test_symmetric_int8_zero_point_is_zero(r):
    try:
        scale, zp = compute_qparams(r[0], r[1], "int8", symmetric=True)
    except ValueError:
        assert max(abs(r[0]), abs(r[1])) > 1e37, f"ordinary range {r} refused"
        return
    assert zp.dtype == np.int8 and zp == 0


def test_symmetric_int8_integer_range():
    assert qrange("int8", symmetric=True) == (-127, 127)
    assert qrange("int8", symmetric=False) == (-128, 127)
    assert qrange("uint8", symmetric=True) == (0, 255)
    assert qrange("int16", symmetric=True) == (-32767, 32767)


@SETTINGS
@given(w=hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=4, max_side=5),
                    elements=f32(-1e30, 1e30)),
       data=st.data())
@example(w=np.array([-1.0, 0.5], np.float32), data=None)
@example(w=np.array([-3.0, 3.0, -3.0], np.float32), data=None)
def test_symmetric_int8_weights_use_minus127_to_127(w, data):
    """A symmetric int8 weight never quantizes to -128, per tensor or per channel, and its extreme hits +-127."""
    axes = [None] + list(range(w.ndim))
    axis = data.draw(st.sampled_from(axes)) if data is not None else None
    scale, zp = weight_qparams(w, axis)
    assert np.all(zp == 0)
    q = quantize(w, scale, zp, axis=axis)
    assert q.min() >= -127 and q.max() <= 127
    # the extreme reaches 127 unless the scale was clamped up to MIN_SCALE (ranges below 127 * float32 tiny)
    if axis is None and np.abs(w).max() / 127 >= MIN_SCALE:
        assert np.abs(q.astype(np.int32)).max() == 127


# ---------------------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("qtype,symmetric", MODES)
@SETTINGS
@given(r=ranges(), data=st.data())
@example(r=(-1.0, 1.0), data=None)
@example(r=(-F32_MAX, F32_MAX), data=None)
@example(r=(-3.0e38, 3.0e38), data=None)
@example(r=(0.0, 1e-40), data=None)
def test_roundtrip_error_at_most_half_scale(qtype, symmetric, r, data):
    lo, hi = min(r[0], 0.0), max(r[1], 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            scale, zp = compute_qparams(r[0], r[1], qtype, symmetric=symmetric)
        except ValueError:
            # refusing a range whose grid does not fit float32 is acceptable; refusing an ordinary one is not
            assert max(-lo, hi) > 1e37, f"ordinary range {r} refused"
            return
    if data is None:
        xs = np.array([lo, hi, 0.0, np.float32(lo / 2), np.float32(hi / 3)], dtype=np.float32)
    else:
        xs = np.array(data.draw(st.lists(st.floats(lo, hi, width=32), min_size=1, max_size=20)) + [lo, hi],
                      dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an overflow to inf in dequantize is a failure
        back = dequantize(quantize(xs, scale, zp), scale, zp)
    s = float(scale)
    err = np.abs(back.astype(np.float64) - xs.astype(np.float64))
    # float32 rounding in x / scale, in the float32 scale itself and in q * scale
    tol = s / 2 * (1 + 1e-4) + 4 * 2.0**-24 * np.maximum(np.abs(xs.astype(np.float64)), max(-lo, hi)) + 1e-45
    bad = err > tol
    assert not bad.any(), (f"range {r} {qtype} sym={symmetric}: scale {s} zp {zp}: x {xs[bad]} -> {back[bad]} "
                           f"(error {err[bad]} > {s / 2})")


# ---------------------------------------------------------------------------------------------- per channel
@st.composite
def weights_and_axis(draw):
    w = draw(hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=4, max_side=5),
                        elements=f32(-1e6, 1e6)
                        | st.sampled_from([0.0, -0.0, 1e-45, -1e-45, 1e-40, 3.0])))
    axis = draw(st.integers(-w.ndim, w.ndim - 1))
    return w, axis


@SETTINGS
@given(wa=weights_and_axis())
@example(wa=(np.zeros((3, 2, 2), np.float32), 0))
@example(wa=(np.array([[1.0, -2.0], [0.5, 0.25]], np.float32), 0))
@example(wa=(np.array([[1.0, -2.0], [0.5, 0.25]], np.float32), -1))
@example(wa=(np.array([4.0, -1e-45, 0.0], np.float32), 0))
def test_per_channel_equals_per_tensor_on_each_slice(wa):
    w, axis = wa
    scale, zp = weight_qparams(w, axis)
    n = w.shape[axis]
    assert scale.shape == (n,) and zp.shape == (n,) and scale.dtype == np.float32 and zp.dtype == np.int8
    q = quantize(w, scale, zp, axis=axis)
    assert q.shape == w.shape and q.dtype == np.int8
    for c in range(n):
        part = np.take(w, c, axis=axis)
        s_c, z_c = weight_qparams(part, None)
        assert scale[c] == s_c and zp[c] == z_c, f"channel {c}"
        np.testing.assert_array_equal(np.take(q, c, axis=axis), quantize(part, scale[c], zp[c]))
        np.testing.assert_array_equal(
            np.take(dequantize(q, scale, zp, axis=axis), c, axis=axis),
            dequantize(np.take(q, c, axis=axis), scale[c], zp[c]))


def test_per_channel_known_answer():
    w = np.array([[1.0, -2.0], [0.5, 0.25]], np.float32)
    scale, zp = weight_qparams(w, 0)
    np.testing.assert_array_equal(scale, np.float32([2.0 / 127, 0.5 / 127]))
    np.testing.assert_array_equal(zp, np.int8([0, 0]))
    np.testing.assert_array_equal(quantize(w, scale, zp, axis=0), np.int8([[64, -127], [127, 64]]))
    scale1, _ = weight_qparams(w, 1)
    np.testing.assert_array_equal(scale1, np.float32([1.0 / 127, 2.0 / 127]))
    s_t, z_t = weight_qparams(w, None)
    assert s_t == np.float32(2.0 / 127) and z_t == 0 and s_t.shape == ()


# ---------------------------------------------------------------------------------------------- scale sanity
@pytest.mark.parametrize("qtype,symmetric", MODES)
@pytest.mark.parametrize("r", [(0.0, 0.0), (-0.0, 0.0), (1e-45, 1e-45), (-1e-45, 0.0), (0.0, 1e-45), (-1e-45, 1e-45),
                               (1e-40, 2e-40), (-1e-38, 1e-38), (5.0, 5.0), (-7.0, -7.0), (1e-300, 1e-300)])
def test_scale_never_zero_nan_or_inf(qtype, symmetric, r):
    scale, zp = compute_qparams(r[0], r[1], qtype, symmetric=symmetric)
    assert scale.dtype == np.float32
    assert np.isfinite(scale) and scale > 0 and scale >= MIN_SCALE
    assert np.isfinite(np.float32(1.0) / scale)
    assert _zero_roundtrip(scale, zp) == 0.0


def test_zero_range_gets_scale_one():
    for qtype, symmetric in MODES:
        scale, zp = compute_qparams(0.0, 0.0, qtype, symmetric=symmetric)
        assert scale == 1.0


@pytest.mark.parametrize("shape,axis", [((4, 3, 3, 3), 0), ((4, 3, 3, 3), None), ((16, 8), 1), ((3,), 0),
                                        ((0, 4), 1), ((4, 0), 0), ((0,), None)])
def test_all_zero_and_empty_weights(shape, axis):
    w = np.zeros(shape, np.float32)
    scale, zp = weight_qparams(w, axis)
    assert np.all(np.isfinite(scale)) and np.all(scale > 0) and np.all(zp == 0)
    if axis is not None:
        assert scale.shape == (shape[axis],)
    q = quantize(w, scale, zp, axis=axis)
    assert np.all(q == 0)
    assert np.all(dequantize(q, scale, zp, axis=axis) == 0.0)


def test_tiny_weight():
    w = np.array([1e-45, -1e-45, 0.0], np.float32)
    scale, zp = weight_qparams(w, None)
    assert np.isfinite(scale) and scale >= MIN_SCALE
    scale_c, zp_c = weight_qparams(w, 0)
    assert np.all(np.isfinite(scale_c)) and np.all(scale_c >= MIN_SCALE)


# ---------------------------------------------------------------------------------------------- non-finite
@pytest.mark.parametrize("qtype,symmetric", MODES)
@pytest.mark.parametrize("r", [(np.nan, 1.0), (0.0, np.nan), (-np.inf, 1.0), (0.0, np.inf), (-np.inf, np.inf),
                               (np.nan, np.nan)])
def test_non_finite_range_raises(qtype, symmetric, r):
    with pytest.raises(ValueError):
        compute_qparams(r[0], r[1], qtype, symmetric=symmetric)


def test_non_finite_per_channel_range_raises():
    with pytest.raises(ValueError):
        compute_qparams(np.array([-1.0, np.nan]), np.array([1.0, 2.0]), "int8", symmetric=True)
    with pytest.raises(ValueError):
        compute_qparams(np.array([-1.0, 0.0]), np.array([1.0, np.inf]), "uint8", symmetric=False)


@pytest.mark.parametrize("axis", [None, 0])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weight_raises(axis, bad):
    w = np.array([[1.0, 2.0], [3.0, bad]], np.float32)
    with pytest.raises(ValueError):
        weight_qparams(w, axis)


# ---------------------------------------------------------------------------------------------- saturation
@pytest.mark.filterwarnings("ignore:overflow encountered in divide:RuntimeWarning")  # float32 max / scale -> inf
@pytest.mark.parametrize("qtype,symmetric", MODES)
def test_saturation(qtype, symmetric):
    scale, zp = compute_qparams(-1.0, 1.0, qtype, symmetric=symmetric)
    info = np.iinfo(INT_TYPES[qtype][0])
    x = np.array([1e30, F32_MAX, np.inf, 1000.0, 2.0], np.float32)
    np.testing.assert_array_equal(quantize(x, scale, zp), np.full(5, info.max, dtype=INT_TYPES[qtype][0]))
    np.testing.assert_array_equal(quantize(-x, scale, zp), np.full(5, info.min, dtype=INT_TYPES[qtype][0]))


def test_saturation_per_channel():
    scale = np.float32([0.5, 1e-3])
    zp = np.uint8([10, 200])
    x = np.array([[1e9, -1e9, 0.0], [1e9, -1e9, 0.0]], np.float32)
    np.testing.assert_array_equal(quantize(x, scale, zp, axis=0), np.uint8([[255, 0, 10], [255, 0, 200]]))


def test_int32_saturation():
    zp = np.int32(0)
    q = quantize(np.float32([1e30, -1e30, 3.0]), np.float32(1.0), zp)
    np.testing.assert_array_equal(q, np.int32([2**31 - 1, -(2**31), 3]))


# ---------------------------------------------------------------------------------------------- rounding
def test_round_half_to_even():
    x = np.float32([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, 0.49999997, 127.5, 126.5])
    np.testing.assert_array_equal(quantize(x, np.float32(1.0), np.int8(0)),
                                  np.int8([0, 2, 2, 4, 0, -2, -2, 0, 127, 126]))
    # rounding happens before the zero point is added (as in ONNX): 0.5 + 3 -> 3, not round(3.5) = 4
    np.testing.assert_array_equal(quantize(np.float32([0.5, 1.5]), np.float32(1.0), np.uint8(3)), np.uint8([3, 5]))
    # with a non-unit scale whose ties are exact in float32
    np.testing.assert_array_equal(quantize(np.float32([0.125, 0.375, 0.625]), np.float32(0.25), np.uint8(128)),
                                  np.uint8([128, 130, 130]))


def test_qparams_known_answers():
    s, z = compute_qparams(0.0, 255.0, "uint8", symmetric=False)
    assert s == 1.0 and z == 0 and z.dtype == np.uint8
    s, z = compute_qparams(-128.0, 127.0, "int8", symmetric=False)
    assert s == 1.0 and z == 0 and z.dtype == np.int8
    s, z = compute_qparams(-1.0, 1.0, "int8", symmetric=True)
    assert s == np.float32(1 / 127) and z == 0
    s, z = compute_qparams(-1.0, 1.0, "uint8", symmetric=False)
    assert s == np.float32(2 / 255) and z == 127  # 1 / float32(2/255) = 127.4999..., rounds to 127
    s, z = compute_qparams(2.0, 3.0, "uint8", symmetric=False)  # widened to [0, 3]
    assert s == np.float32(3 / 255) and z == 0
    s, z = compute_qparams(-3.0, -2.0, "uint8", symmetric=False)  # widened to [-3, 0]
    assert s == np.float32(3 / 255) and z == 255
    s, z = compute_qparams(-2.0, 1.0, "uint8", symmetric=True)  # zero at the middle
    assert s == np.float32(2 / 127.5) and z == 128
    s, z = compute_qparams(np.array([-1.0, 0.0]), np.array([1.0, 0.0]), "int8", symmetric=True)
    np.testing.assert_array_equal(s, np.float32([1 / 127, 1.0]))
    np.testing.assert_array_equal(z, np.int8([0, 0]))


def test_dequantize_known_answers():
    np.testing.assert_array_equal(dequantize(np.uint8([0, 128, 255]), np.float32(0.5), np.uint8(128)),
                                  np.float32([-64.0, 0.0, 63.5]))
    np.testing.assert_array_equal(dequantize(np.int32([-(2**31), 5, 2**31 - 1]), np.float32(1.0)),
                                  np.float32([-(2.0**31), 5.0, 2.0**31]))
    np.testing.assert_array_equal(
        dequantize(np.int8([[1, 2], [3, 4]]), np.float32([1.0, 0.5]), np.int8([0, 2]), axis=1),
        np.float32([[1.0, 0.0], [3.0, 1.0]]))


# ---------------------------------------------------------------------------------------------- ONNX reference
_NP_TO_ONNX = {np.dtype(np.uint8): TensorProto.UINT8, np.dtype(np.int8): TensorProto.INT8,
               np.dtype(np.int32): TensorProto.INT32, np.dtype(np.float32): TensorProto.FLOAT}


@functools.lru_cache(maxsize=None)
def _has_reference_dequantize_13() -> bool:
    from onnx.reference.ops import load_op

    try:
        load_op("", "DequantizeLinear", 13)
    except Exception:  # noqa: BLE001 - "No implementation for operator ..."
        return False
    return True


@functools.lru_cache(maxsize=None)
def _reference(op: str, in_dtype: str, zp_dtype: str | None, axis: int | None) -> ReferenceEvaluator:
    inputs = [helper.make_tensor_value_info("x", _NP_TO_ONNX[np.dtype(in_dtype)], None),
              helper.make_tensor_value_info("scale", TensorProto.FLOAT, None)]
    names = ["x", "scale"]
    if zp_dtype is not None:
        inputs.append(helper.make_tensor_value_info("zp", _NP_TO_ONNX[np.dtype(zp_dtype)], None))
        names.append("zp")
    out_type = TensorProto.FLOAT if op == "DequantizeLinear" else _NP_TO_ONNX[np.dtype(zp_dtype or "uint8")]
    kw = {} if axis is None else {"axis": axis}
    node = helper.make_node(op, names, ["y"], **kw)
    graph = helper.make_graph([node], "ref", inputs, [helper.make_tensor_value_info("y", out_type, None)])
    # onnx's reference implements QuantizeLinear from opset 10 but DequantizeLinear only from opset 19
    # (whose semantics for integer inputs, float32 scales and optional axis are the opset-13 ones)
    opset = 19 if op == "DequantizeLinear" and not _has_reference_dequantize_13() else 13
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return ReferenceEvaluator(model)


def _ref_run(op, x, scale, zp, axis):
    ev = _reference(op, x.dtype.str, None if zp is None else zp.dtype.str, axis)
    feeds = {"x": x, "scale": scale}
    if zp is not None:
        feeds["zp"] = zp
    return ev.run(None, feeds)[0]


def _assert_bit_equal(got: np.ndarray, want: np.ndarray, what: str):
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    if got.dtype.kind == "f":
        got, want = got.view(np.uint32), want.view(np.uint32)
    bad = got != want
    assert not bad.any(), f"{what}: differs at {np.argwhere(bad)[:5].tolist()}: {got[bad][:5]} vs {want[bad][:5]}"


@st.composite
def quant_case(draw, per_axis: bool):
    """x (float32), scale (float32, from compute_qparams or drawn), zero point (uint8/int8), axis or None.

    |x / scale| stays below 1e8 so that the reference's float -> int32 cast is defined (it saturates
    nothing itself; qpass clips in float64, which is only the same for values that fit int32)."""
    x = draw(hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=4, max_side=5),
                        elements=f32(-1e3, 1e3)))
    qtype = draw(st.sampled_from(["uint8", "int8"]))
    dtype = INT_TYPES[qtype][0]
    axis = draw(st.integers(-x.ndim, x.ndim - 1)) if per_axis else None
    n = x.shape[axis] if per_axis else None
    how = draw(st.sampled_from(["qparams", "drawn", "pow2_ties"]))
    if how == "qparams":
        lo = draw(hnp.arrays(np.float64, n or (), elements=st.floats(-1e3, -1e-2)))
        hi = draw(hnp.arrays(np.float64, n or (), elements=st.floats(1e-2, 1e3)))
        scale, zp = compute_qparams(lo, hi, qtype, symmetric=draw(st.booleans()) and qtype == "int8")
    else:
        if how == "drawn":
            scale = draw(hnp.arrays(np.float32, n or (), elements=f32(1e-4, 10.0)))
        else:  # powers of two with x on exact .5 ties: checks the rounding mode bit-exactly
            scale = np.float32(2.0) ** draw(hnp.arrays(np.int32, n or (), elements=st.integers(-10, 3))).astype(np.float32)
            k = draw(hnp.arrays(np.int32, x.shape, elements=st.integers(-300, 300)))
            x = ((k.astype(np.float32) + np.float32(0.5)) * (scale if not per_axis else
                 scale.reshape([-1 if i == axis % x.ndim else 1 for i in range(x.ndim)]))).astype(np.float32)
        info = np.iinfo(dtype)
        zp = draw(hnp.arrays(dtype, n or (), elements=st.integers(info.min, info.max)))
    return x, np.asarray(scale, np.float32), np.asarray(zp, dtype), axis


@SETTINGS
@given(case=quant_case(per_axis=False))
def test_quantize_matches_onnx_reference_per_tensor(case):
    x, scale, zp, _ = case
    _assert_bit_equal(quantize(x, scale, zp), _ref_run("QuantizeLinear", x, scale, zp, None), "QuantizeLinear")


@SETTINGS
@given(case=quant_case(per_axis=True))
def test_quantize_matches_onnx_reference_per_axis(case):
    x, scale, zp, axis = case
    _assert_bit_equal(quantize(x, scale, zp, axis=axis), _ref_run("QuantizeLinear", x, scale, zp, axis),
                      f"QuantizeLinear axis={axis}")


@SETTINGS
@given(case=quant_case(per_axis=False))
def test_dequantize_matches_onnx_reference_per_tensor(case):
    x, scale, zp, _ = case
    q = quantize(x, scale, zp)
    _assert_bit_equal(dequantize(q, scale, zp), _ref_run("DequantizeLinear", q, scale, zp, None), "DequantizeLinear")


@SETTINGS
@given(case=quant_case(per_axis=True))
def test_dequantize_matches_onnx_reference_per_axis(case):
    x, scale, zp, axis = case
    q = quantize(x, scale, zp, axis=axis)
    _assert_bit_equal(dequantize(q, scale, zp, axis=axis), _ref_run("DequantizeLinear", q, scale, zp, axis),
                      f"DequantizeLinear axis={axis}")


@SETTINGS
@given(q=hnp.arrays(np.int32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=6),
                    elements=st.integers(-(2**31), 2**31 - 1)),
       scale=f32(1e-12, 10.0), with_zp=st.booleans())
def test_dequantize_int32_matches_onnx_reference(q, scale, with_zp):
    """Bias-style int32 DequantizeLinear (zero point 0 or absent, as opset 13 requires for int32)."""
    s = np.float32(scale)
    zp = np.zeros((), np.int32) if with_zp else None
    _assert_bit_equal(dequantize(q, s, zp), _ref_run("DequantizeLinear", q, s, zp, None), "DequantizeLinear int32")


@SETTINGS
@given(q=hnp.arrays(np.int32, st.tuples(st.integers(1, 5), st.integers(1, 5)),
                    elements=st.integers(-(2**31), 2**31 - 1)),
       data=st.data())
def test_dequantize_int32_per_axis_matches_onnx_reference(q, data):
    scale = data.draw(hnp.arrays(np.float32, q.shape[0], elements=f32(1e-12, 10.0)))
    zp = np.zeros(q.shape[0], np.int32)
    _assert_bit_equal(dequantize(q, scale, zp, axis=0), _ref_run("DequantizeLinear", q, scale, zp, 0),
                      "DequantizeLinear int32 axis=0")


def test_reference_saturation_agrees_within_int32():
    """Saturation against the reference, for values whose x/scale still fits int32."""
    x = np.float32([1e6, -1e6, 300.0, -300.0, 0.0])
    for zp in (np.uint8(7), np.int8(-3)):
        _assert_bit_equal(quantize(x, np.float32(0.5), zp),
                          _ref_run("QuantizeLinear", x, np.float32(0.5), zp, None), f"saturation {zp.dtype}")


# ============================================================================================== int4 / uint4
#: the 4-bit (qtype, symmetric) combinations; values are held unpacked in int8 / uint8
MODES4 = [("int4", True), ("int4", False), ("uint4", False), ("uint4", True)]


def test_4bit_types_and_ranges():
    assert INT_TYPES["int4"] == (np.int8, -8, 7) and INT_TYPES["uint4"] == (np.uint8, 0, 15)
    assert ONNX_TYPES["int4"] == TensorProto.INT4 and ONNX_TYPES["uint4"] == TensorProto.UINT4
    assert qrange("int4", symmetric=True) == (-7, 7)
    assert qrange("int4", symmetric=False) == (-8, 7)
    assert qrange("uint4", symmetric=True) == (0, 15)
    assert qrange("uint4", symmetric=False) == (0, 15)


def test_4bit_qparams_known_answers():
    s, z = compute_qparams(-1.0, 1.0, "int4", symmetric=True)
    assert s == np.float32(1 / 7) and z == 0 and z.dtype == np.int8
    s, z = compute_qparams(-8.0, 7.0, "int4", symmetric=False)
    assert s == 1.0 and z == 0 and z.dtype == np.int8
    s, z = compute_qparams(0.0, 15.0, "uint4", symmetric=False)
    assert s == 1.0 and z == 0 and z.dtype == np.uint8
    s, z = compute_qparams(-3.0, 0.0, "uint4", symmetric=False)  # all-negative range: zero at the top
    assert s == np.float32(3 / 15) and z == 15
    s, z = compute_qparams(-1.0, 1.0, "uint4", symmetric=False)
    assert s == np.float32(2 / 15) and z == 7  # 1 / float32(2/15) = 7.4999996, rounds to 7
    s, z = compute_qparams(-2.0, 1.0, "uint4", symmetric=True)  # zero at the middle
    assert s == np.float32(2 / 7.5) and z == 8
    w = np.array([[3.5, -7.0], [1.75, -0.5]], np.float32)
    scale, zp = weight_qparams(w, 0, "int4")
    np.testing.assert_array_equal(scale, np.float32([1.0, 0.25]))
    assert zp.dtype == np.int8 and np.all(zp == 0)
    # 3.5 is a tie: rounds to even 4
    np.testing.assert_array_equal(quantize(w, scale, zp, axis=0, qtype="int4"), np.int8([[4, -7], [7, -2]]))


@pytest.mark.parametrize("qtype,symmetric", MODES4)
@SETTINGS
@given(r=ranges(), data=st.data())
@example(r=(-1.0, 1.0), data=None)
@example(r=(0.0, 0.0), data=None)
@example(r=(2.0, 3.0), data=None)
@example(r=(-1e-45, 1e-45), data=None)
def test_4bit_zero_exact_and_roundtrip_error_at_most_half_scale(qtype, symmetric, r, data):
    lo, hi = min(r[0], 0.0), max(r[1], 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            scale, zp = compute_qparams(r[0], r[1], qtype, symmetric=symmetric)
        except ValueError:
            assert max(-lo, hi) > 1e37, f"ordinary range {r} refused"
            return
    qmin, qmax = INT_TYPES[qtype][1:]
    assert zp.dtype == INT_TYPES[qtype][0] and qmin <= zp <= qmax
    assert quantize(np.float32(0.0), scale, zp, qtype=qtype) == zp
    assert dequantize(quantize(np.float32(0.0), scale, zp, qtype=qtype), scale, zp) == 0.0
    if data is None:
        xs = np.array([lo, hi, 0.0, np.float32(lo / 2), np.float32(hi / 3)], dtype=np.float32)
    else:
        xs = np.array(data.draw(st.lists(st.floats(lo, hi, width=32), min_size=1, max_size=20)) + [lo, hi],
                      dtype=np.float32)
    q = quantize(xs, scale, zp, qtype=qtype)
    assert q.min() >= qmin and q.max() <= qmax
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = dequantize(q, scale, zp)
    s = float(scale)
    err = np.abs(back.astype(np.float64) - xs.astype(np.float64))
    tol = s / 2 * (1 + 1e-4) + 4 * 2.0**-24 * np.maximum(np.abs(xs.astype(np.float64)), max(-lo, hi)) + 1e-45
    assert not (err > tol).any(), f"{qtype} sym={symmetric} range {r}: {xs[err > tol]} -> {back[err > tol]}"


@pytest.mark.filterwarnings("ignore:overflow encountered in divide:RuntimeWarning")
@pytest.mark.parametrize("qtype,symmetric", MODES4)
def test_4bit_saturation(qtype, symmetric):
    scale, zp = compute_qparams(-1.0, 1.0, qtype, symmetric=symmetric)
    dtype, qmin, qmax = INT_TYPES[qtype]
    x = np.array([1e30, F32_MAX, np.inf, 1000.0, 2.0], np.float32)
    np.testing.assert_array_equal(quantize(x, scale, zp, qtype=qtype), np.full(5, qmax, dtype=dtype))
    np.testing.assert_array_equal(quantize(-x, scale, zp, qtype=qtype), np.full(5, qmin, dtype=dtype))


def test_4bit_needs_qtype_to_saturate_and_checks_the_zero_point():
    # without qtype, an int8-held zero point saturates to int8: the documented reason qtype= exists
    assert quantize(np.float32(100.0), np.float32(1.0), np.int8(0)) == 100
    assert quantize(np.float32(100.0), np.float32(1.0), np.int8(0), qtype="int4") == 7
    assert quantize(np.float32(-100.0), np.float32(1.0), np.uint8(3), qtype="uint4") == 0
    with pytest.raises(ValueError, match="held as int8"):
        quantize(np.float32(1.0), np.float32(1.0), np.int32(0), qtype="int4")
    with pytest.raises(ValueError, match="int4 range"):
        quantize(np.float32(1.0), np.float32(1.0), np.int8(8), qtype="int4")
    with pytest.raises(ValueError, match="uint4 range"):
        quantize(np.float32(1.0), np.float32([1.0, 1.0]), np.uint8([0, 16]), axis=0, qtype="uint4")


def test_4bit_round_half_to_even():
    x = np.float32([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 6.5, 7.5, -7.5, -8.5])
    np.testing.assert_array_equal(quantize(x, np.float32(1.0), np.int8(0), qtype="int4"),
                                  np.int8([0, 2, 2, 0, -2, -2, 6, 7, -8, -8]))
    np.testing.assert_array_equal(quantize(x, np.float32(1.0), np.uint8(8), qtype="uint4"),
                                  np.uint8([8, 10, 10, 8, 6, 6, 14, 15, 0, 0]))


# ---------------------------------------------------------------------------------------------- block-wise
def test_blocked_shape():
    assert blocked_shape((4, 40), 1, 16) == (4, 3)
    assert blocked_shape((4, 40), -1, 32) == (4, 2)
    assert blocked_shape((64, 7), 0, 16) == (4, 7)
    assert blocked_shape((33, 2, 5), 0, 32) == (2, 2, 5)
    assert blocked_shape((5,), 0, 8) == (1,)
    assert blocked_shape((0, 3), 0, 16) == (0, 3)
    for bad in (0, -16, True, 1.5):
        with pytest.raises(ValueError, match="block_size"):
            blocked_shape((4, 40), 1, bad)
    with pytest.raises(ValueError, match="axis 2 out of range"):
        blocked_shape((4, 40), 2, 16)
    with pytest.raises(ValueError, match="rank"):
        blocked_shape((), 0, 16)


def test_block_qparams_known_answer():
    # axis 1, block 2: blocks [3.5, -7], [14, 0.5], [7] (the last one shorter); scales exact in float32
    w = np.array([[3.5, -7.0, 14.0, 0.5, 7.0],
                  [0.0, 0.0, -7.0, 7.0, -1.75]], np.float32)
    scale, zp = weight_qparams(w, 1, "int4", block_size=2)
    np.testing.assert_array_equal(scale, np.float32([[1.0, 2.0, 1.0], [1.0, 1.0, 0.25]]))  # all-zero block: 1.0
    assert zp.shape == (2, 3) and zp.dtype == np.int8 and np.all(zp == 0)
    q = quantize(w, scale, zp, axis=1, block_size=2, qtype="int4")
    np.testing.assert_array_equal(q, np.int8([[4, -7, 7, 0, 7], [0, 0, -7, 7, -7]]))  # 3.5 ties to even 4
    np.testing.assert_array_equal(dequantize(q, scale, zp, axis=1, block_size=2),
                                  np.float32([[4.0, -7.0, 14.0, 0.0, 7.0], [0.0, 0.0, -7.0, 7.0, -1.75]]))
    # asymmetric uint4, axis 0, block 3 over 4 rows: rows 0-2 and row 3 (shorter)
    v = np.array([[3.0, 0.0], [-12.0, 0.0], [0.0, -7.5], [0.5, 7.5]], np.float32)
    s_a, z_a = block_qparams(v, 0, 3, "uint4", symmetric=False)
    assert s_a.shape == (2, 2) and z_a.dtype == np.uint8
    np.testing.assert_array_equal(s_a, np.float32([[1.0, 0.5], [0.5 / 15, 0.5]]))
    np.testing.assert_array_equal(z_a, np.uint8([[12, 15], [0, 0]]))
    np.testing.assert_array_equal(quantize(v, s_a, z_a, axis=0, block_size=3, qtype="uint4"),
                                  np.uint8([[15, 15], [0, 15], [12, 0], [15, 15]]))


@SETTINGS
@given(w=hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=9),
                    elements=f32(-1e6, 1e6) | st.sampled_from([0.0, -0.0, 1e-45, 3.0])),
       data=st.data())
def test_block_qparams_equal_per_tensor_on_each_block(w, data):
    axis = data.draw(st.integers(-w.ndim, w.ndim - 1))
    block = data.draw(st.integers(1, 10))
    qtype, symmetric = data.draw(st.sampled_from(MODES4 + MODES))
    scale, zp = block_qparams(w, axis, block, qtype, symmetric=symmetric)
    assert scale.shape == zp.shape == blocked_shape(w.shape, axis, block)
    assert scale.dtype == np.float32 and zp.dtype == INT_TYPES[qtype][0]
    if symmetric:
        s_w, z_w = weight_qparams(w, axis, qtype, block_size=block)
        np.testing.assert_array_equal(s_w, scale)
        np.testing.assert_array_equal(z_w, zp)
    q = quantize(w, scale, zp, axis=axis, block_size=block, qtype=qtype)
    ax = axis % w.ndim
    for b in range(scale.shape[ax]):
        part = np.take(w, np.arange(b * block, min((b + 1) * block, w.shape[ax])), axis=ax)
        s_b, z_b = np.take(scale, [b], axis=ax), np.take(zp, [b], axis=ax)
        # every position on the other axes is its own range
        want_s, want_z = compute_qparams(part.min(axis=ax, keepdims=True), part.max(axis=ax, keepdims=True),
                                         qtype, symmetric=symmetric)
        np.testing.assert_array_equal(s_b, want_s)
        np.testing.assert_array_equal(z_b, want_z)
        np.testing.assert_array_equal(np.take(q, np.arange(b * block, b * block + part.shape[ax]), axis=ax),
                                      quantize(part, np.broadcast_to(s_b, part.shape),
                                               np.broadcast_to(z_b, part.shape), qtype=qtype))


def test_block_equals_per_channel_when_one_block_covers_the_axis():
    w = np.random.default_rng(3).normal(size=(20, 6)).astype(np.float32)
    s_b, z_b = weight_qparams(w, 0, "int4", block_size=32)
    s_c, z_c = weight_qparams(w, 1, "int4")
    assert s_b.shape == (1, 6)
    np.testing.assert_array_equal(s_b[0], s_c)
    np.testing.assert_array_equal(z_b[0], z_c)
    np.testing.assert_array_equal(quantize(w, s_b, z_b, axis=0, block_size=32, qtype="int4"),
                                  quantize(w, s_c, z_c, axis=1, qtype="int4"))


@pytest.mark.parametrize("shape,axis", [((0, 40), 1), ((4, 0), 1), ((0,), 0)])
def test_block_qparams_empty(shape, axis):
    w = np.zeros(shape, np.float32)
    scale, zp = weight_qparams(w, axis, "int4", block_size=16)
    assert scale.shape == blocked_shape(shape, axis, 16)
    q = quantize(w, scale, zp, axis=axis, block_size=16, qtype="int4")
    assert q.shape == shape and dequantize(q, scale, zp, axis=axis, block_size=16).shape == shape


def test_block_shape_errors():
    w = np.zeros((4, 40), np.float32)
    with pytest.raises(ValueError, match="expected \\[4, 3\\]"):
        quantize(w, np.ones((4, 2), np.float32), np.zeros((4, 2), np.int8), axis=1, block_size=16)
    with pytest.raises(ValueError, match="expected \\[4, 3\\]"):
        dequantize(w.astype(np.int8), np.ones((12,), np.float32), axis=1, block_size=16)
    with pytest.raises(ValueError, match="expected \\[4, 3\\]"):  # the zero point is checked too
        dequantize(w.astype(np.int8), np.ones((4, 3), np.float32), np.zeros((3, 3), np.int8), axis=1, block_size=16)
    with pytest.raises(ValueError, match="needs an axis"):
        quantize(w, np.ones((4, 3), np.float32), np.zeros((4, 3), np.int8), block_size=16)
    with pytest.raises(ValueError, match="needs an axis"):
        block_qparams(w, None, 16)
    with pytest.raises(ValueError, match="block_size"):
        weight_qparams(w, 1, "int4", block_size=0)


@st.composite
def block_case(draw):
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=40))
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    block = draw(st.sampled_from([1, 2, 3, 7, 16, 32]))
    qtype, symmetric = draw(st.sampled_from(MODES4 + MODES))
    w = draw(hnp.arrays(np.float32, shape, elements=f32(-1e4, 1e4)
                        | st.sampled_from([0.0, 1e-45, -1e-40, 0.5, -3.0])))
    return w, axis, block, qtype, symmetric


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=block_case())
def test_block_roundtrip_error_at_most_half_scale(case):
    """Values inside each block's range come back within half that block's scale."""
    w, axis, block, qtype, symmetric = case
    scale, zp = block_qparams(w, axis, block, qtype, symmetric=symmetric)
    q = quantize(w, scale, zp, axis=axis, block_size=block, qtype=qtype)
    qmin, qmax = INT_TYPES[qtype][1:]
    assert q.dtype == INT_TYPES[qtype][0] and q.shape == w.shape and q.min() >= qmin and q.max() <= qmax
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = dequantize(q, scale, zp, axis=axis, block_size=block)
    ax = axis % w.ndim
    s = np.take(np.repeat(scale, block, axis=ax), np.arange(w.shape[ax]), axis=ax).astype(np.float64)
    err = np.abs(back.astype(np.float64) - w.astype(np.float64))
    tol = s / 2 * (1 + 1e-4) + 4 * 2.0**-24 * np.abs(w.astype(np.float64)) + 1e-45
    bad = err > tol
    assert not bad.any(), f"{qtype} sym={symmetric} axis={axis} block={block}: {w[bad]} -> {back[bad]} (scale {s[bad]})"


# ---------------------------------------------------------------------------------------------- 4-bit packing
def test_pack_4bit_known_answers():
    packed = pack_4bit(np.int8([1, -2, 7]))
    assert packed.dtype == np.uint8 and packed.tolist() == [0xE1, 0x07]  # first value in the low nibble, 0-padded
    assert pack_4bit([1, -2, 7]).tolist() == [0xE1, 0x07]
    assert pack_4bit(np.uint8([15, 0, 3, 12])).tolist() == [0x0F, 0xC3]
    assert pack_4bit(np.int8([-8, -1])).tolist() == [0xF8]
    assert pack_4bit(np.uint8([[1, 2], [3, 4]])).tolist() == [0x21, 0x43]  # C order
    assert pack_4bit([15, 9], signed=False).tolist() == [0x9F]
    assert pack_4bit(np.int8([])).tolist() == []
    np.testing.assert_array_equal(unpack_4bit(np.uint8([0xE1, 0x07]), 3, True), np.int8([1, -2, 7]))
    np.testing.assert_array_equal(unpack_4bit(bytes([0xE1, 0x07]), 4, False), np.uint8([1, 14, 7, 0]))
    np.testing.assert_array_equal(unpack_4bit(np.uint8([0xF8]), 2, True), np.int8([-8, -1]))


def test_pack_4bit_refuses_what_does_not_fit():
    with pytest.raises(ValueError, match="int4 range"):
        pack_4bit(np.int8([8]))
    with pytest.raises(ValueError, match="int4 range"):
        pack_4bit(np.int16([-9]))
    with pytest.raises(ValueError, match="uint4 range"):
        pack_4bit(np.uint8([16]))
    with pytest.raises(ValueError, match="uint4 range"):
        pack_4bit([-1], signed=False)
    with pytest.raises(ValueError, match="integers"):
        pack_4bit(np.float32([1.0]))
    with pytest.raises(ValueError, match="not 4"):
        unpack_4bit(np.uint8([1]), 4, True)
    with pytest.raises(ValueError, match="not 1"):
        unpack_4bit(np.uint8([1, 2]), 1, True)
    with pytest.raises(ValueError, match="flat uint8"):
        unpack_4bit(np.int8([1]), 2, True)


@SETTINGS
@given(qtype=st.sampled_from(["int4", "uint4"]), data=st.data())
def test_pack_4bit_roundtrip(qtype, data):
    dtype, qmin, qmax = INT_TYPES[qtype]
    v = data.draw(hnp.arrays(dtype, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=7),
                             elements=st.integers(qmin, qmax)))
    packed = pack_4bit(v)
    assert packed.dtype == np.uint8 and packed.size == (v.size + 1) // 2
    if v.size % 2:
        assert packed[-1] >> 4 == 0  # padding nibble is 0
    back = unpack_4bit(packed, v.size, qtype == "int4")
    assert back.dtype == dtype
    np.testing.assert_array_equal(back.reshape(v.shape), v)
    t = make_initializer("t", v, qtype)
    assert t.data_type == ONNX_TYPES[qtype] and tuple(t.dims) == v.shape and t.raw_data == packed.tobytes()
    arr = numpy_helper.to_array(t)
    assert arr.dtype == helper.tensor_dtype_to_np_dtype(ONNX_TYPES[qtype]) and arr.shape == v.shape
    np.testing.assert_array_equal(arr.astype(dtype), v)
    # onnx's own packing of the same values (from_array of its 4-bit numpy dtype) writes the same bytes
    assert numpy_helper.from_array(v.astype(arr.dtype)).raw_data == t.raw_data


def test_make_initializer():
    t = make_initializer("w", np.int8([[1, -2, 7], [-8, 0, 3]]), "int4")
    assert t.name == "w" and t.data_type == TensorProto.INT4 and list(t.dims) == [2, 3]
    assert t.raw_data == bytes([0xE1, 0x87, 0x30])
    t8 = make_initializer("w8", np.int8([[1, -2], [3, 4]]), "int8")
    assert t8.SerializeToString() == numpy_helper.from_array(np.int8([[1, -2], [3, 4]]), "w8").SerializeToString()
    np.testing.assert_array_equal(numpy_helper.to_array(make_initializer("u", np.uint16([1, 65535]), "uint16")),
                                  np.uint16([1, 65535]))
    with pytest.raises(ValueError, match="uint4 range"):
        make_initializer("u", np.uint8([16]), "uint4")
    with pytest.raises(ValueError, match="int8 range"):
        make_initializer("u", np.int32([200]), "int8")
    with pytest.raises(ValueError, match="integers"):
        make_initializer("u", np.float32([1.0]), "int4")


# ---------------------------------------------------------------------------------------------- ONNX reference, opset 21
def _np_onnx_dtype(qtype: str):
    """onnx's numpy dtype for ``qtype`` (for int4 / uint4 its own 4-bit dtype)."""
    return helper.tensor_dtype_to_np_dtype(ONNX_TYPES[qtype])


def _model21(op: str, qtype: str, x_shape, axis: int | None, block: int | None, inits) -> ReferenceEvaluator:
    """One QuantizeLinear (float32 input "x") or DequantizeLinear (initializer "x") node at opset 21 whose
    scale and zero point are the initializers "s" and "z"."""
    kw = {}
    if axis is not None:
        kw["axis"] = axis
    if block is not None:
        kw["block_size"] = block
    node = helper.make_node(op, ["x", "s", "z"], ["y"], **kw)
    if op == "QuantizeLinear":
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))]
        out = helper.make_tensor_value_info("y", ONNX_TYPES[qtype], list(x_shape))
    else:
        inputs = []
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x_shape))
    graph = helper.make_graph([node], "ref21", inputs, [out], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return ReferenceEvaluator(model)


def _params21(rng, qtype: str, shape, axis, block, how: str):
    """Scale (float32) and zero point (unpacked int8 / uint8) for per-tensor (axis None), per-axis (block None)
    or block-wise quantization, and an x of ``shape`` that also saturates."""
    dtype, qmin, qmax = INT_TYPES[qtype]
    pshape = () if axis is None else (shape[axis],) if block is None else blocked_shape(shape, axis, block)
    if how == "qparams":
        x = rng.normal(scale=3.0, size=shape).astype(np.float32)
        if axis is None:
            scale, zp = compute_qparams(x.min(), x.max(), qtype, symmetric=qtype == "int4")
        elif block is None:
            scale, zp = weight_qparams(x, axis, qtype)
        else:
            scale, zp = block_qparams(x, axis, block, qtype, symmetric=qtype == "int4")
        x = (x * np.float32(1.5)).astype(np.float32)  # a third of the range beyond: saturation
    else:  # powers of two with x on exact .5 ties (round half to even, bit for bit), and random zero points
        scale = (np.float32(2.0) ** rng.integers(-6, 3, size=pshape)).astype(np.float32)
        zp = rng.integers(qmin, qmax + 1, size=pshape).astype(dtype)
        full = scale if axis is None else (scale.reshape([-1 if i == axis % len(shape) else 1 for i in range(len(shape))])
                                           if block is None else
                                           np.take(np.repeat(scale, block, axis=axis), np.arange(shape[axis]), axis=axis))
        x = ((rng.integers(-12, 12, size=shape).astype(np.float32) + np.float32(0.5)) * full).astype(np.float32)
    return x, np.asarray(scale, np.float32), np.asarray(zp, dtype)


#: (shape, axis, block_size): per tensor, per axis, and block-wise with blocks of 16 and 32 on axis 0 and 1,
#: sizes divisible by the block and not (the last block shorter), and a block larger than the axis
CASES21 = [((6, 10), None, None), ((5, 7), 0, None), ((5, 7), 1, None), ((3, 4, 5), -1, None),
           ((40, 6), 0, 16), ((64, 3), 0, 16), ((5, 40), 1, 16), ((5, 48), 1, 16),
           ((70, 4), 0, 32), ((3, 64), 1, 32), ((3, 33), -1, 32), ((2, 33, 3), 1, 16), ((7, 5), 0, 32)]


@pytest.mark.parametrize("how", ["qparams", "ties"])
@pytest.mark.parametrize("shape,axis,block", CASES21)
@pytest.mark.parametrize("qtype", ["int4", "uint4"])
def test_4bit_matches_onnx_reference_opset21(qtype, shape, axis, block, how):
    rng = np.random.default_rng(zlib.crc32(repr((qtype, shape, axis, block, how)).encode()))
    x, scale, zp = _params21(rng, qtype, shape, axis, block, how)
    what = f"{qtype} shape={shape} axis={axis} block={block} {how}"
    q = quantize(x, scale, zp, axis=axis, block_size=block, qtype=qtype)
    s_init, z_init = numpy_helper.from_array(scale, "s"), make_initializer("z", zp, qtype)
    got = _model21("QuantizeLinear", qtype, shape, axis, block, [s_init, z_init]).run(None, {"x": x})[0]
    assert got.dtype == _np_onnx_dtype(qtype), f"{what}: reference returned {got.dtype}"
    _assert_bit_equal(q, got.astype(q.dtype), f"QuantizeLinear {what}")
    if how == "qparams":
        assert (q == INT_TYPES[qtype][2]).any() or (q == INT_TYPES[qtype][1]).any(), f"{what}: nothing saturated"
    ref_dq = _model21("DequantizeLinear", qtype, shape, axis, block, [make_initializer("x", q, qtype), s_init, z_init])
    _assert_bit_equal(dequantize(q, scale, zp, axis=axis, block_size=block), ref_dq.run(None, {})[0],
                      f"DequantizeLinear {what}")


@functools.lru_cache(maxsize=None)
def _reference21_fed(op: str, qtype: str, rank: int, axis: int, block: int) -> ReferenceEvaluator:
    """Block-wise QuantizeLinear / DequantizeLinear at opset 21 with x, scale and zero point all fed."""
    x_type = TensorProto.FLOAT if op == "QuantizeLinear" else ONNX_TYPES[qtype]
    out_type = ONNX_TYPES[qtype] if op == "QuantizeLinear" else TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("x", x_type, [None] * rank),
              helper.make_tensor_value_info("s", TensorProto.FLOAT, [None] * rank),
              helper.make_tensor_value_info("z", ONNX_TYPES[qtype], [None] * rank)]
    node = helper.make_node(op, ["x", "s", "z"], ["y"], axis=axis, block_size=block)
    graph = helper.make_graph([node], "ref21", inputs, [helper.make_tensor_value_info("y", out_type, [None] * rank)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return ReferenceEvaluator(model)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=block_case(), data=st.data())
def test_block_matches_onnx_reference_opset21(case, data):
    """Block-wise Q / DQ (4- and 8-bit, qparams from the data or drawn scales) bit for bit against the reference."""
    w, axis, block, qtype, symmetric = case
    dtype, qmin, qmax = INT_TYPES[qtype]
    if data.draw(st.booleans()):
        scale, zp = block_qparams(w, axis, block, qtype, symmetric=symmetric)
    else:
        pshape = blocked_shape(w.shape, axis, block)
        scale = data.draw(hnp.arrays(np.float32, pshape, elements=f32(1e-2, 100.0)))
        zp = data.draw(hnp.arrays(dtype, pshape, elements=st.integers(qmin, qmax)))
    x = (w * np.float32(data.draw(st.sampled_from([1.0, 1.5, 3.0])))).astype(np.float32)
    rank, ax = w.ndim, axis % w.ndim
    zp_onnx = zp.astype(_np_onnx_dtype(qtype))
    q = quantize(x, scale, zp, axis=axis, block_size=block, qtype=qtype)
    ref_q = _reference21_fed("QuantizeLinear", qtype, rank, ax, block).run(None, {"x": x, "s": scale, "z": zp_onnx})[0]
    _assert_bit_equal(q, ref_q.astype(dtype), f"QuantizeLinear {qtype} axis={axis} block={block}")
    ref_dq = _reference21_fed("DequantizeLinear", qtype, rank, ax, block).run(
        None, {"x": q.astype(_np_onnx_dtype(qtype)), "s": scale, "z": zp_onnx})[0]
    _assert_bit_equal(dequantize(q, scale, zp, axis=axis, block_size=block), ref_dq,
                      f"DequantizeLinear {qtype} axis={axis} block={block}")


def test_full_range_symmetric_uses_the_lowest_level_and_is_never_coarser():
    w = np.array([[-8.0, 7.0, 0.5], [1.0, -1.0, -0.25], [2.0, 3.5, 0.0], [3.0, -7.0, 0.1]], np.float32)
    full, zf = block_qparams(w, 0, 4, "int4", symmetric=True, full_range=True)
    plain, _ = block_qparams(w, 0, 4, "int4", symmetric=True)
    assert np.all(zf == 0) and np.all(full <= plain)
    assert full[0, 0] == np.float32(1.0) and full[0, 1] == np.float32(1.0)  # -8 -> level -8; +7 -> level 7
    q = quantize(w, full, zf, axis=0, block_size=4, qtype="int4")
    assert q[0, 0] == -8 and q[0, 1] == 7 and q.min() >= -8 and q.max() <= 7
    assert np.abs(dequantize(q, full, zf, axis=0, block_size=4) - w).max() <= full.max() / 2 + 1e-7
    # unsigned types and asymmetric specs are unaffected
    for qtype, sym in (("uint4", False), ("int4", False), ("uint8", True)):
        a = block_qparams(w, 0, 4, qtype, symmetric=sym, full_range=True)
        b = block_qparams(w, 0, 4, qtype, symmetric=sym)
        assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_quantize_a_block_of_rows_at_a_time_equals_whole(monkeypatch):
    """quantize() converts large tensors QUANTIZE_SLICE elements at a time: the same values as in one go, for per-
    channel scales on either axis, a per-tensor scale, int32 (bias) and block-wise int4."""
    from qpass import qparams

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((300, 70)) * 3).astype(np.float32)
    x.flat[::97] = 1e30  # saturates
    cases = []
    for axis, dtype in ((1, np.int8), (0, np.int8), (None, np.uint8), (0, np.int32)):
        n = 1 if axis is None else x.shape[axis]
        s = (rng.random(n) * 0.05 + 1e-3).astype(np.float32)
        z = (rng.integers(120, 130, n) if dtype == np.uint8 else rng.integers(-5, 5, n)).astype(dtype)
        cases.append(dict(scale=s[0] if axis is None else s, zero_point=z[0] if axis is None else z, axis=axis))
    cases.append(dict(scale=(rng.random((10, 70)) * 0.1 + 1e-3).astype(np.float32), zero_point=np.zeros((10, 70), np.int8),
                      axis=0, block_size=32, qtype="int4"))
    whole = [qparams.quantize(x, **c) for c in cases]
    monkeypatch.setattr(qparams, "QUANTIZE_SLICE", 150)  # a few rows at a time (two rows of 70)
    for c, w in zip(cases, whole):
        got = qparams.quantize(x, **c)
        assert got.dtype == w.dtype and np.array_equal(got, w)
    # and by hand: round half to even, then saturate
    got = qparams.quantize(np.array([[0.5, 1.5, -2.5], [1e9, -1e9, 0.25]] * 100, np.float32), np.float32(0.5), np.int8(0))
    assert got[:2].tolist() == [[1, 3, -5], [127, -128, 0]]
