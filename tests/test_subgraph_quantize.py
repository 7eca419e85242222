"""Static int8 inside If branches, end to end: the digits CNN's Conv stack in both branches of an If on an input flag."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import qpass
from qpass.runtime import make_session
from qpass.verify import verify_model

from .builders import DIGITS_CALIB, DIGITS_TEST
from .subgraph_models import digits_in_if, feeds


def _branches(model: onnx.ModelProto) -> dict[str, onnx.GraphProto]:
    node = next(n for n in model.graph.node if n.op_type == "If")
    return {a.name: a.g for a in node.attribute}


def _ops(g: onnx.GraphProto) -> list[str]:
    return [n.op_type for n in g.node]


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return digits_in_if()


@pytest.fixture(scope="module")
def calib() -> np.ndarray:
    return np.load(DIGITS_CALIB)["input"][:60]


def _top1_agreement(ref: onnx.ModelProto, quant: onnx.ModelProto, flag: bool) -> tuple[float, float, float]:
    test = np.load(DIGITS_TEST)
    x, labels = test["input"], test["label"]
    feed = {"input": x, "flag": np.array(flag)}
    a = make_session(ref).run(None, feed)[0].argmax(1)
    b = make_session(quant).run(None, feed)[0].argmax(1)
    return float((a == b).mean()), float((a == labels).mean()), float((b == labels).mean())


def test_both_branches_are_quantized_and_stay_close_to_fp32(model, calib):
    result = qpass.quantize(model, feeds(calib, [i % 2 == 0 for i in range(len(calib))]), per_layer=False,
                            latency=False)
    q = result.model
    onnx.checker.check_model(q, full_check=True)
    verify_model(q)
    assert result.report.quantized_nodes == {"Conv": 4, "Gemm": 4}
    labels = {n.node for n in result.plan.nodes}
    assert {"If_0/then//0/Conv", "If_0/else//0/Conv", "If_0/then//8/Gemm", "If_0/else//8/Gemm"} <= labels
    for name, g in _branches(q).items():
        ops = _ops(g)
        assert ops.count("QuantizeLinear") >= 4 and ops.count("DequantizeLinear") >= 8, name
        assert "Constant" not in [n.op_type for n in g.node if n.output[0].endswith("weight")], name
        int8 = [t for t in g.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2]
        assert len(int8) == 4, name  # the two Conv and two Gemm weights, per-channel int8, inside the branch
    assert not any(t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 2 for t in q.graph.initializer)
    assert result.passed
    for flag in (True, False):
        agree, acc_fp32, acc_q = _top1_agreement(model, q, flag)
        assert agree >= 0.98, (flag, agree)
        assert acc_q >= acc_fp32 - 0.02, (flag, acc_fp32, acc_q)


def test_a_branch_no_calibration_sample_takes_is_reported_and_left_in_float(model, calib):
    result = qpass.quantize(model, feeds(calib, [True] * len(calib)), per_layer=False, latency=False)
    q = result.model
    verify_model(q)
    assert result.report.quantized_nodes == {"Conv": 2, "Gemm": 2}
    branches = _branches(q)
    assert "QuantizeLinear" in _ops(branches["then_branch"])
    assert "QuantizeLinear" not in _ops(branches["else_branch"])
    assert "DequantizeLinear" not in _ops(branches["else_branch"])
    report = result.report.to_dict()
    assert report["calibration"]["branches_not_taken"] == ["If_0/else (4 tensor(s))"]
    reasons = [s["reason"] for p in report["passes"] for s in p["skipped"]]
    assert any("no calibration sample took that branch" in r and "If_0/else" in r for r in reasons), reasons
    left = [s for p in report["passes"] for s in p["skipped"] if s["node"].startswith("If_0/else/")]
    assert {s["node"] for s in left} >= {"If_0/else//0/Conv", "If_0/else//8/Gemm"}
    assert make_session(q).run(None, {"input": calib[:2], "flag": np.array(False)})[0].shape == (2, 10)


def test_a_saved_plan_of_nested_nodes_loads_and_gives_the_same_model(model, calib, tmp_path):
    data = feeds(calib, [i % 2 == 0 for i in range(len(calib))])
    first = qpass.quantize(model, data, per_layer=False, latency=False, save_plan=tmp_path / "plan.json")
    again = qpass.quantize(model, data, per_layer=False, latency=False, plan=tmp_path / "plan.json")
    assert again.plan.to_dict() == first.plan.to_dict()
    assert again.model.SerializeToString() == first.model.SerializeToString()


@pytest.mark.parametrize("kind", ["loop", "scan"])
def test_loop_and_scan_bodies_are_quantized_and_run(kind):
    from .subgraph_models import matmul_in_loop, matmul_in_scan

    rng = np.random.default_rng(7)
    if kind == "loop":
        model = matmul_in_loop()
        data = [{"x": rng.normal(size=(2, 8)).astype(np.float32)} for _ in range(20)]
    else:
        model = matmul_in_scan()[0]
        data = [{"x": rng.normal(size=(5, 1, 8)).astype(np.float32), "h0": np.zeros((1, 8), np.float32)}
                for _ in range(20)]
    result = qpass.quantize(model, data, per_layer=False, latency=False)
    q = result.model
    onnx.checker.check_model(q, full_check=True)
    verify_model(q)
    assert result.report.quantized_nodes == {"MatMul": 1}
    body = next(a.g for a in q.graph.node[-1].attribute if a.name == "body")
    ops = _ops(body)
    assert ops.count("QuantizeLinear") >= 1 and ops.count("DequantizeLinear") >= 2
    assert any(t.data_type == onnx.TensorProto.INT8 and list(t.dims) == [8, 8] for t in body.initializer)
    feed = data[0]
    a = np.concatenate([np.ravel(v) for v in make_session(model).run(None, feed)])
    b = np.concatenate([np.ravel(v) for v in make_session(q).run(None, feed)])
    assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.999
    assert result.passed
