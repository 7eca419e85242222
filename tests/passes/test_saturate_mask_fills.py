"""Softmax mask fills beyond float16's range clamp to ±16384 (known answers), and nothing else does."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import qpass
from qpass.passes.saturate_mask_fills import MASK_FILL, SaturateMaskFills

F = TensorProto.FLOAT
LOWEST = float(np.finfo(np.float32).min)  # -3.4028235e38, what exporters write for an additive mask


def _mask_model(tail: str = "softmax", fill_as: str = "constant") -> onnx.ModelProto:
    """y = tail(scores + Where(keep, 0, LOWEST)); the fill as a Constant node or an initializer."""
    ins = [helper.make_tensor_value_info("scores", F, [3, 4]), helper.make_tensor_value_info("keep", TensorProto.BOOL, [3, 4])]
    outs = [helper.make_tensor_value_info("y", F, [3, 4])]
    zero = numpy_helper.from_array(np.array(0.0, np.float32), "zero")
    fill = numpy_helper.from_array(np.array(LOWEST, np.float32), "fill")
    nodes = [helper.make_node("Where", ["keep", "zero", "fill"], ["mask"], name="where"),
             helper.make_node("Add", ["scores", "mask"], ["masked"], name="add")]
    inits = [zero]
    if fill_as == "constant":
        nodes.insert(0, helper.make_node("Constant", [], ["fill"], value=fill, name="fill_const"))
    else:
        inits.append(fill)
    if tail == "softmax":
        nodes.append(helper.make_node("Softmax", ["masked"], ["y"], axis=-1, name="softmax"))
    elif tail == "logsoftmax":
        nodes.append(helper.make_node("LogSoftmax", ["masked"], ["y"], axis=-1, name="logsoftmax"))
    else:  # softmax, and the mask itself also a graph output
        nodes.append(helper.make_node("Softmax", ["masked"], ["y"], axis=-1, name="softmax"))
        outs.append(helper.make_tensor_value_info("mask", F, [3, 4]))
    m = helper.make_model(helper.make_graph(nodes, "g", ins, outs, inits), opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def _feed(seed=0):
    rng = np.random.default_rng(seed)
    keep = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]], bool)  # the last row masked entirely
    return {"scores": rng.normal(0, 3, (3, 4)).astype(np.float32), "keep": keep}


def _run(m, feed):
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)


def _fill_value(m) -> float:
    for t in m.graph.initializer:
        if t.name == "fill":
            return float(numpy_helper.to_array(t))
    c = next(n for n in m.graph.node if n.output and n.output[0] == "fill")
    return float(numpy_helper.to_array(c.attribute[0].t))


def test_a_softmax_mask_fill_clamps_and_every_unmasked_row_is_unchanged():
    for fill_as in ("constant", "initializer"):
        model = _mask_model(fill_as=fill_as)
        feed = _feed()
        (want,) = _run(model, feed)
        out, res = SaturateMaskFills().apply(_mask_model(fill_as=fill_as))
        assert res.modified and res.stats["constants"] == ["fill"] and _fill_value(out) == -MASK_FILL
        (got,) = _run(out, feed)
        np.testing.assert_array_equal(got[:2], want[:2])  # exp(-16384 + s) is 0 in float32 as exp(-3.4e38) is
        s = feed["scores"][0, :2]
        np.testing.assert_allclose(got[0, :2], np.exp(s - s.max()) / np.exp(s - s.max()).sum(), rtol=1e-6)  # by hand
        s2 = feed["scores"][2]  # the row masked entirely: finite, the softmax of its raw scores (fp32: uniform)
        np.testing.assert_allclose(got[2], np.exp(s2 - s2.max()) / np.exp(s2 - s2.max()).sum(), rtol=5e-3)  # -16384 + s: ulp 0.002
        np.testing.assert_allclose(want[2], 0.25)


def test_a_fill_that_also_reaches_something_else_stays():
    for tail in ("logsoftmax", "output"):
        out, res = SaturateMaskFills().apply(_mask_model(tail))
        assert not res.modified and _fill_value(out) == LOWEST


def test_float16_mode_converts_the_masked_softmax_instead_of_keeping_it_float32():
    """Without the clamp the mask and the masked scores measure 3.4e38 and stay float32 behind Casts; with it the
    whole model runs in float16 and matches fp32 on every row with an unmasked entry."""
    model = _mask_model()
    samples = [_feed(i) for i in range(6)]
    res = qpass.quantize(model, samples, val=samples[:2], float_type="float16", latency=False, per_layer=False)
    half = res.report.calibration["half"]
    assert half["mask_fills_clamped"] == ["fill"] and half["measured_float32"] == {}
    assert not any(n.op_type == "Cast" and n.output[0] in ("mask", "masked") for n in res.model.graph.node)
    feed = _feed(7)
    (want,) = _run(model, feed)
    (got,) = _run(res.model, feed)
    np.testing.assert_allclose(got[:2], want[:2], atol=2e-3)
    assert np.all(np.isfinite(got))
    bf = qpass.quantize(model, samples, float_type="bfloat16", validate=False)
    assert bf.report.calibration["half"]["mask_fills_clamped"] == []  # bfloat16 holds float32's range


def test_weight_only_with_float16_clamps_the_fill_too():
    """int4 weight-only + float16: the MatMul's weight goes int4 and the masked Softmax runs in float16 (the fill
    clamped before the float remainder is measured), matching fp32 on the unmasked entries."""
    rng = np.random.default_rng(4)
    w = rng.normal(size=(8, 4)).astype(np.float32)
    ins = [helper.make_tensor_value_info("x", F, [1, 8]), helper.make_tensor_value_info("keep", TensorProto.BOOL, [1, 4])]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["scores"], name="mm"),
             helper.make_node("Where", ["keep", "zero", "fill"], ["mask"], name="where"),
             helper.make_node("Add", ["scores", "mask"], ["masked"], name="add"),
             helper.make_node("Softmax", ["masked"], ["y"], axis=-1, name="softmax")]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array(LOWEST, np.float32), "fill")]
    model = helper.make_model(helper.make_graph(nodes, "g", ins, [helper.make_tensor_value_info("y", F, [1, 4])], inits),
                              opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    keep = np.array([[1, 0, 1, 1]], bool)
    samples = [{"x": rng.normal(size=(1, 8)).astype(np.float32), "keep": keep} for _ in range(6)]
    res = qpass.quantize(model, samples, weight_only="int4", block_size=8, algorithm="rtn", float_type="float16",
                         validate=False)
    half = res.report.calibration["half"]
    assert half["mask_fills_clamped"] == ["fill"] and not {"mask", "masked"} & set(half["measured_float32"])
    (want,) = _run(model, samples[0])
    (got,) = _run(res.model, samples[0])
    assert got[0, 1] == 0.0 and np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, atol=0.1)  # int4 weights: the scores move by their rounding
    assert _fill_value(model) == LOWEST  # the input model is not written


def _mul_model(kind: str) -> onnx.ModelProto:
    """kind "mask": y = Softmax(scores + (1 - Cast(mask:int64)) * LOWEST), the older exporters' extended mask;
    kind "temperature": y = Softmax(scores * 1e5), a constant beyond float16's range that is not a mask."""
    ins = [helper.make_tensor_value_info("scores", F, [2, 4])]
    outs = [helper.make_tensor_value_info("y", F, [2, 4])]
    if kind == "mask":
        ins.append(helper.make_tensor_value_info("mask", TensorProto.INT64, [2, 4]))
        inits = [numpy_helper.from_array(np.array(1.0, np.float32), "one"),
                 numpy_helper.from_array(np.array(LOWEST, np.float32), "fill")]
        nodes = [helper.make_node("Cast", ["mask"], ["mf"], to=F),
                 helper.make_node("Sub", ["one", "mf"], ["inv"]),
                 helper.make_node("Mul", ["inv", "fill"], ["ext"]),
                 helper.make_node("Add", ["scores", "ext"], ["masked"]),
                 helper.make_node("Softmax", ["masked"], ["y"], axis=-1)]
    else:
        inits = [numpy_helper.from_array(np.array(1e5, np.float32), "fill")]
        nodes = [helper.make_node("Mul", ["scores", "fill"], ["hot"]),
                 helper.make_node("Softmax", ["hot"], ["y"], axis=-1)]
    m = helper.make_model(helper.make_graph(nodes, "g", ins, outs, inits), opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_a_mask_made_by_mul_clamps_and_a_temperature_does_not():
    model = _mul_model("mask")
    feed = {"scores": np.array([[0.5, -1.0, 2.0, 0.1], [1.0, 1.0, -3.0, 0.0]], np.float32),
            "mask": np.array([[1, 1, 0, 1], [1, 0, 0, 0]], np.int64)}
    (want,) = _run(model, feed)
    out, res = SaturateMaskFills().apply(_mul_model("mask"))
    assert res.stats["constants"] == ["fill"] and _fill_value(out) == -MASK_FILL
    np.testing.assert_array_equal(_run(out, feed)[0], want)
    out, res = SaturateMaskFills().apply(_mul_model("temperature"))
    assert not res.modified and _fill_value(out) == 1e5  # scores * 1e5 is a sharp Softmax, not a mask: left alone


def test_a_fill_also_read_inside_an_if_body_stays():
    """The fill feeds the masked Softmax and is also read by an If's branch (an outer-scope value): the pass does
    not follow bodies, so the fill is left as it is (clamping it would change the branch's output)."""
    model = _mask_model(fill_as="initializer")
    branch = helper.make_graph([helper.make_node("Identity", ["fill"], ["z_then"])], "then", [],
                               [helper.make_tensor_value_info("z_then", F, [])])
    other = helper.make_graph([helper.make_node("Identity", ["zero"], ["z_else"])], "else", [],
                              [helper.make_tensor_value_info("z_else", F, [])])
    model.graph.input.append(helper.make_tensor_value_info("c", TensorProto.BOOL, []))
    model.graph.node.append(helper.make_node("If", ["c"], ["z"], then_branch=branch, else_branch=other, name="if"))
    model.graph.output.append(helper.make_tensor_value_info("z", F, []))
    onnx.checker.check_model(model, full_check=True)
    out, res = SaturateMaskFills().apply(model)
    assert not res.modified and _fill_value(out) == LOWEST
