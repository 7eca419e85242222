"""Observers (qpass.calib.observers): the protocol and registry, range observers against the histogram methods,
GramObserver and AbsMeanObserver against numpy, and collect_ranges collecting extra statistics."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qpass.calib import collect
from qpass.calib.collect import collect_ranges
from qpass.calib.data import input_specs
from qpass.calib.histogram import StreamingHistogram
from qpass.calib.methods import METHODS, entropy_range, mse_range, percentile_range
from qpass.calib.observers import (OBSERVERS, AbsMeanObserver, GramObserver, MinMaxObserver, Observer, RangeOptions,
                                   kl_levels, make_observer, register_observer)
from qpass.calib.stats import AbsMean, Gram, TensorRange
from qpass.calib.table import CalibrationTable


def _batches(seed=0, n=7, k=6, integers=False) -> list[np.ndarray]:
    """Batches of different leading shapes with the same last axis (float32, as onnxruntime returns them)."""
    rng = np.random.default_rng(seed)
    shapes = [(2, 3, k), (1, k), (5, k), (4, 1, 2, k), (k,), (3, 3, k), (1, 1, k)][:n]
    if integers:
        return [rng.integers(-8, 9, s).astype(np.float32) for s in shapes]
    return [(rng.standard_t(3, s) * 10.0 ** rng.integers(-2, 3, s[-1])).astype(np.float32) for s in shapes]


def _rows(batches) -> np.ndarray:
    return np.concatenate([b.reshape(-1, b.shape[-1]) for b in batches]).astype(np.float64)


def _fed(obs, batches):
    for b in batches:
        obs.update(b)
    return obs


# ---------------------------------------------------------------------------------------------- protocol, registry
def test_every_registered_observer_follows_the_protocol():
    assert set(METHODS) | {"gram", "absmean"} <= set(OBSERVERS)
    for name in OBSERVERS:
        obs = make_observer(name, RangeOptions())
        assert isinstance(obs, Observer) and obs.method == name
        assert obs.result() is None  # nothing observed yet
        obs.update(np.zeros((0, 4), np.float32))
        assert obs.result() is None  # an empty batch adds nothing
    assert {m: make_observer(m).stat for m in METHODS} == dict.fromkeys(METHODS, "range")
    assert (make_observer("gram").stat, make_observer("absmean").stat) == ("gram", "absmean")


def test_an_unknown_observer_is_named():
    with pytest.raises(ValueError, match="unknown calibration observer 'kl'.*entropy"):
        make_observer("kl")
    with pytest.raises(ValueError, match="unknown calibration observer"):
        collect_ranges(_matmul_model(), ["x"], _samples(2), methods="kl")


class _MaxAbsObserver:
    """A statistic the collection loop has never heard of: the largest |x|."""

    method = stat = "test_maxabs"
    costly = False

    def __init__(self, options=None):
        self.value = None

    def update(self, x, lo=None, hi=None, *, samples=1):
        if x.size:
            m = float(np.max(np.abs(x)))
            self.value = m if self.value is None else max(self.value, m)

    def merge(self, other):
        out = _MaxAbsObserver()
        out.value = max((v for v in (self.value, other.value) if v is not None), default=None)
        return out

    def result(self):
        return self.value


def test_a_new_observer_plugs_in_through_the_registry_alone(monkeypatch):
    monkeypatch.setitem(OBSERVERS, "test_maxabs", _MaxAbsObserver)
    assert register_observer("test_maxabs")(_MaxAbsObserver) is _MaxAbsObserver  # the same class again: fine
    with pytest.raises(ValueError, match="already registered"):
        register_observer("test_maxabs")(MinMaxObserver)
    samples = _samples(5)
    table = collect_ranges(_matmul_model(), ["y"], samples, extra={"x": ("test_maxabs",)})
    assert table.statistics.get("x", "test_maxabs") == max(float(np.abs(f["x"]).max()) for f, _ in samples)
    assert "x" not in table and len(table) == 1  # a tensor named in extra only gets no range
    back = CalibrationTable.from_json(table.to_json())  # an unregistered kind: a plain JSON value
    assert back.statistics.get("x", "test_maxabs") == table.statistics.get("x", "test_maxabs")


# ---------------------------------------------------------------------------------------------- ranges
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("method", ["percentile", "mse", "entropy"])
def test_histogram_observers_clip_with_their_method(method, symmetric):
    """No subsampling: the observer's range is its method's on a plain histogram of the same values."""
    opt = RangeOptions(bins=512, symmetric=symmetric, qtype="int8" if symmetric else "uint8", hist_sample=0)
    batches = _batches(3)
    obs = _fed(make_observer(method, opt), batches)
    h = StreamingHistogram(512)
    for b in batches:
        h.update(b)
    want = {"percentile": lambda: percentile_range(h, opt.percentile, symmetric=symmetric),
            "mse": lambda: mse_range(h, opt.qtype, symmetric=symmetric),
            "entropy": lambda: entropy_range(h, kl_levels(opt, h.min, h.max), symmetric=symmetric)}[method]()
    cat = _rows(batches)
    r = obs.result()
    # percentile's range also carries the MSE range of the same histogram (auto's range choice tries it)
    alternatives = (("mse", *mse_range(h, opt.qtype, symmetric=symmetric)),) if method == "percentile" else ()
    assert r == TensorRange(*want, method, len(batches), float(cat.min()), float(cat.max()), alternatives)


def test_minmax_result_and_sample_count():
    obs = MinMaxObserver()
    obs.update(np.float32([[1, -2], [3, 0]]), samples=2)
    obs.update(np.float32([5]))
    assert obs.result() == TensorRange(-2.0, 5.0, "minmax", 3, -2.0, 5.0) and obs.count == 2


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_histogram_observer_merge_equals_one_observer_of_both(method):
    opt = RangeOptions(bins=256, hist_sample=0)
    a, b = _batches(4)[:3], _batches(4)[3:]
    merged = _fed(make_observer(method, opt), a).merge(_fed(make_observer(method, opt), b))
    assert merged.result() == _fed(make_observer(method, opt), a + b).result()
    with pytest.raises(ValueError):
        merged.merge(make_observer(method, RangeOptions(bins=512)))


# ---------------------------------------------------------------------------------------------- Gram, abs-mean
def test_gram_equals_numpy_on_the_concatenated_rows():
    batches = _batches(1)
    g = _fed(GramObserver(), batches).result()
    rows = _rows(batches)
    assert isinstance(g, Gram) and g.rows == len(rows) == 2 * 3 + 1 + 5 + 4 * 2 + 1 + 9 + 1
    assert g.matrix.dtype == np.float64 and g.matrix.shape == (6, 6)
    np.testing.assert_allclose(g.matrix, rows.T @ rows, rtol=1e-13, atol=0)
    np.testing.assert_allclose(g.mean(), rows.T @ rows / len(rows), rtol=1e-13, atol=0)


def test_gram_known_answer():
    x = np.float32([[1, 2], [3, 4], [0, -1]])
    g = _fed(GramObserver(), [x[:1], x[1:]]).result()
    assert g.rows == 3 and g.matrix.tolist() == [[10.0, 14.0], [14.0, 21.0]]


def test_absmean_known_answer():
    x = np.float32([[[1, -2, 0]], [[-3, 4, 0.5]]])  # [2, 1, 3]: two rows of three channels
    r = _fed(AbsMeanObserver(), [x[:1], x[1:]]).result()
    assert isinstance(r, AbsMean) and r.count == 2 and r.mean.tolist() == [2.0, 3.0, 0.25]


def test_absmean_equals_numpy_on_the_concatenated_rows():
    batches = _batches(2)
    r = _fed(AbsMeanObserver(), batches).result()
    rows = _rows(batches)
    assert r.count == len(rows) and r.mean.dtype == np.float64
    np.testing.assert_allclose(r.mean, np.abs(rows).mean(axis=0), rtol=1e-13, atol=0)


@pytest.mark.parametrize("cls", [GramObserver, AbsMeanObserver])
def test_batching_and_order_do_not_change_the_result(cls):
    """The same rows split and ordered differently: exactly equal where the float64 sums are exact (small
    integers), equal to rounding otherwise; merging two observers equals one observer of both."""
    for integers in (True, False):
        batches = _batches(5, integers=integers)
        rows = _rows(batches).astype(np.float32)
        ways = [batches, batches[::-1], [rows], [r[None] for r in rows], [rows[:3], rows[3:17], rows[17:]]]
        results = [_fed(cls(), w).result() for w in ways]
        merged = _fed(cls(), batches[:4]).merge(_fed(cls(), batches[4:])).result()
        for r in results[1:] + [merged]:
            if integers:
                assert r == results[0]
            else:
                a, b = (r.matrix, results[0].matrix) if cls is GramObserver else (r.mean, results[0].mean)
                np.testing.assert_allclose(a, b, rtol=1e-13, atol=0)


@pytest.mark.parametrize("cls", [GramObserver, AbsMeanObserver])
def test_memory_does_not_grow_with_the_samples(cls):
    def state_bytes(obs):
        return sum(v.nbytes for v in vars(obs).values() if isinstance(v, np.ndarray))

    rng = np.random.default_rng(0)
    few, many = cls(), cls()
    for i in range(200):
        x = rng.standard_normal((4, 8)).astype(np.float32)
        many.update(x)
        if i < 2:
            few.update(x)
    assert state_bytes(few) == state_bytes(many) == (8 * 8 * 8 if cls is GramObserver else 8 * 8)


@pytest.mark.parametrize("cls", [GramObserver, AbsMeanObserver])
def test_a_changed_channel_count_is_an_error_and_results_are_copies(cls):
    obs = _fed(cls(), [np.ones((2, 3), np.float32)])
    with pytest.raises(ValueError, match="last axis"):
        obs.update(np.ones((2, 4), np.float32))
    with pytest.raises(ValueError, match="cannot merge"):
        obs.merge(_fed(cls(), [np.ones((1, 4), np.float32)]))
    r = obs.result()
    (r.matrix if cls is GramObserver else r.mean)[...] = 0.0
    assert obs.result() != r  # the result does not alias the observer's state
    assert cls().merge(obs).result() == obs.result() == obs.merge(cls()).result()


# ---------------------------------------------------------------------------------------------- collect_ranges
def _matmul_model() -> onnx.ModelProto:
    """x[N, 3, 4] -> MatMul(W[4, 5]) -> y[N, 3, 5]."""
    w = np.random.default_rng(0).normal(0, 0.5, (4, 5)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="matmul")], "matmul",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 5])],
                              initializer=[numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _samples(n, seed=1):
    rng = np.random.default_rng(seed)
    return [({"x": rng.standard_normal((1, 3, 4)).astype(np.float32) * np.float32([1, 10, 0.1, 3])}, None)
            for _ in range(n)]


@pytest.mark.parametrize("batch_size", [1, 4])
def test_collect_ranges_collects_gram_and_absmean_of_a_matmul_input(batch_size, tmp_path):
    model = _matmul_model()
    samples = _samples(10)
    specs = input_specs(model) if batch_size > 1 else None
    table = collect_ranges(model, ["x", "y"], samples, methods="percentile", batch_size=batch_size, specs=specs,
                           extra={"x": ("gram", "absmean")})
    rows = np.concatenate([f["x"].reshape(-1, 4) for f, _ in samples]).astype(np.float64)
    g = table.statistics.get("x", "gram")
    assert g.rows == 30 and g.matrix.shape == (4, 4)
    np.testing.assert_allclose(g.matrix, rows.T @ rows, rtol=1e-13, atol=0)
    a = table.statistics.get("x", "absmean")
    assert a.count == 30
    np.testing.assert_allclose(a.mean, np.abs(rows).mean(axis=0), rtol=1e-13, atol=0)
    assert table.statistics.kinds("x") == ("range", "gram", "absmean") and table.statistics.kinds("y") == ("range",)
    # the ranges are the ones collected without the extra statistics
    plain = collect_ranges(model, ["x", "y"], samples, methods="percentile", batch_size=batch_size, specs=specs)
    assert plain.to_json() == CalibrationTable(dict(table.ranges), samples=10).to_json()
    # and everything round-trips through JSON, bit for bit
    table.save(tmp_path / "t.json")
    back = CalibrationTable.load(tmp_path / "t.json")
    assert back.statistics == table.statistics and back.to_json() == table.to_json()
    assert back.statistics.get("x", "gram").matrix.tobytes() == g.matrix.tobytes()


def test_collect_ranges_extra_only_and_the_overlap(monkeypatch):
    """A tensor named only in extra is fetched but gets no range; a Gram observer's updates may go to the worker
    thread (they are costly), with the same results."""
    monkeypatch.setattr(collect, "cpu_count", lambda: 2)
    model = _matmul_model()
    samples = _samples(collect.OVERLAP_PROBE_RUNS * 2 + collect.OVERLAP_WARMUP_RUNS + 4)
    stats: dict = {}
    over = collect_ranges(model, ["y"], samples, extra={"x": "gram"}, overlap=True, stats=stats)
    turns = collect_ranges(model, ["y"], samples, extra={"x": "gram"}, overlap=False)
    assert stats["observer_thread"] and over.statistics == turns.statistics
    assert list(over.ranges) == ["y"] and over.statistics.kinds("x") == ("gram",)
    only = collect_ranges(model, [], samples[:3], extra={"x": ("absmean",)})
    assert only.samples == 3 and len(only) == 0 and only.statistics.get("x", "absmean").count == 9


def test_collect_ranges_rejects_two_statistics_of_one_kind():
    with pytest.raises(ValueError, match="two observers of statistic 'range'"):
        collect_ranges(_matmul_model(), ["x"], _samples(2), extra={"x": ("entropy",)})
