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
