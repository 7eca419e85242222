"""The statistics table (qpass.calib.stats) and CalibrationTable as its range view: JSON with arrays, exact round
trips, the schema-1 files of ranges alone unchanged, errors."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from qpass.calib.stats import (AbsMean, Gram, Statistics, TensorRange, decode_array, encode_array,
                               register_statistic)
from qpass.calib.table import CalibrationTable
from qpass.errors import CalibrationDataError

#: a table as qpass wrote it before any statistic but ranges existed (schema_version 1)
V1_TEXT = json.dumps({"schema_version": 1, "samples": 8, "synthetic": False,
                      "ranges": {"x": {"min": -1.5, "max": 2.25, "method": "minmax", "samples": 8},
                                 "c": {"min": 0.0, "max": 0.1, "method": "percentile", "samples": 8,
                                       "observed_min": -0.5, "observed_max": 3.0}}}, indent=1)


def _awkward(shape, seed=0) -> np.ndarray:
    """float64 values that a decimal or float32 round trip would change: subnormals, -0.0, extremes, 1/3."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(shape) * 10.0 ** rng.integers(-300, 300, shape)
    flat = a.reshape(-1)
    special = [5e-324, -0.0, np.finfo(np.float64).max, -np.finfo(np.float64).tiny, 1 / 3]
    flat[: min(len(flat), len(special))] = special[: len(flat)]
    return a


def _stats() -> Statistics:
    s = Statistics(samples=12, synthetic=True)
    s.set("x", "range", TensorRange(-1.0, 2.0, "minmax", 12, -1.0, 2.0))
    m = _awkward((5, 5))
    s.set("x", "gram", Gram(m + m.T, 120))
    s.set("x", "absmean", AbsMean(np.abs(_awkward(5, seed=1)), 120))
    s.set("w/only:stats", "absmean", AbsMean(np.zeros(0), 0))
    s.set("ü", "range", TensorRange(-3.4028234663852886e38, 5e-324, "percentile", 1))
    return s


# ---------------------------------------------------------------------------------------------- schema 1
def test_a_schema_1_table_loads_and_writes_back_byte_for_byte():
    t = CalibrationTable.from_json(V1_TEXT)
    assert (t.samples, t.synthetic, len(t)) == (8, False, 2)
    assert t.get("x") == TensorRange(-1.5, 2.25, "minmax", 8)
    assert t.get("c") == TensorRange(0.0, 0.1, "percentile", 8, -0.5, 3.0)
    assert "x" in t and "y" not in t and t.get("y") is None
    assert t.to_json() == V1_TEXT  # a table of ranges alone: the same file as before


def test_a_table_of_ranges_writes_no_statistics_section():
    t = CalibrationTable({"x": TensorRange(0.0, 1.0)}, samples=3)
    assert set(json.loads(t.to_json())) == {"schema_version", "samples", "synthetic", "ranges"}


def test_ranges_stay_readable_by_a_reader_of_ranges_alone():
    """A reader of schema 1 that knows only "ranges" (older qpass) still finds every range, unchanged."""
    s = _stats()
    data = json.loads(s.to_json())
    assert data["schema_version"] == 1
    assert data["ranges"] == json.loads(CalibrationTable(dict(CalibrationTable(statistics=s).ranges),
                                                         samples=12, synthetic=True).to_json())["ranges"]
    assert set(data["statistics"]) == {"x", "w/only:stats"} and set(data["statistics"]["x"]) == {"gram", "absmean"}


# ---------------------------------------------------------------------------------------------- round trips
def test_statistics_round_trip_exactly(tmp_path):
    s = _stats()
    back = Statistics.from_json(s.to_json())
    assert back == s
    g, g2 = s.get("x", "gram"), back.get("x", "gram")
    assert g2.matrix.dtype == np.float64 and g2.matrix.tobytes() == g.matrix.tobytes() and g2.rows == 120
    assert back.kinds("x") == ("range", "gram", "absmean")
    assert list(back) == ["x", "ü", "w/only:stats"]  # ranges first, in order, then tensors with statistics only
    s.save(tmp_path / "s.json")
    assert Statistics.load(tmp_path / "s.json") == s
    assert back.to_json() == s.to_json()


def test_calibration_table_round_trips_its_statistics(tmp_path):
    t = CalibrationTable(statistics=_stats())
    t.save(tmp_path / "t.json")
    back = CalibrationTable.load(tmp_path / "t.json")
    assert back.statistics == t.statistics
    assert (back.samples, back.synthetic) == (12, True)
    # the range view sees ranges only
    assert len(back) == 2 and set(back.ranges) == {"x", "ü"} and "w/only:stats" not in back
    assert back.get("w/only:stats") is None and back.statistics.get("w/only:stats", "absmean") == AbsMean(np.zeros(0), 0)
    assert pickle.loads(pickle.dumps(back)).statistics == back.statistics


@pytest.mark.parametrize("dtype", ["<f8", ">f8", "<f4", ">i4", "u1", "?", "<i8"])
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 0, 3), (4, 5)])
def test_array_encoding_is_exact(dtype, shape):
    if np.dtype(dtype).itemsize == 8 and np.dtype(dtype).kind == "f":
        a = _awkward(shape).astype(dtype)
    elif np.dtype(dtype).kind == "f":
        a = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    else:
        a = np.arange(int(np.prod(shape))).reshape(shape).astype(dtype)
    enc = encode_array(a)
    assert enc["ndarray"] == np.dtype(dtype).newbyteorder("<").str
    back = decode_array(json.loads(json.dumps(enc)))
    assert back.shape == a.shape and back.dtype == a.dtype.newbyteorder("=")
    assert back.tobytes() == a.astype(a.dtype.newbyteorder("=")).tobytes()
    assert back.flags.writeable


def test_a_statistic_of_an_unknown_kind_loads_as_its_fields_and_is_written_back_unchanged():
    s = Statistics(samples=1)
    s.set("x", "future_kind", {"weights": np.arange(6, dtype=np.float32).reshape(2, 3), "n": 4,
                               "parts": [np.ones(2), "tag", 1.5]})
    text = s.to_json()
    back = Statistics.from_json(text)
    v = back.get("x", "future_kind")
    assert v["weights"].dtype == np.float32 and v["weights"].tolist() == [[0, 1, 2], [3, 4, 5]] and v["n"] == 4
    assert back == s and back.to_json() == text


def test_a_registered_kind_round_trips_through_its_class():
    @register_statistic
    class Count:
        kind = "test_count"

        def __init__(self, n):
            self.n = n

        def to_dict(self):
            return {"n": self.n}

        @classmethod
        def from_dict(cls, d):
            return cls(int(d["n"]))

        def __eq__(self, other):
            return isinstance(other, Count) and other.n == self.n

    from qpass.calib import stats
    try:
        s = Statistics({"x": {"test_count": Count(7)}})
        back = Statistics.from_json(s.to_json())
        assert isinstance(back.get("x", "test_count"), Count) and back == s
        with pytest.raises(TypeError):
            s.set("x", "test_count", 7)  # a registered kind holds its class
    finally:
        del stats.STATISTICS["test_count"]


# ---------------------------------------------------------------------------------------------- API
def test_statistics_access():
    s = _stats()
    assert s.get("x", "gram").rows == 120 and s.get("x", "nothing") is None and s.get("nobody", "range") is None
    assert set(s.of_kind("absmean")) == {"x", "w/only:stats"} and set(s.of_kind("range")) == {"x", "ü"}
    assert "w/only:stats" in s and len(s) == 3 and s.kinds("nobody") == ()
    with pytest.raises(TypeError):
        s.set("x", "range", (0.0, 1.0))
    with pytest.raises(TypeError):
        s.set("x", "gram", np.eye(2))


def test_the_range_view_is_read_only_and_follows_the_table():
    t = CalibrationTable({"a": TensorRange(0.0, 1.0)}, samples=2)
    view = t.ranges
    with pytest.raises(TypeError):
        view["b"] = TensorRange(0.0, 1.0)  # type: ignore[index]
    t.statistics.set("b", "range", TensorRange(-1.0, 1.0))
    t.statistics.set("c", "absmean", AbsMean(np.ones(2), 3))
    assert dict(view) == {"a": TensorRange(0.0, 1.0), "b": TensorRange(-1.0, 1.0)} and len(t) == 2
    t.samples, t.synthetic = 5, True
    assert (t.statistics.samples, t.statistics.synthetic) == (5, True)


def test_gram_and_absmean_values():
    g = Gram(np.array([[4.0, 2.0], [2.0, 6.0]]), 2)
    assert g.mean().tolist() == [[2.0, 1.0], [1.0, 3.0]]
    assert g == Gram(np.array([[4.0, 2.0], [2.0, 6.0]]), 2) and g != Gram(np.array([[4.0, 2.0], [2.0, 6.0]]), 3)
    assert g != Gram(np.array([[4.0, 2.0], [2.0, 6.0]], np.float32), 2)  # dtype counts: the round trip keeps it
    with pytest.raises(ValueError):
        Gram(np.zeros((2, 3)), 1)
    with pytest.raises(ValueError):
        AbsMean(np.zeros((2, 2)), 1)
    with pytest.raises(ValueError):
        AbsMean(np.zeros(2), -1)


# ---------------------------------------------------------------------------------------------- errors
def _with_statistics(stat: dict) -> str:
    data = json.loads(V1_TEXT)
    data["statistics"] = {"x": stat}
    return json.dumps(data)


GOOD_MATRIX = encode_array(np.eye(2))


@pytest.mark.parametrize("stat", [
    {"gram": {"rows": 1}},  # no matrix
    {"gram": {"rows": 1, "matrix": [[1.0, 0.0], [0.0, 1.0]]}},  # not an encoded array
    {"gram": {"rows": 1, "matrix": dict(GOOD_MATRIX, shape=[2, 3])}},  # data for another shape
    {"gram": {"rows": 1, "matrix": dict(GOOD_MATRIX, shape=[4])}},  # not square
    {"gram": {"rows": 1, "matrix": dict(GOOD_MATRIX, base64="not base64!")}},
    {"gram": {"rows": 1, "matrix": dict(GOOD_MATRIX, ndarray="<U4")}},
    {"gram": {"rows": "many", "matrix": GOOD_MATRIX}},
    {"absmean": {"count": 2, "mean": GOOD_MATRIX}},  # two axes
    {"absmean": 3.0},
    {"range": {"min": 0.0, "max": 1.0}},  # ranges belong under "ranges"
])
def test_a_malformed_statistic_is_a_calibration_data_error(stat):
    with pytest.raises(CalibrationDataError, match="not a qpass calibration table"):
        CalibrationTable.from_json(_with_statistics(stat), source="t.json")


def test_a_well_formed_statistic_of_the_same_shape_loads():
    t = CalibrationTable.from_json(_with_statistics({"gram": {"rows": 1, "matrix": GOOD_MATRIX}}))
    assert t.statistics.get("x", "gram") == Gram(np.eye(2), 1) and len(t) == 2
