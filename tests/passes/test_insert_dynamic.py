"""Dynamic quantization: known answers computed with numpy from the ONNX definitions of DynamicQuantizeLinear and
MatMulInteger, the plan's specs, mixing with a static plan, and bad input."""
from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import qpass
from qpass import stages
from qpass.config import QuantConfig
from qpass.errors import ConfigError
from qpass.plan.spec import Override


def _model(opset: int = 17) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x [3, 8] -> MatMul(W1 [8, 6]) -> Relu -> Gemm(W2 [5, 6], transB, alpha 0.5, C [5], beta 2) -> y [3, 5]."""
    rng = np.random.default_rng(7)
    w1 = rng.normal(size=(8, 6)).astype(np.float32) * np.array([0.1, 1, 3, 0.5, 2, 0.05], np.float32)
    w2 = rng.normal(size=(5, 6)).astype(np.float32)
    c = rng.normal(size=(5,)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm"),
         helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("Gemm", ["r", "w2", "c"], ["y"], name="gemm", transB=1, alpha=0.5, beta=2.0)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 5])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(c, "c")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)]), {"w1": w1, "w2": w2, "c": c}


def _dynamic_quantize(x: np.ndarray) -> tuple[np.ndarray, np.float32, np.uint8]:
    """DynamicQuantizeLinear as the ONNX specification defines it (uint8, range widened to include 0)."""
    lo, hi = min(0.0, float(x.min())), max(0.0, float(x.max()))
    scale = np.float32((hi - lo) / 255.0)
    zp = np.uint8(np.clip(np.rint(0.0 - lo / scale), 0, 255))
    q = np.clip(np.rint(x / scale) + zp, 0, 255).astype(np.uint8)
    return q, scale, zp


def _int8_columns(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8, one scale per output column (max |w| / 127)."""
    scale = (np.abs(w).max(axis=1 - axis) / 127.0).astype(np.float32)
    shape = (1, -1) if axis == 1 else (-1, 1)
    return np.clip(np.rint(w / scale.reshape(shape)), -127, 127).astype(np.int32), scale


def _expected(x: np.ndarray, p: dict[str, np.ndarray]) -> np.ndarray:
    xq, xs, xz = _dynamic_quantize(x)
    w1q, s1 = _int8_columns(p["w1"], 1)
    h = ((xq.astype(np.int32) - int(xz)) @ w1q).astype(np.float32) * (xs * s1)
    r = np.maximum(h, 0)
    rq, rs, rz = _dynamic_quantize(r)
    w2q, s2 = _int8_columns(p["w2"], 0)  # W2 is [N, K] (transB): one scale per row
    acc = ((rq.astype(np.int32) - int(rz)) @ w2q.T).astype(np.float32)
    return acc * (rs * (s2 * np.float32(0.5))) + 2.0 * p["c"]


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as written
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


def test_known_answer_matmul_and_gemm():
    model, params = _model()
    result = qpass.quantize(model, dynamic=True, validate=False)
    ops = Counter(n.op_type for n in result.model.graph.node)
    assert ops["DynamicQuantizeLinear"] == 2 and ops["MatMulInteger"] == 2
    assert "QuantizeLinear" not in ops and "DequantizeLinear" not in ops and "MatMul" not in ops and "Gemm" not in ops
    assert all(n.domain in ("", "ai.onnx") for n in result.model.graph.node)
    weights = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
    assert {w.dtype for n, w in weights.items() if n.startswith(("w1", "w2")) and w.ndim == 2} == {np.dtype(np.int8)}
    x = np.random.default_rng(1).normal(size=(3, 8)).astype(np.float32) * 2 + 0.5
    want = _expected(x, params)
    got = _run(result.model, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # and it is not the float model's answer: the test would notice a float passthrough
    float_y = np.maximum(x @ params["w1"], 0) @ params["w2"].T * 0.5 + 2 * params["c"]
    assert np.abs(got - float_y).max() > 1e-4
    # onnxruntime's fused kernels (the default optimization level) give the same numbers
    fused = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(fused.run(None, {"x": x})[0], want, rtol=1e-4, atol=1e-4)


def test_needs_no_calibration_and_reports_the_plan():
    model, _ = _model()
    result = qpass.quantize(model, dynamic=True)  # validated on synthetic feeds
    assert result.report.calibration["samples"] == 0
    assert result.report.quantized_nodes == {"MatMul": 1, "Gemm": 1}
    tensors = result.report.plan["tensors"]
    assert set(tensors) == {"x", "r"}
    assert all(t["spec"]["dynamic"] and t["spec"]["dtype"] == "uint8" for t in tensors.values())
    assert result.report.validation["outputs"][0]["cosine_mean"] > 0.999


def test_per_tensor_weights_with_per_channel_off():
    model, _ = _model()
    result = qpass.quantize(model, dynamic=True, per_channel=False, validate=False)
    scales = [numpy_helper.to_array(i) for i in result.model.graph.initializer if i.name.endswith("_scale")]
    assert scales and all(s.size == 1 for s in scales)


def test_mixed_with_a_static_plan_through_an_override():
    """A static plan whose Gemm input is made dynamic by an override: the MatMul gets Q/DQ, the Gemm MatMulInteger."""
    model, params = _model()
    rng = np.random.default_rng(3)
    calib = [{"x": rng.normal(size=(3, 8)).astype(np.float32)} for _ in range(8)]
    cfg = QuantConfig(quantize_outputs=())
    prepared = stages.prepare(model, cfg)
    plan = stages.plan(prepared, cfg)
    assert "r" in plan.tensors and not plan.tensors["r"].spec.dynamic
    plan = replace(plan, overrides=(Override("tensor", "r", spec={"dynamic": True, "dtype": "uint8", "symmetric": False,
                                                                   "method": None}),))
    result = qpass.quantize(model, calib, plan=plan, config=cfg, validate=False)
    ops = Counter(n.op_type for n in result.model.graph.node)
    assert ops["DynamicQuantizeLinear"] == 1 and ops["MatMulInteger"] == 1
    assert ops["QuantizeLinear"] >= 1 and ops["MatMul"] == 1  # the static MatMul as DQ -> MatMul
    x = calib[0]["x"]
    float_y = np.maximum(x @ params["w1"], 0) @ params["w2"].T * 0.5 + 2 * params["c"]
    got = _run(result.model, x)
    assert np.abs(got - float_y).max() < 0.05 * np.abs(float_y).max()


def test_dynamic_with_weight_only_is_a_config_error():
    with pytest.raises(ConfigError, match="dynamic"):
        QuantConfig(dynamic=True, weight_only="int4")
    with pytest.raises(ConfigError, match="dynamic"):
        QuantConfig(dynamic="yes")
    with pytest.raises(ConfigError, match="float_type float16"):
        QuantConfig(dynamic=True, float_type="float16")


def test_opset_10_is_refused_with_the_reason():
    model, _ = _model(opset=10)
    with pytest.raises(qpass.errors.QpassError, match="opset >= 11"):
        qpass.quantize(model, dynamic=True, per_channel=False, validate=False)


def test_cli_runs_without_calibration_data(tmp_path):
    from qpass.cli import main
    model, _ = _model()
    src, out = tmp_path / "m.onnx", tmp_path / "m.dyn.onnx"
    onnx.save(model, src)
    assert main(["run", str(src), "--dynamic", "-o", str(out)]) == 0
    ops = {n.op_type for n in onnx.load(out).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops


def test_embedding_table_stored_int8_per_row():
    """Gather(E [10, 4], ids) -> MatMul(W [4, 3]): E stored int8 with one scale per row, the looked-up rows
    dequantized (max |row| / 127); the MatMul dynamic. Known answer from numpy."""
    rng = np.random.default_rng(5)
    table = (rng.normal(size=(10, 4)) * np.arange(1, 11)[:, None]).astype(np.float32)
    w = rng.normal(size=(4, 3)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Gather", ["E", "ids"], ["e"], name="embed"),
         helper.make_node("MatMul", ["e", "W"], ["y"], name="mm")],
        "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 3])],
        [numpy_helper.from_array(table, "E"), numpy_helper.from_array(w, "W")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    result = qpass.quantize(model, dynamic=True, validate=False)
    assert result.report.quantized_nodes == {"Gather": 1, "MatMul": 1}
    stored = [numpy_helper.to_array(i) for i in result.model.graph.initializer if i.dims == [10, 4]]
    assert len(stored) == 1 and stored[0].dtype == np.int8
    ids = np.array([[0, 9, 3], [5, 5, 1]], dtype=np.int64)
    row_scale = np.abs(table).max(axis=1) / 127.0
    rows = (np.rint(table / row_scale[:, None]) * row_scale[:, None]).astype(np.float32)[ids]
    xq, xs, xz = _dynamic_quantize(rows)
    wq, ws = _int8_columns(w, 1)
    want = ((xq.astype(np.int32) - int(xz)) @ wq).astype(np.float32) * (xs * ws)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    got = ort.InferenceSession(result.model.SerializeToString(), so,
                               providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    kept = qpass.quantize(model, dynamic=True, weight_only_embeddings=False, validate=False)
    assert kept.report.quantized_nodes == {"MatMul": 1}
