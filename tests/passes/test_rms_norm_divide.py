"""RMS normalization as a division, its statistics kept float32 by the float16 conversion."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import qpass
from qpass.half import convert
from qpass.passes.rms_norm_divide import RmsNormDivide, rms_chains, rms_statistics

F, H = TensorProto.FLOAT, TensorProto.FLOAT16


def _rms_model(form: str = "reciprocal", exponent: float = 2.0, extra_reader: bool = False) -> onnx.ModelProto:
    """y = w * x * rsqrt(mean(x^2, -1) + eps) + 0 (a Llama RMSNorm as PyTorch's exporter writes it), x [1, 4, 8]."""
    inits = [numpy_helper.from_array(np.array(exponent, np.float32), "two"),
             numpy_helper.from_array(np.array([-1], np.int64), "axes"),
             numpy_helper.from_array(np.array(1e-6, np.float32), "eps"),
             numpy_helper.from_array(np.linspace(0.5, 2.0, 8).astype(np.float32), "w")]
    nodes = [helper.make_node("Pow", ["x", "two"], ["sq"]),
             helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1),
             helper.make_node("Add", ["ms", "eps"], ["ms_eps"]),
             helper.make_node("Sqrt", ["ms_eps"], ["rms"])]
    if form == "reciprocal":
        nodes += [helper.make_node("Reciprocal", ["rms"], ["inv"]), helper.make_node("Mul", ["x", "inv"], ["n"])]
    else:
        nodes += [helper.make_node("Div", ["x", "rms"], ["n"])]
    nodes += [helper.make_node("Mul", ["w", "n"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", F, [1, 4, 8])]
    if extra_reader:  # the reciprocal is also read elsewhere: left alone
        nodes.append(helper.make_node("Identity", ["inv"], ["inv_out"]))
        outputs.append(helper.make_tensor_value_info("inv_out", F, None))
    g = helper.make_graph(nodes, "rms", [helper.make_tensor_value_info("x", F, [1, 4, 8])], outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def _run(m, x):
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})


def _x():
    x = np.random.default_rng(0).normal(0, 1, (1, 4, 8)).astype(np.float32)
    x[0, 0, 3] = 3000.0  # a massive activation: x^2 = 9e6, past float16's range
    return x


def test_reciprocal_form_becomes_a_division_with_the_same_values():
    m = _rms_model()
    x = _x()
    want = _run(m, x)[0]
    out, res = RmsNormDivide().apply(m)
    assert res.stats == {"rewritten": 1}
    assert [n.op_type for n in out.graph.node] == ["Pow", "ReduceMean", "Add", "Sqrt", "Div", "Mul"]
    onnx.checker.check_model(out, full_check=True)
    np.testing.assert_allclose(_run(out, x)[0], want, rtol=1e-6)
    by_hand = np.linspace(0.5, 2.0, 8) * x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(_run(out, x)[0], by_hand, rtol=1e-5)


@pytest.mark.parametrize("kw", [dict(exponent=3.0), dict(extra_reader=True)])
def test_not_an_rms_normalization_is_left_alone(kw):
    m = _rms_model(**kw)
    before = m.SerializeToString()
    out, res = RmsNormDivide().apply(m)
    assert not res.modified and out.SerializeToString() == before


def test_float16_keeps_the_statistics_float32_between_two_casts():
    """The form onnxruntime fuses on CUDA (SimplifiedLayerNormalization): Cast(x) -> Pow .. Div in float32 ->
    Cast -> Mul(w) in float16; the massive activation's square (9e6) never meets float16."""
    x = _x()
    m = _rms_model()
    want = _run(m, x)[0]
    out, records = convert(m, qpass.QuantConfig(float_type="float16", half_io=True))
    onnx.checker.check_model(out, full_check=True)
    ops = [n.op_type for n in out.graph.node]
    assert ops == ["Cast", "Pow", "ReduceMean", "Add", "Sqrt", "Div", "Cast", "Mul"], ops
    first = out.graph.node[0]
    assert [n.op_type for n in out.graph.node if first.output[0] in n.input] == ["Pow", "Div"]  # x cast once
    types = {vi.name: vi.type.tensor_type.elem_type for vi in onnx.shape_inference.infer_shapes(out).graph.value_info}
    assert all(types[t] == F for t in ("sq", "ms", "ms_eps", "rms", "n"))
    assert rms_statistics(out) == {"sq", "ms", "ms_eps", "rms", "n"} and len(rms_chains(out)) == 1
    got = _run(out, x.astype(np.float16))[0].astype(np.float32)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)


def test_weight_only_output_writes_its_rms_normalization_as_a_division():
    """Weight-only int4 quantizes the MatMul after the norm and leaves the norm float, written as a division (one
    SimplifiedLayerNormalization for onnxruntime); the same output with the division undone by hand."""
    m = _rms_model()
    m.graph.node.append(helper.make_node("MatMul", ["y", "proj"], ["z"], name="proj_mm"))
    m.graph.initializer.append(
        numpy_helper.from_array(np.random.default_rng(1).normal(0, 0.1, (8, 64)).astype(np.float32), "proj"))
    del m.graph.output[:]
    m.graph.output.append(helper.make_tensor_value_info("z", F, [1, 4, 64]))
    m.opset_import[0].version = 21
    res = qpass.quantize(m, None, weight_only="int4", block_size=8, validate=False)
    ops = [n.op_type for n in res.model.graph.node]
    assert "Reciprocal" not in ops and ops.count("Div") == 1 and "DequantizeLinear" in ops
    assert next(r for r in res.report.passes if r.name == "rms_norm_divide").stats == {"rewritten": 1}
    searched = qpass.quantize(m, None, weight_only="int4", block_size=8, target_cosine=0.9999999, latency=False)
    assert searched.report.search and "Reciprocal" not in [n.op_type for n in searched.model.graph.node]
    undone = onnx.ModelProto()
    undone.CopyFrom(res.model)
    div = next(n for n in undone.graph.node if n.op_type == "Div")
    at = list(undone.graph.node).index(div)
    x_name, rms = div.input
    div.op_type, div.input[1] = "Mul", "inv"
    undone.graph.node.insert(at, helper.make_node("Reciprocal", [rms], ["inv"]))
    x = _x()
    np.testing.assert_allclose(_run(res.model, x)[0], _run(undone, x)[0], rtol=1e-4, atol=1e-4)


def test_a_reciprocal_also_read_inside_an_if_branch_is_left_alone():
    """The branch reads the reciprocal from the outer scope: removing it would leave the branch reading nothing."""
    m = _rms_model()
    then_b = helper.make_graph([helper.make_node("Identity", ["inv"], ["t_out"])], "then", [],
                               [helper.make_tensor_value_info("t_out", F, [1, 4, 1])])
    else_b = helper.make_graph([helper.make_node("Identity", ["y"], ["e_out"])], "else", [],
                               [helper.make_tensor_value_info("e_out", F, [1, 4, 8])])
    m.graph.input.append(helper.make_tensor_value_info("c", TensorProto.BOOL, []))
    m.graph.node.append(helper.make_node("If", ["c"], ["w_out"], then_branch=then_b, else_branch=else_b))
    m.graph.output.append(helper.make_tensor_value_info("w_out", F, [1, 4, None]))
    out, res = RmsNormDivide().apply(m)
    assert res.stats == {"rewritten": 0} and "Reciprocal" in [n.op_type for n in out.graph.node]
    onnx.checker.check_model(out, full_check=True)


def _layer_norm_model() -> onnx.ModelProto:
    """h = Relu(x); y = Relu(gamma * (h - mean(h)) / sqrt(var(h) + eps) + beta), a LayerNorm as exporters
    decompose it, between two Relus (x [1, 4, 8], opset 13)."""
    inits = [numpy_helper.from_array(np.array(2.0, np.float32), "two"),
             numpy_helper.from_array(np.array(1e-5, np.float32), "eps"),
             numpy_helper.from_array(np.linspace(0.5, 2.0, 8).astype(np.float32), "gamma"),
             numpy_helper.from_array(np.linspace(-1.0, 1.0, 8).astype(np.float32), "beta")]
    nodes = [helper.make_node("Relu", ["x"], ["h"]),
             helper.make_node("ReduceMean", ["h"], ["mean"], axes=[-1], keepdims=1),
             helper.make_node("Sub", ["h", "mean"], ["c"]),
             helper.make_node("Pow", ["c", "two"], ["sq"]),
             helper.make_node("ReduceMean", ["sq"], ["var"], axes=[-1], keepdims=1),
             helper.make_node("Add", ["var", "eps"], ["var_eps"]),
             helper.make_node("Sqrt", ["var_eps"], ["std"]),
             helper.make_node("Div", ["c", "std"], ["n"]),
             helper.make_node("Mul", ["n", "gamma"], ["scaled"]),
             helper.make_node("Add", ["scaled", "beta"], ["ln"]),
             helper.make_node("Relu", ["ln"], ["y"])]
    g = helper.make_graph(nodes, "ln", [helper.make_tensor_value_info("x", F, [1, 4, 8])],
                          [helper.make_tensor_value_info("y", F, [1, 4, 8])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_bfloat16_keeps_a_decomposed_layer_norm_float32_from_its_mean_to_the_normalized_x():
    """bfloat16: onnxruntime's CUDA provider has no bfloat16 ReduceMean at opset 13, so the mean is float32; the
    centering and the statistics stay float32 too, one Cast of the input feeding both the mean and the Sub, and one
    Cast back before gamma and beta (bfloat16, like the Relus around): the form onnxruntime fuses into one
    LayerNormalization of bfloat16 input, scale and bias. float16 keeps its form (centering in float16, statistics
    float32)."""
    from qpass.passes.rms_norm_divide import layer_norm_boundary, layer_norm_tensors

    m = _layer_norm_model()
    ln = {"mean", "c", "sq", "var", "var_eps", "std", "n"}
    assert layer_norm_tensors(m) == ln
    assert layer_norm_boundary(m) == {"h", "scaled", "ln"}  # what bfloat16's fidelity check does not move
    out, _ = convert(m, qpass.QuantConfig(float_type="bfloat16", half_io=True))
    onnx.checker.check_model(out, full_check=True)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in onnx.shape_inference.infer_shapes(out).graph.value_info}
    assert all(types[t] == F for t in ln), {t: types[t] for t in ln}
    assert types["h"] == types["scaled"] == types["ln"] == TensorProto.BFLOAT16
    casts = [n for n in out.graph.node if n.op_type == "Cast"]
    assert [(n.input[0], n.attribute[0].i) for n in casts] == [("h", F), ("n", TensorProto.BFLOAT16)]
    readers = [n.op_type for n in out.graph.node if casts[0].output[0] in n.input]
    assert sorted(readers) == ["ReduceMean", "Sub"]  # the Cast onnxruntime takes into the fused node
    half, _ = convert(m, qpass.QuantConfig(float_type="float16", half_io=True))
    ht = {vi.name: vi.type.tensor_type.elem_type for vi in onnx.shape_inference.infer_shapes(half).graph.value_info}
    assert ht["mean"] == ht["c"] == ht["ln"] == H and ht["sq"] == ht["n"] == F


@pytest.mark.parametrize("where", ["graph_input", "kept_producer"])
def test_bfloat16_layer_norm_with_a_float32_input_is_float32_through_gamma_and_beta(where):
    """A LayerNorm whose input stays float32 (a float32 graph input read directly, or the output of a node kept
    float32) gets float32 gamma and beta too: one pass of the conversion leaves them bfloat16 (the mix onnxruntime
    fuses into a node CUDA does not run), qpass.half.convert converts again with them kept."""
    from qpass.pass_manager import run_model_passes
    from qpass.passes.rms_norm_divide import mixed_layer_norms
    from qpass.recipes import float_passes
    from qpass.verify import verify_model

    m = _layer_norm_model()
    m.graph.node.append(helper.make_node("MatMul", ["y", "proj"], ["z"]))  # a heavy op after it: bfloat16
    m.graph.initializer.append(numpy_helper.from_array(np.eye(8, dtype=np.float32), "proj"))
    m.graph.output[0].CopyFrom(helper.make_tensor_value_info("z", F, [1, 4, 8]))
    keep = {"h"} if where == "kept_producer" else set()
    if where == "graph_input":  # the LayerNorm reads x itself
        for n in m.graph.node:
            n.input[:] = ["x" if i == "h" else i for i in n.input]
        del m.graph.node[0]
    cfg = qpass.QuantConfig(float_type="bfloat16")
    once = onnx.ModelProto()
    once.CopyFrom(m)
    once, _ = run_model_passes(once, float_passes(cfg, keep_tensors=frozenset(keep), keep_nodes=()), verify=verify_model)
    assert mixed_layer_norms(m, once) == {"scaled", "ln"}
    out, _ = convert(m, cfg, keep)
    onnx.checker.check_model(out, full_check=True)
    assert mixed_layer_norms(m, out) == set()
    types = {vi.name: vi.type.tensor_type.elem_type for vi in onnx.shape_inference.infer_shapes(out).graph.value_info}
    assert all(types[t] == F for t in ("mean", "c", "n", "scaled", "ln"))
    matmul = next(n for n in out.graph.node if n.op_type == "MatMul")
    assert types[matmul.input[0]] == TensorProto.BFLOAT16  # the MatMul after it still runs in bfloat16
