"""MatMulBiasToGemm: a 2-D DQ -> MatMul + bias Add becomes a Gemm with an int32 bias, which onnxruntime runs as QGemm."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import qpass
from qpass.graph import WorkingGraph
from qpass.pass_manager import PassContext
from qpass.passes.matmul_bias_gemm import MatMulBiasToGemm

RNG = np.random.default_rng(5)


def _dense_model(rank: int = 2) -> onnx.ModelProto:
    """x -> MatMul(W) -> Add(b) -> y, as a Keras/JAX Dense exports (x of rank 2, or 3 for a sequence)."""
    shape = [1, 16] if rank == 2 else [1, 3, 16]
    out = shape[:-1] + [6]
    rng = np.random.default_rng(11)  # the same weights every call
    inits = [numpy_helper.from_array(rng.normal(0, 0.4, (16, 6)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.normal(0, 0.5, 6).astype(np.float32), "b")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="dense"),
             helper.make_node("Add", ["m", "b"], ["y"], name="bias")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _feeds(model, n=16):
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return [{"x": RNG.normal(0, 1, shape).astype(np.float32)} for _ in range(n)]


def _quantize(model, **kw):
    return qpass.quantize(model, _feeds(model), val_fraction=0.0, **kw).model


def _arrays(model):
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def test_dense_becomes_a_gemm_with_an_int32_bias_at_input_scale_times_weight_scale():
    q = _quantize(_dense_model())
    ops = [n.op_type for n in q.graph.node]
    assert "MatMul" not in ops and ops.count("Gemm") == 1 and "Add" not in ops
    producers = {o: n for n in q.graph.node for o in n.output}
    gemm = next(n for n in q.graph.node if n.op_type == "Gemm")
    assert gemm.output[0] == "y"
    a_dq, w_dq, b_dq = (producers[i] for i in gemm.input)
    assert {a_dq.op_type, w_dq.op_type, b_dq.op_type} == {"DequantizeLinear"}
    arr = _arrays(q)
    s_a, s_w = arr[a_dq.input[1]], arr[w_dq.input[1]]
    bq, bs, bz = arr[b_dq.input[0]], arr[b_dq.input[1]], arr[b_dq.input[2]]
    assert bq.dtype == np.int32 and bz.dtype == np.int32 and not bz.any()
    assert np.array_equal(bs, (np.float32(s_a) * s_w).astype(np.float32))
    assert {a.name: a.i for a in b_dq.attribute} == {"axis": 0}
    b = _arrays(_dense_model())["b"]
    assert np.all(np.abs(bq * bs.astype(np.float64) - b) <= bs / 2 + 1e-12)  # the bias, rounded once


def test_onnxruntime_runs_it_as_one_integer_gemm_with_the_graphs_own_result(tmp_path):
    """Fused (QGemm) and unfused (DQ, Gemm in float) runs of the output agree: the fusion computes the graph."""
    model = _dense_model()
    q = _quantize(model)
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    fused = ort.InferenceSession(q.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    optimized = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert "QGemm" in optimized and "Gemm" not in optimized and "MatMul" not in optimized
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    unfused = ort.InferenceSession(q.SerializeToString(), plain, providers=["CPUExecutionProvider"])
    for feed in _feeds(model, 4):
        y, r = fused.run(None, feed)[0], unfused.run(None, feed)[0]
        assert np.abs(y - r).max() <= 1e-4 * np.abs(r).max()


def test_a_second_run_changes_nothing():
    wg = WorkingGraph(_quantize(_dense_model()))
    assert not MatMulBiasToGemm().run(wg.graph, PassContext()).modified


def test_a_sequence_input_and_the_qop_form_keep_matmul_and_add():
    seq = [n.op_type for n in _quantize(_dense_model(rank=3)).graph.node]
    assert "MatMul" in seq and "Add" in seq and "Gemm" not in seq  # onnxruntime fuses DQ -> MatMul of rank 3 itself
    qop = [n.op_type for n in _quantize(_dense_model(), format="qop").graph.node]
    assert "Gemm" not in qop


def test_per_tensor_weights_give_a_per_tensor_int32_bias_and_the_same_outputs():
    """--per-tensor: one weight scale, so the bias DQ has one 0-d scale and no axis (it crashed building the scale
    constant from a NumPy scalar before)."""
    model = _dense_model()
    q = _quantize(model, per_channel=False)
    gemm = next(n for n in q.graph.node if n.op_type == "Gemm")
    b_dq = next(n for n in q.graph.node if n.output[0] == gemm.input[2])
    assert b_dq.op_type == "DequantizeLinear" and not any(a.name == "axis" for a in b_dq.attribute)
    assert _arrays(q)[b_dq.input[1]].shape == ()
    feed = _feeds(model, 1)[0]
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    got = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()


def test_a_bias_held_in_a_constant_node_becomes_the_gemm_bias_too():
    """TensorFlow and Paddle exports hold a Dense's bias in a Constant node rather than an initializer."""
    model = _dense_model()
    b = next(i for i in model.graph.initializer if i.name == "b")
    model.graph.node.insert(0, helper.make_node("Constant", [], ["b"], name="b_const", value=b))
    model.graph.initializer.remove(b)
    q = _quantize(model)
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("Gemm") == 1 and "MatMul" not in ops and "Add" not in ops
