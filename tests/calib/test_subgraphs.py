"""Calibration inside If branches: each taken branch runs as a model of its own on the main run's values."""
from __future__ import annotations

import numpy as np

from qpass.calib.collect import collect_ranges
from qpass.calib.subgraphs import BranchValues
from qpass.runtime import augmented_model, make_session

from ..builders import DIGITS_CALIB, DIGITS_MODEL
from ..subgraph_models import ELSE_SCALE, digits_in_if, matmul_in_loop, nested_if


def _values(model, wanted, feed):
    bv = BranchValues(model, wanted, lambda m, where: make_session(m))
    main = make_session(augmented_model(model, bv.fetch)).run(bv.fetch, feed)
    got = {**feed, **dict(zip(bv.fetch, main))}
    got.update(bv.expand(got))
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


def test_a_tensor_in_a_loop_body_is_reported_unreachable():
    model = matmul_in_loop()
    x = np.ones((2, 8), np.float32)
    stats: dict = {}
    table = collect_ranges(model, ["x", "v_out"], [({"x": x}, None)], stats=stats)
    assert table.get("x").max == 1.0 and table.get("v_out") is None
    assert stats["unreachable"] == {"v_out": "inside the body of Loop 'Loop_0'"}
