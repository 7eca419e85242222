"""Calibration inside If branches: each taken branch runs as a model of its own on the main run's values."""
from __future__ import annotations

import numpy as np

from qpass.calib.collect import collect_ranges
from qpass.calib.subgraphs import BranchValues
from qpass.runtime import augmented_model, make_session

from ..builders import DIGITS_CALIB, DIGITS_MODEL
from ..subgraph_models import ELSE_SCALE, digits_in_if, matmul_in_loop, matmul_in_scan, nested_if


def _values(model, wanted, feed):
    bv = BranchValues(model, wanted, lambda m, where: make_session(m))
    main = make_session(augmented_model(model, bv.fetch)).run(bv.fetch, feed)
    got = {**feed, **dict(zip(bv.fetch, main))}
    inner = bv.expand(got)
    assert all(len(v) == 1 for v in inner.values())  # an If branch runs once per main run
    got.update({k: v[0] for k, v in inner.items()})
    return bv, got


def test_branch_tensors_equal_the_same_tensors_of_the_original_cnn():
    import onnx

    x = np.load(DIGITS_CALIB)["input"][:5]
    digits = onnx.load(str(DIGITS_MODEL))
    names = ["/0/Conv_output_0", "/6/Gemm_output_0"]
    ref = make_session(augmented_model(digits, names))
    wanted = [f"{b}/{n}" for b in ("then", "else") for n in names]
    model = digits_in_if()
    bv, then = _values(model, wanted, {"input": x, "flag": np.array(True)})
    assert bv.fetch == ["flag"] or set(bv.fetch) == {"flag", "input"}
    for name, expected in zip(names, ref.run(names, {"input": x})):
        np.testing.assert_allclose(then[f"then/{name}"], expected, rtol=1e-5, atol=1e-5)
        assert f"else/{name}" not in then
    _, other = _values(model, wanted, {"input": x, "flag": np.array(False)})
    for name, expected in zip(names, ref.run(names, {"input": x * ELSE_SCALE})):
        np.testing.assert_allclose(other[f"else/{name}"], expected, rtol=1e-5, atol=1e-5)


def test_nested_branches_are_followed_and_untaken_ones_reported():
    model, w = nested_if()
    x = np.random.default_rng(3).normal(size=(4, 8)).astype(np.float32)
    samples = [({"x": x, "a": np.array(True), "b": np.array(b)}, None) for b in (True, False, True)]
    stats: dict = {}
    table = collect_ranges(model, ["tt_mm", "te_mm", "e_mm"], samples, stats=stats)
    for name, key in (("tt_mm", "tt"), ("te_mm", "te")):
        y = x @ w[key]
        assert table.get(name).min == float(y.min()) and table.get(name).max == float(y.max())
    assert table.get("e_mm") is None
    assert stats["branches_not_taken"] == ["If_0/else (1 tensor(s))"]


def _weight(model, node_name):
    from onnx import numpy_helper

    body = model.graph.node[0].attribute[0].g
    return numpy_helper.to_array(next(n for n in body.node if n.name == node_name).attribute[0].t)


def test_a_loop_body_is_observed_at_every_iteration():
    model = matmul_in_loop()
    w = _weight(model, "loop_w_const")
    x = np.random.default_rng(4).normal(size=(2, 8)).astype(np.float32)
    stats: dict = {}
    table = collect_ranges(model, ["x", "v_in", "v_out"], [({"x": x}, None)], stats=stats)
    ins, outs, v = [], [], x
    for _ in range(3):  # the model's trip count
        ins.append(v)
        v = v @ w
        outs.append(v)
    for name, seen in (("v_in", ins), ("v_out", outs)):
        r = table.get(name)
        assert np.isclose(r.min, min(a.min() for a in seen), rtol=1e-6) and np.isclose(r.max, max(a.max() for a in seen), rtol=1e-6)
    assert table.get("x").max == float(x.max())
    assert stats["branches_not_taken"] == [] and stats["unreachable"] == {}


def test_a_scan_body_is_observed_at_every_step_with_its_state_carried():
    model, w = matmul_in_scan()
    x = np.random.default_rng(5).normal(size=(6, 1, 8)).astype(np.float32)
    h = np.full((1, 8), 0.25, np.float32)
    table = collect_ranges(model, ["x_t", "xw", "h_in"], [({"x": x, "h0": h}, None)])
    states = []
    for t in range(len(x)):
        states.append(h)
        h = x[t] @ w + h
    xw = x[:, 0] @ w
    assert table.get("x_t").min == float(x.min()) and table.get("x_t").max == float(x.max())
    assert np.isclose(table.get("xw").min, xw.min(), rtol=1e-6) and np.isclose(table.get("xw").max, xw.max(), rtol=1e-6)
    assert np.isclose(table.get("h_in").max, max(s.max() for s in states), rtol=1e-5)
    assert np.isclose(table.get("h_in").min, min(s.min() for s in states), rtol=1e-5)
