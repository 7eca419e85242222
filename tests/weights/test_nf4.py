"""NF4: the codebook against QLoRA's published levels, nearest-level assignment, exact round trip of grid weights."""
from __future__ import annotations

import numpy as np
import pytest

from qpass.weights.nf4 import NF4_CODEBOOK, NF4_ZERO, block_absmax, nearest_code, nf4_dequantize, nf4_quantize

#: the NF4 levels as published with QLoRA (Dettmers et al. 2023, appendix E; bitsandbytes' NF4 table)
PUBLISHED = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]


def test_codebook_is_qloras_normal_float_levels():
    assert NF4_CODEBOOK.dtype == np.float32 and NF4_CODEBOOK.shape == (16,)
    np.testing.assert_allclose(NF4_CODEBOOK, PUBLISHED, atol=2e-7)  # bitsandbytes built its linspace in float32
    assert (np.diff(NF4_CODEBOOK) > 0).all()  # strictly increasing
    assert NF4_CODEBOOK[0] == -1.0 and NF4_CODEBOOK[-1] == 1.0 and NF4_CODEBOOK[NF4_ZERO] == 0.0  # exact ends and 0
    # 8 positive levels and 7 negative ones: not mirror-symmetric, each side is quantiles of one half of N(0, 1)
    assert (NF4_CODEBOOK > 0).sum() == 8 and (NF4_CODEBOOK < 0).sum() == 7
    assert not np.allclose(NF4_CODEBOOK[1:7], -NF4_CODEBOOK[-2:-8:-1])


def test_nearest_code_picks_the_closest_level():
    x = np.random.default_rng(0).uniform(-1.2, 1.2, 5000).astype(np.float32)
    codes = nearest_code(x)
    brute = np.abs(x[:, None].astype(np.float64) - NF4_CODEBOOK[None, :]).argmin(axis=1)
    np.testing.assert_array_equal(codes, brute)
    np.testing.assert_array_equal(nearest_code(NF4_CODEBOOK), np.arange(16))  # every level is its own code
    mid = (np.float64(NF4_CODEBOOK[3]) + NF4_CODEBOOK[4]) / 2
    assert nearest_code(np.array([np.nextafter(mid, 1.0)]))[0] == 4
    assert nearest_code(np.array([np.nextafter(mid, -1.0)]))[0] == 3


@pytest.mark.parametrize("k", [64, 80])  # whole blocks, and a last block of 16
def test_weights_on_the_grid_round_trip_exactly(k):
    rng = np.random.default_rng(1)
    block, n = 32, 5
    codes = rng.integers(0, 16, (k, n)).astype(np.uint8)
    codes[::block] = 15  # every block holds the level 1.0, so its absmax is its scale
    scale = rng.uniform(0.01, 2.0, (-(-k // block), n)).astype(np.float32)
    w = nf4_dequantize(codes, scale, block)
    q, s = nf4_quantize(w, block)
    np.testing.assert_array_equal(s, scale)
    np.testing.assert_array_equal(q, codes)
    np.testing.assert_array_equal(nf4_dequantize(q, s, block), w)


def test_quantize_uses_the_block_absmax_and_bounds_the_error():
    rng = np.random.default_rng(2)
    w = rng.normal(0, 0.1, (96, 7)).astype(np.float32)
    w[5:32] = 0.0  # a zero-heavy block keeps exact zeros
    codes, scale = nf4_quantize(w, 32)
    np.testing.assert_array_equal(scale, block_absmax(w, 32))
    np.testing.assert_array_equal(scale[1], np.abs(w[32:64]).max(axis=0))
    deq = nf4_dequantize(codes, scale, 32)
    assert (deq[5:32] == 0).all()
    gap = np.diff(NF4_CODEBOOK).max() / 2  # at most half the widest gap between levels, times the scale
    full = np.repeat(scale, 32, axis=0)
    assert (np.abs(deq - w) <= gap * full * (1 + 1e-6)).all()
    with pytest.raises(ValueError):
        nf4_quantize(np.ones((2, 3, 4), np.float32), 2)
