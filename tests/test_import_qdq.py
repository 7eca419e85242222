"""QDQ import end to end: the PyTorch QAT export in models/ and onnxruntime's quantize_static output."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import qpass
from qpass.calib.table import CalibrationTable
from qpass.cli import main
from tests import builders

QAT_MODEL = builders.REPO / "models" / "digits_qat_qdq.onnx"
QAT_FP32 = builders.REPO / "models" / "digits_qat_fp32.onnx"


def _run(model, x: np.ndarray) -> np.ndarray:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def _output_step(model: onnx.ModelProto) -> float:
    """The scale of the DequantizeLinear that writes the graph output (one quantization step of the output)."""
    out = model.graph.output[0].name
    dq = next(n for n in model.graph.node if out in n.output)
    assert dq.op_type == "DequantizeLinear"
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return float(inits[dq.input[1]].reshape(-1)[0])


def _x() -> np.ndarray:
    return np.load(builders.DIGITS_TEST)["input"][:128]


@pytest.mark.parametrize("fmt", ["qdq", "qop"])
def test_qat_export_is_imported_with_int8_weights_and_its_outputs(tmp_path, fmt):
    original = onnx.load(str(QAT_MODEL))
    out = qpass.quantize(QAT_MODEL, output=tmp_path / "m.onnx", val=builders.DIGITS_TEST, reference=QAT_FP32,
                         format=fmt, per_layer=False, latency=False)
    inits = {i.name: numpy_helper.to_array(i) for i in out.model.graph.initializer}
    weights = {n: v for n, v in inits.items() if v.ndim >= 2}  # the four weight matrices / kernels
    assert len(weights) == 4 and all(v.dtype == np.int8 for v in weights.values()), {n: v.dtype for n, v in weights.items()}
    assert (tmp_path / "m.onnx").stat().st_size < QAT_MODEL.stat().st_size / 3  # float weights were 4x larger
    x = _x()
    expected, got = _run(QAT_MODEL, x), _run(tmp_path / "m.onnx", x)
    step = _output_step(original)
    assert np.max(np.abs(got - expected)) <= step + 1e-6
    assert out.report.quantized_nodes == {"Conv": 2, "Gemm": 2} and out.report.calibration["weights_folded"] == 4
    assert "digits_qat_fp32" in out.report.validation["reference"]
    acc = out.report.validation["outputs"][0]
    assert acc["accuracy_quantized"] >= 0.95
    ops = {n.op_type for n in out.model.graph.node}
    if fmt == "qop":
        assert {"QLinearConv", "MatMulInteger"} <= ops and not ops & {"Conv", "Gemm"}
    else:
        assert {"Conv", "Gemm"} <= ops


def test_plan_and_table_say_what_the_model_quantized(tmp_path):
    out = qpass.quantize(QAT_MODEL, per_layer=False, latency=False, save_calib=tmp_path / "t.json",
                         save_plan=tmp_path / "p.json")
    plan = out.plan
    conv = next(n for n in plan.nodes if n.op_type == "Conv")
    assert conv.weight.spec.dtype == "int8" and conv.weight.spec.granularity == "channel" and conv.weight.spec.axis == 0
    assert conv.bias.dtype == "int32"
    model = onnx.load(str(QAT_MODEL))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    s = float(inits["quant.activation_post_process.scale"].reshape(()))
    z = int(inits["onnx::QuantizeLinear_108"].reshape(()))
    rng = CalibrationTable.load(tmp_path / "t.json").get("input")
    assert rng.min == pytest.approx((0 - z) * s) and rng.max == pytest.approx((255 - z) * s)
    assert plan.tensors["input"].spec.dtype == "uint8"
    assert "itself" in out.report.validation["reference"]  # no reference given
    assert any("RANDOM" in w for w in out.report.warnings)


def test_ort_quantize_static_output_is_imported_and_validated_against_fp32(tmp_path):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    calib = np.load(builders.DIGITS_CALIB)["input"]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": calib[i:i + 1]} for i in range(64)])

        def get_next(self):
            return next(self.it, None)

    qdq = tmp_path / "ort_qdq.onnx"
    quantize_static(str(builders.DIGITS_MODEL), str(qdq), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    for fmt in ("qdq", "qop"):
        out = qpass.quantize(qdq, output=tmp_path / f"m_{fmt}.onnx", val=builders.DIGITS_TEST,
                             reference=builders.DIGITS_MODEL, format=fmt, per_layer=False, latency=False)
        assert "digits_cnn.onnx" in out.report.validation["reference"]
        assert out.report.validation["outputs"][0]["top1_agreement"] >= 0.97
        x = _x()
        got, expected = _run(tmp_path / f"m_{fmt}.onnx", x), _run(qdq, x)
        step = _output_step(onnx.load(str(qdq)))
        assert np.max(np.abs(got - expected)) <= step + 1e-6
    ops = {n.op_type for n in out.model.graph.node}
    assert "QLinearConv" in ops and "Conv" not in ops


def test_cli_reference_flag(tmp_path, capsys):
    assert main(["run", str(QAT_MODEL), "-o", str(tmp_path / "m.onnx"), "--reference", str(QAT_FP32),
                 "--val", str(builders.DIGITS_TEST), "--format", "qop", "-q", "--no-per-layer"]) == 0
    assert (tmp_path / "m.onnx").is_file()
    assert main(["run", str(builders.DIGITS_MODEL), "--calib", str(builders.DIGITS_CALIB), "-o",
                 str(tmp_path / "f.onnx"), "--reference", str(QAT_FP32), "-q"]) == 2
    assert "reference" in capsys.readouterr().err


def test_a_scale_computed_at_run_time_is_refused_naming_the_node():
    """Dynamic quantization written out with standard ops (ReduceMax -> Div -> QuantizeLinear): no range to import."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Abs", ["x"], ["a"]), helper.make_node("ReduceMax", ["a"], ["m"], keepdims=0),
             helper.make_node("Div", ["m", "c127"], ["s"]),
             helper.make_node("QuantizeLinear", ["x", "s"], ["q"], name="dyn_q"),
             helper.make_node("DequantizeLinear", ["q", "s"], ["y"], name="dyn_dq")]
    model = builders._model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
                            [numpy_helper.from_array(np.float32(127), "c127")])
    with pytest.raises(qpass.errors.UnsupportedModelError, match="'dyn_q': its scale is not a constant but computed by Div"):
        qpass.quantize(model, [{"x": np.ones((2, 3), np.float32)}])


def test_a_scale_in_a_constant_node_of_value_float_is_imported():
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.integers(-127, 127, (4, 3, 3, 3)).astype(np.int8), "Wq"),
             numpy_helper.from_array(np.float32(0.01), "ws"), numpy_helper.from_array(np.int8(0), "wz"),
             numpy_helper.from_array(np.uint8(128), "xz")]
    nodes = [helper.make_node("Constant", [], ["xs"], name="xs_const", value_float=0.02),
             helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="q_x"),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["Wq", "ws", "wz"], ["W"]),
             helper.make_node("Conv", ["xd", "W"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    model = builders._model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    feeds = [{"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)} for _ in range(4)]
    r = qpass.quantize(model, feeds)
    assert r.report.calibration["imported"] and r.report.quantized_nodes == {"Conv": 1} and r.passed


def test_many_scales_behind_reshaped_constants_each_keep_their_own_value():
    """60 Q/DQ pairs whose scales are Reshape(Constant): each reads back its own scale (a cache keyed by the
    transient value objects once handed one pair another's), so the import computes what the model computes."""
    from onnx import TensorProto, helper

    nodes, outs = [], []
    for i, s in enumerate(np.linspace(0.05, 5, 60).tolist()):
        nodes += [helper.make_node("Constant", [], [f"sc{i}"], value=numpy_helper.from_array(np.array([s], np.float32))),
                  helper.make_node("Reshape", [f"sc{i}", "shp"], [f"s{i}"]),
                  helper.make_node("QuantizeLinear", ["x", f"s{i}"], [f"q{i}"]),
                  helper.make_node("DequantizeLinear", [f"q{i}", f"s{i}"], [f"d{i}"]),
                  helper.make_node("Relu", [f"d{i}"], [f"y{i}"])]
        outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [4]))
    model = builders._model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])], outs,
                            [numpy_helper.from_array(np.array([1], np.int64), "shp")])
    x = np.array([0.3, 1.7, 5.0, -9.0], np.float32)

    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    got = run(qpass.quantize(model, [{"x": x}]).model)
    assert all(np.array_equal(a, b) for a, b in zip(run(model), got))
