"""auto's clipping rule chosen on held-out data: rare large values that carry the signal keep min-max; an outlier
seen only in calibration keeps percentile; the table and plan swap; when the choice runs at all."""
from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qpass
from qpass import stages
from qpass.calib.stats import TensorRange
from qpass.calib.table import CalibrationTable
from qpass.config import QuantConfig
from qpass.errors import ConfigError
from qpass.search.range_choice import RULES, applies, with_rule

SIDE = 64  # 4 x 64 x 64 = 16,384 values a sample: one value in it is under percentile 99.99's 0.01 %


def pointwise_conv() -> onnx.ModelProto:
    """x[N,4,64,64] -> Conv 1x1 (a fixed channel mix) -> y."""
    w = (np.eye(4) + 0.1 * np.arange(16).reshape(4, 4) / 16).astype(np.float32).reshape(4, 4, 1, 1)
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], name="mix")]
    graph = helper.make_graph(nodes, "mix", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, SIDE, SIDE])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, SIDE, SIDE])],
                              [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def gaussian(n: int, seed: int, spike: float = 0.0, spikes_in: range | None = None) -> list[dict]:
    """``n`` samples of N(0, 1); the samples in ``spikes_in`` (default all) hold one value ``spike`` each."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        x = rng.normal(0, 1, (1, 4, SIDE, SIDE)).astype(np.float32)
        if spike and (spikes_in is None or i in spikes_in):
            x[0, rng.integers(4), rng.integers(SIDE), rng.integers(SIDE)] = spike
        out.append({"x": x})
    return out


def run(tmp_path, calib, val=None, **kw):
    # no collapse rescue: percentile's output here is broken on purpose (SQNR ~1 dB), and is what is compared
    return qpass.quantize(pointwise_conv(), calib, val=val, output=tmp_path / "q.onnx", latency=False,
                          per_layer=False, collapse_rescue=False, **kw)


def worst_sqnr(result) -> float:
    return min(float(o["sqnr_db"]) for o in result.report.validation["outputs"])


def test_rare_values_that_carry_the_signal_keep_min_max(tmp_path):
    """One value of 300 per sample (0.006 % of the values, most of the energy): percentile clips it away, min-max
    keeps it; the choice measures that on the held-out split and keeps a rule that keeps the spike."""
    calib = gaussian(20, 0, spike=300.0)
    chosen = run(tmp_path, calib)
    info = chosen.report.calibration["range_choice"]
    assert info["rule"] != "percentile"
    assert info["tensors"] == 1  # the Conv's input (its output is the graph's)
    scores = info["worst_output_sqnr_db"]
    assert set(scores) == set(RULES)
    assert scores[info["rule"]] >= scores["percentile"] + 10  # percentile loses the spikes' energy
    plain = run(tmp_path, calib, range_choice=False)
    assert "range_choice" not in plain.report.calibration
    assert worst_sqnr(chosen) >= worst_sqnr(plain) + 10
    assert worst_sqnr(plain) == pytest.approx(scores["percentile"], abs=1e-3)  # the same held-out samples
    methods = {t["range_of"]: t["spec"]["method"] for t in chosen.report.plan["tensors"].values()}
    assert set(methods.values()) == {info["rule"]}  # the plan says which rule made the ranges


def test_an_outlier_seen_only_in_calibration_keeps_percentile(tmp_path):
    """One calibration sample holds 1e4 at one position; the held-out data is clean: min-max's range is 2,000 times
    too wide there and scores worst, and the default rule stays."""
    calib = gaussian(20, 1, spike=1e4, spikes_in=range(1))
    val = gaussian(4, 2)
    res = run(tmp_path, calib, val=val)
    info = res.report.calibration["range_choice"]
    scores = info["worst_output_sqnr_db"]
    assert scores["minmax"] < scores["percentile"] - 10
    assert info["rule"] != "minmax"


def test_a_margin_keeps_percentile_unless_beaten_by_it(tmp_path):
    calib = gaussian(20, 0, spike=300.0)
    res = run(tmp_path, calib, range_choice_margin_db=1000.0)
    assert res.report.calibration["range_choice"]["rule"] == "percentile"


def test_with_rule_swaps_only_the_named_ranges_and_their_plan_tensors():
    cfg = QuantConfig(latency=False)
    prepared = stages.prepare(pointwise_conv(), cfg)
    plan = stages.plan(prepared, cfg)
    table = stages.calibrate(prepared, plan, iter([(f, None) for f in gaussian(6, 3, spike=50.0)]), cfg).table
    names = applies(cfg, plan, table)
    assert names and all(table.get(n).method == "percentile" for n in names)
    r = table.get(names[0])
    assert r.alternative("minmax") == (r.observed_min, r.observed_max)
    assert r.alternative("mse") is not None and r.alternative("entropy") is None
    t2, p2 = with_rule(table, plan, names[:1], "minmax")
    assert (t2.get(names[0]).min, t2.get(names[0]).max) == (r.observed_min, r.observed_max)
    assert t2.get(names[0]).method == "minmax"
    for n in names[1:]:
        assert t2.get(n) == table.get(n)
    assert table.get(names[0]) == r  # the input table is unchanged
    for t in p2.tensors.values():
        assert t.spec.method == ("minmax" if t.range_of == names[0] else plan.tensors[t.name].spec.method)
    # the alternatives survive the table's JSON
    back = CalibrationTable.from_json(table.to_json())
    assert back.get(names[0]) == r and back.get(names[0]).alternatives == r.alternatives
    assert "alternatives" in json.loads(table.to_json())["ranges"][names[0]]


@pytest.mark.parametrize("change", [dict(method="percentile"), dict(op_methods={"Conv": "percentile"}),
                                    dict(activation_type="uint16"), dict(range_choice=False)])
def test_the_choice_runs_only_for_auto_at_8_bits(change):
    cfg = QuantConfig(latency=False)
    prepared = stages.prepare(pointwise_conv(), cfg)
    plan = stages.plan(prepared, cfg)
    table = stages.calibrate(prepared, plan, iter([(f, None) for f in gaussian(4, 4)]), cfg).table
    assert applies(cfg, plan, table)
    assert applies(cfg.replace(**change), plan, table) == []


def test_no_choice_without_held_out_samples(tmp_path):
    res = run(tmp_path, gaussian(20, 0, spike=300.0), val_fraction=0.0)
    assert "range_choice" not in res.report.calibration


@pytest.mark.parametrize("bad", [-1.0, math.nan, "1", True])
def test_margin_must_be_a_number_at_least_zero(bad):
    with pytest.raises(ConfigError, match="range_choice_margin_db"):
        QuantConfig(range_choice_margin_db=bad)


def test_a_range_without_alternatives_knows_its_own_and_min_max():
    r = TensorRange(-1.0, 2.0, "percentile", 3, -5.0, 9.0)
    assert r.alternative("percentile") == (-1.0, 2.0)
    assert r.alternative("minmax") == (-5.0, 9.0)
    assert r.alternative("mse") is None
    assert TensorRange(0.0, 1.0, "percentile").alternative("minmax") is None


def test_the_saved_table_and_plan_are_the_chosen_ones(tmp_path):
    """--save-calib / --save-plan keep the kept rule's ranges: loading them writes the same model, without a choice."""
    calib = gaussian(20, 0, spike=300.0)
    first = qpass.quantize(pointwise_conv(), calib, output=tmp_path / "a.onnx", latency=False, per_layer=False,
                           collapse_rescue=False, save_calib=tmp_path / "t.json", save_plan=tmp_path / "p.json")
    rule = first.report.calibration["range_choice"]["rule"]
    assert rule != "percentile"
    saved = json.loads((tmp_path / "t.json").read_text())["ranges"]
    assert {r["method"] for r in saved.values()} == {rule}
    again = qpass.quantize(pointwise_conv(), calib, output=tmp_path / "b.onnx", latency=False, per_layer=False,
                           collapse_rescue=False, load_calib=tmp_path / "t.json", plan=tmp_path / "p.json")
    assert "range_choice" not in again.report.calibration
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()



def test_a_given_plan_is_used_as_given(tmp_path):
    calib = gaussian(20, 0, spike=300.0)
    run(tmp_path, calib, range_choice=False, save_plan=tmp_path / "p.json")
    res = run(tmp_path, calib, plan=tmp_path / "p.json")
    assert "range_choice" not in res.report.calibration
    assert {t["spec"]["method"] for t in res.report.plan["tensors"].values()} == {"percentile"}


def test_a_reference_that_fails_on_the_held_out_data_leaves_it_to_validation(tmp_path):
    """The original cannot run the given validation samples (a fixed Reshape after the Conv, samples of batch 2):
    no onnxruntime exception escapes; validation reports it as before."""
    base = pointwise_conv()
    graph = base.graph
    graph.node[0].output[0] = "c"
    graph.node.append(helper.make_node("Reshape", ["c", "shape"], ["y"], name="flat"))
    graph.initializer.append(numpy_helper.from_array(np.array([1, 4 * SIDE * SIDE], np.int64), "shape"))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4 * SIDE * SIDE]))
    val = [{"x": np.concatenate([f["x"], f["x"]])} for f in gaussian(2, 5)]
    res = qpass.quantize(base, gaussian(12, 0, spike=300.0), val=val, output=tmp_path / "q.onnx", latency=False,
                         per_layer=False, collapse_rescue=False)
    assert "range_choice" not in res.report.calibration
    assert any("run failed" in f for f in res.report.validation["findings"])


def three_convs() -> onnx.ModelProto:
    """x -> Conv 1x1 -> c -> Conv 1x1 -> d -> Conv 1x1 -> y: x, c and d are calibrated."""
    model = pointwise_conv()
    g = model.graph
    g.node[0].output[0] = "c"
    g.node.extend([helper.make_node("Conv", ["c", "W"], ["d"], name="mix2"),
                   helper.make_node("Conv", ["d", "W"], ["y"], name="mix3")])
    return model


def test_a_plan_made_again_by_the_search_keeps_the_kept_rules_label(tmp_path):
    """The search re-plans from the configuration when it keeps a move (here one Conv to 16 bits): the 8-bit tensor
    left is labelled with the kept rule, not percentile, in the report and the saved plan."""
    res = qpass.quantize(three_convs(), gaussian(20, 0, spike=300.0), output=tmp_path / "q.onnx", latency=False,
                         per_layer=False, collapse_rescue=False, target_cosine=0.99999999, search_budget=1,
                         save_plan=tmp_path / "p.json")
    rule = res.report.calibration["range_choice"]["rule"]
    assert rule != "percentile" and len(res.report.search["moves"]) == 1
    for plan in (res.report.plan, json.loads((tmp_path / "p.json").read_text())):
        methods = {t["spec"]["method"] for t in plan["tensors"].values()}
        assert rule in methods and "percentile" not in methods


def test_large_reference_outputs_are_run_again_per_rule_with_the_same_scores(tmp_path, monkeypatch):
    from qpass.search import range_choice

    calib = gaussian(20, 0, spike=300.0)
    kept = run(tmp_path, calib).report.calibration["range_choice"]["worst_output_sqnr_db"]
    monkeypatch.setattr(range_choice, "KEEP_REFERENCE_BYTES", 0)
    again = run(tmp_path, calib).report.calibration["range_choice"]["worst_output_sqnr_db"]
    assert again == kept


def test_a_rule_that_cannot_be_scored_is_reported(tmp_path, monkeypatch):
    from qpass.search import range_choice

    real, calls = range_choice.worst_sqnr, []

    def second_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("planted failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(range_choice, "worst_sqnr", second_fails)
    res = run(tmp_path, gaussian(20, 0, spike=300.0))
    info = res.report.calibration["range_choice"]
    assert info["worst_output_sqnr_db"]["minmax"] is None and "planted failure" in info["errors"]["minmax"]
    assert any("range choice: the minmax rule could not be scored (planted failure)" in w for w in res.report.warnings)
