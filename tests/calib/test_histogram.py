"""StreamingHistogram: exact, order- and batch-independent, mergeable; memory O(bins)."""
from __future__ import annotations

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
