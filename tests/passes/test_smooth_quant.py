"""SmoothQuant: on a MatMul whose input has a planted outlier channel, the scales are the formula's (computed here
by hand), the smoothed float model computes what the original does, the int8 model's output error is lower with
smoothing than without, a second run changes nothing, and the statistics it needs round-trip."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import qpass
from qpass import stages
from qpass.calib.observers import ChannelRangeObserver, RowSampleObserver
from qpass.calib.stats import Statistics
from qpass.config import QuantConfig
from qpass.graph import WorkingGraph
from qpass.pass_manager import PassContext, PassManager
from qpass.passes.smooth_quant import SmoothQuant
from qpass.plan.policy import build_plan

K, N, OUTLIER = 32, 24, 5


def _model() -> onnx.ModelProto:
    """x -> Mul(x, g[K]) (a norm's weight) -> MatMul(h, W)."""
    rng = np.random.default_rng(1)
    g = rng.uniform(0.5, 1.5, K).astype(np.float32)
    w = rng.normal(0, 0.2, (K, N)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Mul", ["x", "g"], ["h"], name="norm"),
                               helper.make_node("MatMul", ["h", "W"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", N])],
                              [numpy_helper.from_array(g, "g"), numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _feeds(n: int, seed: int) -> list[dict]:
    """Rows of |x| ~ 1 with channel OUTLIER 60x larger: a per-tensor int8 grid on x spends its levels on it."""
    rng = np.random.default_rng(seed)
    gain = np.where(np.arange(K) == OUTLIER, 60.0, 1.0).astype(np.float32)
    return [{"x": (rng.normal(0, 1, (16, K)) * gain).astype(np.float32)} for _ in range(n)]


def _run(model: onnx.ModelProto, feeds: list[dict]) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, f)[0] for f in feeds])


def _const(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


CFG = QuantConfig(smooth_quant="on", smooth_alpha=0.5, validate=False)


def test_known_scales_same_float_function_and_lower_int8_error():
    model, calib, test = _model(), _feeds(8, 0), _feeds(8, 1)
    g, w = _const(model, "g"), _const(model, "W")
    # by hand: h = x * g; s_j = max|h_j|^a / max|W_j|^(1-a) with a = 0.5, max over every calibration row
    h = np.concatenate([f["x"] for f in calib]).astype(np.float64) * g
    s = np.sqrt(np.abs(h).max(axis=0)) / np.sqrt(np.abs(w.astype(np.float64)).max(axis=1))

    prepared = stages.prepare(model, CFG)
    smoothed = stages.smooth(prepared, [(f, None) for f in calib], CFG)
    record = next(r for r in smoothed.records if r.name == "smooth_quant")
    assert record.stats["strengths"] == {"h": 0.5}
    assert record.stats["groups smoothed, folded into the producer"] == 1
    out = smoothed.model
    np.testing.assert_allclose(_const(out, "W"), w * s[:, None], rtol=1e-5)
    np.testing.assert_allclose(_const(out, "g"), g / s, rtol=1e-5)
    assert [n.op_type for n in out.graph.node] == ["Mul", "MatMul"]  # folded: no node added
    np.testing.assert_allclose(_run(out, test), _run(model, test), rtol=1e-4, atol=1e-4)

    ref = _run(model, test)
    err = {}
    for mode in ("off", "on"):
        q = qpass.quantize(model, iter(calib), config=CFG.replace(smooth_quant=mode)).model  # one pass: copied
        err[mode] = float(np.mean((_run(q, test) - ref) ** 2))
    assert err["on"] < 0.5 * err["off"], err


def test_search_keeps_no_migration_without_an_outlier_when_it_scores_best():
    """Every strength is scored against no migration; the report names the chosen one per input."""
    model, calib = _model(), _feeds(4, 0)
    cfg = CFG.replace(smooth_alpha=None)
    smoothed = stages.smooth(stages.prepare(model, cfg), [(f, None) for f in calib], cfg)
    record = next(r for r in smoothed.records if r.name == "smooth_quant")
    assert set(record.stats["strengths"]) == {"h"} and 0.0 < record.stats["strengths"]["h"] <= 1.0


def test_second_run_changes_nothing_and_weight_only_is_not_smoothed():
    model, calib = _model(), _feeds(4, 0)
    prepared = stages.prepare(model, CFG)
    smoothed = stages.smooth(prepared, [(f, None) for f in calib], CFG)
    again = stages.smooth(smoothed, [(f, None) for f in calib], CFG.replace(smooth_alpha=None))
    # the smoothed input has no outlier left: a second search keeps it (strength 0), or the graph still computes
    # the same function; either way the pass on its own output with no statistics of the new names changes nothing
    wg = WorkingGraph(smoothed.model)
    table = stages.calibrate(prepared, stages.plan(prepared, CFG), [(f, None) for f in calib], CFG,
                             extra={"h": ("chanrange", "rows")}).table
    records = PassManager([SmoothQuant(alpha=0.5)], export=wg.export, verify=None).run(
        wg.graph, PassContext(build_plan(wg.graph, CFG), table))
    assert not records[0].modified and records[0].skipped
    np.testing.assert_allclose(_run(again.model, _feeds(2, 3)), _run(model, _feeds(2, 3)), rtol=1e-4, atol=1e-4)
    result = qpass.quantize(model, calib, config=CFG.replace(weight_only="int8", block_size=16, target_opset=21))
    assert not any(r["name"] == "smooth_quant" for r in result.report.to_dict()["passes"])


def test_observers_and_table_round_trip():
    rng = np.random.default_rng(0)
    batches = [rng.normal(0, 1, (3, 7, 4)).astype(np.float32) for _ in range(5)]
    every = np.concatenate([b.reshape(-1, 4) for b in batches])
    chan, rows = ChannelRangeObserver(), RowSampleObserver(cap=10)
    for b in batches:
        chan.update(b)
        rows.update(b)
    c, r = chan.result(), rows.result()
    np.testing.assert_array_equal(c.min, every.min(axis=0))
    np.testing.assert_array_equal(c.max, every.max(axis=0))
    assert c.count == every.shape[0] and r.seen == every.shape[0] and r.rows.shape == (10, 4)
    kept = {tuple(x) for x in r.rows}
    assert kept <= {tuple(x) for x in every} and len(kept) == 10  # distinct rows of the data
    again = RowSampleObserver(cap=10)
    for b in batches:
        again.update(b)
    np.testing.assert_array_equal(again.result().rows, r.rows)  # seeded: reproducible
    table = Statistics(samples=5)
    table.set("x", "chanrange", c)
    table.set("x", "rows", r)
    assert Statistics.from_json(table.to_json()) == table


def test_bad_settings_are_config_errors_and_the_cli_sets_them():
    import pytest

    from qpass.cli import build_parser
    from qpass.errors import ConfigError

    for bad in ({"smooth_quant": "yes"}, {"smooth_alpha": 0.0}, {"smooth_alpha": 1.5}, {"smooth_alpha": True}):
        with pytest.raises(ConfigError):
            QuantConfig(**bad)
    args = build_parser().parse_args(["run", "m.onnx", "--smooth-quant", "on", "--smooth-alpha", "0.6"])
    assert (args.smooth_quant, args.smooth_alpha) == ("on", 0.6)


def test_a_matmul_inside_a_loop_body_is_skipped_with_a_reason():
    from tests.subgraph_models import matmul_in_loop

    feeds = [{"x": np.random.default_rng(i).normal(0, 1, (4, 8)).astype(np.float32)} for i in range(6)]
    result = qpass.quantize(matmul_in_loop(), feeds, config=CFG.replace(smooth_alpha=None))
    record = next(r for r in result.report.passes if r.name == "smooth_quant")
    assert not record.modified and [s.node for s in record.skipped] == ["Loop_0/body/mm"]
