"""--allow-contrib-ops writes com.microsoft.MatMulNBits for the blocked 4/8-bit MatMul weights; without it the output
holds standard ONNX ops only. The contrib form loads in onnxruntime and matches the standard form."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import qpass
from qpass.passes.contrib_matmul_nbits import matmul_nbits_inputs

K, N = 72, 24  # K is not a multiple of the block (16): the last block is padded


def _mlp(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.2, (K, K)).astype(np.float32)
    w2 = rng.normal(0, 0.2, (K, N)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"), helper.make_node("Tanh", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="mm2")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", N])],
                              [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # no fusion of the standard form
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("qtype", ["int4", "uint4", "int8"])
def test_contrib_matmul_nbits_only_with_the_flag_and_it_matches_the_standard_form(qtype):
    model = _mlp()
    kw = dict(weight_only=qtype, block_size=16, per_layer=False, latency=False, weight_only_head="same")
    standard = qpass.quantize(model, **kw).model
    assert {n.domain for n in standard.graph.node} <= {"", "ai.onnx"}
    assert [o.domain for o in standard.opset_import] == [""]
    contrib = qpass.quantize(model, allow_contrib_ops=True, **kw)
    ops = [(n.op_type, n.domain) for n in contrib.model.graph.node]
    assert ops.count(("MatMulNBits", "com.microsoft")) == 2 and ("DequantizeLinear", "") not in ops
    node = next(n for n in contrib.model.graph.node if n.op_type == "MatMulNBits")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["bits"] == (8 if qtype == "int8" else 4) and attrs["block_size"] == 16 and attrs["K"] == K
    x = np.random.default_rng(2).normal(size=(2, 5, K)).astype(np.float32)
    a, b = _run(standard, x), _run(contrib.model, x)
    # accuracy level 4 quantizes the activations to int8 per block: an error far below the weight's own
    assert np.abs(a - b).max() <= 0.02 * np.abs(a).max()
    ref = _run(model, x)
    assert np.abs(b - ref).max() <= np.abs(a - ref).max() + 0.02 * np.abs(a).max()
    # a second run on its own output changes nothing
    from qpass.graph import WorkingGraph
    from qpass.pass_manager import PassContext
    from qpass.passes.contrib_gather_block_quantized import ContribGatherBlockQuantized
    from qpass.passes.contrib_matmul_nbits import ContribMatMulNBits

    graph = WorkingGraph(contrib.model).graph
    assert not ContribMatMulNBits().run(graph, PassContext()).modified
    assert not ContribGatherBlockQuantized().run(graph, PassContext()).modified


def test_the_packed_layout_dequantizes_back_to_the_weight():
    rng = np.random.default_rng(0)
    q = rng.integers(0, 16, (80, N)).astype(np.int32)
    zp = rng.integers(0, 16, (5, N)).astype(np.int32)
    scale = rng.random((5, N)).astype(np.float32)
    packed, scales, zeros = matmul_nbits_inputs(q, scale, zp, "uint4", 16)
    assert packed.shape == (N, 5, 8) and scales.shape == (N * 5,) and zeros.shape == (N * 3,)
    packed, zeros = packed.astype(np.int32), zeros.astype(np.int32)
    low, high = packed & 15, packed >> 4
    codes = np.stack([low, high], axis=-1).reshape(N, 80)  # K = 80 = 5 blocks exactly
    zeros_unpacked = np.stack([zeros.reshape(N, 3) & 15, zeros.reshape(N, 3) >> 4], -1).reshape(N, 6)[:, :5]
    w = (codes.reshape(N, 5, 16) - zeros_unpacked[..., None]) * scales.reshape(N, 5)[..., None]
    expect = (q - np.repeat(zp, 16, axis=0)) * np.repeat(scale, 16, axis=0)
    np.testing.assert_allclose(w.reshape(N, 80).T, expect, rtol=1e-6)


def test_contrib_embedding_is_gather_block_quantized_unless_tied_or_not_a_power_of_two():
    from tests.passes.test_weight_only_tied import _tied_lm
    from tests.test_validate import _tiny_lm

    model = _tiny_lm(vocab=50, dim=32)
    kw = dict(weight_only="int4", block_size=16, per_layer=False, latency=False)
    standard = qpass.quantize(model, **kw).model
    out = qpass.quantize(model, allow_contrib_ops=True, **kw)
    ops = [n.op_type for n in out.model.graph.node]
    assert ops.count("GatherBlockQuantized") == 1 and ops.count("MatMulNBits") == 1 and "Gather" not in ops
    ids = {"input_ids": np.array([[0, 7, 49, 7]], dtype=np.int64)}
    a = ort.InferenceSession(standard.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, ids)[0]
    b = ort.InferenceSession(out.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, ids)[0]
    assert np.abs(a - b).max() <= 0.02 * np.abs(a).max()
    # a tied table stays standard (the head reads its int8 rows), and says why
    tied = qpass.quantize(_tied_lm("copy"), allow_contrib_ops=True, **kw)
    assert "GatherBlockQuantized" not in [n.op_type for n in tied.model.graph.node]
    assert any("tied head" in s["reason"] for s in tied.report.skipped)
    # a row length that is no power of two stays standard too
    odd = qpass.quantize(_tiny_lm(vocab=50, dim=24), allow_contrib_ops=True, **kw)
    assert "GatherBlockQuantized" not in [n.op_type for n in odd.model.graph.node]
    assert any("power of two" in s["reason"] for s in odd.report.skipped)
