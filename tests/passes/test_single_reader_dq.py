"""SingleReaderDequantize: a DQ read by a GELU's Div and Mul gets one reader, so onnxruntime still fuses the Gelu."""
from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import qpass
from qpass.config import QuantConfig
from qpass.graph import WorkingGraph
from qpass.pass_manager import PassContext
from qpass.passes.single_reader_dq import GUARD_VALUE, SingleReaderDequantize
from qpass.recipes import rewrite_passes

RNG = np.random.default_rng(3)


def _gelu_model(second_reader: str = "gelu") -> onnx.ModelProto:
    """x -> Conv -> GELU (Div, Erf, Add, Mul(c), Mul) -> Conv -> y, as exporters write it (opset 13: no Gelu op).
    ``second_reader="conv"``: the first Conv's output is read by two Convs instead."""
    inits = [numpy_helper.from_array(RNG.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "W1"),
             numpy_helper.from_array(RNG.normal(0, 0.1, 8).astype(np.float32), "B1"),
             numpy_helper.from_array(RNG.normal(0, 0.3, (4, 8, 1, 1)).astype(np.float32), "W2"),
             numpy_helper.from_array(np.array(1.4142135, np.float32), "sqrt2"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array(0.5, np.float32), "half")]
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["c"], name="conv1", pads=[1, 1, 1, 1])]
    if second_reader == "gelu":
        nodes += [helper.make_node("Div", ["c", "sqrt2"], ["d"], name="div"),
                  helper.make_node("Erf", ["d"], ["e"], name="erf"),
                  helper.make_node("Add", ["e", "one"], ["a"], name="add1"),
                  helper.make_node("Mul", ["c", "a"], ["m"], name="mul"),
                  helper.make_node("Mul", ["m", "half"], ["g"], name="mul_half"),
                  helper.make_node("Conv", ["g", "W2"], ["y"], name="conv2")]
        outputs = ["y"]
    else:
        nodes += [helper.make_node("Conv", ["c", "W2"], ["y"], name="conv2"),
                  helper.make_node("Conv", ["c", "W2"], ["z"], name="conv3")]
        outputs = ["y", "z"]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, [1, 4, 8, 8]) for o in outputs],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _feeds(n=8):
    return [{"x": RNG.normal(0, 1, (1, 3, 8, 8)).astype(np.float32)} for _ in range(n)]


def _quantize(model, **kw):
    return qpass.quantize(model, _feeds(), val_fraction=0.0, **kw).model


def _optimized_ops(model, tmp_path, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL) -> list[str]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]


def test_the_gelu_input_dq_gets_one_reader_an_add_of_a_tiny_constant():
    q = _quantize(_gelu_model())
    nodes = {n.name: n for n in q.graph.node}
    readers = lambda t: [n for n in q.graph.node if t in n.input]  # noqa: E731
    dq = [n for n in q.graph.node if n.op_type == "DequantizeLinear" and any(r.op_type == "Div" for r in
                                                                             readers(n.output[0]) + [
            m for r in readers(n.output[0]) for m in readers(r.output[0])])]
    assert len(dq) == 1
    (guard,) = readers(dq[0].output[0])
    assert guard.op_type == "Add" and guard.name in nodes
    const = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}[guard.input[1]]
    assert const.dtype == np.float32 and const.tolist() == [float(GUARD_VALUE)] and GUARD_VALUE == 2.0 ** -60
    assert sorted(r.op_type for r in readers(guard.output[0])) == ["Div", "Mul"]


def test_onnxruntime_fuses_the_gelu_only_with_the_single_reader(tmp_path):
    guarded = _optimized_ops(_quantize(_gelu_model()), tmp_path)
    plain = _optimized_ops(_quantize(_gelu_model(), single_reader_dq=False), tmp_path)
    assert "Gelu" in guarded and "Erf" not in guarded
    assert "Gelu" not in plain and "Erf" in plain  # the DQ copied per reader broke the pattern


def test_the_guard_changes_no_output_value():
    x = {"x": RNG.normal(0, 1, (1, 3, 8, 8)).astype(np.float32)}
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the same float ops either way
    run = lambda m: ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, x)[0]  # noqa: E731
    model = _gelu_model()
    same_feeds = _feeds()  # the same calibration both times
    g = qpass.quantize(model, same_feeds, val_fraction=0.0).model
    p = qpass.quantize(model, same_feeds, val_fraction=0.0, single_reader_dq=False).model
    assert np.array_equal(run(g), run(p))


def test_a_second_run_changes_nothing_and_compute_readers_are_left_alone():
    q = _quantize(_gelu_model())
    wg = WorkingGraph(q)
    assert not SingleReaderDequantize().run(wg.graph, PassContext()).modified
    two_convs = _quantize(_gelu_model("conv"))
    assert not any(n.op_type == "Add" for n in two_convs.graph.node)  # the DQ feeds two Convs: no guard
    assert not any(isinstance(p, SingleReaderDequantize) for p in rewrite_passes(QuantConfig(single_reader_dq=False)))
    adds = [sum(n.op_type == "Add" for n in _quantize(_gelu_model(), single_reader_dq=on).graph.node) for on in (True, False)]
    assert adds[0] == adds[1] + 1  # the guard is the one Add more


def test_the_addend_keeps_a_zero_and_what_a_gelu_makes_of_it_out_of_the_subnormal_floats():
    """An exact 0 from the DQ becomes GUARD_VALUE; its GELU (about half of it) and its square must stay normal
    floats, which CPUs compute at full speed (2**-126 did not: the detector's Gelus ran 3x slower)."""
    tiny = np.finfo(np.float32).tiny
    g = np.float32(GUARD_VALUE)
    gelu = g * np.float32(0.5) * (np.float32(1) + np.float32(math.erf(float(g) / math.sqrt(2))))
    assert gelu >= tiny and g * g >= tiny and g / np.float32(1.4142135) >= tiny
    # and exact on any DQ value of magnitude 2**-36 or more
    for v in (2.0 ** -36, 1e-6, 0.37, -5.0, 1e4):
        assert np.float32(v) + g == np.float32(v)
