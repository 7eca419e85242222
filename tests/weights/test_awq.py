"""Known answers for qpass.weights.awq: alpha 0 is round to nearest exactly, the chosen loss is never above it, a
planted outlier input channel gets a large scale, the Hessian loss equals the error computed from x, and the
clipping search never loses to the plain range under its own block error."""
from __future__ import annotations

import numpy as np
import pytest

from qpass.qparams import block_qparams, dequantize, quantize
from qpass.weights.awq import output_error, rtn_dequantized, scaled_error, scales_for, search_clip, search_scales
from qpass.weights.rtn import rtn

K, N, B = 64, 24, 16


def _data(seed=0, outlier: int | None = 5, rows=512):
    """x [rows, K] with mild per-channel spread (one channel 30x larger when ``outlier``), W [K, N] Gaussian."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, K)) * rng.uniform(0.5, 1.5, K)
    if outlier is not None:
        x[:, outlier] *= 30.0
    w = rng.normal(0, 0.1, (K, N)).astype(np.float32)
    return x, w, x.T @ x / rows, np.abs(x).mean(axis=0)


def test_loss_matches_the_error_computed_from_x():
    x, w, h, _ = _data(outlier=None)
    w_hat = rtn_dequantized(w, B, "int4", symmetric=True)
    direct = np.sum((x @ w.astype(np.float64) - x @ w_hat.astype(np.float64)) ** 2) / x.shape[0]
    assert output_error(w, w_hat, h) == pytest.approx(direct, rel=1e-9)
    s = scales_for(np.abs(x).mean(axis=0), 0.5)
    w_hat_s = rtn_dequantized(w * s[:, None], B, "int4", symmetric=True) / s[:, None]
    direct_s = np.sum((x @ w.astype(np.float64) - x @ w_hat_s.astype(np.float64)) ** 2) / x.shape[0]
    assert scaled_error([w], [(B, "int4", True)], s, h) == pytest.approx(direct_s, rel=1e-5)


def test_alpha_zero_is_round_to_nearest_exactly():
    x, w, h, absmean = _data()
    s = scales_for(absmean, 0.0)
    assert np.array_equal(s, np.ones(K, np.float32))
    qw = rtn(w, "int4", symmetric=True, axis=0, block_size=B, full_range=True)
    plain = dequantize(qw.q, qw.scale, qw.zero_point, axis=0, block_size=B)
    assert np.array_equal(rtn_dequantized(w, B, "int4", symmetric=True), plain)
    _, _, losses = search_scales([w], [(B, "int4", True)], absmean, h)
    assert losses[0.0] == pytest.approx(output_error(w, plain, h), rel=1e-5)  # the search's products are float32


@pytest.mark.parametrize("qtype, symmetric", [("int4", True), ("uint4", False)])
def test_chosen_loss_is_below_rtn_and_the_outlier_channel_gets_a_large_scale(qtype, symmetric):
    x, w, h, absmean = _data()
    w2 = np.random.default_rng(3).normal(0, 0.1, (K, 8)).astype(np.float32)  # a second weight reading the same x
    specs = [(B, qtype, symmetric)] * 2
    s, alpha, losses = search_scales([w, w2], specs, absmean, h)
    assert losses[alpha] == min(losses.values()) and alpha > 0
    assert losses[alpha] < 0.8 * losses[0.0]  # the outlier channel's rounding error dominated plain RTN
    assert scaled_error([w, w2], specs, s, h) == losses[alpha]
    assert int(np.argmax(s)) == 5 and s[5] > 3 * np.median(s)
    assert np.sqrt(s.max() * s.min()) == pytest.approx(1.0, rel=1e-5)  # normalised as the reference does


def test_uniform_inputs_keep_rtn():
    """Every channel alike: every alpha gives (nearly) the same scales; plain RTN is kept unless strictly beaten."""
    _, w, _, _ = _data(outlier=None)
    h = np.eye(K)
    s, alpha, losses = search_scales([w], [(B, "int4", True)], np.ones(K), h)
    assert alpha == 0.0 and np.array_equal(s, np.ones(K, np.float32))
    assert len(losses) == 21


def test_dead_channel_scales_stay_finite():
    absmean = np.linspace(0, 2, K)
    s = scales_for(absmean, 1.0)
    assert np.all(np.isfinite(s)) and s.min() > 0


def _block_errors(w, h, scale, zp, qtype):
    dq = dequantize(quantize(w, scale, zp, axis=0, block_size=B, qtype=qtype), scale, zp, axis=0, block_size=B)
    d = w.astype(np.float64) - dq.astype(np.float64)
    return np.stack([np.einsum("kn,kj,jn->n", d[b:b + B], h[b:b + B, b:b + B], d[b:b + B]) for b in range(0, K, B)])


@pytest.mark.parametrize("qtype, symmetric", [("int4", True), ("uint4", False)])
def test_clip_search_never_loses_to_the_full_range_and_clips_an_outlier(qtype, symmetric):
    x, w, _, _ = _data(outlier=None)
    x[:, 3] *= 0.1  # a quiet input channel ...
    h = x.T @ x / x.shape[0]
    w = w.copy()
    w[3, :] = 0.4  # ... with outlier weights in block 0: clipping them costs less than a wide scale on the block
    scale, zp = search_clip(w, h, B, qtype, symmetric=symmetric)
    plain = block_qparams(w, 0, B, qtype, symmetric=symmetric, full_range=True)
    searched, base = _block_errors(w, h, scale, zp, qtype), _block_errors(w, h, *plain, qtype)
    assert np.all(searched <= base) and searched[0].sum() < 0.9 * base[0].sum()
    assert np.mean(scale[0] < plain[0][0]) > 0.5  # block 0's range shrank in most columns
    # the whole output error (cross-block terms included) follows on this data
    dq = dequantize(quantize(w, scale, zp, axis=0, block_size=B, qtype=qtype), scale, zp, axis=0, block_size=B)
    dq0 = dequantize(quantize(w, *plain, axis=0, block_size=B, qtype=qtype), *plain, axis=0, block_size=B)
    assert output_error(w, dq, h) < output_error(w, dq0, h)


def test_bad_input_is_a_value_error():
    _, w, h, absmean = _data()
    with pytest.raises(ValueError, match="hessian"):
        search_scales([w], [(B, "int4", True)], absmean, h[:-1, :-1])
    with pytest.raises(ValueError, match="absmean"):
        search_scales([w], [(B, "int4", True)], absmean[:-1], h)
    with pytest.raises(ValueError, match="max_shrink"):
        search_clip(w, h, B, "int4", symmetric=True, max_shrink=1.0)
