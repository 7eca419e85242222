"""InsertQDQ: exact wiring per op, idempotence, and numerics on onnxruntime within a derived tolerance."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import qpass
from qpass.calib.table import CalibrationTable, TensorRange
from qpass.config import QuantConfig
from qpass.graph import WorkingGraph
from qpass.pass_manager import PassContext
from qpass.passes.insert_qdq import InsertQDQ
from qpass.plan.policy import build_plan
from qpass.qparams import compute_qparams, dequantize, quantize, weight_qparams
from tests import builders


def _by_output(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _attr(node: onnx.NodeProto, name: str, default=None):
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _table(**ranges) -> CalibrationTable:
    return CalibrationTable({k: TensorRange(lo, hi) for k, (lo, hi) in ranges.items()}, samples=1)


def _ctx(graph, table: CalibrationTable, config: QuantConfig | None = None) -> PassContext:
    """The plan of ``graph`` under ``config`` and the table: what the rewrite stage hands InsertQDQ."""
    return PassContext(build_plan(graph, config or QuantConfig(quantize_outputs=False)), table)


def _run_pass(model: onnx.ModelProto, table: CalibrationTable, config: QuantConfig | None = None):
    wg = WorkingGraph(onnx.shape_inference.infer_shapes(model))
    result = InsertQDQ().run(wg.graph, _ctx(wg.graph, table, config))
    return wg, result


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


# ------------------------------------------------------------------------------------------ wiring
def test_conv_wiring_weight_axis0_int32_bias():
    model = builders.conv_model()
    wg, result = _run_pass(model, _table(x=(-2.0, 3.0)))
    assert result.modified and result.stats == {"Conv": 1}
    out = wg.export()
    prod, inits = _by_output(out), _inits(out)
    conv = next(n for n in out.graph.node if n.op_type == "Conv")
    dq_x, dq_w, dq_b = (prod[i] for i in conv.input)
    assert [dq_x.op_type, dq_w.op_type, dq_b.op_type] == ["DequantizeLinear"] * 3
    # activation: x -> Q -> DQ, uint8 asymmetric from the calibrated range
    q_x = prod[dq_x.input[0]]
    assert q_x.op_type == "QuantizeLinear" and q_x.input[0] == "x"
    s_x, z_x = compute_qparams(-2.0, 3.0, "uint8", symmetric=False)
    assert inits[q_x.input[1]] == pytest.approx(s_x) and inits[q_x.input[2]] == z_x
    assert inits[q_x.input[2]].dtype == np.uint8
    # weight: int8, per output channel on axis 0, zero point 0
    w = numpy_helper.to_array(model.graph.initializer[0])
    assert _attr(dq_w, "axis") == 0
    wq, s_w, z_w = inits[dq_w.input[0]], inits[dq_w.input[1]], inits[dq_w.input[2]]
    assert wq.dtype == np.int8 and s_w.shape == (4,) and not z_w.any()
    np.testing.assert_array_equal(wq, quantize(w, *weight_qparams(w, 0), axis=0))
    assert np.abs(wq).max() == 127  # the channel maximum maps to the end of the symmetric range
    # bias: int32, scale = s_x * s_w per channel, zero point 0, axis 0 set explicitly
    b = numpy_helper.to_array(model.graph.initializer[1])
    bq, s_b, z_b = inits[dq_b.input[0]], inits[dq_b.input[1]], inits[dq_b.input[2]]
    assert bq.dtype == np.int32 and z_b.dtype == np.int32 and not z_b.any()
    np.testing.assert_allclose(s_b, s_x * s_w, rtol=1e-6)
    assert _attr(dq_b, "axis") == 0
    np.testing.assert_array_equal(bq, np.rint(b.astype(np.float64) / s_b.astype(np.float64)).astype(np.int32))
    # the float weight and bias are gone
    assert "W" not in inits and "B" not in inits


@pytest.mark.parametrize("trans_b, axis", [(1, 0), (0, 1)])
def test_gemm_weight_axis_follows_transB(trans_b, axis):
    model = builders.gemm_model(trans_b=trans_b)
    wg, _ = _run_pass(model, _table(x=(-1.0, 1.0)))
    out = wg.export()
    prod = _by_output(out)
    gemm = next(n for n in out.graph.node if n.op_type == "Gemm")
    dq_w = prod[gemm.input[1]]
    assert _attr(dq_w, "axis") == axis
    assert _inits(out)[dq_w.input[1]].shape == (8,)


def test_gemm_bias_of_shape_1xN_uses_axis_1():
    model = builders.gemm_model(bias_shape=(1, 8))
    wg, result = _run_pass(model, _table(x=(-1.0, 1.0)))
    out = wg.export()
    dq_c = _by_output(out)[next(n for n in out.graph.node if n.op_type == "Gemm").input[2]]
    assert dq_c.op_type == "DequantizeLinear" and _attr(dq_c, "axis") == 1
    assert not result.skipped


def test_matmul_weight_axis_is_last_and_act_x_act_skipped_with_reason():
    model = builders.matmul_model(act_x_act=True)
    wg, result = _run_pass(model, _table(x=(-1.0, 1.0)))
    out = wg.export()
    prod = _by_output(out)
    mm = next(n for n in out.graph.node if n.name == "matmul")
    assert _attr(prod[mm.input[1]], "axis") == 1
    act = next(n for n in out.graph.node if n.name == "matmul_act")
    assert all(i not in prod or prod[i].op_type != "DequantizeLinear" for i in act.input)
    assert [s.node for s in result.skipped] == ["matmul_act"]
    assert "activation x activation" in result.skipped[0].reason


def test_conv_transpose_weight_axis_is_1():
    model = builders.conv_transpose_model()
    wg, _ = _run_pass(model, _table(x=(-1.0, 1.0)))
    out = wg.export()
    deconv = next(n for n in out.graph.node if n.op_type == "ConvTranspose")
    dq_w = _by_output(out)[deconv.input[1]]
    assert _attr(dq_w, "axis") == 1 and _inits(out)[dq_w.input[1]].shape == (6,)


def test_per_tensor_config_writes_scalar_scales_without_axis():
    model = builders.conv_model()
    wg, _ = _run_pass(model, _table(x=(-1.0, 1.0)), QuantConfig(per_channel=False, quantize_outputs=False))
    out = wg.export()
    for n in out.graph.node:
        if n.op_type == "DequantizeLinear":
            assert _attr(n, "axis") is None
            assert _inits(out)[n.input[1]].shape == ()


def test_shared_activation_gets_one_qdq_pair():
    model = builders.matmul_model()
    # second MatMul reading the same x
    w2 = numpy_helper.from_array(np.ones((16, 8), np.float32), "W2")
    model.graph.initializer.append(w2)
    model.graph.node.append(onnx.helper.make_node("MatMul", ["x", "W2"], ["y2"], name="matmul2"))
    model.graph.output.append(onnx.helper.make_tensor_value_info("y2", onnx.TensorProto.FLOAT, ["N", 8]))
    wg, result = _run_pass(model, _table(x=(-1.0, 1.0)))
    out = wg.export()
    assert result.stats == {"MatMul": 2}
    assert sum(n.op_type == "QuantizeLinear" for n in out.graph.node) == 1


def test_missing_range_is_skipped_with_reason():
    wg, result = _run_pass(builders.conv_model(), _table())
    assert not result.modified
    assert "no calibration range" in result.skipped[0].reason


def test_excluded_node_is_skipped():
    wg, result = _run_pass(builders.conv_model(), _table(x=(-1.0, 1.0)), QuantConfig(exclude_nodes=("co.*",), quantize_outputs=False))
    assert not result.modified and result.skipped[0].reason == "excluded by configuration"


def test_bias_overflowing_int32_widens_that_channels_weight_scale():
    """|b| / (s_x * s_w) above 2**31-1 on channel 0: that channel's weight scale grows until the int32 bias fits
    (a float bias would be re-quantized by onnxruntime's optimizer, wrongly at 16-bit scales); the others keep theirs."""
    model = builders.conv_model()
    bias = np.array([2e7, 0.1, -0.2, 0.05], np.float32)
    for t in model.graph.initializer:
        if t.name == "B":
            t.CopyFrom(numpy_helper.from_array(bias, "B"))
    w = next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "W")
    wg, result = _run_pass(model, _table(x=(-1.0, 1.0)))
    out = wg.export()
    nodes, inits = _by_output(out), _inits(out)
    conv = next(n for n in out.graph.node if n.op_type == "Conv")
    w_dq, b_dq = nodes[conv.input[1]], nodes[conv.input[2]]
    s_w, s_b, b_q = inits[w_dq.input[1]], inits[b_dq.input[1]], inits[b_dq.input[0]]
    s_x, _ = compute_qparams(-1.0, 1.0, "uint8", symmetric=False)
    own, _ = weight_qparams(w, 0)
    assert s_w[0] > own[0] * 100 and np.array_equal(s_w[1:], own[1:])
    np.testing.assert_allclose(s_w[0], 2e7 / (s_x * (2**31 - 1)), rtol=1e-4)  # just wide enough
    assert b_q.dtype == np.int32 and np.abs(b_q.astype(np.int64)).max() <= 2**31 - 1
    np.testing.assert_allclose(s_b, (np.float64(s_x) * s_w.astype(np.float64)).astype(np.float32))
    np.testing.assert_allclose(b_q * s_b.astype(np.float64), bias, rtol=1e-6, atol=s_b.max())
    assert any("weight scale widened at 1 channel" in s.reason for s in result.skipped)
    assert not any("overflows int32" in s.reason for s in result.skipped)


# ------------------------------------------------------------------------------------------ idempotence
@pytest.mark.parametrize("make", [builders.conv_model, builders.gemm_model, builders.matmul_model,
                                  builders.conv_transpose_model])
def test_second_run_changes_nothing(make):
    wg, first = _run_pass(make(), _table(x=(-1.0, 1.0)))
    assert first.modified
    before = wg.export().SerializeToString()
    second = InsertQDQ().run(wg.graph, _ctx(wg.graph, _table(x=(-1.0, 1.0))))
    assert not second.modified and not second.skipped
    assert wg.export().SerializeToString() == before


# ------------------------------------------------------------------------------------------ numerics
def test_gemm_on_onnxruntime_within_the_quantization_error_bound():
    """|y_int8 - y_fp32| <= sum_k |x_k| dw_k + |w_k| dx + dx dw_k  (+ half a bias step), per element."""
    model = builders.gemm_model(trans_b=1)
    rng = np.random.default_rng(3)
    x = rng.uniform(-1.5, 2.0, (64, 16)).astype(np.float32)
    table = _table(x=(float(x.min()), float(x.max())))
    wg, _ = _run_pass(model, table)
    quantized = wg.export()
    y_ref = _session(model).run(None, {"x": x})[0]
    y_q = _session(quantized).run(None, {"x": x})[0]
    w = numpy_helper.to_array(model.graph.initializer[0])  # [8,16] (transB)
    s_x, _ = compute_qparams(x.min(), x.max(), "uint8", symmetric=False)
    s_w, _ = weight_qparams(w, 0)
    dx, dw = s_x / 2, s_w[:, None] / 2
    bound = np.abs(x).sum(1)[:, None] * dw[:, 0][None, :] + (np.abs(w).sum(1) * dx)[None, :] + (16 * dx * dw[:, 0])[None, :] + s_x * s_w / 2
    err = np.abs(y_q - y_ref)
    assert np.all(err <= bound * 1.001 + 1e-6), float((err - bound).max())
    assert err.max() > 0  # it really was quantized


def test_conv_on_onnxruntime_matches_the_qdq_simulation():
    """The quantized model computes exactly Conv(fakequant(x), dequant(Wq)) + dequant(Bq), up to float rounding."""
    model = builders.conv_model()
    x = np.random.default_rng(5).normal(0, 1, (2, 3, 8, 8)).astype(np.float32)
    wg, _ = _run_pass(model, _table(x=(float(x.min()), float(x.max()))))
    quantized = wg.export()
    inits = _inits(quantized)
    s_x, z_x = compute_qparams(x.min(), x.max(), "uint8", symmetric=False)
    x_sim = dequantize(quantize(x, s_x, z_x), s_x, z_x)
    sim = onnx.ModelProto()
    sim.CopyFrom(model)
    prod = _by_output(quantized)
    conv = next(n for n in quantized.graph.node if n.op_type == "Conv")
    dq_w, dq_b = prod[conv.input[1]], prod[conv.input[2]]
    w_sim = dequantize(inits[dq_w.input[0]], inits[dq_w.input[1]], inits[dq_w.input[2]], axis=0)
    b_sim = dequantize(inits[dq_b.input[0]], inits[dq_b.input[1]], inits[dq_b.input[2]], axis=0)
    del sim.graph.initializer[:]
    sim.graph.initializer.extend([numpy_helper.from_array(w_sim, "W"), numpy_helper.from_array(b_sim, "B")])
    y_sim = _session(sim).run(None, {"x": x_sim})[0]
    y_q = _session(quantized).run(None, {"x": x})[0]
    y_ref = _session(model).run(None, {"x": x})[0]
    np.testing.assert_allclose(y_q, y_sim, atol=1e-5, rtol=1e-5)
    assert np.abs(y_q - y_ref).max() > 0


def test_weights_in_constant_nodes_are_quantized():
    model = builders.conv_model(weight_as_constant_node=True)
    result = qpass.quantize(model, builders.feeds(model, 6))
    assert result.report.quantized_nodes == {"Conv": 1}
    assert not any(n.op_type == "Constant" for n in result.model.graph.node)
    assert any(t.data_type == onnx.TensorProto.INT8 for t in result.model.graph.initializer)


def test_float_bias_option_keeps_the_bias_initializer():
    model = builders.conv_model()
    wg, result = _run_pass(model, _table(x=(-1.0, 1.0)), QuantConfig(quantize_outputs=False, bias="float"))
    out = wg.export()
    conv = next(n for n in out.graph.node if n.op_type == "Conv")
    assert conv.input[2] == "B" and result.stats == {"Conv": 1}
    assert not any(t.data_type == onnx.TensorProto.INT32 for t in out.graph.initializer)
    with pytest.raises(qpass.errors.ConfigError):
        QuantConfig(bias="float", format="qop")


# ------------------------------------------------------------------------------------------ joins in int8
def test_joins_and_pooling_become_integer_kernels_in_onnxruntime(tmp_path):
    """The residual Add, the Concat and the GlobalAveragePool each read DQ and write Q, which onnxruntime's
    optimizer turns into QLinearAdd / QLinearConcat / QLinearGlobalAveragePool; without joins it cannot."""
    model = builders.residual_model()
    feeds = builders.feeds(model, n=16, seed=5, batch=1)
    fused = {}
    for label, ops in (("joins", None), ("no_joins", ())):
        kw = {} if ops is None else {"neighbour_ops": ops}
        res = qpass.quantize(model, feeds, val_fraction=0.25, **kw)
        assert {n.domain for n in res.model.graph.node} <= {"", "ai.onnx"}  # standard ops in the file
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = str(tmp_path / f"{label}.onnx")
        ort.InferenceSession(res.model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        fused[label] = {n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node}
        # still close to fp32 on the held-out samples
        assert min(o["cosine_min"] for o in res.report.validation["outputs"]) > 0.99
    assert {"QLinearAdd", "QLinearConcat", "QLinearGlobalAveragePool"} <= fused["joins"]
    assert not {"QLinearAdd", "QLinearConcat", "QLinearGlobalAveragePool"} & fused["no_joins"]


def test_second_run_on_a_graph_with_joins_changes_nothing():
    model = builders.residual_model()
    names = ["x", "r1", "c2", "a", "cc", "g", "z"]
    wg, first = _run_pass(model, _table(**{n: (-1.0, 2.0) for n in names}), QuantConfig())
    assert first.modified
    before = wg.export().SerializeToString()
    second = InsertQDQ().run(wg.graph, _ctx(wg.graph, _table(**{n: (-1.0, 2.0) for n in names}), QuantConfig()))
    assert not second.modified
    assert wg.export().SerializeToString() == before
