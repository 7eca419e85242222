"""LowerToQOperator: exact op sequences, agreement with the QDQ model within one quantization step, idempotence."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import qpass
from qpass.graph import WorkingGraph
from qpass.pass_manager import PassContext
from qpass.passes.lower_qop import LowerToQOperator
from tests import builders


def _ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def _run(model: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)


def _both(model, feeds):
    qdq = qpass.quantize(model, feeds, format="qdq", val_fraction=0.0)
    qop = qpass.quantize(model, feeds, format="qop", val_fraction=0.0)
    return qdq.model, qop.model


def _step(model: onnx.ModelProto) -> float:
    """The largest output-side quantization step in the model: the tolerance for qop vs qdq."""
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    steps = [float(np.max(inits[n.input[1]])) for n in model.graph.node if n.op_type == "QuantizeLinear"]
    return max(steps)


def test_conv_with_quantized_output_becomes_qlinearconv_on_the_digits_model():
    qop = qpass.quantize(builders.DIGITS_MODEL, builders.DIGITS_CALIB, format="qop").model
    ops = _ops(qop)
    assert ops["QLinearConv"] == 2 and ops["Conv"] == 0
    conv = next(n for n in qop.graph.node if n.op_type == "QLinearConv")
    assert len(conv.input) == 9  # x, sx, zx, w, sw, zw, sy, zy, int32 bias
    inits = {t.name: t for t in qop.graph.initializer}
    assert inits[conv.input[3]].data_type == onnx.TensorProto.INT8
    assert inits[conv.input[8]].data_type == onnx.TensorProto.INT32
    assert len(inits[conv.input[4]].dims) == 1  # per-channel weight scale
    # the Relu after each Conv is dropped: its output zero point is 0 (uint8), so it clipped nothing
    assert ops["Relu"] == 1  # only the one after the first Gemm, which has no output Q to fold into
    assert all(n.domain in ("", "ai.onnx") for n in qop.graph.node)


@pytest.mark.parametrize("make, op", [(builders.matmul_model, "MatMulInteger"), (builders.gemm_model, "MatMulInteger"),
                                      (lambda: builders.gemm_model(trans_b=0, bias_shape=(1, 8)), "MatMulInteger"),
                                      (builders.conv_model, "ConvInteger")])
def test_integer_sequence_wiring(make, op):
    model = make()
    _, qop = _both(model, builders.feeds(model, 10))
    ops = _ops(qop)
    assert ops[op] == 1 and ops["Cast"] == 1 and ops["Mul"] == 1
    integer = next(n for n in qop.graph.node if n.op_type == op)
    producers = {o: n for n in qop.graph.node for o in n.output}
    assert producers[integer.input[0]].op_type == "QuantizeLinear"
    cast = next(n for n in qop.graph.node if n.op_type == "Cast")
    add = next((n for n in qop.graph.node if n.op_type == "Add" and integer.output[0] in n.input), None)
    if make is not builders.matmul_model:  # Gemm/Conv biases are added to the int32 accumulator
        assert add is not None and cast.input[0] == add.output[0]
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in qop.graph.initializer}
    assert inits[integer.input[3]].shape == () and inits[integer.input[3]] == 0  # one scalar weight zero point


@pytest.mark.parametrize("make", [builders.matmul_model, builders.gemm_model, builders.conv_model,
                                  lambda: builders.gemm_model(trans_b=0, bias_shape=(1, 8))])
def test_qop_agrees_with_qdq_within_one_quantization_step(make):
    model = make()
    feeds = builders.feeds(model, 10)
    qdq, qop = _both(model, feeds)
    for feed in builders.feeds(model, 4, seed=9):
        for a, b in zip(_run(qdq, feed), _run(qop, feed)):
            # no output Q in these models: both forms compute the same integer products, so they may differ
            # only by float rounding (far below one quantization step)
            assert np.max(np.abs(a - b)) <= 1e-4 * max(1.0, float(np.max(np.abs(a))))


def test_digits_qop_and_qdq_agree_within_one_output_step():
    feeds = builders.DIGITS_TEST
    qdq = qpass.quantize(builders.DIGITS_MODEL, builders.DIGITS_CALIB, format="qdq").model
    qop = qpass.quantize(builders.DIGITS_MODEL, builders.DIGITS_CALIB, format="qop").model
    x = np.load(feeds)["input"]
    a, b = _run(qdq, {"input": x})[0], _run(qop, {"input": x})[0]
    assert np.max(np.abs(a - b)) <= _step(qdq)
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.99


def test_second_lowering_changes_nothing():
    qop = qpass.quantize(builders.DIGITS_MODEL, builders.DIGITS_CALIB, format="qop").model
    wg = WorkingGraph(qop)
    before = wg.export().SerializeToString()
    result = LowerToQOperator().run(wg.graph, PassContext())
    assert not result.modified
    assert wg.export().SerializeToString() == before


def test_conv_transpose_stays_qdq_with_a_reason():
    model = builders.conv_transpose_model()
    r = qpass.quantize(model, builders.feeds(model, 10), format="qop")
    assert any("no integer ConvTranspose" in s["reason"] for s in r.report.skipped)
