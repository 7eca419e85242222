"""Malformed or unusual input, end to end: each case gets a typed error with exit code 2, or a documented handling."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import qpass
from qpass.cli import main
from qpass.errors import CalibrationDataError, NothingQuantizedError, OpsetError, UnsupportedModelError
from tests import builders


def _save(model, path):
    onnx.save_model(model, str(path))
    return path


def _int_only_model():
    nodes = [helper.make_node("Add", ["a", "b"], ["c"], name="add")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("a", TensorProto.INT64, [2]),
                                        helper.make_tensor_value_info("b", TensorProto.INT64, [2])],
                          [helper.make_tensor_value_info("c", TensorProto.INT64, [2])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def test_model_with_no_float_tensors_quantizes_nothing_and_says_so(tmp_path, capsys):
    path = _save(_int_only_model(), tmp_path / "ints.onnx")
    feeds = [{"a": np.array([1, 2]), "b": np.array([3, 4])}]
    with pytest.raises(NothingQuantizedError, match="nothing was quantized"):
        qpass.quantize(path, feeds)
    r = qpass.quantize(path, feeds, allow_empty=True)  # explicitly accepted: the model passes through
    assert r.report.quantized_nodes == {} and [n.op_type for n in r.model.graph.node] == ["Add"]
    np.savez(tmp_path / "c.npz", a=np.array([[1, 2]]), b=np.array([[3, 4]]))
    assert main(["run", str(path), "--calib", str(tmp_path / "c.npz"), "-q"]) == 2
    assert "nothing was quantized" in capsys.readouterr().err


def test_integer_operator_model_is_refused_and_a_qdq_one_imported(tmp_path):
    q = qpass.quantize(builders.DIGITS_MODEL, builders.DIGITS_CALIB, format="qop").model
    path = _save(q, tmp_path / "q.onnx")
    with pytest.raises(UnsupportedModelError, match="already quantized"):
        qpass.quantize(path, builders.DIGITS_CALIB)
    qdq = _save(qpass.quantize(builders.DIGITS_MODEL, builders.DIGITS_CALIB).model, tmp_path / "qdq.onnx")
    again = qpass.quantize(qdq, builders.DIGITS_CALIB)  # imported (QDQ import), not quantized twice
    assert again.report.calibration["imported"] and again.report.validation["outputs"][0]["max_abs_error"] == 0.0


def test_opset_below_10_is_upgraded_loudly_or_refused_with_the_upgrade_flag_named():
    m = builders.conv_model()
    m.opset_import[0].version = 9
    with pytest.raises(OpsetError, match="--target-opset"):
        qpass.quantize(m, builders.feeds(m, 4), per_channel=False, opset_upgrade=False)
    r = qpass.quantize(m, builders.feeds(m, 4), per_channel=False)  # QuantizeLinear needs 10
    assert r.report.opset["output"] == 10 and any("opset upgraded 9 -> 10" in w for w in r.report.warnings)
    r = qpass.quantize(m, builders.feeds(m, 4), target_opset=13)
    assert r.report.quantized_nodes == {"Conv": 1} and r.report.opset == {"input": 9, "output": 13}


def test_constant_activation_gets_a_non_zero_scale():
    m = builders.conv_model()
    feeds = [{"x": np.zeros((1, 3, 8, 8), np.float32)} for _ in range(4)]
    r = qpass.quantize(m, feeds)
    inits = {t.name: numpy_helper.to_array(t) for t in r.model.graph.initializer}
    q = next(n for n in r.model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
    assert inits[q.input[1]] == 1.0 and inits[q.input[2]] == 0
    out = ort.InferenceSession(r.model.SerializeToString()).run(None, {"x": feeds[0]["x"]})[0]
    ref = ort.InferenceSession(m.SerializeToString()).run(None, {"x": feeds[0]["x"]})[0]
    np.testing.assert_allclose(out, ref, atol=0.05)  # only the bias' quantization differs


def test_all_negative_input_uses_the_whole_uint8_range_below_zero():
    m = builders.conv_model()
    rng = np.random.default_rng(3)
    feeds = [{"x": -rng.uniform(0.1, 2.0, (1, 3, 8, 8)).astype(np.float32)} for _ in range(6)]
    r = qpass.quantize(m, feeds)
    inits = {t.name: numpy_helper.to_array(t) for t in r.model.graph.initializer}
    q = next(n for n in r.model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
    lo = min(float(f["x"].min()) for f in feeds)
    assert inits[q.input[2]] == 255  # zero maps to the top: all of [lo, 0] is representable
    assert inits[q.input[1]] == pytest.approx(-lo / 255, rel=1e-6)
    assert r.report.validation["outputs"][0]["sqnr_db"] > 25


def test_inputs_beyond_the_calibrated_range_saturate_instead_of_wrapping():
    m = builders.matmul_model()
    feeds = [{"x": np.random.default_rng(i).uniform(-1, 1, (1, 16)).astype(np.float32)} for i in range(6)]
    r = qpass.quantize(m, feeds)
    big = np.full((1, 16), 1e6, np.float32)
    out = ort.InferenceSession(r.model.SerializeToString()).run(None, {"x": big})[0]
    at_max = ort.InferenceSession(r.model.SerializeToString()).run(None, {"x": np.full((1, 16), 1.0, np.float32)})[0]
    # 1e6 is far past the calibrated maximum (~1): it saturates to the top of the uint8 range, like ~1.0 does
    np.testing.assert_allclose(out, at_max, rtol=0.02, atol=0.02)


@pytest.mark.parametrize("make_empty", ["folder", "npz", "list"])
def test_empty_calibration_set_is_refused(tmp_path, make_empty):
    m = builders.conv_model()
    if make_empty == "folder":
        (tmp_path / "empty").mkdir()
        calib = tmp_path / "empty"
    elif make_empty == "npz":
        np.savez(tmp_path / "e.npz", x=np.zeros((0, 1, 3, 8, 8), np.float32))
        calib = tmp_path / "e.npz"
    else:
        calib = []
    with pytest.raises(CalibrationDataError):
        qpass.quantize(m, calib)


def test_a_value_that_is_not_a_tensor_is_refused_with_a_typed_error():
    m = builders.conv_model()
    seq_out = helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, None)
    m.graph.node.append(helper.make_node("SequenceConstruct", ["y"], ["s"], name="seq"))
    m.graph.output.append(seq_out)
    # a sequence output is fine to carry through; an optional one is not (graphsurgeon cannot export it)
    r = qpass.quantize(m, builders.feeds(m, 4), val_fraction=0.0)
    assert r.report.quantized_nodes == {"Conv": 1}
    m2 = builders.conv_model(opset=15)
    m2.graph.node.append(helper.make_node("Optional", ["y"], ["o"], name="opt"))
    m2.graph.output.append(helper.make_value_info("o", helper.make_optional_type_proto(
        helper.make_tensor_type_proto(TensorProto.FLOAT, None))))
    with pytest.raises(UnsupportedModelError, match="optional"):
        qpass.quantize(m2, builders.feeds(m2, 4))


def test_sixteen_bit_activations_upgrade_to_opset_21_loudly_or_are_refused_with_keep_opset():
    m = builders.conv_model()  # opset 13
    r = qpass.quantize(m, builders.feeds(m, 4), activation_type="uint16")
    assert r.report.opset["output"] == 21 and any("uint16 QuantizeLinear needs it" in w for w in r.report.warnings)
    assert not any("--per-tensor keeps" in w for w in r.report.warnings)  # per-tensor weights would not help here
    with pytest.raises(OpsetError, match="--target-opset 21"):
        qpass.quantize(m, builders.feeds(m, 4), activation_type="uint16", opset_upgrade=False)


def _with_output_dims(model: onnx.ModelProto, dims: list) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    shape = out.graph.output[0].type.tensor_type.shape
    del shape.dim[:]
    for d in dims:
        dim = shape.dim.add()
        if isinstance(d, int):
            dim.dim_value = d
        elif d is not None:
            dim.dim_param = d
    return out


def test_an_upgrade_that_only_makes_a_dim_known_keeps_the_declared_interface():
    """The converter's shape inference may make an unknown output dim known ([?, ?] -> [?, 384], MiniLM at 17 -> 21):
    the declared dims are put back, so the interface is as given; a dim whose value changed is still reported."""
    from qpass.opset import interface_changes, keep_declared_dims

    before = _with_output_dims(builders.conv_model(), [None, "C", None, None])
    after = _with_output_dims(builders.conv_model(), [None, 4, 8, 8])
    assert keep_declared_dims(before, after) == 3
    assert interface_changes(before, after) == []
    assert [d.dim_param for d in after.graph.output[0].type.tensor_type.shape.dim] == ["", "C", "", ""]
    fixed = _with_output_dims(builders.conv_model(), [None, 4, 8, 8])
    changed = _with_output_dims(builders.conv_model(), [None, 5, 8, 8])
    assert keep_declared_dims(fixed, changed) == 0
    assert interface_changes(fixed, changed)  # 4 -> 5 is a change, not a refinement
