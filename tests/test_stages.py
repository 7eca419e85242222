"""The stages one at a time: calibrate once, rewrite several plans; artifacts pickle; quantize() is the same calls."""
from __future__ import annotations

import hashlib
import json
import pickle

import numpy as np
import onnx
import pytest

import qpass
from qpass import stages
from qpass.calib import collect
from qpass.calib.data import input_specs, open_samples
from qpass.calib.sources import take
from qpass.config import QuantConfig
from qpass.errors import PlanError
from qpass.plan.spec import QuantPlan
from tests.builders import DIGITS_CALIB, DIGITS_MODEL, DIGITS_TEST


def _weight_is_float(model: onnx.ModelProto, node_name: str) -> bool:
    """The node reads its weight straight from a float initializer (no DequantizeLinear in between)."""
    node = next(n for n in model.graph.node if n.name == node_name)
    inits = {t.name: t for t in model.graph.initializer}
    w = node.input[1]
    return w in inits and inits[w].data_type == onnx.TensorProto.FLOAT


@pytest.fixture(scope="module")
def calibrated_once():
    cfg = QuantConfig(latency=False, per_layer=False)
    prepared = stages.prepare(stages.load(DIGITS_MODEL), cfg)
    plan = stages.plan(prepared, cfg)
    samples = open_samples(DIGITS_CALIB, input_specs(prepared.model))
    calibrated = stages.calibrate(prepared, plan, samples, cfg)
    return cfg, prepared, plan, calibrated


def test_calibrate_once_rewrite_two_plans_one_edited_through_a_file(calibrated_once, tmp_path, monkeypatch):
    cfg, prepared, plan, calibrated = calibrated_once
    calls = []
    monkeypatch.setattr(collect, "collect_ranges", lambda *a, **k: calls.append(1))  # a second calibration would fail
    monkeypatch.setattr(stages, "collect_ranges", lambda *a, **k: calls.append(1))

    default = stages.rewrite(prepared, plan, calibrated.table, cfg)
    path = tmp_path / "plan.json"
    plan.save(path)
    edited = json.loads(path.read_text())
    [entry] = [n for n in edited["nodes"] if n["node"] == "/6/Gemm"]
    entry["precision"] = "float"
    path.write_text(json.dumps(edited))
    moved = stages.rewrite(prepared, QuantPlan.load(path), calibrated.table, cfg)

    assert not calls
    assert default.quantized_nodes == {"Conv": 2, "Gemm": 2}
    assert moved.quantized_nodes == {"Conv": 2, "Gemm": 1}
    assert not _weight_is_float(default.model, "/6/Gemm") and _weight_is_float(moved.model, "/6/Gemm")
    assert any(s.node == "/6/Gemm" and "plan" in s.reason for r in moved.records for s in r.skipped)
    test = open_samples(DIGITS_TEST, input_specs(prepared.reference))
    for result in (default, moved):
        onnx.checker.check_model(result.model, full_check=True)
        report = stages.evaluate(prepared.reference, result.model, take(test, 64), "test", cfg)
        [out] = report["outputs"]
        assert out["cosine_mean"] > 0.99 and out["top1_agreement"] > 0.95


def test_override_by_op_type_keeps_every_gemm_float(calibrated_once):
    cfg, prepared, plan, calibrated = calibrated_once
    ov = QuantPlan.from_dict({**plan.to_dict(), "overrides": [{"op_type": "Gemm", "precision": "float"}]})
    out = stages.rewrite(prepared, ov, calibrated.table, cfg)
    assert out.quantized_nodes == {"Conv": 2}
    assert _weight_is_float(out.model, "/6/Gemm") and _weight_is_float(out.model, "/8/Gemm")


def test_a_tensor_override_changes_its_spec_and_only_its_quantizer(calibrated_once):
    cfg, prepared, plan, calibrated = calibrated_once
    first = next(iter(plan.tensors))
    ov = QuantPlan.from_dict({**plan.to_dict(), "overrides": [{"tensor": first, "spec": {"dtype": "int8"}}]})
    out = stages.rewrite(prepared, ov, calibrated.table, cfg)
    zps = {n.input[0]: n.input[2] for n in out.model.graph.node if n.op_type == "QuantizeLinear"}
    inits = {t.name: t for t in out.model.graph.initializer}
    assert inits[zps[first]].data_type == onnx.TensorProto.INT8
    assert all(inits[z].data_type == onnx.TensorProto.UINT8 for x, z in zps.items() if x != first)


def test_an_override_that_matches_nothing_is_an_error(calibrated_once):
    cfg, prepared, plan, calibrated = calibrated_once
    ov = QuantPlan.from_dict({**plan.to_dict(), "overrides": [{"node": "/6/gemm", "precision": "float"}]})
    with pytest.raises(PlanError, match="matches no node"):
        stages.rewrite(prepared, ov, calibrated.table, cfg)


def test_a_plan_for_another_model_is_refused_by_name(calibrated_once):
    cfg, prepared, plan, calibrated = calibrated_once
    data = plan.to_dict()
    data["nodes"][0]["node"] = "not_here"
    with pytest.raises(PlanError, match="'not_here' is not a node of this model"):
        stages.rewrite(prepared, QuantPlan.from_dict(data), calibrated.table, cfg)


def test_artifacts_pickle_and_rewrite_the_same_after_a_round_trip(calibrated_once):
    cfg, prepared, plan, calibrated = calibrated_once
    again = [pickle.loads(pickle.dumps(a)) for a in (prepared, plan, calibrated.table)]
    a = stages.rewrite(prepared, plan, calibrated.table, cfg).model.SerializeToString()
    b = stages.rewrite(*again, cfg).model.SerializeToString()
    assert a == b


def test_quantize_with_its_own_saved_plan_writes_the_same_bytes(tmp_path):
    kw = dict(val=DIGITS_TEST, max_calib_samples=32, latency=False, per_layer=False)
    first = qpass.quantize(DIGITS_MODEL, DIGITS_CALIB, output=tmp_path / "a.onnx", save_plan=tmp_path / "plan.json", **kw)
    second = qpass.quantize(DIGITS_MODEL, DIGITS_CALIB, output=tmp_path / "b.onnx", plan=tmp_path / "plan.json", **kw)
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (first.output_path, second.output_path)]
    assert digest[0] == digest[1]
    report = json.loads(first.report_path.read_text())
    assert report["plan"] == json.loads((tmp_path / "plan.json").read_text())
    assert "seconds" in report and "plan" in report["seconds"]


def test_stage_outputs_match_quantize(calibrated_once):
    """quantize() is the stages in order: the same plan and the same model bytes."""
    cfg, prepared, plan, calibrated = calibrated_once
    result = qpass.quantize(DIGITS_MODEL, DIGITS_CALIB, config=cfg, val_fraction=0.0)
    assert result.plan == plan
    assert result.model.SerializeToString() == stages.rewrite(prepared, plan, calibrated.table, cfg).model.SerializeToString()


def test_recorded_output_hashes_of_the_shipped_model():
    """The byte-identity guard of the architecture change (tools/output_hashes.json), for the models in models/."""
    from tools import output_hashes

    record = json.loads(output_hashes.RECORD.read_text())
    for name in ("digits_cnn", "digits_cnn_opset21"):  # the second upgrades the opset first (value_info kept as input's)
        for fmt in output_hashes.FORMATS:
            assert output_hashes.output_hash(name, fmt) == record[f"{name}.{fmt}"], (name, fmt)


def test_calibration_ranges_are_stored_for_exactly_the_planned_tensors(calibrated_once):
    cfg, prepared, plan, calibrated = calibrated_once
    assert sorted(calibrated.table.ranges) == sorted(plan.calibrate)
    assert set(plan.methods().values()) <= {"minmax", "percentile"}
    assert np.isfinite([r.min for r in calibrated.table.ranges.values()]).all()


def test_calibrate_collects_extra_statistics_for_a_later_rewrite(calibrated_once):
    cfg, prepared, plan, _ = calibrated_once
    gemm_input = next(t for t in plan.tensors if t in [n.input[0] for n in prepared.model.graph.node if n.name == "/8/Gemm"])
    samples = take(open_samples(DIGITS_CALIB, input_specs(prepared.model)), 16)
    got = stages.calibrate(prepared, plan, samples, cfg, extra={gemm_input: ("gram", "absmean")}).table.statistics
    gram, absmean = got.get(gemm_input, "gram"), got.get(gemm_input, "absmean")
    assert gram.rows == 16 and gram.matrix.shape == (absmean.mean.shape[0],) * 2
    assert np.allclose(gram.matrix, gram.matrix.T) and (np.diag(gram.matrix) >= 0).all()


# ------------------------------------------------------------------------------------------ plans as users edit them
def _with(plan: QuantPlan, **changes) -> QuantPlan:
    return QuantPlan.from_dict({**plan.to_dict(), **changes})


def test_overrides_reach_calibration_and_a_typo_fails_before_it(monkeypatch):
    cfg = QuantConfig(latency=False, per_layer=False)
    prepared = stages.prepare(stages.load(DIGITS_MODEL), cfg)
    plan = stages.plan(prepared, cfg)
    assert "percentile" in plan.methods().values()
    all_minmax = _with(plan, overrides=[{"tensor_regex": ".*", "spec": {"method": "minmax"}}])
    samples = take(open_samples(DIGITS_CALIB, input_specs(prepared.model)), 8)
    assert stages.calibrate(prepared, all_minmax, samples, cfg).info["methods_used"] == {"minmax": len(plan.calibrate)}
    calls = []
    monkeypatch.setattr(stages, "collect_ranges", lambda *a, **k: calls.append(1))
    typo = _with(plan, overrides=[{"node": "/6/gemm", "precision": "float"}])
    with pytest.raises(PlanError, match="matches no node"):
        qpass.quantize(DIGITS_MODEL, DIGITS_CALIB, plan=typo, latency=False, per_layer=False)
    assert not calls


def test_a_saved_plan_rerun_without_the_flags_writes_the_same_model(tmp_path):
    kw = dict(max_calib_samples=24, latency=False, per_layer=False, val=DIGITS_TEST)
    a = qpass.quantize(DIGITS_MODEL, DIGITS_CALIB, activation_type="int8", method="entropy",
                       save_plan=tmp_path / "p.json", **kw)
    b = qpass.quantize(DIGITS_MODEL, DIGITS_CALIB, plan=tmp_path / "p.json", **kw)  # config says uint8/auto
    assert a.model.SerializeToString() == b.model.SerializeToString()


def test_the_plan_in_the_report_loads_again_after_a_tensor_override(calibrated_once, tmp_path):
    cfg, prepared, plan, calibrated = calibrated_once
    shared = next(t for t in plan.tensors.values() if t.range_of != t.name)  # a range shared through data movement
    dropped = _with(plan, overrides=[{"tensor": shared.range_of, "precision": "float"}])
    result = qpass.quantize(DIGITS_MODEL, DIGITS_CALIB, plan=dropped, latency=False, per_layer=False)
    again = QuantPlan.from_dict(result.report.plan)
    assert shared.range_of not in again.tensors and shared.name in again.tensors
    assert stages.rewrite(prepared, again, calibrated.table, cfg).quantized_nodes


def test_a_node_marked_float_can_be_quantized_again_by_an_override(calibrated_once):
    cfg, prepared, plan, calibrated = calibrated_once
    data = plan.to_dict()
    next(n for n in data["nodes"] if n["node"] == "/6/Gemm")["precision"] = "float"
    back = QuantPlan.from_dict({**data, "overrides": [{"node": "/6/Gemm", "precision": "quantized"}]})
    assert stages.rewrite(prepared, back, calibrated.table, cfg).quantized_nodes == {"Conv": 2, "Gemm": 2}


def test_activation_specs_static_qdq_cannot_write(calibrated_once):
    cfg, prepared, plan, calibrated = calibrated_once
    first = next(iter(plan.tensors))
    four = stages.rewrite(prepared, _with(plan, overrides=[{"tensor": first, "spec": {"dtype": "int4"}}]),
                          calibrated.table, cfg)
    assert any(s.node == first and "int4 activations are not written" in s.reason for r in four.records for s in r.skipped)
    assert first not in {n.input[0] for n in four.model.graph.node if n.op_type == "QuantizeLinear"}
    sixteen = _with(plan, overrides=[{"tensor": first, "spec": {"dtype": "uint16", "symmetric": False}}])
    with pytest.raises(PlanError, match="need opset 21"):
        stages.rewrite(prepared, sixteen, calibrated.table, cfg)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["nodes"].append(dict(d["nodes"][0])), "listed twice"),
    (lambda d: d["nodes"][0].update(activations=[5]), "activation input 5"),
    (lambda d: d["nodes"][0]["bias"].update(axis=3), "bias axis 3"),
    (lambda d: d["nodes"][0]["weight"]["spec"].update(axis=2), "go on axis 0"),
])
def test_hand_edited_entries_that_do_not_fit_are_named(calibrated_once, edit, message):
    cfg, prepared, plan, calibrated = calibrated_once
    data = plan.to_dict()
    edit(data)
    with pytest.raises(PlanError, match=message):
        stages.rewrite(prepared, QuantPlan.from_dict(data), calibrated.table, cfg)


def test_plan_and_table_paths_are_checked_before_any_work(tmp_path):
    from qpass.errors import ModelSaveError

    with pytest.raises(ModelSaveError, match="folder does not exist"):
        qpass.quantize(DIGITS_MODEL, DIGITS_CALIB, save_plan=tmp_path / "no" / "p.json")
    with pytest.raises(ModelSaveError, match="same file"):
        qpass.quantize(DIGITS_MODEL, DIGITS_CALIB, output=tmp_path / "m.onnx", save_plan=tmp_path / "m.onnx")


def test_an_upgrade_qpass_chooses_keeps_the_original_as_the_reference():
    """opset 12 with per-channel weights: the prepared model is at 13, the reference the result is validated against
    is the model as given; an upgrade --target-opset asked for is the reference itself."""
    from tests import builders
    from qpass.io import default_opset

    m = builders.conv_model()
    m.opset_import[0].version = 12
    chosen = stages.prepare(m, QuantConfig())
    assert default_opset(chosen.model) == 13 and chosen.reference is m and "upgraded" in chosen.opset
    asked = stages.prepare(m, QuantConfig(target_opset=13))
    assert default_opset(asked.reference) == 13 and "upgraded" not in asked.opset
