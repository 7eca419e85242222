"""Double quantization of block scales: uint8 codes x a float32 scale per output channel."""
from __future__ import annotations

import numpy as np

from qpass.weights.double_quant import quantize_scales


def test_scales_on_a_uint8_grid_per_channel():
    rng = np.random.default_rng(0)
    scale = rng.uniform(1e-4, 0.05, (12, 9)).astype(np.float32)
    scale[:, 3] *= 100  # channels of very different magnitude keep their own grid
    q, s2, deq = quantize_scales(scale, channel_axis=1)
    assert q.dtype == np.uint8 and s2.shape == (9,) and deq.dtype == np.float32
    np.testing.assert_allclose(s2, scale.max(axis=0) / 255, rtol=1e-6)
    assert (q.max(axis=0) == 255).all() and (q >= 1).all()
    np.testing.assert_array_equal(deq, q.astype(np.float32) * s2)
    assert (np.abs(deq - scale) <= s2 / 2 * (1 + 1e-5)).all()  # half a step of the channel's grid


def test_tiny_scales_never_become_zero_and_rank_three_axes_work():
    scale = np.array([[[1.0, 1e-6]], [[0.6, 1e-6]], [[1e-9, 2e-6]]], np.float32)  # [blocks, 1, N]
    q, s2, deq = quantize_scales(scale, channel_axis=2)
    assert s2.shape == (2,) and (q >= 1).all() and (deq > 0).all()
    assert q[0, 0, 0] == 255 and q[1, 0, 0] == 153 and q[2, 0, 0] == 1  # 1e-9 rounds to 0 and is kept at one step
