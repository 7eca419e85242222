"""StreamingHistogram: exact, order- and batch-independent, mergeable; memory O(bins)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from qpass.calib.histogram import StreamingHistogram

finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32)
data = arrays(np.float32, st.integers(1, 300), elements=finite)


def _observe(chunks, bins=128) -> StreamingHistogram:
    h = StreamingHistogram(bins)
    for c in chunks:
        h.update(c)
    return h


def _same(a: StreamingHistogram, b: StreamingHistogram) -> None:
    assert (a.exp, a.k0, a.min, a.max, a.count) == (b.exp, b.k0, b.min, b.max, b.count)
    np.testing.assert_array_equal(a.counts, b.counts)


@settings(max_examples=150, deadline=None)
@given(data, st.integers(1, 20), st.randoms(use_true_random=False))
def test_any_split_and_order_gives_the_same_histogram(x, parts, rnd):
    whole = _observe([x])
    chunks = np.array_split(x, parts)
    rnd.shuffle(chunks)
    _same(whole, _observe(chunks))


@settings(max_examples=150, deadline=None)
@given(data, data)
def test_merging_two_histograms_equals_observing_the_concatenation(a, b):
    _same(_observe([a]).merge(_observe([b])), _observe([np.concatenate([a, b])]))


@settings(max_examples=150, deadline=None)
@given(data)
def test_each_bin_holds_the_exact_count_of_its_interval(x):
    h = _observe([x])
    edges = h.edges()
    x64 = x.astype(np.float64)
    expected = np.array([np.sum((x64 >= lo) & (x64 < hi)) for lo, hi in zip(edges[:-1], edges[1:])])
    np.testing.assert_array_equal(h.counts, expected)
    assert h.counts.sum() == x.size and h.min == x64.min() and h.max == x64.max()


@settings(max_examples=100, deadline=None)
@given(data)
def test_folded_histogram_is_the_exact_histogram_of_abs(x):
    h = _observe([x])
    folded, w = h.folded()
    a = np.abs(x.astype(np.float64))
    expected = np.bincount(np.where(x >= 0, np.floor(a / w), np.ceil(a / w) - 1).astype(np.int64),
                           minlength=len(folded))
    np.testing.assert_array_equal(folded, expected[: len(folded)])


def test_at_least_half_the_bins_span_the_data_and_memory_is_fixed():
    rng = np.random.default_rng(0)
    h = StreamingHistogram(2048)
    for _ in range(50):
        h.update(rng.normal(0, 1, 10_000) * rng.uniform(0.5, 3))
    assert h.counts.shape == (2048,)
    occupied = (h.max - h.min) / h.width
    assert 1024 <= occupied <= 2048


def test_constant_tensor_and_growth_from_it():
    h = StreamingHistogram(64)
    h.update(np.zeros(10))
    assert h.counts.sum() == 10
    h.update(np.full(3, 5.0))
    assert h.counts.sum() == 13 and h.max == 5.0
    np.testing.assert_array_equal(h.edges()[np.nonzero(h.counts)[0]], [0.0, 5.0])


def test_too_few_bins_is_refused():
    with pytest.raises(ValueError):
        StreamingHistogram(4)


# ---------------------------------------------------------------- the bin counting and the subsample stride
from qpass.calib.histogram import bin_counts, subsample_stride  # noqa: E402

values = arrays(np.float32, st.integers(1, 300),
                elements=st.one_of(st.floats(-1e4, 1e4, width=32), st.sampled_from([0.0, -0.0, -1e-45, 1e-45, -3e-39])))


@settings(max_examples=200, deadline=None)
@given(values, st.integers(1, 7), st.sampled_from([1, 2, 3]), st.sampled_from([np.float32, np.float64]))
def test_bin_counts_match_a_plain_loop(x, stride, rows, dtype):
    x = np.resize(x, (rows, x.size)).astype(dtype)
    h = StreamingHistogram(64)
    h._grow(float(x.min()), float(x.max()))
    got = bin_counts(x, stride, h.exp, h.k0, 64, nonnegative=bool(x.min() >= 0))
    want = np.zeros(64, np.int64)
    for v in x[:, ::stride].ravel().tolist():  # exact rational arithmetic on the binary values
        from fractions import Fraction
        want[math.floor(Fraction(v) / Fraction(2) ** h.exp) - h.k0] += 1
    assert np.array_equal(got, want)


def test_bin_counts_of_float64_values_that_underflow():
    """float64 values far below the bin width: -tiny*2**-exp underflows to -0.0 and must still count below 0."""
    x = np.array([[-1e-320, 1e-320, -5e-324, 0.0, -1e300, 1e300]])
    h = StreamingHistogram(64)
    h._grow(float(x.min()), float(x.max()))
    assert h.exp > 0
    got = bin_counts(x, 1, h.exp, h.k0, 64)
    assert got[-h.k0 - 1] == 2 and got[-h.k0] == 2 and got.sum() == 6


def test_a_value_outside_the_window_is_an_error_not_a_wrong_bin():
    with pytest.raises(AssertionError):
        bin_counts(np.array([[0.0, 100.0]], np.float32), 1, 0, 0, 16)
    with pytest.raises(ValueError):
        bin_counts(np.array([[-5.0, 1.0]], np.float32), 1, 0, 0, 16)


@pytest.mark.parametrize("shape,cap", [((1, 3, 224, 224), 65536), ((1, 128, 384), 4096), ((7, 1000), 1024),
                                       ((2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2), 1000)])
def test_stride_is_a_prime_that_divides_no_dimension_and_keeps_about_cap_values(shape, cap):
    p = subsample_stride(shape, cap)
    n = int(np.prod(shape))
    assert all(p % d for d in range(2, p)) and p >= 2
    assert all(d % p for d in shape if d > 1)
    assert len(range(0, n, p)) <= cap and p < 2 * (n / cap) + 10
    # the walk never revisits a residue of the last axis before it has visited them all: no hidden unit or
    # column is left out while others are counted twice
    kept = np.arange(0, n, p)
    assert len(set(kept % shape[-1])) == min(len(kept), shape[-1])


def test_small_rows_and_cap_zero_keep_every_value():
    assert subsample_stride((1, 3, 8, 8), 65536) == 1
    assert subsample_stride((1, 3, 512, 512), 0) == 1


def test_a_subsampled_row_weighs_by_its_size_not_by_its_count():
    """A long sample walked with stride 7 and a short one counted in full: each counted value of the long one
    stands for 7, so the histogram's mass per sample is the sample's size (no bias toward short samples)."""
    h = StreamingHistogram(64)
    long_row = np.full((1, 7000), 1.0, np.float32)
    short_row = np.full((1, 500), -1.0, np.float32)
    h.update(long_row, rows=1, stride=7)
    h.update(short_row)
    edges = h.edges()
    at = lambda v: int(h.counts[np.searchsorted(edges, v, side="right") - 1])  # noqa: E731
    assert at(1.0) == 7000 and at(-1.0) == 500 and h.count == 7500
