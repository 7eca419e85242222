"""The latency objective: a node planted slower in its integer form than in float is the one kept float (timings
injected, read by hand); float islands (a HardSwish between Q/DQ pairs) name the Conv feeding them; end to end."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qpass
from qpass import stages
from qpass.calib.data import input_specs, open_samples
from qpass.config import QuantConfig
from qpass.errors import ConfigError
from qpass.search.latency import float_islands, search_latency
from tests.builders import DIGITS_CALIB, DIGITS_MODEL, _model

#: per compute node of the digits CNN: (ms in its integer form, ms in float). /2/Conv is planted slower as integer.
COST = {"/0/Conv": (1.0, 2.0), "/2/Conv": (5.0, 1.0), "/6/Gemm": (1.0, 2.0), "/8/Gemm": (1.0, 2.0)}


def _integer_nodes(model: onnx.ModelProto) -> set[str]:
    """The compute nodes whose weight is read through a DequantizeLinear (their integer form)."""
    dq = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return {n.name for n in model.graph.node if n.name in COST and n.input[1] in dq}


def fake_timer(models: dict, final: bool = False) -> dict:
    """Milliseconds of each model: the sum over the compute nodes of COST, integer or float as the graph has it."""
    return {k: sum(COST[n][0] if n in _integer_nodes(m) else COST[n][1] for n in COST) for k, m in models.items()}


@pytest.fixture(scope="module")
def digits():
    cfg = QuantConfig(latency=False, search_budget=6)
    prepared = stages.prepare(stages.load(DIGITS_MODEL), cfg)
    plan = stages.plan(prepared, cfg)
    table = stages.calibrate(prepared, plan, open_samples(DIGITS_CALIB, input_specs(prepared.model)), cfg).table
    first = stages.rewrite(prepared, plan, table, cfg)
    return cfg, prepared, plan, table, first


def test_planted_slow_node_kept_float(digits):
    cfg, prepared, plan, table, first = digits
    ref = prepared.reference
    # by hand: fp32 = 2+1+2+2 = 7 ms; int8 = 1+5+1+1 = 8 ms (slower). No float island in the digits CNN, so nodes
    # are tried one at a time in graph order: /0/Conv float -> 2+5+1+1 = 9 (not faster, stays integer), /2/Conv
    # float -> 5 ms (faster, kept), and at 5 <= 7 the search stops: 2 trials. 5, not 1+1+1+1: planned again with
    # /2/Conv excluded, /6/Gemm goes float too (its input, /2/Conv's output through Relu/MaxPool/Flatten, is no
    # longer quantized), so 1+1+2+1.
    assert fake_timer({"r": ref, "q": first.model}) == {"r": 7.0, "q": 8.0}
    res = search_latency(prepared, plan, table, cfg, ref, {}, first.model, timer=fake_timer)
    r = res.report
    assert r["islands"] == []
    assert res.floated == ("/2/Conv",) and r["floated"] == ["/2/Conv"]
    assert r["trials"] == 2
    assert [m["nodes"] for m in r["moves"]] == [["/2/Conv"]]
    assert (r["moves"][0]["ms_before"], r["moves"][0]["ms_after"]) == (8.0, 5.0)
    assert r["start"] == {"fp32_ms": 7.0, "ms": 8.0, "ratio": round(8 / 7, 4)}
    assert r["end"]["ms"] == 5.0 and r["met"] is True
    assert _integer_nodes(res.model) == {"/0/Conv", "/8/Gemm"}


def test_budget_spent_moves_the_rest_to_float_in_one_last_trial_and_says_so(digits):
    """Budget 1: /0/Conv float (9 ms) is not kept; still 8 ms > 7; one trial past the budget moves the four
    compute nodes to float together: 2+1+2+2 = 7 ms, not slower than fp32, kept: all float, and said."""
    cfg, prepared, plan, table, first = digits
    res = search_latency(prepared, plan, table, cfg.replace(search_budget=1), prepared.reference, {}, first.model,
                         timer=fake_timer)
    r = res.report
    assert r["trials"] == 2 and r["past_budget"] == 1 and r["met"] is True
    assert r["moves"][-1]["step"] == "rest to float" and (r["moves"][-1]["ms_before"], r["moves"][-1]["ms_after"]) == (8.0, 7.0)
    assert _integer_nodes(res.model) == set() and "search-budget of 1 trials was spent" in r["note"]


def test_budget_spent_says_it_could_not(digits):
    """When even all float is slower than the current model (timings that make float slow), nothing is kept past
    the budget and the report says the objective was not met."""
    cfg, prepared, plan, table, first = digits
    slow_float = {n: (a, b * 10) for n, (a, b) in COST.items()}

    def timer(models, final=False):
        t = {k: sum(slow_float[n][0] if n in _integer_nodes(m) else slow_float[n][1] for n in COST)
             for k, m in models.items()}
        return {**t, "fp32": 7.0} if "fp32" in t else t

    res = search_latency(prepared, plan, table, cfg.replace(search_budget=1), prepared.reference, {}, first.model,
                         timer=timer)
    assert res.report["met"] is False and res.report["trials"] == 2 and res.model is None
    assert "could not make the output as fast as fp32" in res.report["note"]
    assert "--search-budget 1, and one past it" in res.report["note"]


def test_not_slower_moves_nothing(digits):
    cfg, prepared, plan, table, first = digits
    res = search_latency(prepared, plan, table, cfg, prepared.reference, {}, first.model,
                         timer=lambda models, final=False: {k: 1.0 for k in models})
    assert res.model is None and res.report["trials"] == 0 and res.report["met"] is True


def hardswish_model(seed: int = 0) -> onnx.ModelProto:
    """x[1,8,16,16] -> conv_a -> HardSwish -> conv_b -> Relu -> conv_c -> y (3x3, pad 1, 8 channels)."""
    rng = np.random.default_rng(seed)
    inits, nodes, t = [], [], "x"
    for name, act in (("conv_a", "HardSwish"), ("conv_b", "Relu"), ("conv_c", None)):
        inits += [numpy_helper.from_array(rng.normal(0, 0.2, (8, 8, 3, 3)).astype(np.float32), f"{name}_w"),
                  numpy_helper.from_array(rng.normal(0, 0.1, (8,)).astype(np.float32), f"{name}_b")]
        nodes.append(helper.make_node("Conv", [t, f"{name}_w", f"{name}_b"], [f"{name}_out"], name=name, pads=[1] * 4))
        t = f"{name}_out"
        if act:
            nodes.append(helper.make_node(act, [t], [f"{name}_{act}"], name=f"{name}_{act.lower()}"))
            t = f"{name}_{act}"
    nodes.append(helper.make_node("Identity", [t], ["y"], name="out"))
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16, 16])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16, 16])], inits, opset=14)


def _calib(n: int = 16) -> list[dict]:
    rng = np.random.default_rng(1)
    return [{"x": rng.normal(0, 1, (1, 8, 16, 16)).astype(np.float32)} for _ in range(n)]


def test_float_islands_name_the_conv_before_hardswish():
    """conv_a's output is quantized, dequantized for the float HardSwish, quantized again for conv_b: an island fed
    by conv_a. The Relu after conv_b runs on the integers (not an island)."""
    res = qpass.quantize(hardswish_model(), _calib(), validate=False, integer_hard_swish="off")
    ops = [n.op_type for n in res.model.graph.node]
    assert "HardSwish" in ops and ops.count("QuantizeLinear") >= 3  # the island is there
    assert float_islands(res.model, {"conv_a", "conv_b", "conv_c"}) == ["conv_a"]
    assert float_islands(res.model, {"conv_b", "conv_c"}) == []  # conv_a not quantized: nothing to name
    # by default the HardSwish is written as Add and Mul of dequantized inputs, which run as integer kernels
    default = qpass.quantize(hardswish_model(), _calib(), validate=False).model
    assert "HardSwish" not in [n.op_type for n in default.graph.node]
    assert float_islands(default, {"conv_a", "conv_b", "conv_c"}) == []


def test_latency_objective_end_to_end(tmp_path):
    """Real timings (this machine's): the report says where it ended against fp32, and the output is the one the
    report describes."""
    model = tmp_path / "hs.onnx"
    onnx.save(hardswish_model(), model)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.concatenate([f["x"] for f in _calib(24)]))
    from qpass.cli import main

    out = tmp_path / "hs.qpass.onnx"
    assert main(["run", str(model), "--calib", str(calib), "-o", str(out), "--objective", "latency",
                 "--search-budget", "4", "-q"]) == 0
    report = json.loads(out.with_name("hs.qpass.report.json").read_text())
    assert report["config"]["objective"] == "latency"
    lat = report["search"]["latency"]
    assert lat["trials"] <= 4 + lat.get("past_budget", 0) and lat["end"]["fp32_ms"] > 0
    q = onnx.load(str(out))
    all_float = not any(n.op_type == "DequantizeLinear" for n in q.graph.node)
    assert lat["met"] == (lat["end"]["ms"] <= lat["end"]["fp32_ms"] or all_float)
    if not lat["met"]:
        assert "could not make the output as fast as fp32" in lat["note"]
        assert any(w.startswith("latency objective:") for w in report["warnings"])
    if lat["start"]["ms"] <= lat["start"]["fp32_ms"]:
        assert lat["trials"] == 0
    dq_weights = {n.input[1] for n in q.graph.node if n.op_type == "Conv"} & {
        n.output[0] for n in q.graph.node if n.op_type == "DequantizeLinear"}
    assert len(dq_weights) == 3 - sum(len(m["nodes"]) for m in lat["moves"]) + len(lat["requantized"])
    shutil.rmtree(tmp_path / "unused", ignore_errors=True)


def test_bad_objective():
    with pytest.raises(ConfigError, match="objective"):
        QuantConfig(objective="speed")


def test_the_accuracy_search_16_bit_moves_stay_through_the_latency_trials(digits):
    """After an accuracy search kept a 16-bit move, every latency trial is planned with it: the final model still
    has the 16-bit pairs of that node (/8/Gemm reads /7/Relu's output) while /2/Conv goes float as above."""
    from qpass.search.precision import sixteen_bit

    cfg, prepared, plan, table, first = digits
    wide, info = sixteen_bit(prepared, cfg)
    assert wide is not None and info.get("upgraded_to") == 21
    res = search_latency(wide, plan, table, cfg, prepared.reference, {}, first.model, widened=("/8/Gemm",),
                         timer=fake_timer)
    assert res.floated == ("/2/Conv",) and _integer_nodes(res.model) == {"/0/Conv", "/8/Gemm"}
    inits = {t.name: t for t in res.model.graph.initializer}
    q16 = [n.input[0] for n in res.model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2
           and inits[n.input[2]].data_type == TensorProto.UINT16]
    assert q16 == ["/7/Relu_output_0"]


def test_all_float_is_met_even_when_its_last_timing_is_a_hair_above_fp32(digits):
    """Every integer form 1 ms slower than float, and fp32 timed at 6.99 ms: the nodes go float one by one until
    none is left (7.0 ms, the float model); 7.0 > 6.99 is noise for a model with no quantized node left: met, said."""
    cfg, prepared, plan, table, first = digits
    cost = {n: (f + 1.0, f) for n, (_, f) in COST.items()}

    def timer(models, final=False):
        return {k: 6.99 if k == "fp32" else sum(cost[n][0] if n in _integer_nodes(m) else cost[n][1] for n in cost)
                for k, m in models.items()}

    res = search_latency(prepared, plan, table, cfg, prepared.reference, {}, first.model, timer=timer)
    r = res.report
    assert _integer_nodes(res.model) == set() and r["end"] == {"fp32_ms": 6.99, "ms": 7.0, "ratio": round(7 / 6.99, 4)}
    assert r["met"] is True and "no slower than fp32 by construction" in r["note"]


def test_a_mul_of_dequantized_inputs_is_an_island_unless_its_output_is_quantized_to_uint8():
    """Mul(DQ(u8), DQ(u8)) -> Q(u8) runs as QLinearMul; the same Mul into a uint16 QuantizeLinear stays float."""

    def model(out_type):
        inits = [numpy_helper.from_array(np.array(0.05, np.float32), "s"),
                 numpy_helper.from_array(np.array(128, np.uint8), "z"),
                 numpy_helper.from_array(np.array(0.001, np.float32), "s2"),
                 numpy_helper.from_array(np.array(0, out_type), "z2"),
                 numpy_helper.from_array(np.ones((4, 4, 1, 1), np.float32), "W")]
        nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
                 helper.make_node("QuantizeLinear", ["c", "s", "z"], ["cq"]),
                 helper.make_node("DequantizeLinear", ["cq", "s", "z"], ["d"]),
                 helper.make_node("Mul", ["d", "d"], ["m"]),
                 helper.make_node("QuantizeLinear", ["m", "s2", "z2"], ["mq"]),
                 helper.make_node("DequantizeLinear", ["mq", "s2", "z2"], ["y"])]
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])

    assert float_islands(model(np.uint8), {"conv"}) == []
    assert float_islands(model(np.uint16), {"conv"}) == ["conv"]
