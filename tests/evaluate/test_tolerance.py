from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import qpass
from qpass.cli import main
from qpass.config import QuantConfig
from qpass.evaluate.tolerance import COLLAPSE_PERPLEXITY_RATIO, COLLAPSE_SQNR_DB, check_tolerance


def _out(name="y", sqnr=30.0, **extra):
    return {"output": name, "sqnr_db": sqnr, "cosine_mean": 0.99, "cosine_min": 0.98, "max_abs_error": 0.1, **extra}


def test_collapse_rule_known_answers():
    per_layer = [{"node": "mm3", "op_type": "MatMul"}, {"node": "mm1", "op_type": "MatMul"}]
    ok = check_tolerance({"outputs": [_out(sqnr=COLLAPSE_SQNR_DB + 0.1)], "per_layer": per_layer}, QuantConfig())
    assert ok == {"passed": True, "tolerance_failures": []}
    bad = check_tolerance({"outputs": [_out(sqnr=COLLAPSE_SQNR_DB - 0.1)], "per_layer": per_layer}, QuantConfig())
    assert not bad["passed"] and len(bad["tolerance_failures"]) == 1
    line = bad["tolerance_failures"][0]
    assert "output 'y' is broken" in line and "mm3 (MatMul), mm1 (MatMul)" in line and "--exclude" in line
    # a language model: perplexity decides, not the logits' SQNR (4-bit logits measure ~4 dB at +38 % perplexity)
    lm = dict(perplexity_fp32=50.0, tokens=100, kl_mean=0.5)
    degraded = _out("logits", sqnr=3.9, perplexity_quantized=50.0 * COLLAPSE_PERPLEXITY_RATIO, **lm)
    assert check_tolerance({"outputs": [degraded]}, QuantConfig())["passed"]
    broken = _out("logits", sqnr=3.9, perplexity_quantized=50.0 * COLLAPSE_PERPLEXITY_RATIO + 1, **lm)
    r = check_tolerance({"outputs": [broken]}, QuantConfig())
    assert not r["passed"] and "--weight-only int4" in r["tolerance_failures"][0]
    assert "--smooth-quant on" in r["tolerance_failures"][0]
    r = check_tolerance({"outputs": [broken]}, QuantConfig(smooth_quant="on"))
    assert "--weight-only int4" in r["tolerance_failures"][0] and "--smooth-quant" not in r["tolerance_failures"][0]
    r = check_tolerance({"outputs": [broken]}, QuantConfig(weight_only="int4"))
    assert "GPTQ" in r["tolerance_failures"][0]
    # off, or replaced by an explicit minimum
    assert check_tolerance({"outputs": [broken]}, QuantConfig(collapse_check=False))["passed"]
    assert check_tolerance({"outputs": [_out(sqnr=1.0)]}, QuantConfig(min_top1=0.5))["passed"]


def _outlier_model(tmp_path):
    """y = x @ W with W's row for input channel 0 zero: channel 0 (range 1e4 in calibration) sets the uint8 input
    scale, so every channel that matters quantizes to a few levels and the output is noise."""
    rng = np.random.default_rng(0)
    w = rng.normal(0, 1, (16, 8)).astype(np.float32)
    w[0] = 0.0
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "outlier",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
                              [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "m.onnx")
    x = rng.normal(0, 1, (64, 16)).astype(np.float32)
    x[:, 0] = rng.uniform(-1e4, 1e4, 64)
    np.savez(tmp_path / "calib.npz", x=x[:48])
    np.savez(tmp_path / "val.npz", x=x[48:])
    return tmp_path / "m.onnx"


def test_a_broken_output_fails_the_run_and_names_the_layer(tmp_path, capsys):
    path = _outlier_model(tmp_path)
    r = qpass.quantize(path, tmp_path / "calib.npz", val=tmp_path / "val.npz", latency=False)
    assert r.report.validation["outputs"][0]["sqnr_db"] < COLLAPSE_SQNR_DB and not r.passed
    # the 16-bit rescue was tried: channel 0's range breaks that too, so the 8-bit output and its failure stand
    assert r.report.config["activation_type"] == "uint8"
    assert any(w.startswith("16-bit activations (uint16) were tried and broke the output too") for w in r.report.warnings)
    args = ["run", str(path), "--calib", str(tmp_path / "calib.npz"), "--val", str(tmp_path / "val.npz"),
            "-o", str(tmp_path / "q.onnx"), "--quiet"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "is broken" in err and "mm (MatMul)" in err and "--allow-collapse" in err
    assert main([*args, "--allow-collapse"]) == 0


def _spread_chain(tmp_path):
    """y = x W_1 ... W_8 (random orthogonal W_i, opset 17); one calibration sample 30 times larger makes every
    min-max range coarse for 8 bits (the output is noise) and fine for 16."""
    rng = np.random.default_rng(7)
    inits, nodes, prev = [], [], "x"
    for i in range(8):
        inits.append(numpy_helper.from_array(np.linalg.qr(rng.normal(size=(32, 32)))[0].astype(np.float32), f"w{i}"))
        out = "y" if i == 7 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [out], name=f"mm{i}"))
        prev = out
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "chain.onnx")
    x = rng.normal(0, 1, (48, 32)).astype(np.float32)
    x[0] *= 30.0
    np.savez(tmp_path / "calib.npz", x=x[:32])
    np.savez(tmp_path / "val.npz", x=x[32:])
    return tmp_path / "chain.onnx"


def test_a_broken_static_output_is_quantized_again_with_16_bit_activations(tmp_path, capsys):
    """8-bit activations break the chain's output (SQNR under 10 dB); the run quantizes it again with uint16
    activations at opset 21 (weights int8), keeps that output (not broken) with a warning, exits 0; with
    --no-collapse-rescue it fails as before."""
    path = _spread_chain(tmp_path)
    data = dict(val=tmp_path / "val.npz", latency=False)
    first = qpass.quantize(path, tmp_path / "calib.npz", collapse_rescue=False, **data)
    assert first.report.validation["outputs"][0]["sqnr_db"] < COLLAPSE_SQNR_DB and not first.passed
    r = qpass.quantize(path, tmp_path / "calib.npz", **data)
    assert r.passed and r.report.config["activation_type"] == "uint16" and r.report.opset["output"] == 21
    assert r.report.validation["outputs"][0]["sqnr_db"] > COLLAPSE_SQNR_DB
    assert r.report.warnings[0].startswith("8-bit activations broke the output")
    # the upgrade 17 -> 21 is the opset policy's, said as such (the user asked for no opset)
    assert "upgraded" in r.report.opset and any(w.startswith("opset upgraded 17 -> 21: uint16 QuantizeLinear needs it")
                                                for w in r.report.warnings)
    rescue = r.report.search["collapse_rescue"]
    assert rescue["activation_type"] == "uint16" and rescue["first"][0]["sqnr_db"] < COLLAPSE_SQNR_DB
    q = {n.input[0] for n in r.model.graph.node if n.op_type == "QuantizeLinear"}
    zps = {n.input[2] for n in r.model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2}
    inits = {t.name: t.data_type for t in r.model.graph.initializer}
    assert q and {inits[z] for z in zps} == {TensorProto.UINT16}
    args = ["run", str(path), "--calib", str(tmp_path / "calib.npz"), "--val", str(tmp_path / "val.npz"),
            "-o", str(tmp_path / "q.onnx"), "--no-latency", "--quiet"]
    assert main(args) == 0 and (tmp_path / "q.onnx").exists()
    assert main([*args, "--no-collapse-rescue"]) == 1
    assert "is broken" in capsys.readouterr().err


def test_the_rescue_leaves_dynamic_runs_pinned_opsets_and_the_side_files_of_a_kept_refusal(tmp_path):
    """No rescue for dynamic quantization or a target_opset pinned below 21; when the 16-bit attempt breaks too, the
    plan and table files are the 8-bit run's (the result's)."""
    path = _outlier_model(tmp_path)
    data = dict(val=tmp_path / "val.npz", latency=False)
    dyn = qpass.quantize(path, tmp_path / "calib.npz", dynamic=True, **data)
    assert not any("16-bit activations" in w for w in dyn.report.warnings)
    (tmp_path / "chain").mkdir()
    chain = _spread_chain(tmp_path / "chain")
    pinned = qpass.quantize(chain, tmp_path / "chain" / "calib.npz", val=tmp_path / "chain" / "val.npz", latency=False,
                            target_opset=17)
    assert not pinned.passed and pinned.report.opset["output"] == 17 and "collapse_rescue" not in (pinned.report.search or {})
    kept = qpass.quantize(chain, tmp_path / "chain" / "calib.npz", val=tmp_path / "chain" / "val.npz", latency=False,
                          opset_upgrade=False)  # --keep-opset: 16-bit Q/DQ would need opset 21
    assert not kept.passed and kept.report.opset["output"] == 17 and "collapse_rescue" not in (kept.report.search or {})
    plan, table = tmp_path / "plan.json", tmp_path / "table.json"
    r = qpass.quantize(path, tmp_path / "calib.npz", save_plan=plan, save_calib=table, **data)
    assert not r.passed and r.report.config["activation_type"] == "uint8"
    import json

    saved = json.loads(plan.read_text())
    assert {t["spec"]["dtype"] for t in saved["tensors"].values()} == {"uint8"}
    alone = tmp_path / "table_8bit.json"
    qpass.quantize(path, tmp_path / "calib.npz", save_calib=alone, collapse_rescue=False, **data)
    assert json.loads(table.read_text()) == json.loads(alone.read_text())
