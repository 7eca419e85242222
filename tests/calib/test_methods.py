"""Known answers for percentile, MSE and entropy ranges, and the vectorised KL search against a plain loop."""
from __future__ import annotations

import numpy as np
import pytest

from qpass.calib.histogram import StreamingHistogram
from qpass.calib.methods import entropy_range, entropy_threshold, mse_range, percentile_range
from qpass.qparams import compute_qparams, dequantize, quantize


def _hist(x, bins=2048) -> StreamingHistogram:
    h = StreamingHistogram(bins)
    h.update(np.asarray(x))
    return h


def test_percentile_of_a_known_sample():
    x = np.arange(100_001, dtype=np.float64)  # 0 .. 100000, uniform
    lo, hi = percentile_range(_hist(x), 99.0)
    w = _hist(x).width
    assert abs(hi - 99_000) <= w and abs(lo - 1_000) <= w
    t_lo, t_hi = percentile_range(_hist(x - 50_000), 99.0, symmetric=True)
    assert abs(t_hi - 49_500) <= 2 * w and t_lo == -t_hi


def _true_mse(x, lo, hi, qtype="uint8", symmetric=False) -> float:
    s, z = compute_qparams(lo, hi, qtype, symmetric=symmetric)
    return float(np.mean((dequantize(quantize(x, s, z), s, z) - x) ** 2))


def test_mse_optimum_for_uniform_with_outliers_matches_brute_force():
    """The histogram search lands within 5 % of the best range found by quantizing the raw data on a grid."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(-1, 1, 100_000), rng.uniform(6, 8, 40)]).astype(np.float32)
    lo, hi = mse_range(_hist(x), "uint8")
    grid = [(a, b) for a in np.linspace(x.min(), 0, 8) for b in np.linspace(0.5, x.max(), 120)]
    best = min(_true_mse(x, a, b) for a, b in grid)
    assert _true_mse(x, lo, hi) <= best * 1.05


def test_mse_keeps_a_range_when_clipping_would_cost_more():
    x = np.concatenate([np.random.default_rng(1).uniform(-1, 1, 1000), [50.0] * 100]).astype(np.float32)
    lo, hi = mse_range(_hist(x), "uint8")
    assert hi > 45  # 10 % of the mass at 50: clipping it is far worse than a coarse step


def test_symmetric_mse_clips_a_lone_far_outlier_and_uses_one_threshold():
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.normal(0, 1, 200_000), [40.0]]).astype(np.float32)
    lo, hi = mse_range(_hist(x), "int8", symmetric=True)
    assert hi < 40.0 and lo == pytest.approx(max(-hi, float(x.min())))
    best = min(_true_mse(x, -t, t, "int8", True) for t in np.linspace(1.0, 40.0, 200))
    assert _true_mse(x, -hi, hi, "int8", True) <= best * 1.05


def test_entropy_clips_a_lone_outlier_that_minmax_keeps():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, 100_000), [40.0]]).astype(np.float32)
    h = _hist(x)
    lo, hi = entropy_range(h, 128)
    assert (h.min, h.max) == (pytest.approx(x.min()), 40.0)  # min-max keeps the outlier
    assert hi < 10.0 and lo == pytest.approx(max(h.min, -hi))


def _kl_loop(folded: np.ndarray, levels: int, candidates: np.ndarray) -> int:
    """The same criterion written plainly, one candidate at a time."""
    best, best_kl = None, np.inf
    for i in candidates:
        sliced = folded[:i].astype(np.float64)
        p = sliced.copy()
        p[-1] += folded[i:].sum()
        nz = p > 0
        q = np.zeros(i)
        groups = (np.arange(i) * levels) // i
        for g in range(levels):
            m = groups == g
            cnt = nz[m].sum()
            if cnt:
                q[m & nz] = sliced[m].sum() / cnt
        q[nz & (q <= 0)] = 1e-12
        p, q = p / p.sum(), q / q.sum()
        kl = np.sum(p[nz] * np.log(p[nz] / q[nz]))
        if kl < best_kl:
            best, best_kl = i, kl
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_kl_search_equals_the_loop(seed):
    rng = np.random.default_rng(seed)
    x = np.abs(rng.standard_t(2 + seed, 50_000))
    folded, _ = _hist(x, 512).folded()
    n, levels = len(folded), 64
    stride = max(1, (n - levels) // 512)
    cand = np.unique(np.append(np.arange(levels, n + 1, stride), n))
    assert entropy_threshold(folded, levels) == _kl_loop(folded, levels, cand)


def test_entropy_of_a_short_histogram_is_its_full_range():
    assert entropy_threshold(np.array([5, 3, 1]), 128) == 3


def test_entropy_does_not_clip_a_relu_output_for_its_spike_of_zeros():
    """60 % exact zeros and a half-normal tail: with the zeros' bin searched as is, the KL search spread that spike
    over its group at every wide threshold and chose the narrowest candidate (the VAD's first ReLU: 9.5 % of its
    values clipped). The zeros cost nothing (0 is on the grid), so the threshold keeps the body of the tail."""
    rng = np.random.default_rng(0)
    x = np.concatenate([np.zeros(60_000), np.abs(rng.normal(0, 3.0, 40_000))]).astype(np.float32)
    h = _hist(x)
    _, hi = entropy_range(h, 255)
    clipped = float(np.mean(x > hi))
    assert clipped < 0.005, clipped
    assert hi < float(x.max())  # it still clips the far tail
    _, hi_128 = entropy_range(h, 128)
    assert np.mean(x > hi_128) < 0.01


@pytest.mark.parametrize("qtype,symmetric,lo,hi,want", [
    ("uint8", False, 0.0, 10.0, 255),      # a ReLU output: all of the unsigned grid is above 0
    ("uint8", False, -0.375, 20.0, 250),   # a HardSwish output: almost all
    ("uint8", False, -10.0, 10.0, 128),    # balanced: half, the signed grid's magnitudes
    ("uint8", False, -30.0, 1.0, 247),     # mostly negative: |x| folds onto the same long side
    ("uint8", False, -1.0, 0.0, 255),      # no positive value
    ("uint8", False, 0.0, 0.0, 128),       # all zeros: nothing to choose
    ("int8", True, 0.0, 10.0, 128),        # a symmetric signed grid: kl_levels
    ("uint8", True, 0.0, 10.0, 128),
    ("uint16", False, 0.0, 10.0, 65535),   # 16-bit grids: 256 times the 8-bit levels
    ("int16", True, -1.0, 10.0, 32768),
])
def test_kl_levels_follow_the_share_of_the_unsigned_grid_above_zero(qtype, symmetric, lo, hi, want):
    from qpass.calib.observers import RangeOptions, kl_levels

    assert kl_levels(RangeOptions(qtype=qtype, symmetric=symmetric), lo, hi) == want


def test_entropy_on_a_16_bit_grid_keeps_the_range_that_an_8_bit_search_would_clip():
    """A 2048-bin histogram cannot resolve a 16-bit grid's rounding, so no threshold loses less than keeping
    everything: the search with the 16-bit level count returns the observed range, where the 8-bit count clips."""
    from qpass.calib.observers import RangeOptions, kl_levels

    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(0, 1, 100_000), [40.0]]).astype(np.float32)
    h = _hist(x)
    lo, hi = entropy_range(h, kl_levels(RangeOptions(qtype="int16", symmetric=True), h.min, h.max), symmetric=True)
    assert hi == pytest.approx(h.max) and lo == pytest.approx(h.min)
    assert entropy_range(h, kl_levels(RangeOptions(qtype="int8", symmetric=True), h.min, h.max))[1] < 10.0
