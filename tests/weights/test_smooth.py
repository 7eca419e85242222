"""SmoothQuant's scales and scoring: the formula by hand, the fake-quantized error against an ONNX-semantics
computation through qparams, and a search that never scores worse than no migration."""
from __future__ import annotations

import numpy as np
import pytest

from qpass.qparams import compute_qparams, dequantize, quantize, weight_qparams
from qpass.weights.smooth import fake_quant_error, search_strength, smooth_scales


def test_scales_by_hand():
    xmax, wmax = np.array([4.0, 1.0, 100.0]), np.array([0.5, 2.0, 0.25])
    np.testing.assert_allclose(smooth_scales(xmax, wmax, 0.5), [np.sqrt(4 / 0.5), np.sqrt(1 / 2.0), np.sqrt(100 / 0.25)],
                               rtol=1e-6)
    np.testing.assert_allclose(smooth_scales(xmax, wmax, 0.75), xmax ** 0.75 / wmax ** 0.25, rtol=1e-6)
    np.testing.assert_array_equal(smooth_scales(xmax, wmax, 0.0), np.ones(3, np.float32))
    with pytest.raises(ValueError):
        smooth_scales(xmax, wmax[:2], 0.5)


def test_error_matches_onnx_quantize_dequantize():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (40, 6)).astype(np.float32) * np.array([1, 1, 30, 1, 1, 1], np.float32)
    w = rng.normal(0, 0.3, (6, 5)).astype(np.float32)
    s = np.array([1.0, 2.0, 5.0, 0.5, 1.0, 1.5], np.float32)
    cmin, cmax = x.min(axis=0), x.max(axis=0)
    # independently: the smoothed input's min-max range, uint8 asymmetric; the smoothed weight int8 per column
    xs = x / s
    a_scale, a_zp = compute_qparams(xs.min(), xs.max(), "uint8", symmetric=False)
    xq = dequantize(quantize(xs, a_scale, a_zp), a_scale, a_zp)
    ws = w * s[:, None]
    w_scale, w_zp = weight_qparams(ws, 1, "int8")
    wq = dequantize(quantize(ws, w_scale, w_zp, axis=1), w_scale, w_zp, axis=1)
    expected = float(np.sum((xq.astype(np.float64) @ wq - x.astype(np.float64) @ w) ** 2))
    got = fake_quant_error(x, [w], s, cmin, cmax, "uint8", act_symmetric=False)
    assert got == pytest.approx(expected, rel=1e-4)


def test_search_never_worse_than_no_migration():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (64, 16)).astype(np.float32)
    x[:, 3] *= 50
    ws = [rng.normal(0, 0.2, (16, 8)).astype(np.float32), rng.normal(0, 0.2, (16, 4)).astype(np.float32)]
    s, alpha, errors = search_strength(x, ws, x.min(0), x.max(0), "int8", act_symmetric=True)
    assert set(errors) == {0.0} | {i / 10 for i in range(1, 11)}
    assert errors[alpha] == min(errors.values()) and errors[alpha] < errors[0.0]  # the outlier makes migration pay
    np.testing.assert_allclose(s, smooth_scales(np.abs(x).max(0), np.abs(np.concatenate(ws, 1)).max(1), alpha),
                               rtol=1e-6)
    s1, a1, e1 = search_strength(x, ws, x.min(0), x.max(0), "int8", act_symmetric=True, alpha=0.5)
    assert set(e1) == {0.0, 0.5} and a1 in (0.0, 0.5)
