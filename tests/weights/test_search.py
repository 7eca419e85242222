"""Known answers for qpass.weights.search.search_block_qparams: the importance-weighted error per (block, column)
is never above plain block_qparams', drops where the plain range is a bad fit, and follows the importance."""
from __future__ import annotations


import numpy as np
import pytest

from qpass.qparams import INT_TYPES, block_qparams, dequantize, quantize, qrange
from qpass.weights.search import search_block_qparams

#: (qtype, symmetric) pairs a weight-only MatMul uses
MODES = [("int4", True), ("uint4", False), ("int8", True), ("int4", False)]


def block_errors(w, scale, zp, block_size, qtype, importance=None):
    """sum_k importance_k (w_kn - dq(q(w_kn)))^2 per (block, column), through qparams' block-wise quantize."""
    dq = dequantize(quantize(w, scale, zp, axis=0, block_size=block_size, qtype=qtype), scale, zp, axis=0,
                    block_size=block_size)
    imp = np.ones(w.shape[0]) if importance is None else np.asarray(importance, dtype=np.float64)
    sq = imp[:, None] * (w.astype(np.float64) - dq.astype(np.float64)) ** 2
    return np.add.reduceat(sq, np.arange(0, w.shape[0], block_size), axis=0)


def outlier_weight(seed=0, k=64, n=16):
    """Gaussian weight with one moderate outlier (4x the spread) in block 1 of every column."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.05
    w[20] = 0.05 * 4.0 * np.where(rng.random(n) < 0.5, -1.0, 1.0)
    return w


@pytest.mark.parametrize("qtype, symmetric", MODES)
@pytest.mark.parametrize("weighted", [False, True])
def test_never_worse_than_plain_and_better_in_total(qtype, symmetric, weighted):
    w = outlier_weight()
    importance = np.random.default_rng(1).uniform(0.1, 3.0, w.shape[0]) if weighted else None
    plain = block_qparams(w, 0, 16, qtype, symmetric=symmetric)
    searched = search_block_qparams(w, 16, qtype, symmetric=symmetric, importance=importance)
    e_plain = block_errors(w, *plain, 16, qtype, importance)
    e_search = block_errors(w, *searched, 16, qtype, importance)
    assert np.all(e_search <= e_plain)
    assert e_search.sum() < e_plain.sum()
    # the outlier's block is one where a shrunk range pays
    assert e_search[1].sum() < e_plain[1].sum()
    if (qtype, symmetric) == ("int4", True):  # the coarsest symmetric grid gains most (about 27 % here)
        assert e_search[1].sum() < 0.9 * e_plain[1].sum()


@pytest.mark.parametrize("qtype, symmetric", MODES)
def test_shapes_dtypes_and_zero_points(qtype, symmetric):
    w = outlier_weight(seed=3, k=64, n=8)
    scale, zp = search_block_qparams(w, 16, qtype, symmetric=symmetric)
    dtype, _, _ = INT_TYPES[qtype]
    assert scale.shape == zp.shape == (4, 8)
    assert scale.dtype == np.float32 and zp.dtype == dtype
    assert np.all(scale > 0)
    qmin, qmax = qrange(qtype, symmetric=symmetric)
    assert zp.min() >= qmin and zp.max() <= qmax
    if symmetric:  # signed symmetric types keep zero point 0
        assert np.all(zp == 0)


def test_importance_on_one_row_lowers_that_rows_error():
    w = outlier_weight(seed=5, k=32, n=32)
    row = 7
    only_row = np.zeros(w.shape[0])
    only_row[row] = 1.0
    plain = block_qparams(w, 0, 16, "int4", symmetric=True)
    uniform = search_block_qparams(w, 16, "int4", symmetric=True)
    focused = search_block_qparams(w, 16, "int4", symmetric=True, importance=only_row)

    def row_error(params):
        return block_errors(w, *params, 16, "int4", only_row)[0]  # [N]: row 7's squared error per column

    assert np.all(row_error(focused) <= row_error(plain))
    assert row_error(focused).sum() < 0.7 * row_error(plain).sum()
    assert row_error(focused).sum() < row_error(uniform).sum()
    # block 1 carries no importance at all: nothing beats the plain candidate there, which is kept
    np.testing.assert_array_equal(focused[0][1], plain[0][1])


def test_plain_range_kept_when_it_is_exact():
    # every value on the int4 grid of the plain scale 0.1: zero error, so shrinking cannot win (factor 1.0 kept)
    ints = np.tile(np.arange(-7, 8, dtype=np.float32), 2)[:16]
    w = np.stack([ints * np.float32(0.1), ints[::-1] * np.float32(0.25)], axis=1)
    plain = block_qparams(w, 0, 16, "int4", symmetric=True)
    searched = search_block_qparams(w, 16, "int4", symmetric=True)
    np.testing.assert_array_equal(searched[0], plain[0])
    np.testing.assert_array_equal(searched[1], plain[1])


def test_k_not_divisible_by_block_size():
    w = outlier_weight(seed=7, k=50, n=12)
    imp = np.random.default_rng(2).uniform(0.5, 2.0, 50)
    scale, zp = search_block_qparams(w, 16, "uint4", symmetric=False, importance=imp)
    assert scale.shape == zp.shape == (4, 12)
    # blocks are independent: the short last block (2 rows) gets what it gets on its own, padding plays no part
    for b, (lo, hi) in enumerate([(0, 16), (16, 32), (32, 48), (48, 50)]):
        s, z = search_block_qparams(w[lo:hi], 16, "uint4", symmetric=False, importance=imp[lo:hi])
        np.testing.assert_array_equal(scale[b], s[0])
        np.testing.assert_array_equal(zp[b], z[0])
    plain = block_qparams(w, 0, 16, "uint4", symmetric=False)
    assert np.all(block_errors(w, scale, zp, 16, "uint4", imp) <= block_errors(w, *plain, 16, "uint4", imp))


def test_no_shrink_is_plain_and_bad_arguments_raise():
    w = outlier_weight()
    plain = block_qparams(w, 0, 16, "int4", symmetric=True)
    same = search_block_qparams(w, 16, "int4", symmetric=True, max_shrink=0.0)
    np.testing.assert_array_equal(same[0], plain[0])
    with pytest.raises(ValueError):
        search_block_qparams(w, 16, "int4", symmetric=True, importance=np.ones(3))
    with pytest.raises(ValueError):
        search_block_qparams(w, 16, "int4", symmetric=True, importance=-np.ones(64))
    with pytest.raises(ValueError):
        search_block_qparams(w, 0, "int4", symmetric=True)
    with pytest.raises(ValueError):
        search_block_qparams(w, 16, "int4", symmetric=True, grid=0)
    with pytest.raises(ValueError):
        search_block_qparams(w[0], 16, "int4", symmetric=True)

