"""Ternary (absmean) rounding and the int2 packing it is written with."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, numpy_helper

from qpass.qparams import make_initializer, pack_2bit
from qpass.weights.ternary import block_absmean, ternary


def test_absmean_scale_and_clipped_rounding():
    w = np.array([[0.1, -3.0], [-0.2, 0.5], [0.9, 0.0], [-0.01, 0.3],
                  [2.0, 1.0], [0.0, -1.0]], np.float32)  # K=6, blocks of 4 (the last one of 2)
    qw = ternary(w, 4)
    np.testing.assert_allclose(qw.scale, [[0.3025, 0.95], [1.0, 1.0]], rtol=1e-6)
    # w / s: 0.33 -> 0, -3.16 -> -1 (clipped), -0.66 -> -1, 0.53 -> 1, 2.98 -> 1, ...; 2/1 -> 1 (clipped)
    np.testing.assert_array_equal(qw.q, [[0, -1], [-1, 1], [1, 0], [0, 0], [1, 1], [0, -1]])
    assert qw.q.dtype == np.int8 and qw.axis == 0 and qw.block_size == 4 and (qw.zero_point == 0).all()


def test_ternary_weights_round_trip_and_zero_blocks_stay_zero():
    rng = np.random.default_rng(0)
    q = rng.integers(-1, 2, (64, 6)).astype(np.int8)
    q[:32, 0] = 0
    s = block_absmean(q.astype(np.float32), 32)
    w = q * np.repeat(s, 32, axis=0)  # {-1, 0, 1} x the block's absmean: already ternary
    qw = ternary(w, 32)
    np.testing.assert_array_equal(qw.q, q)
    assert (qw.scale > 0).all()  # the all-zero block gets the smallest positive scale, not 0
    with pytest.raises(ValueError):
        ternary(np.ones(4, np.float32), 2)


def test_int2_initializer_reads_back_through_onnx():
    values = np.array([[-2, -1, 0], [1, 1, -1], [0, -2, 1]], np.int8)  # 9 values: 3 bytes, the last one padded
    # the first value in the lowest two bits: -2 -> 0b10, -1 -> 0b11, 0 -> 0b00, 1 -> 0b01
    assert pack_2bit(values).tolist() == [0b01_00_11_10, 0b10_00_11_01, 0b00_00_00_01]
    t = make_initializer("t", values, "int2")
    assert t.data_type == TensorProto.INT2 and len(t.raw_data) == 3
    np.testing.assert_array_equal(numpy_helper.to_array(t), values)
    with pytest.raises(ValueError):
        make_initializer("t", np.array([2], np.int8), "int2")
