"""Empirical bias correction: a planted weight-rounding shift removed (known answer), sequential stages, the pass
on hand-written shift tables, and the mean observers."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import qpass
from qpass.calib.observers import make_observer
from qpass.calib.sources import keep_spread
from qpass.calib.stats import BiasShift, Statistics
from qpass.calib.table import CalibrationTable
from qpass.config import QuantConfig
from qpass.errors import ConfigError
from qpass.graph import WorkingGraph
from qpass.pass_manager import PassContext
from qpass.passes.bias_correction import BiasCorrection
from qpass.plan.spec import NodePlan, QuantPlan
from qpass.verify import verify_model

# 1x1 Conv, 2 input and 2 output channels. Per-channel int8 scales are max|w| / 127 = 0.01 for both rows, so
# w[0, 1] = 0.004 rounds to 0 (error +0.004) and w[1, 1] = 0.0165 rounds to 0.02 (error -0.0035); column 0 is
# exact. Input channel 1 is the constant 2.0 and every input value is a multiple of 0.01 in [0, 2.55], so with
# min-max the uint8 input grid (scale 0.01, zero point 0) holds the input exactly and the only error is the
# weights': y_fp - y_q = (w - w_q)[:, 1] * 2.0 = [+0.008, -0.007] per output channel, the shift to plant.
W = np.array([[1.27, 0.004], [-1.27, 0.0165]], dtype=np.float32).reshape(2, 2, 1, 1)
B = np.array([0.1, -0.2], dtype=np.float32)
SHIFT = np.array([0.004 * 2.0, -0.0035 * 2.0])
STEP = 0.01 * 0.01  # the int32 bias step: input scale x weight scale


def _conv_model(bias: bool = True) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(W, "W")] + ([numpy_helper.from_array(B, "B")] if bias else [])
    node = helper.make_node("Conv", ["x", "W", "B"] if bias else ["x", "W"], ["y"], name="conv")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 4, 4])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _feeds(n: int = 6, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(n):
        x = np.empty((1, 2, 4, 4), dtype=np.float32)
        x[0, 0] = rng.integers(0, 256, (4, 4)) / np.float32(100)
        x[0, 0, 0, 0], x[0, 0, 0, 1] = 0.0, 2.55  # the range of every sample: [0, 2.55]
        x[0, 1] = 2.0
        feeds.append({"x": x})
    return feeds


def _run(model: onnx.ModelProto, feeds: list[dict], output: str = "y") -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run([output], f)[0] for f in feeds])


def _conv_bias(model: onnx.ModelProto) -> np.ndarray:
    """The Conv's bias as the quantized model dequantizes it (int32 x scale)."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    dq = next(n for n in model.graph.node if n.output[0] == conv.input[2])
    assert dq.op_type == "DequantizeLinear" and inits[dq.input[0]].dtype == np.int32
    return inits[dq.input[0]].astype(np.float64) * inits[dq.input[1]].astype(np.float64)


def _quantize(model, feeds, **kw):
    return qpass.quantize(model, feeds, method="minmax", quantize_outputs=(), val_fraction=0.0, validate=False, **kw)


def test_planted_shift_is_removed():
    feeds = _feeds()
    plain = _quantize(_conv_model(), feeds)
    fixed = _quantize(_conv_model(), feeds, bias_correction="empirical", bias_correction_samples=4)
    ref = _run(_conv_model(), feeds).mean(axis=(0, 2, 3))
    # the planted shift is there without correction (it is what the test removes) ...
    np.testing.assert_allclose(ref - _run(plain.model, feeds).mean(axis=(0, 2, 3)), SHIFT, atol=1e-5)
    np.testing.assert_allclose(_conv_bias(plain.model), B, atol=STEP / 2 + 1e-7)
    # ... and the corrected int32 bias is the float bias plus the hand-computed shift, to the bias step
    np.testing.assert_allclose(_conv_bias(fixed.model), B + SHIFT, atol=STEP / 2 + 1e-7)
    np.testing.assert_allclose(_run(fixed.model, feeds).mean(axis=(0, 2, 3)), ref, atol=STEP)
    info = fixed.report.calibration["bias_correction"]
    assert (info["layers"], info["samples"], info["passes"]) == (1, 4, 1) and info["seconds"] >= 0
    record = next(r for r in fixed.report.passes if r.name == "bias_correction")
    assert record.stats == {"corrected": 1}


def test_node_without_bias_gets_the_shift_as_int32_bias():
    feeds = _feeds()
    fixed = _quantize(_conv_model(bias=False), feeds, bias_correction="empirical", bias_correction_samples=4)
    np.testing.assert_allclose(_conv_bias(fixed.model), SHIFT, atol=STEP / 2 + 1e-7)
    record = next(r for r in fixed.report.passes if r.name == "bias_correction")
    assert record.stats == {"corrected": 1, "bias_added": 1}


def _chain_model() -> onnx.ModelProto:
    """x -> Conv1 (1x1, W) -> Conv2 (1x1, W2) -> y: Conv2 reads Conv1's shifted output."""
    w2 = np.array([[0.5, 0.75], [-0.25, 1.0]], dtype=np.float32).reshape(2, 2, 1, 1)
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["h"], name="conv1"),
             helper.make_node("Conv", ["h", "W2"], ["y"], name="conv2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 4, 4])],
                              initializer=[numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B"),
                                           numpy_helper.from_array(w2, "W2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_sequential_stages_correct_each_layer_after_the_one_before():
    feeds = _feeds()
    ref = _run(_chain_model(), feeds).mean(axis=(0, 2, 3))
    seq = _quantize(_chain_model(), feeds, bias_correction="empirical", bias_correction_samples=6)
    once = _quantize(_chain_model(), feeds, bias_correction="empirical", bias_correction_samples=6,
                     bias_correction_stages=2)
    assert seq.report.calibration["bias_correction"]["passes"] == 2
    assert once.report.calibration["bias_correction"]["passes"] == 1
    # one layer at a time the output mean matches fp32's on the samples measured (to the int32 bias steps) ...
    np.testing.assert_allclose(_run(seq.model, feeds).mean(axis=(0, 2, 3)), ref, atol=2e-3)
    # ... both at once, conv2 also absorbs the shift conv1's correction removes: corrected twice, about -W2 . SHIFT
    off = _run(once.model, feeds).mean(axis=(0, 2, 3)) - ref
    assert np.abs(off).max() > 4e-3


def _pass_graph(model, shifts: dict[str, np.ndarray], nodes: tuple[str, ...]):
    wg = WorkingGraph(onnx.shape_inference.infer_shapes(model))
    stats = Statistics()
    for name, v in shifts.items():
        stats.set(name, "bias_shift", BiasShift(np.asarray(v, dtype=np.float64), 16))
    plan = QuantPlan(tuple(NodePlan(n, "?", ()) for n in nodes), {}, ())
    result = BiasCorrection("float").run(wg.graph, PassContext(plan, CalibrationTable(statistics=stats)))
    out = wg.export()
    verify_model(out)
    return result, out


def test_pass_moves_float_biases_gemm_by_beta_and_matmul_add():
    rng = np.random.default_rng(1)
    c = rng.normal(0, 1, 3).astype(np.float32)
    badd = rng.normal(0, 1, 3).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "G", "C"], ["g"], name="gemm", beta=2.0),
             helper.make_node("MatMul", ["g", "M"], ["m"], name="matmul"),
             helper.make_node("Add", ["m", "A"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
                              initializer=[numpy_helper.from_array(rng.normal(0, 1, (4, 3)).astype(np.float32), "G"),
                                           numpy_helper.from_array(c, "C"),
                                           numpy_helper.from_array(rng.normal(0, 1, (3, 3)).astype(np.float32), "M"),
                                           numpy_helper.from_array(badd, "A")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    result, out = _pass_graph(model, {"g": [0.2, -0.4, 0.0], "y": [1.0, 2.0, 3.0]}, ("gemm", "matmul"))
    assert result.modified and result.stats == {"corrected": 2}
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    by_op = {n.op_type: n for n in out.graph.node}
    np.testing.assert_allclose(inits[by_op["Gemm"].input[2]], c + np.array([0.1, -0.2, 0.0], np.float32), atol=1e-6)
    add_const = [i for i in by_op["Add"].input if i in inits][0]
    np.testing.assert_allclose(inits[add_const], badd + np.array([1.0, 2.0, 3.0], np.float32), atol=1e-6)
    # a zero shift, or none, changes nothing
    again, _ = _pass_graph(model, {"g": [0.0, 0.0, 0.0]}, ("gemm", "matmul"))
    assert not again.modified


def test_pass_skips_a_shift_of_the_wrong_length_with_a_reason():
    result, _ = _pass_graph(_conv_model(), {"y": [1.0, 2.0, 3.0]}, ("conv",))
    assert not result.modified
    assert "not one value per output channel" in result.skipped[0].reason


def test_mean_observers_axis1_and_last():
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    a1, last = make_observer("mean_axis1"), make_observer("mean_last")
    for obs in (a1, last):
        obs.update(x[:1])
        obs.update(x[1:])
    np.testing.assert_allclose(a1.result().mean, x.mean(axis=(0, 2)))
    np.testing.assert_allclose(last.result().mean, x.mean(axis=(0, 1)))
    assert a1.result().count == 8 and last.result().count == 6
    merged = make_observer("mean_axis1")
    merged.update(x[:1])
    other = make_observer("mean_axis1")
    other.update(x[1:])
    np.testing.assert_allclose(merged.merge(other).result().mean, x.mean(axis=(0, 2)))


def test_statistics_round_trip_means():
    s = Statistics()
    s.set("t", "bias_shift", BiasShift(np.array([0.5, -1.25]), 7))
    back = Statistics.from_json(s.to_json())
    assert back == s and isinstance(back.get("t", "bias_shift"), BiasShift)


def test_keep_spread_keeps_evenly_spaced_items():
    it, kept = keep_spread(iter(range(10)), 4, 10)
    assert list(it) == list(range(10)) and kept == [0, 3, 6, 9]
    it, kept = keep_spread(iter(range(10)), 3, None)
    assert list(it) == list(range(10)) and kept == [0, 1, 2]


@pytest.mark.parametrize("field,value", [("bias_correction", "analytic"), ("bias_correction_samples", 0),
                                         ("bias_correction_stages", True)])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ConfigError, match=field):
        QuantConfig(**{field: value})


def test_cli_flags_reach_the_config():
    from qpass.cli import _config_from_args, build_parser

    args = build_parser().parse_args(["run", "m.onnx", "--bias-correction", "empirical",
                                      "--bias-correction-samples", "12", "--bias-correction-stages", "2"])
    cfg = _config_from_args(args)
    assert (cfg.bias_correction, cfg.bias_correction_samples, cfg.bias_correction_stages) == ("empirical", 12, 2)
    assert _config_from_args(build_parser().parse_args(["run", "m.onnx"])).bias_correction == "off"


def test_a_loaded_table_brings_no_samples_and_the_report_says_so(tmp_path):
    feeds = _feeds()
    _quantize(_conv_model(), feeds, save_calib=tmp_path / "t.json")
    r = _quantize(_conv_model(), None, load_calib=tmp_path / "t.json", bias_correction="empirical")
    assert r.report.calibration["bias_correction"]["layers"] == 0
    assert any("bias correction: no calibration samples" in w for w in r.report.warnings)
    np.testing.assert_allclose(_conv_bias(r.model), B, atol=STEP / 2 + 1e-7)
