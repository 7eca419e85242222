"""ActivationScale: the float model with the scales applied computes what the original does (each folding case and
the Mul fallback), the scaled inputs' Gram matrices in the table are what calibrating the rewritten model measures,
a second run changes nothing, and AWQ's quantized model is closer to the float one than round to nearest on inputs
with an outlier channel."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import qpass
from qpass import stages
from qpass.config import QuantConfig
from qpass.errors import CalibrationDataError
from qpass.graph import WorkingGraph
from qpass.pass_manager import PassContext, PassManager
from qpass.passes.activation_scale import ActivationScale
from qpass.verify import verify_model

K, N = 32, 16
CFG = QuantConfig(weight_only="int4", block_size=16, algorithm="awq", weight_only_head="same", validate=False)


def _model(nodes, inits: dict, outputs: list[tuple[str, int]]) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", K])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["M", d]) for n, d in outputs],
                              [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def _w(seed, k=K, n=N):
    return np.random.default_rng(seed).normal(0, 0.2, (k, n)).astype(np.float32)


def norm_mul():
    """x -> Mul(x, g[K]) (an RMSNorm's weight) -> q/k MatMuls: 1/s folds into g."""
    g = np.random.default_rng(7).uniform(0.5, 1.5, K)
    return _model([helper.make_node("Mul", ["x", "g"], ["h"], name="norm"),
                   helper.make_node("MatMul", ["h", "Wq"], ["q"], name="q"),
                   helper.make_node("MatMul", ["h", "Wk"], ["k"], name="k")],
                  {"g": g, "Wq": _w(1), "Wk": _w(2, n=8)}, [("q", N), ("k", 8)])


def layernorm():
    """x -> LayerNormalization(scale, bias) -> Gemm(transB): 1/s folds into the scale and the bias."""
    rng = np.random.default_rng(8)
    return _model([helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], name="ln", axis=-1),
                   helper.make_node("Gemm", ["h", "Wt", "c"], ["y"], name="gemm", transB=1)],
                  {"gamma": rng.uniform(0.5, 1.5, K) * np.where(np.arange(K) == 3, 20.0, 1.0),
                   "beta": rng.normal(0, 0.1, K), "Wt": _w(3).T, "c": rng.normal(0, 0.1, N)}, [("y", N)])


def ffn():
    """gate/up MatMuls read the graph input x (a Mul(x, 1/s) is inserted); down reads Mul(silu(gate), up): 1/s
    folds into the up projection's columns."""
    return _model([helper.make_node("MatMul", ["x", "Wg"], ["a"], name="gate"),
                   helper.make_node("MatMul", ["x", "Wu"], ["b"], name="up"),
                   helper.make_node("Sigmoid", ["a"], ["sa"], name="sig"),
                   helper.make_node("Mul", ["a", "sa"], ["silu"], name="silu"),
                   helper.make_node("Mul", ["silu", "b"], ["m"], name="gated"),
                   helper.make_node("MatMul", ["m", "Wd"], ["y"], name="down")],
                  {"Wg": _w(4, n=K), "Wu": _w(5, n=K), "Wd": _w(6)}, [("y", N)])


def shared_input():
    """Tanh's output is read by a MatMul and by an Add to a graph output: not foldable, a Mul(h, 1/s) feeds the MatMul."""
    return _model([helper.make_node("Mul", ["x", "g"], ["xs"], name="pre"),
                   helper.make_node("Tanh", ["xs"], ["h"], name="tanh"),
                   helper.make_node("MatMul", ["h", "W"], ["y"], name="mm"),
                   helper.make_node("Add", ["h", "h"], ["z"], name="side")],
                  {"g": np.where(np.arange(K) == 3, 1.0, 0.1), "W": _w(9)}, [("y", N), ("z", K)])


def _feeds(n, seed=0, outlier=3):
    rng = np.random.default_rng(seed)
    scale = np.where(np.arange(K) == outlier, 20.0, 1.0) * rng.uniform(0.5, 1.5, K)
    return [{"x": (rng.normal(size=(4, K)) * scale).astype(np.float32)} for _ in range(n)]


def _scaled(model):
    """The prepared model, its plan and table, and the model after ActivationScale alone (with its records)."""
    prepared = stages.prepare(model, CFG)
    plan = stages.plan(prepared, CFG)
    table = stages.calibrate(prepared, plan, [(f, str(i)) for i, f in enumerate(_feeds(32))], CFG).table
    wg = WorkingGraph(prepared.model)
    ctx = PassContext(plan, table)
    records = PassManager([ActivationScale()], export=wg.export, verify=verify_model).run(wg.graph, ctx)
    return prepared, plan, table, wg, ctx, records


def _run(model, feed):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


@pytest.mark.parametrize("build, how, muls", [(norm_mul, {"groups scaled, folded into the producer": 1}, 0),
                                              (layernorm, {"groups scaled, folded into the producer": 1}, 0),
                                              (ffn, {"groups scaled, folded into the producer": 1,
                                                     "groups scaled through a Mul": 1}, 1),
                                              (shared_input, {"groups scaled through a Mul": 1}, 1)])
def test_the_scaled_float_model_computes_the_original(build, how, muls):
    model = build()
    prepared, _, _, wg, _, records = _scaled(model)
    assert records[0].modified and records[0].stats == how
    scaled = wg.export()
    count = lambda m: sum(n.op_type == "Mul" for n in m.graph.node)  # noqa: E731
    assert count(scaled) == count(model) + muls
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in scaled.graph.initializer}
    assert any(not np.allclose(before[n], after[n]) for n in before if n in after)  # weights really were scaled
    for feed in _feeds(4, seed=11):
        for want, got in zip(_run(model, feed), _run(scaled, feed)):
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())


def test_the_scaled_inputs_gram_matrix_is_what_calibration_measures_on_the_rewritten_model():
    _, _, table, wg, _, _ = _scaled(ffn())
    scaled = wg.export()
    new = [n.input[0] for n in scaled.graph.node if n.op_type == "MatMul"]
    assert all(name.endswith("_activation_scaled") for name in new)
    measured = stages.calibrate(stages.prepare(scaled, CFG), qpass.QuantPlan((), {}, (), (), {n: ("gram",) for n in new}),
                                [(f, str(i)) for i, f in enumerate(_feeds(32))], CFG).table
    for name in set(new):
        want, got = measured.statistics.get(name, "gram"), table.statistics.get(name, "gram")
        assert got.rows == want.rows
        np.testing.assert_allclose(got.matrix, want.matrix, rtol=1e-4, atol=1e-6 * np.abs(want.matrix).max())


def test_the_plan_asks_for_each_planned_inputs_gram_matrix_and_mean_abs():
    _, plan, table, _, _, _ = _scaled(ffn())
    assert plan.statistics == {"x": ("gram", "absmean"), "m": ("gram", "absmean")}
    assert table.statistics.get("m", "absmean").mean.shape == (K,)


def test_a_second_run_changes_nothing():
    _, _, _, wg, ctx, _ = _scaled(norm_mul())
    again = PassManager([ActivationScale()], export=wg.export, verify=verify_model).run(wg.graph, ctx)
    assert not again[0].modified and all("no mean |x|" in s.reason for s in again[0].skipped)


def test_awq_is_closer_to_float_than_rtn_and_awq_gptq_than_gptq_with_an_outlier_input_channel():
    sqnr = {}
    for alg in ("rtn", "gptq", "awq", "awq-gptq"):
        out = qpass.quantize(norm_mul(), _feeds(32) if alg != "rtn" else None, weight_only="int4", block_size=16,
                             algorithm=alg, weight_only_head="same", per_layer=False, latency=False,
                             val=_feeds(8, seed=5))
        sqnr[alg] = min(o["sqnr_db"] for o in out.report.validation["outputs"])
    assert sqnr["awq"] > sqnr["rtn"] + 3.0, sqnr
    assert sqnr["awq-gptq"] > sqnr["gptq"] + 2.0, sqnr  # the scales help GPTQ too


def test_awq_without_calibration_data_is_a_clear_error():
    with pytest.raises(CalibrationDataError, match="no calibration data"):
        qpass.quantize(norm_mul(), weight_only="int4", algorithm="awq", per_layer=False, latency=False)


def test_8_bit_weights_are_not_scaled():
    cfg = CFG.replace(weight_only="int8")
    prepared = stages.prepare(norm_mul(), cfg)
    plan = stages.plan(prepared, cfg)
    table = stages.calibrate(prepared, plan, [(f, str(i)) for i, f in enumerate(_feeds(8))], cfg).table
    wg = WorkingGraph(prepared.model)
    records = PassManager([ActivationScale()], export=wg.export, verify=None).run(wg.graph, PassContext(plan, table))
    assert not records[0].modified and {s.node for s in records[0].skipped} == {"q", "k"}
    assert all("int8" in s.reason for s in records[0].skipped)


def test_gptq_sequential_with_awq_gptq_is_said_to_be_ignored():
    out = qpass.quantize(norm_mul(), _feeds(16), weight_only="int4", block_size=16, algorithm="awq-gptq",
                         gptq_sequential=2, per_layer=False, latency=False, validate=False)
    assert any("gptq_sequential applies to --algorithm gptq only" in w for w in out.report.warnings)


def test_awq_with_double_quant_is_a_configuration_error():
    with pytest.raises(qpass.QpassError, match="double_quant"):
        QuantConfig(weight_only="int4", double_quant=True, algorithm="awq")
