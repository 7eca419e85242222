"""IntegerHardSwish: a hard-swish or hard-sigmoid gate between 8-bit Q/DQ becomes Add and Mul between Q/DQ pairs."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import qpass
from qpass.config import QuantConfig
from qpass.graph import WorkingGraph
from qpass.pass_manager import PassContext
from qpass.passes.integer_hard_swish import IntegerHardSwish
from qpass.recipes import rewrite_passes

RNG = np.random.default_rng(11)
S_X, S_Y = 0.05, 0.04  # the input's grid covers [-6.4, 6.35] (uint8 zero point 128), the output's [-0.4, 9.8]
K, B = 0.7, 0.3  # a learnable affine block's scale and bias


def _scalar(name, value, dtype=np.float32):
    return numpy_helper.from_array(np.array(value, dtype), name)


def _island(form: str, qtype=np.uint8, out_scale=S_Y) -> list[onnx.NodeProto]:
    """The float nodes from ``d`` (the dequantized input) to ``f`` (quantized again); extra constants in _CONSTANTS."""
    mul = lambda a, b, o: helper.make_node("Mul", [a, b], [o])  # noqa: E731
    if form == "HardSwish":
        return [helper.make_node("HardSwish", ["d"], ["f"])]
    if form == "HardSigmoid * x":
        return [helper.make_node("HardSigmoid", ["d"], ["g"], alpha=1 / 6, beta=0.5), mul("d", "g", "f")]
    if form == "x * HardSigmoid, Paddle's slope":
        return [helper.make_node("HardSigmoid", ["d"], ["g"], alpha=0.2, beta=0.5), mul("g", "d", "f")]
    add_clip = [helper.make_node("Add", ["d", "three"], ["a"]), helper.make_node("Clip", ["a", "zero", "six"], ["c"])]
    if form == "x * Clip(x + 3, 0, 6) / 6":
        return add_clip + [mul("d", "c", "m"), helper.make_node("Div", ["m", "six"], ["f"])]
    if form == "x * (Clip(x + 3, 0, 6) / 6)":
        return add_clip + [helper.make_node("Div", ["c", "six"], ["h"]), mul("d", "h", "f")]
    if form == "x * Clip(x + 3, 0, 6) * (1/6)":
        return add_clip + [mul("c", "d", "m"), mul("m", "sixth", "f")]
    if form == "HardSwish * k + b":  # Paddle's LearnableAffineBlock after the activation
        return [helper.make_node("HardSwish", ["d"], ["h"]), mul("h", "k", "m"),
                helper.make_node("Add", ["m", "b"], ["f"])]
    if form == "x * Clip(x + 3, 0, 6) / 6 * k + b":
        return add_clip + [mul("d", "c", "m"), helper.make_node("Div", ["m", "six"], ["h"]), mul("h", "k", "m2"),
                           helper.make_node("Add", ["b", "m2"], ["f"])]
    if form == "HardSwish * k":
        return [helper.make_node("HardSwish", ["d"], ["h"]), mul("k", "h", "f")]
    if form == "x * Clip(x + 3, 0, 6) / 3":  # twice a hard-swish: the output's QuantizeLinear divides by 2
        return add_clip + [mul("d", "c", "m"), helper.make_node("Div", ["m", "three"], ["f"])]
    if form == "x * HardSigmoid(x), slope -1/6":
        return [helper.make_node("HardSigmoid", ["d"], ["g"], alpha=-1 / 6, beta=0.5), mul("d", "g", "f")]
    raise KeyError(form)


def _qdq_model(form: str, qtype=np.uint8, *, out_scale=S_Y, extra_output: str | None = None) -> onnx.ModelProto:
    """x -> Q -> DQ -> <island> -> Q -> DQ -> y, the shape of qpass's output around an activation."""
    zx = 128 if qtype == np.uint8 else 0
    zy = 10 if qtype == np.uint8 else -118
    inits = [_scalar("sx", S_X), _scalar("zx", zx, qtype), _scalar("zy", zy, qtype),
             _scalar("three", 3.0), _scalar("six", 6.0), _scalar("zero", 0.0), _scalar("sixth", 1 / 6),
             _scalar("k", K), _scalar("b", B)]
    inits.append(numpy_helper.from_array(np.asarray(out_scale, np.float32), "sy"))
    axis = {"axis": 1} if np.ndim(out_scale) else {}
    if axis:
        inits[2] = numpy_helper.from_array(np.full(np.shape(out_scale), zy, qtype), "zy")
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["d"])]
    nodes += _island(form, qtype)
    nodes += [helper.make_node("QuantizeLinear", ["f", "sy", "zy"], ["yq"], **axis),
              helper.make_node("DequantizeLinear", ["yq", "sy", "zy"], ["y"], **axis)]
    outputs = [helper.make_tensor_value_info("yq", TensorProto.UINT8 if qtype == np.uint8 else TensorProto.INT8,
                                             [1, 4, 8, 8])]
    if extra_output:
        outputs.append(helper.make_tensor_value_info(extra_output, TensorProto.FLOAT, [1, 4, 8, 8]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    return model


def _rewritten(model: onnx.ModelProto, offsets: bool = True):
    wg = WorkingGraph(model)
    result = IntegerHardSwish(offsets=offsets).run(wg.graph, PassContext())
    return wg.export(), result


def _every_code() -> np.ndarray:
    """The values of the input's 256 codes (uint8 with zero point 128 or int8 with 0: the same values), [1, 4, 8, 8]."""
    return (np.arange(-128, 128) * S_X).astype(np.float32).reshape(1, 4, 8, 8)


def _run(model, x, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL, name="yq"):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(
        [name], {"x": x})[0].astype(int)


FORMS = ["HardSwish", "HardSigmoid * x", "x * HardSigmoid, Paddle's slope", "x * Clip(x + 3, 0, 6) / 6",
         "x * (Clip(x + 3, 0, 6) / 6)", "x * Clip(x + 3, 0, 6) * (1/6)", "HardSwish * k + b",
         "x * Clip(x + 3, 0, 6) / 6 * k + b", "HardSwish * k", "x * Clip(x + 3, 0, 6) / 3"]


@pytest.mark.parametrize("form", FORMS)
def test_every_input_code_gives_the_float_forms_code_within_one_step(form):
    model = _qdq_model(form)
    new, result = _rewritten(model)
    assert result.modified and result.stats == {"hard-swish": 1}
    ops = [n.op_type for n in new.graph.node]
    assert not {"HardSwish", "HardSigmoid", "Clip", "Div"} & set(ops)
    assert ops.count("Add") == 1 + form.endswith("+ b") and ops.count("Mul") == 1
    onnx.checker.check_model(new, full_check=True)
    x = _every_code()
    float_form = _run(model, x, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    assert len(np.unique(float_form)) > 100  # the 256 input codes reach many output codes: a real test
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        diff = np.abs(_run(new, x, level) - float_form)
        assert diff.max() <= 1 and diff.mean() < 0.1, (level, diff.max(), diff.mean())
    # the clip is the gate's saturation: far below -3 the output is the code of 0, far above it is x
    d = x.ravel()
    gate = np.clip(d * (0.2 if "Paddle" in form else 1 / 6) + 0.5, 0, 1)
    k = K if "k" in form else 2.0 if form.endswith("/ 3") else 1.0
    b = B if form.endswith("+ b") else 0.0
    expect = np.clip(np.round((k * d * gate + b) / S_Y) + 10, 0, 255)
    assert np.abs(_run(new, x).ravel() - expect).max() <= 1


def test_the_offset_form_waits_for_its_setting():
    """By default (``integer_hard_swish="on"``) the form whose offset costs one more rounding stays float."""
    model = _qdq_model("x * Clip(x + 3, 0, 6) / 6 * k + b")
    new, result = _rewritten(model, offsets=False)
    assert not result.modified and "Clip" in [n.op_type for n in new.graph.node]
    assert _rewritten(_qdq_model("HardSwish * k"), offsets=False)[1].modified  # a factor alone is exact
    on, offsets = (next(p for p in rewrite_passes(QuantConfig(integer_hard_swish=v)) if isinstance(p, IntegerHardSwish))
                   for v in ("on", "offsets"))
    assert not on.offsets and offsets.offsets


def test_onnxruntime_runs_the_rewrite_with_integer_kernels(tmp_path):
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    for form in ("HardSwish", "x * Clip(x + 3, 0, 6) / 6", "x * Clip(x + 3, 0, 6) / 6 * k + b", "HardSwish * k"):
        new, _ = _rewritten(_qdq_model(form))
        ort.InferenceSession(new.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
        assert ops.count("QLinearAdd") == 1 + form.endswith("+ b") and ops.count("QLinearMul") == 1, ops
        assert not {"HardSigmoid", "HardSwish", "Mul", "Add", "Clip"} & set(ops), ops


@pytest.mark.parametrize("case", ["negative factor", "negative slope", "int8", "16-bit output", "per-channel output",
                                  "intermediate is a graph output"])
def test_forms_that_are_not_certain_or_not_faster_are_left_alone(case):
    if case == "int8":  # onnxruntime 1.32 fuses neither QLinearAdd nor QLinearMul with int8: slower than float
        model = _qdq_model("HardSwish", np.int8)
    elif case == "negative factor":
        model = _qdq_model("HardSwish * k")
        next(i for i in model.graph.initializer if i.name == "k").CopyFrom(_scalar("k", -K))
    elif case == "negative slope":
        model = _qdq_model("x * HardSigmoid(x), slope -1/6")
    elif case == "16-bit output":  # QLinearMul has no 16-bit kernel; the gate's 1/255 would cost 16-bit accuracy
        model = _qdq_model("HardSwish")
        zy = next(i for i in model.graph.initializer if i.name == "zy")
        zy.CopyFrom(numpy_helper.from_array(np.array(10, np.uint16), "zy"))
        model.graph.output[0].type.tensor_type.elem_type = TensorProto.UINT16
        model.opset_import[0].version = 21
    elif case == "per-channel output":
        model = _qdq_model("HardSwish", out_scale=np.full(4, S_Y, np.float32))
    else:
        model = _qdq_model("x * (Clip(x + 3, 0, 6) / 6)", extra_output="c")
    new, result = _rewritten(model)
    assert not result.modified
    assert [n.op_type for n in new.graph.node] == [n.op_type for n in model.graph.node]


def test_a_hard_sigmoid_gate_on_another_tensor_is_left_in_float():
    """y = f * HardSigmoid(g) with g a per-channel [1, C, 1, 1] gate (a squeeze-and-excitation block): the gate's
    rounding error would scale with |f| (the shared detector lost 0.004 mask IoU), so it stays as it is."""
    inits = [_scalar("sx", S_X), _scalar("zx", 128, np.uint8), _scalar("sg", 0.03), _scalar("zg", 120, np.uint8),
             _scalar("sy", S_Y * 2), _scalar("zy", 128, np.uint8)]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["d"]),
             helper.make_node("QuantizeLinear", ["gate", "sg", "zg"], ["gq"]),
             helper.make_node("DequantizeLinear", ["gq", "sg", "zg"], ["gd"]),
             helper.make_node("HardSigmoid", ["gd"], ["h"], alpha=0.2, beta=0.5),
             helper.make_node("Mul", ["d", "h"], ["f"]),
             helper.make_node("QuantizeLinear", ["f", "sy", "zy"], ["yq"])]
    graph = helper.make_graph(nodes, "se", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8]),
                                            helper.make_tensor_value_info("gate", TensorProto.FLOAT, [1, 4, 1, 1])],
                              [helper.make_tensor_value_info("yq", TensorProto.UINT8, [1, 4, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    new, result = _rewritten(model)
    assert not result.modified and "HardSigmoid" in [n.op_type for n in new.graph.node]
    same = _qdq_model("HardSigmoid * x")  # the same nodes with f and g one tensor are rewritten
    assert _rewritten(same)[1].modified


def _conv_hard_swish_conv(form: str = "HardSwish") -> onnx.ModelProto:
    """x -> Conv -> hard-swish -> Conv -> y with real-looking weights (a MobileNetV3 block)."""
    inits = [numpy_helper.from_array(RNG.normal(0, 0.4, (8, 3, 3, 3)).astype(np.float32), "W1"),
             numpy_helper.from_array(RNG.normal(0, 0.5, 8).astype(np.float32), "B1"),
             numpy_helper.from_array(RNG.normal(0, 0.3, (4, 8, 1, 1)).astype(np.float32), "W2"),
             _scalar("three", 3.0), _scalar("six", 6.0), _scalar("zero", 0.0), _scalar("sixth", 1 / 6)]
    island = _island(form)
    for n in island:  # rename the island's ends onto the Convs
        n.input[:] = ["conv_out" if t == "d" else t for t in n.input]
        n.output[:] = ["hs" if t == "f" else t for t in n.output]
    nodes = ([helper.make_node("Conv", ["x", "W1", "B1"], ["conv_out"], name="conv1", pads=[1, 1, 1, 1])] + island
             + [helper.make_node("Conv", ["hs", "W2"], ["y"], name="conv2")])
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("form", ["HardSwish", "x * Clip(x + 3, 0, 6) / 6"])
def test_the_default_run_writes_it_and_the_option_turns_it_off(form):
    model = _conv_hard_swish_conv(form)
    feeds = [{"x": RNG.normal(0, 1, (1, 3, 8, 8)).astype(np.float32)} for _ in range(16)]
    on = qpass.quantize(model, feeds, val_fraction=0.0, validate=False).model
    off = qpass.quantize(model, feeds, val_fraction=0.0, validate=False, integer_hard_swish="off").model
    ops_on, ops_off = [n.op_type for n in on.graph.node], [n.op_type for n in off.graph.node]
    assert "HardSwish" not in ops_on and "Clip" not in ops_on and ops_on.count("Mul") == 1
    assert ("HardSwish" if form == "HardSwish" else "Clip") in ops_off
    x = {"x": RNG.normal(0, 1, (1, 3, 8, 8)).astype(np.float32)}
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    got = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
           for m in (on, off)]
    sqnr = [10 * np.log10((ref ** 2).sum() / ((g - ref) ** 2).sum()) for g in got]
    assert sqnr[1] > 25 and abs(sqnr[0] - sqnr[1]) < 1.0, sqnr
    wg = WorkingGraph(on)
    assert not IntegerHardSwish().run(wg.graph, PassContext()).modified  # a second run finds nothing
    assert not any(isinstance(p, IntegerHardSwish) for p in rewrite_passes(QuantConfig(integer_hard_swish="off")))
    assert not any(isinstance(p, IntegerHardSwish) for p in rewrite_passes(QuantConfig(format="qop")))


def test_the_setting_is_checked():
    with pytest.raises(qpass.QpassError, match="integer_hard_swish"):
        QuantConfig(integer_hard_swish=True)


def test_identity_nodes_an_exporter_left_are_looked_through():
    """DQ -> Identity -> HardSigmoid, and Mul -> Identity -> Q (Paddle exports keep such Identity nodes)."""
    model = _qdq_model("HardSigmoid * x")
    g = model.graph
    for n in g.node:
        if n.op_type == "HardSigmoid":
            n.input[0] = "d_id"
        if n.op_type == "QuantizeLinear" and n.input[0] == "f":
            n.input[0] = "f_id"
    at = [n.op_type for n in g.node].index("HardSigmoid")
    g.node.insert(at, helper.make_node("Identity", ["d"], ["d_id"]))
    g.node.insert(len(g.node) - 2, helper.make_node("Identity", ["f"], ["f_id"]))
    onnx.checker.check_model(model)
    new, result = _rewritten(model)
    assert result.modified and not {"HardSigmoid", "Identity"} & {n.op_type for n in new.graph.node}
    x = _every_code()
    assert np.abs(_run(new, x) - _run(model, x, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)).max() <= 1


def test_a_negative_offset_and_a_shared_output_scale():
    """b < 0 is one uint8 code below zero point 255; a second QuantizeLinear reading the same scale constant keeps it."""
    model = _qdq_model("HardSwish * k + b")
    next(i for i in model.graph.initializer if i.name == "b").CopyFrom(_scalar("b", -B))
    model.graph.node.append(helper.make_node("QuantizeLinear", ["x", "sy", "zy"], ["xq2"]))
    model.graph.output.append(helper.make_tensor_value_info("xq2", TensorProto.UINT8, [1, 4, 8, 8]))
    new, result = _rewritten(model)
    assert result.modified
    x = _every_code()
    d = x.ravel()
    expect = np.clip(np.round((K * d * np.clip(d / 6 + 0.5, 0, 1) - B) / S_Y) + 10, 0, 255)
    assert np.abs(_run(new, x).ravel() - expect).max() <= 1
    assert np.array_equal(_run(new, x, name="xq2"), _run(model, x, name="xq2"))


@pytest.mark.parametrize("case", ["the gate dequantized on another grid", "int8 without a zero point",
                                  "a constant of higher rank"])
def test_what_would_change_the_function_or_the_types_is_left_alone(case):
    if case == "the gate dequantized on another grid":  # one tensor, two DQs: f and g are not one value
        model = _qdq_model("HardSigmoid * x")
        model.graph.initializer.append(_scalar("sx_half", S_X / 2))
        g = model.graph
        at = [n.op_type for n in g.node].index("HardSigmoid")
        g.node.insert(at, helper.make_node("DequantizeLinear", ["xq", "sx_half", "zx"], ["d_half"]))
        next(n for n in g.node if n.op_type == "HardSigmoid").input[0] = "d_half"
    elif case == "int8 without a zero point":  # an omitted zero point would be read as uint8's
        model = _qdq_model("HardSwish")  # the output stays uint8; the input becomes int8, its DQ without zero point
        next(i for i in model.graph.initializer if i.name == "zx").CopyFrom(_scalar("zx", 0, np.int8))
        del next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "xq").input[2]
    else:  # a [1, 1, 1, 1, 1] factor makes the 4-D output 5-D
        model = _qdq_model("HardSwish * k")
        next(i for i in model.graph.initializer if i.name == "k").CopyFrom(
            numpy_helper.from_array(np.full((1, 1, 1, 1, 1), K, np.float32), "k"))
        model.graph.output[0].CopyFrom(helper.make_tensor_value_info("yq", TensorProto.UINT8, [1, 1, 4, 8, 8]))
    onnx.checker.check_model(model)
    new, result = _rewritten(model)
    assert not result.modified
    assert [n.op_type for n in new.graph.node] == [n.op_type for n in model.graph.node]


def test_the_command_line_option(tmp_path):
    """``--integer-hard-swish off`` keeps the HardSwish; the default rewrites it; a wrong value exits 2."""
    from qpass.cli import main

    model = tmp_path / "hs.onnx"
    onnx.save(_conv_hard_swish_conv(), str(model))
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=RNG.normal(0, 1, (16, 1, 3, 8, 8)).astype(np.float32)[:, 0])
    ops = {}
    for value in ("on", "off"):
        out = tmp_path / f"hs.{value}.onnx"
        assert main(["run", str(model), "--calib", str(calib), "-o", str(out), "--integer-hard-swish", value, "-q"]) == 0
        ops[value] = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert "HardSwish" in ops["off"] and "HardSwish" not in ops["on"]
    with pytest.raises(SystemExit) as exc:
        main(["run", str(model), "--calib", str(calib), "--integer-hard-swish", "yes"])
    assert exc.value.code == 2
