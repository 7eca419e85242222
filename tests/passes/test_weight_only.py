"""Weight-only mode: block-wise int4/uint4/int8 DequantizeLinear -> MatMul, exact against onnx.reference, fused by
onnxruntime into MatMulNBits, tied weights once, GPTQ through calibration statistics."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import qpass
from qpass.errors import OpsetError
from qpass.qparams import dequantize, unpack_4bit

K, N = 64, 24


def _mlp(opset: int = 21, *, tied: bool = False, gemm_trans_b: bool = False, seed: int = 0) -> onnx.ModelProto:
    """x[M, K] -> MatMul(W1[K, K]) -> Tanh -> MatMul(W2[K, N]) (or Gemm with W2 stored [N, K]) -> y; optionally a
    third MatMul reading W1 again (a tied weight)."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.2, (K, K)).astype(np.float32)
    w2 = rng.normal(0, 0.2, (K, N)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"), helper.make_node("Tanh", ["h"], ["r"], name="tanh")]
    if gemm_trans_b:
        nodes.append(helper.make_node("Gemm", ["r", "W2"], ["y"], name="gemm", transB=1))
        inits = [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(np.ascontiguousarray(w2.T), "W2")]
    else:
        nodes.append(helper.make_node("MatMul", ["r", "W2"], ["y"], name="mm2"))
        inits = [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", N])]
    if tied:
        nodes.append(helper.make_node("MatMul", ["r", "W1"], ["z"], name="mm_tied"))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["M", K]))
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", K])], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model


def _feeds(n: int = 24, seed: int = 1, correlated: bool = False):
    rng = np.random.default_rng(seed)
    # one fixed mixing for every seed: calibration and validation feeds come from the same distribution
    mix = np.random.default_rng(123).normal(size=(K, K)).astype(np.float32) if correlated else np.eye(K, dtype=np.float32)
    return [{"x": (rng.normal(size=(4, K)).astype(np.float32) @ mix)} for _ in range(n)]


def _dq_of(model: onnx.ModelProto, weight_reader: str) -> onnx.NodeProto:
    node = next(n for n in model.graph.node if n.name == weight_reader)
    return next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == node.input[1])


def _inits(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


@pytest.mark.parametrize("qtype, elem, symmetric", [("int4", TensorProto.INT4, True), ("uint4", TensorProto.UINT4, False),
                                                    ("int8", TensorProto.INT8, True)])
def test_weights_become_packed_block_wise_dq_and_match_the_reference(qtype, elem, symmetric):
    model = _mlp()
    out = qpass.quantize(model, weight_only=qtype, block_size=16, per_layer=False, latency=False).model
    onnx.checker.check_model(out, full_check=True)
    dq = _dq_of(out, "mm1")
    attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
    assert attrs == {"axis": 0, "block_size": 16}
    inits = _inits(out)
    q, scale, zp = (inits[n] for n in dq.input)
    assert q.data_type == elem and zp.data_type == elem and scale.data_type == TensorProto.FLOAT
    assert list(scale.dims) == [K // 16, K]
    if qtype != "int8":
        assert len(q.raw_data) == K * K // 2  # two values a byte
        values = unpack_4bit(np.frombuffer(q.raw_data, np.uint8), K * K, signed=qtype == "int4").reshape(K, K)
        zeros = unpack_4bit(np.frombuffer(zp.raw_data, np.uint8), int(np.prod(zp.dims)), signed=qtype == "int4")
        assert (zeros == 0).all() == symmetric
        w = dequantize(values, numpy_helper.to_array(scale), zeros.reshape(scale.dims), axis=0, block_size=16)
        assert np.abs(w - numpy_helper.to_array(_inits(model)["W1"])).max() <= numpy_helper.to_array(scale).max() * 0.51
    assert not any(n.op_type == "QuantizeLinear" for n in out.graph.node)  # activations untouched
    x = _feeds(1)[0]
    ref = ReferenceEvaluator(out).run(None, x)[0]
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    got = ort.InferenceSession(out.SerializeToString(), plain, providers=["CPUExecutionProvider"]).run(None, x)[0]
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_onnxruntime_fuses_the_int4_form_into_matmulnbits(tmp_path):
    out = qpass.quantize(_mlp(), weight_only="int4", block_size=32, per_layer=False, latency=False).model
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    sess = ort.InferenceSession(out.SerializeToString(), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert ops.count("MatMulNBits") == 2 and "DequantizeLinear" not in ops
    x = _feeds(1)[0]
    ref = ReferenceEvaluator(out).run(None, x)[0]
    assert np.abs(sess.run(None, x)[0] - ref).max() <= 1e-4 * np.abs(ref).max()


def test_a_tied_weight_is_stored_once_and_gemm_blocks_its_input_axis():
    tied = qpass.quantize(_mlp(tied=True), weight_only="int4", block_size=16, per_layer=False, latency=False,
                          weight_only_head="same")
    assert tied.report.quantized_nodes == {"MatMul": 3}
    assert _dq_of(tied.model, "mm1").output[0] == _dq_of(tied.model, "mm_tied").output[0]
    assert sum(n.op_type == "DequantizeLinear" for n in tied.model.graph.node) == 2
    gemm = qpass.quantize(_mlp(gemm_trans_b=True), weight_only="int4", block_size=16, per_layer=False, latency=False,
                          weight_only_head="same").model
    dq = _dq_of(gemm, "gemm")
    assert {a.name: helper.get_attribute_value(a) for a in dq.attribute} == {"axis": 1, "block_size": 16}
    assert list(_inits(gemm)[dq.input[1]].dims) == [N, K // 16]


def test_rtn_needs_no_calibration_data_and_gptq_uses_it():
    model = _mlp()
    rtn = qpass.quantize(model, weight_only="int4", block_size=16, per_layer=False, latency=False,
                         val=_feeds(8, seed=5, correlated=True))
    assert rtn.report.calibration["samples"] == 0 and rtn.plan.statistics == {}
    gptq = qpass.quantize(model, _feeds(48, correlated=True), weight_only="int4", block_size=16, algorithm="gptq",
                          per_layer=False, latency=False, val=_feeds(8, seed=5, correlated=True))
    assert set(gptq.plan.statistics) == {"x", "r"} and gptq.report.calibration["samples"] == 48
    err = {name: r.report.validation["outputs"][0]["sqnr_db"] for name, r in (("rtn", rtn), ("gptq", gptq))}
    assert err["gptq"] > err["rtn"] + 1.0, err  # GPTQ's output error is lower on correlated inputs


def test_gptq_without_calibration_data_is_a_clear_error():
    with pytest.raises(qpass.QpassError, match="calibration data"):
        qpass.quantize(_mlp(), weight_only="int4", algorithm="gptq", per_layer=False, latency=False)


def test_opset_below_21_is_upgraded_loudly_or_refused_with_keep_opset():
    """Block-wise DequantizeLinear needs opset 21: an opset-17 model is upgraded (onnx.version_converter) with a
    warning and the reason in the report, validated against the model as given; --keep-opset refuses, naming the fix."""
    res = qpass.quantize(_mlp(opset=17), weight_only="int4", per_layer=False, latency=False)
    assert res.report.opset["input"] == 17 and res.report.opset["output"] == 21
    assert "block-wise DequantizeLinear" in res.report.opset["upgraded"]
    assert any(w.startswith("opset upgraded 17 -> 21") for w in res.report.warnings)
    assert res.model.opset_import[0].version == 21 and res.passed
    assert any(n.op_type == "DequantizeLinear" for n in res.model.graph.node)
    with pytest.raises(OpsetError, match="--target-opset 21"):
        qpass.quantize(_mlp(opset=17), weight_only="int4", opset_upgrade=False, per_layer=False, latency=False)
    with pytest.raises(OpsetError, match="--target-opset 21"):  # a target below what the mode needs
        qpass.quantize(_mlp(opset=17), weight_only="int4", target_opset=18, per_layer=False, latency=False)


def test_the_output_is_not_quantized_twice():
    from qpass.config import QuantConfig
    from qpass.graph import WorkingGraph
    from qpass.plan.policy import build_plan

    cfg = QuantConfig(weight_only="int4", block_size=16, per_layer=False, latency=False)
    once = qpass.quantize(_mlp(), config=cfg).model
    plan = build_plan(WorkingGraph(once).graph, cfg)
    assert not plan.nodes and len(plan.skipped) == 2  # its weights are DequantizeLinear outputs, not constants
    with pytest.raises(qpass.QpassError, match="already quantized"):
        qpass.quantize(once, config=cfg)

def test_the_output_head_is_int8_by_default_or_as_configured():
    def head_type(**kw):
        out = qpass.quantize(_mlp(), weight_only="int4", block_size=16, per_layer=False, latency=False, **kw)
        mm2 = next(n for n in out.model.graph.node if n.name == "mm2")
        if mm2.input[1] in _inits(out.model):
            return "float", out
        return {TensorProto.INT4: "int4", TensorProto.INT8: "int8"}[_inits(out.model)[_dq_of(out.model, "mm2").input[0]].data_type], out

    assert head_type()[0] == "int8"
    assert head_type(weight_only_head="same")[0] == "int4"
    kind, out = head_type(weight_only_head="float")
    assert kind == "float" and any("output head" in s["reason"] for s in out.report.skipped)
    assert _inits(out.model)[_dq_of(out.model, "mm1").input[0]].data_type == TensorProto.INT4  # the rest stays int4


def test_embedding_tables_are_int8_per_row_and_only_gathered_rows_are_dequantized():
    from tests.test_validate import _tiny_lm

    model = _tiny_lm(vocab=50, dim=32)
    out = qpass.quantize(model, weight_only="int4", block_size=16, per_layer=False, latency=False)
    assert out.report.quantized_nodes == {"Gather": 1, "MatMul": 1}
    inits = _inits(out.model)
    gathers = [n for n in out.model.graph.node if n.op_type == "Gather"]
    table = next(inits[g.input[0]] for g in gathers if inits[g.input[0]].data_type == TensorProto.INT8)
    assert list(table.dims) == [50, 32] and "E" not in inits  # the float table is gone
    # Gather(E_q) -> Cast -> Mul(row scale): no block-wise DequantizeLinear left unfused (the CUDA provider fails on one)
    cast = next(n for n in out.model.graph.node if n.op_type == "Cast" and n.input[0] in {g.output[0] for g in gathers})
    dq = next(n for n in out.model.graph.node if n.op_type == "Mul" and cast.output[0] in n.input)
    assert not [n for n in out.model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] not in inits]
    ids = {"input_ids": np.array([[0, 7, 49, 7]], dtype=np.int64)}
    emb = numpy_helper.to_array(_inits(model)["E"])
    step = np.abs(emb).max(axis=1) / 127
    rows = ReferenceEvaluator(out.model).run([dq.output[0]], ids)[0][0]
    assert np.all(np.abs(rows - emb[ids["input_ids"][0]]) <= step[ids["input_ids"][0], None] / 2 + 1e-7)
    off = qpass.quantize(model, weight_only="int4", block_size=16, per_layer=False, latency=False,
                         weight_only_embeddings=False)
    assert off.report.quantized_nodes == {"MatMul": 1} and "E" in _inits(off.model)


def test_auto_is_awq_gptq_with_calibration_data_and_round_to_nearest_without():
    with_data = qpass.quantize(_mlp(), _feeds(16, correlated=True), weight_only="int4", block_size=16, per_layer=False,
                               latency=False)
    assert with_data.report.config["algorithm"] == "awq-gptq" and with_data.plan.statistics
    without = qpass.quantize(_mlp(), weight_only="int4", block_size=16, per_layer=False, latency=False)
    assert without.report.config["algorithm"] == "rtn" and not without.plan.statistics
    assert any("--calib for activation-aware scaling and GPTQ" in w for w in without.report.warnings)


def test_sequential_gptq_measures_later_hessians_on_the_quantized_earlier_layers():
    from qpass import stages
    from qpass.config import QuantConfig
    from qpass.plan.policy import dependency_stages
    from qpass.graph import WorkingGraph

    cfg = QuantConfig(weight_only="int4", block_size=16, algorithm="gptq", weight_only_head="same", validate=False)
    prepared = stages.prepare(_mlp(), cfg)
    plan = stages.plan(prepared, cfg)
    assert dependency_stages(WorkingGraph(prepared.model).graph, plan) == {"mm1": 0, "mm2": 1}
    feeds = [(f, None) for f in _feeds(48, correlated=True)]
    seq = stages.rewrite_sequential(prepared, plan, feeds, cfg.replace(gptq_sequential=1))
    float_h = stages.rewrite(prepared, plan, stages.calibrate(prepared, plan, feeds, cfg).table, cfg)
    assert seq.quantized_nodes == float_h.quantized_nodes == {"MatMul": 2}
    inits = lambda m: {t.name: numpy_helper.to_array(t) if t.data_type != TensorProto.INT4 else t.raw_data  # noqa: E731
                       for t in m.graph.initializer}
    a, b = inits(seq.model), inits(float_h.model)
    assert a["W1_quantized"] == b["W1_quantized"]  # the first layer sees the same (float) inputs either way
    assert a["W2_quantized"] != b["W2_quantized"]  # the second's Hessian comes from the quantized first layer
    onnx.checker.check_model(seq.model, full_check=True)
    # end to end through quantize(): at least as close to fp32 on held-out inputs as the float-Hessian GPTQ
    val = _feeds(8, seed=5, correlated=True)
    kw = dict(weight_only="int4", block_size=16, algorithm="gptq", weight_only_head="same", per_layer=False,
              latency=False, val=val)
    err = [qpass.quantize(_mlp(), [f for f, _ in feeds], gptq_sequential=s, **kw).report.validation["outputs"][0]["sqnr_db"]
           for s in (0, 1)]
    assert err[1] >= err[0] - 0.5, err



def _kv_model() -> onnx.ModelProto:
    """x -> k_proj (output as present_key through Reshape) and -> MatMul(W_head [K, 4K]) -> logits: two graph
    outputs, one head."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "Wk"], ["k"], name="k_proj"),
             helper.make_node("Reshape", ["k", "shape"], ["present_key"], name="reshape"),
             helper.make_node("MatMul", ["x", "Wh"], ["logits"], name="lm_head")]
    inits = [numpy_helper.from_array(rng.normal(size=(K, K)).astype(np.float32), "Wk"),
             numpy_helper.from_array(rng.normal(size=(K, 4 * K)).astype(np.float32), "Wh"),
             numpy_helper.from_array(np.array([-1, 4, K // 4], np.int64), "shape")]
    graph = helper.make_graph(nodes, "kv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", K])],
                              [helper.make_tensor_value_info("present_key", TensorProto.FLOAT, ["M", 4, K // 4]),
                               helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["M", 4 * K])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def test_only_the_widest_output_matmul_is_the_head_not_a_kv_cache_projection():
    out = qpass.quantize(_kv_model(), weight_only="int4", block_size=16, validate=False).model
    types = {n: _inits(out)[_dq_of(out, n).input[0]].data_type for n in ("k_proj", "lm_head")}
    assert types == {"k_proj": TensorProto.INT4, "lm_head": TensorProto.INT8}


def test_gptq_on_a_transposed_gemm_input_falls_back_to_rtn_and_says_so():
    rng = np.random.default_rng(0)
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "W"], ["y"], name="gemm", transA=1)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [K, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, N])],
                              [numpy_helper.from_array(rng.normal(size=(K, N)).astype(np.float32), "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    feeds = [{"x": rng.normal(size=(K, 8)).astype(np.float32)} for _ in range(4)]
    out = qpass.quantize(model, feeds, weight_only="int4", block_size=16, algorithm="gptq", weight_only_head="same",
                         validate=False)
    assert out.report.quantized_nodes == {"Gemm": 1} and not out.plan.statistics
    assert any("round to nearest" in s["reason"] for s in out.report.skipped)


def test_static_flags_and_plans_with_weight_only():
    warned = qpass.quantize(_mlp(), weight_only="int4", block_size=16, validate=False, method="entropy")
    assert any("method apply to static quantization" in w for w in warned.report.warnings)
    static_plan = qpass.quantize(_mlp(), _feeds(8), latency=False, per_layer=False, target_opset=None).plan
    with pytest.raises(qpass.QpassError, match="made for static quantization"):
        qpass.quantize(_mlp(), _feeds(8), weight_only="int4", plan=static_plan, validate=False)
    with pytest.raises(qpass.QpassError, match="no one table to save"):
        qpass.quantize(_mlp(), _feeds(8), weight_only="int4", algorithm="gptq", gptq_sequential=1,
                       save_calib="/tmp/never-written.json", validate=False)


@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                    reason="needs onnxruntime-gpu and a GPU")
def test_weight_only_output_runs_on_cuda():  # pragma: no cover - exercised on the GPU machine
    from qpass.evaluate.validate import validate
    from tests.test_validate import _tiny_lm

    model = _tiny_lm(vocab=64, dim=32)
    out = qpass.quantize(model, weight_only="int4", block_size=16, per_layer=False, latency=False, validate=False)
    rng = np.random.default_rng(0)
    samples = [({"input_ids": rng.integers(0, 64, (1, 8)).astype(np.int64)}, None) for _ in range(2)]
    r = validate(model, out.model, samples, providers=["cuda"], per_layer=False, latency=False)
    assert "error" not in r["providers"][0] and r["outputs"][0]["top1_agreement"] > 0.5


def test_validation_says_whether_matmulnbits_formed_and_scores_accuracy_level_0_too():
    import jsonschema

    from tests.test_validate import SCHEMA, _tiny_lm

    model = _tiny_lm(vocab=64, dim=32)
    rng = np.random.default_rng(0)
    val = [{"input_ids": rng.integers(0, 64, (1, 12)).astype(np.int64)} for _ in range(3)]
    out = qpass.quantize(model, weight_only="int4", block_size=16, val=val, per_layer=False, latency=False)
    cpu = out.report.validation["providers"][0]
    assert cpu["matmulnbits"] == {"formed": 1, "weight_only_matmuls": 1}  # the lm_head, int8 block-wise
    level0, default = cpu["accuracy_level_0"][0], cpu["outputs"][0]
    assert level0["tokens"] == default["tokens"] == 3 * 11
    # level 0 keeps activations float: a different number from the default level 4 (int8 activations)
    assert level0["kl_mean"] != default["kl_mean"] and level0["perplexity_fp32"] == default["perplexity_fp32"]
    jsonschema.validate(out.report.to_dict(), SCHEMA)
