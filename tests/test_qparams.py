"""Property tests and known answers for qpass.qparams (range -> scale/zero point, quantize/dequantize).

The numeric truth is ONNX's own reference implementation (onnx.reference.ReferenceEvaluator) of
QuantizeLinear / DequantizeLinear at opset 13.
"""
from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from qpass.qparams import INT_TYPES, MIN_SCALE, compute_qparams, dequantize, qrange, quantize, weight_qparams

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
