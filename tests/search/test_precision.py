"""The precision search: a planted bad layer is found and moved first, the budget stops it, the pool moves as in-process."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import qpass
from qpass import stages
from qpass.calib.data import input_specs, open_samples
from qpass.calib.stats import TensorRange
from qpass.config import QuantConfig
from qpass.errors import ConfigError
from qpass.calib.table import CalibrationTable
from qpass.search.precision import Target, candidates, plan_for, table_for, widen, with_float
from tests.builders import DIGITS_CALIB, DIGITS_MODEL, DIGITS_TEST

#: the output of the digits CNN's second Conv (/2/Conv -> /3/Relu); its range also serves MaxPool's and Flatten's
PLANTED = "/3/Relu_output_0"
BLOW_UP = 200.0
#: the plan nodes that write (through Relu) or read (through MaxPool and Flatten) PLANTED's Q/DQ pairs
CORRUPTED_PAIR = ("/2/Conv", "/6/Gemm")


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A calibration table of the digits CNN whose range of PLANTED is 200 times too wide, saved to a file, and the
    uint8 scale that range gives (what the bad Q/DQ pair uses)."""
    cfg = QuantConfig(latency=False)
    prepared = stages.prepare(stages.load(DIGITS_MODEL), cfg)
    plan = stages.plan(prepared, cfg)
    table = stages.calibrate(prepared, plan, open_samples(DIGITS_CALIB, input_specs(prepared.model)), cfg).table
    r = table.get(PLANTED)
    bad = TensorRange(r.min, r.max * BLOW_UP, r.method, r.samples)
    table.statistics.set(PLANTED, "range", bad)
    path = tmp_path_factory.mktemp("planted") / "bad_table.json"
    table.save(path)
    # uint8 asymmetric: the range is widened to include 0, scale = (max - min) / 255
    return path, (max(bad.max, 0.0) - min(bad.min, 0.0)) / 255.0


def _quantize(table, **kw):
    return qpass.quantize(str(DIGITS_MODEL), load_calib=table, val=str(DIGITS_TEST), latency=False, **kw)


def _q_scales(model: onnx.ModelProto) -> list[float]:
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return [float(inits[n.input[1]]) for n in model.graph.node
            if n.op_type == "QuantizeLinear" and n.input[1] in inits and inits[n.input[1]].size == 1]


def test_planted_bad_layer_moved_first_and_target_met(planted, tmp_path):
    table, bad_scale = planted
    plain = _quantize(table)
    assert "search" not in plain.report.to_dict()  # off by default
    start = plain.report.validation["outputs"][0]["cosine_mean"]
    assert start < 0.99  # the planted range hurts (else the test proves nothing)
    assert any(abs(s - bad_scale) < 1e-3 * bad_scale for s in _q_scales(plain.model))

    plan_file = tmp_path / "plan.json"
    res = _quantize(table, target_cosine=0.999, search_budget=6, save_plan=plan_file)
    s = res.report.search
    assert s["met"] is True
    # one 16-bit move fixes it: the Conv writing the corrupted range or the Gemm reading it (both widen its pairs)
    assert [(m["node"] in CORRUPTED_PAIR, m["to"]) for m in s["moves"]] == [(True, "16-bit")]
    assert s["moves"][0]["before"]["cosine_min"] == pytest.approx(start, abs=1e-9)
    assert s["trials"] <= 6 and s["floated"] == []
    assert s["opset"] == {"from": 13, "to": 21} and res.model.opset_import[0].version == 21
    # the report's validation is of the final model, measured again: the target holds there
    assert res.report.validation["outputs"][0]["cosine_mean"] >= 0.999
    assert not any(abs(x - bad_scale) < 1e-3 * bad_scale for x in _q_scales(res.model))
    # the saved plan is the final one: the corrupted range's pairs at 16 bits, every node still quantized
    saved = json.loads(plan_file.read_text())
    assert {n: t["spec"]["dtype"] for n, t in saved["tensors"].items() if t["range_of"] == PLANTED} == {
        PLANTED: "uint16", "/4/MaxPool_output_0": "uint16", "/5/Flatten_output_0": "uint16"}
    assert [n["node"] for n in saved["nodes"]] == ["/0/Conv", "/2/Conv", "/6/Gemm", "/8/Gemm"]
    assert [w for w in res.report.warnings if "precision search" in w] == [
        "precision search: the output is at opset 21 (the prepared model's 13, upgraded by onnx.version_converter for its "
        "16-bit activations)"]
    # the final model runs and agrees with fp32 on the test split's argmax at least as often as the planted one
    import onnxruntime as ort

    with np.load(DIGITS_TEST) as d:
        x = d["input"][:200]
    sess = ort.InferenceSession(res.model.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = ort.InferenceSession(str(DIGITS_MODEL), providers=["CPUExecutionProvider"])
    agree = np.mean(sess.run(None, {"input": x})[0].argmax(1) == ref.run(None, {"input": x})[0].argmax(1))
    assert agree >= 0.99


def test_search_stops_at_budget_and_says_so(planted):
    table, _ = planted
    res = _quantize(table, target_cosine=0.9999999, search_budget=3)
    s = res.report.search
    assert s["met"] is False
    assert s["trials"] == 3
    assert "3 of 3" in s["note"]
    assert any(w.startswith("precision search: target not met") for w in res.report.warnings)
    assert s["failures"] and "0.9999999" in s["failures"][0]


def test_target_already_met_moves_nothing():
    res = qpass.quantize(str(DIGITS_MODEL), str(DIGITS_CALIB), val=str(DIGITS_TEST), latency=False, target_cosine=0.9)
    assert res.report.search["met"] is True and res.report.search["trials"] == 0 and res.report.search["moves"] == []


def test_pool_moves_as_in_process(planted):
    table, _ = planted
    one = _quantize(table, target_cosine=0.99999, search_budget=4).report.search
    two = _quantize(table, target_cosine=0.99999, search_budget=4, search_workers=2).report.search
    assert two["workers"] == 2
    assert [m["node"] for m in one["moves"]] == [m["node"] for m in two["moves"]]
    assert len(one["moves"]) >= 1
    for a, b in zip(one["moves"], two["moves"]):
        assert [c["node"] for c in a["candidates"]] == [c["node"] for c in b["candidates"]]
        for ca, cb in zip(a["candidates"], b["candidates"]):
            assert ca["cosine_min"] == pytest.approx(cb["cosine_min"], abs=1e-7)
    assert one["trials"] == two["trials"]


def test_candidates_map_ranked_ops_to_plan_nodes():
    """A ranked MaxPool stands for the Conv feeding it (up) and the Gemm reading it through Flatten (down); a
    ranked plan node is itself; a row that adds nothing is left out (digits graph, read by hand)."""
    cfg = QuantConfig()
    prepared = stages.prepare(stages.load(DIGITS_MODEL), cfg)
    plan = stages.plan(prepared, cfg)
    rows = [{"node": "/7/Relu", "tensor": "/7/Relu_output_0", "added_noise_db": "-inf"},
            {"node": "/4/MaxPool", "tensor": "/4/MaxPool_output_0", "added_noise_db": -3.0},
            {"node": "/8/Gemm", "tensor": "logits", "added_noise_db": -40.0}]
    got = candidates(rows, prepared.model, plan, 3)
    assert [c for c, _ in got] == ["/2/Conv", "/6/Gemm", "/8/Gemm"]
    assert [c for c, _ in candidates(rows, prepared.model, plan, 3, {"/2/Conv"})] == ["/6/Gemm", "/8/Gemm"]


def digits_accuracy(model: onnx.ModelProto) -> float:
    """Top-1 accuracy on the first 200 labelled test digits (a user's eval_fn)."""
    import onnxruntime as ort

    with np.load(DIGITS_TEST) as d:
        x, y = d["input"][:200], d["label"][:200]
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return float(np.mean(sess.run(None, {"input": x})[0].argmax(1) == y))


def test_eval_fn_target(planted):
    table, _ = planted
    fp32 = digits_accuracy(onnx.load(str(DIGITS_MODEL)))
    bad = digits_accuracy(_quantize(table).model)
    assert bad < fp32 - 0.01  # the planted range costs accuracy
    res = _quantize(table, eval_fn=digits_accuracy, max_metric_drop=0.005, search_budget=4)
    s = res.report.search
    assert s["target"]["metric_fp32"] == pytest.approx(fp32)
    assert s["met"] and s["moves"][0]["node"] in CORRUPTED_PAIR
    assert digits_accuracy(res.model) >= fp32 - 0.005
    with pytest.raises(ConfigError):
        _quantize(table, eval_fn=digits_accuracy)


def test_float_moves_in_the_plan():
    """with_float (unnamed nodes): the node is float and the Q/DQ pairs only it read are gone, the others keep
    their readers; plan_for (named nodes): planned again with it excluded (digits graph, read by hand)."""
    cfg = QuantConfig()
    prepared = stages.prepare(stages.load(DIGITS_MODEL), cfg)
    plan = stages.plan(prepared, cfg)
    assert plan.tensors["/5/Flatten_output_0"].readers == ("/6/Gemm",)
    moved = with_float(plan, "/6/Gemm", prepared.model)
    assert [n.precision for n in moved.nodes if n.node == "/6/Gemm"] == ["float"]
    folded = moved.with_overrides()
    assert "/6/Gemm" not in [n.node for n in folded.nodes] and "/5/Flatten_output_0" not in folded.tensors
    assert set(folded.tensors) == set(plan.tensors) - {"/5/Flatten_output_0"}
    replanned = plan_for(prepared, cfg, ("/2/Conv",))
    assert [n.node for n in replanned.nodes] == ["/0/Conv", "/6/Gemm", "/8/Gemm"]
    assert any(s.node == "/2/Conv" and "excluded" in s.reason for s in replanned.skipped)


@pytest.mark.parametrize("field,value", [("target_cosine", 1.5), ("target_top1", -0.1), ("search_budget", 0),
                                         ("search_workers", 0), ("search_budget", True), ("search_16bit", "yes")])
def test_bad_search_config(field, value):
    with pytest.raises(ConfigError, match=field):
        QuantConfig(**{field: value})


def test_cli_flags(tmp_path, planted):
    from qpass.cli import main

    table, _ = planted
    model = tmp_path / "digits.onnx"
    shutil.copyfile(DIGITS_MODEL, model)
    out = tmp_path / "d.qpass.onnx"
    rc = main(["run", str(model), "--load-calib", str(table), "--val", str(DIGITS_TEST), "-o", str(out), "--no-latency",
               "--target-cosine", "0.999", "--search-budget", "4", "-q"])
    assert rc == 0
    report = json.loads(out.with_name("d.qpass.report.json").read_text())
    assert report["config"]["target_cosine"] == 0.999 and report["config"]["search_budget"] == 4
    assert report["search"]["met"] and report["search"]["moves"][0]["node"] in CORRUPTED_PAIR
    assert report["search"]["moves"][0]["to"] == "16-bit"
    rc = main(["run", str(model), "--load-calib", str(table), "--val", str(DIGITS_TEST), "-o", str(out), "--no-latency",
               "--target-cosine", "0.999", "--search-budget", "4", "--no-search-16bit", "-q"])
    report = json.loads(out.with_name("d.qpass.report.json").read_text())
    assert rc == 0 and report["search"]["moves"][0] == {**report["search"]["moves"][0], "node": "/2/Conv", "to": "float"}
    assert "--no-search-16bit" in report["search"]["sixteen_bit"]["reason"]


def test_a_target_without_validation_samples_says_it_was_not_searched():
    report = qpass.quantize(DIGITS_MODEL, DIGITS_CALIB, val_fraction=0.0, target_cosine=0.9999).report
    assert report.to_dict().get("search") is None
    assert any("the accuracy target was not searched for" in w for w in report.warnings)


def test_planted_bad_layer_moved_to_float_when_16_bit_cannot_be_written(planted):
    """Integer operators take 8-bit activations only: every move is to float, the report says why, and the Conv
    writing the corrupted range is the first move (as before 16-bit moves existed)."""
    table, _ = planted
    res = _quantize(table, format="qop", target_cosine=0.999, search_budget=6)
    s = res.report.search
    assert s["met"] and s["moves"][0]["node"] == "/2/Conv" and {m["to"] for m in s["moves"]} == {"float"}
    assert "8-bit activations only" in s["sixteen_bit"]["reason"] and "opset" not in s
    assert res.model.opset_import[0].version == 13


def test_float_after_a_16_bit_move_that_does_not_suffice(tmp_path):
    """A range a million times too wide leaves a 16-bit pair under one level's worth of resolution: the 16-bit moves
    of the two nodes around it do not help, so those nodes' next candidates are float moves, and the Conv writing the
    range, moved to float, meets the target."""
    cfg = QuantConfig(latency=False)
    prepared = stages.prepare(stages.load(DIGITS_MODEL), cfg)
    plan = stages.plan(prepared, cfg)
    table = stages.calibrate(prepared, plan, open_samples(DIGITS_CALIB, input_specs(prepared.model)), cfg).table
    r = table.get(PLANTED)
    table.statistics.set(PLANTED, "range", TensorRange(r.min, r.max * 1e6, r.method, r.samples))  # no min-max kept
    path = tmp_path / "worse.json"
    table.save(path)
    s = _quantize(path, target_cosine=0.999, search_budget=8).report.search
    assert s["met"]
    tried = [(c["node"], c["to"]) for step in s["rejected"] + s["moves"] for c in step["candidates"]]
    assert ("/2/Conv", "16-bit") in tried and ("/2/Conv", "float") in tried
    assert tried.index(("/2/Conv", "16-bit")) < tried.index(("/2/Conv", "float"))
    assert s["moves"][-1]["node"] in CORRUPTED_PAIR and s["moves"][-1]["to"] == "float"


def test_score_ranks_by_what_the_target_asks_first():
    """A top-1 target prefers the trial with more top-1 agreement though its cosine is lower; a cosine target the
    other way round (SmolLM2's search kept a move that raised cosine and lowered top-1 before this order)."""
    a = [{"output": "y", "cosine_mean": 0.7787, "top1_agreement": 0.4873}]
    b = [{"output": "y", "cosine_mean": 0.7771, "top1_agreement": 0.4945}]
    assert Target(top1=0.9).score(b) > Target(top1=0.9).score(a)
    assert Target(cosine=0.99).score(a) > Target(cosine=0.99).score(b)
    assert Target(cosine=0.99, top1=0.9).score(a) > Target(cosine=0.99, top1=0.9).score(b)


def test_widen_and_its_table():
    """widen: the activations a node reads and writes, with every one sharing their ranges, go to uint16 min-max;
    table_for: ranges only 16-bit pairs use become the min-max range observed in the same run (digits graph and
    numbers read by hand)."""
    cfg = QuantConfig()
    prepared = stages.prepare(stages.load(DIGITS_MODEL), cfg)
    plan = stages.plan(prepared, cfg)
    dtypes = lambda p: {n: t.spec.dtype for n, t in p.tensors.items()}  # noqa: E731
    assert set(dtypes(plan).values()) == {"uint8"}
    wide = widen(plan, ("/8/Gemm",), prepared.model)  # reads /7/Relu's output, writes the graph output (no pair)
    assert {n for n, d in dtypes(wide).items() if d == "uint16"} == {"/7/Relu_output_0"}
    assert wide.tensors["/7/Relu_output_0"].spec.method == "minmax"
    wide = widen(plan, ("/2/Conv",), prepared.model)  # reads /1/Relu's; writes /3/Relu's, shared by MaxPool, Flatten
    assert {n for n, d in dtypes(wide).items() if d == "uint16"} == {
        "/1/Relu_output_0", PLANTED, "/4/MaxPool_output_0", "/5/Flatten_output_0"}
    table = CalibrationTable({"/1/Relu_output_0": TensorRange(0.0, 2.0, "percentile", 4, 0.0, 3.0),
                              PLANTED: TensorRange(0.0, 5.0, "percentile", 4, 0.0, 9.0),
                              "input": TensorRange(-1.0, 1.0, "percentile", 4, -2.0, 2.0)})
    got = table_for(table, wide)
    assert (got.get("/1/Relu_output_0").min, got.get("/1/Relu_output_0").max) == (0.0, 3.0)
    assert (got.get(PLANTED).max, got.get(PLANTED).method) == (9.0, "minmax")
    assert got.get("input").max == 1.0  # still an 8-bit pair
    assert table.get(PLANTED).max == 5.0  # the table itself unchanged
    assert table_for(table, plan) is table


def _linear_chain(layers: int = 16, width: int = 32) -> onnx.ModelProto:
    """y = x W_1 ... W_n with random orthogonal W_i (the norm kept): every layer's activation quantization adds about
    the same error, none stands out (opset 21, so 16-bit moves need no upgrade)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(7)
    inits, nodes, prev = [], [], "x"
    for i in range(layers):
        w = np.linalg.qr(rng.normal(size=(width, width)))[0].astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        out = "y" if i == layers - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [out], name=f"mm{i}"))
        prev = out
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, width])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def test_spread_error_is_reached_by_growing_group_moves(monkeypatch):
    """16 layers that each add the same error (one calibration sample 30 times larger makes every min-max range
    coarse for 8 bits, fine for 16): a target 60 % of the way from the int8 output's worst cosine to the all-16-bit
    one needs about 10 layers at 16 bits. Single moves (2 trials a step) move at most 4 in a budget of 8; the
    search's growing groups (1, then 2, 4, 8 nodes) move up to 15 and meet it, each group a recorded move."""
    model = _linear_chain()
    rng = np.random.default_rng(8)
    calib = [{"x": rng.normal(size=(1, 32)).astype(np.float32) * (30.0 if i == 0 else 1.0)} for i in range(16)]
    val = [{"x": rng.normal(size=(1, 32)).astype(np.float32)} for _ in range(8)]
    kw = dict(val=val, latency=False, per_layer=False, method="minmax", collapse_rescue=False)
    start = qpass.quantize(model, calib, **kw).report.validation["outputs"][0]["cosine_min"]
    ceiling = qpass.quantize(model, calib, activation_type="uint16", **kw).report.validation["outputs"][0]["cosine_min"]
    assert ceiling > start  # 16-bit activations help (else the test proves nothing)
    target = start + 0.6 * (ceiling - start)
    res = qpass.quantize(model, calib, target_cosine=float(target), search_budget=8, **{**kw, "per_layer": True})
    s = res.report.search
    assert s["met"] is True and s["trials"] <= 8
    groups = [len(m.get("group", [m])) for m in s["moves"]]
    assert groups == [2 ** i for i in range(len(groups))] and len(groups) >= 3
    moved = set(s["widened"]) | set(s["floated"])
    assert len(moved) == sum(groups) > 4
    assert {(g["node"], g["to"]) for m in s["moves"] for g in m.get("group", [m])} == \
        {(n, "16-bit") for n in s["widened"]} | {(n, "float") for n in s["floated"]}
    import qpass.search.precision as precision

    monkeypatch.setattr(precision, "GROUP_GROWTH", 1)  # single moves only: the same budget does not reach it
    single = qpass.quantize(model, calib, target_cosine=float(target), search_budget=8,
                            **{**kw, "per_layer": True}).report.search
    assert single["met"] is False and len(set(single["widened"]) | set(single["floated"])) <= 4


def test_a_group_that_does_not_help_sends_the_search_back_to_single_moves(monkeypatch):
    """Planted: the first group trial's rewrite fails. The step is rejected, the next step is a single move again
    (2 candidates), and only the group's first node counts as tried: its other nodes still get their 16-bit move."""
    import qpass.search.precision as precision

    model = _linear_chain()
    rng = np.random.default_rng(8)
    calib = [{"x": rng.normal(size=(1, 32)).astype(np.float32) * (30.0 if i == 0 else 1.0)} for i in range(16)]
    val = [{"x": rng.normal(size=(1, 32)).astype(np.float32)} for _ in range(8)]
    original, failed = precision.run_trial, []

    def run_trial(*args):
        move = args[-1]
        if len(move) > 1 and not failed:
            failed.append(move)
            trial = original(*args)
            trial.model, trial.info["error"] = None, "planted rewrite failure"
            return trial
        return original(*args)

    monkeypatch.setattr(precision, "run_trial", run_trial)
    s = qpass.quantize(model, calib, val=val, latency=False, method="minmax", collapse_rescue=False,
                       target_cosine=0.99999, search_budget=8).report.search
    (group,) = failed
    assert len(group) == 2 and s["rejected"][0]["candidates"][0]["nodes"] == 2
    after = [c for r in s["rejected"][1:] + s["moves"][1:] for c in r["candidates"]]
    assert after and "nodes" not in after[0]  # single candidates again
    second = group[1][0]
    tried = [(c["node"], c["to"]) for r in s["rejected"] + s["moves"] for c in r["candidates"] if "nodes" not in c]
    assert (second, "float") not in tried or tried.index((second, "16-bit")) < tried.index((second, "float"))
