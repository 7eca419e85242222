"""Calibration data readers (qpass.calib.data), streaming range collection (collect.py), the observers
and the CalibrationTable."""
from __future__ import annotations

import dataclasses
import gc
import inspect
import json
import weakref

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper, numpy_helper

from qpass.calib import collect as collect_mod
from qpass.calib import observers as observers_mod
from qpass.calib.collect import collect_ranges
from qpass.calib.data import InputSpec, IterableSource, SampleSource, input_specs, open_samples, split_holdout
from qpass.calib.observers import MinMaxObserver
from qpass.runtime import augmented_model
from qpass.calib.table import CalibrationTable, TensorRange
from qpass.errors import CalibrationDataError
from tests import builders

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                            HealthCheck.function_scoped_fixture])


# ---------------------------------------------------------------------------------------------- models
def _model(nodes, inputs, outputs) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def dynamic_model() -> onnx.ModelProto:
    """x[N,3,H,W] -> Relu -> y (spatial dims dynamic)."""
    return _model([helper.make_node("Relu", ["x"], ["y"])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, "H", "W"])])


def two_input_model() -> onnx.ModelProto:
    """x float32 [N,4] and ids int64 [N,2], each passed through."""
    return _model([helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Identity", ["ids"], ["ids_out"])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
                   helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 2])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4]),
                   helper.make_tensor_value_info("ids_out", TensorProto.INT64, ["N", 2])])


def scalar_model() -> onnx.ModelProto:
    """k: a rank-0 int64 input -> Cast to float -> y (rank 0)."""
    return _model([helper.make_node("Cast", ["k"], ["y"], to=TensorProto.FLOAT)],
                  [helper.make_tensor_value_info("k", TensorProto.INT64, [])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])])


@pytest.fixture(scope="module")
def conv_specs():
    return input_specs(builders.conv_model())


@pytest.fixture(scope="module")
def dyn_specs():
    return input_specs(dynamic_model())


@pytest.fixture(scope="module")
def two_specs():
    return input_specs(two_input_model())


def _x(*shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_input_specs():
    specs = input_specs(builders.conv_model())
    assert [(s.name, s.dtype, s.shape, s.rank) for s in specs] == [("x", np.dtype(np.float32), ("N", 3, 8, 8), 4)]
    (k,) = input_specs(scalar_model())
    assert (k.name, k.dtype, k.shape, k.rank) == ("k", np.dtype(np.int64), (), 0)


# ---------------------------------------------------------------------------------------------- one .npz
def test_stacked_npz(tmp_path, conv_specs):
    arr = _x(5, 1, 3, 8, 8)
    np.savez(tmp_path / "calib.npz", x=arr)
    src = open_samples(tmp_path / "calib.npz", conv_specs)
    assert isinstance(src, SampleSource) and len(src) == 5
    got = list(src)
    assert len(got) == 5
    for i, (feed, label) in enumerate(got):
        assert list(feed) == ["x"] and label is None
        assert feed["x"].shape == (1, 3, 8, 8) and feed["x"].dtype == np.float32
        np.testing.assert_array_equal(feed["x"], arr[i])
    # re-iterable, same data
    for (a, _), (b, _) in zip(got, src):
        np.testing.assert_array_equal(a["x"], b["x"])


def test_stacked_npz_with_batch_2(tmp_path, conv_specs):
    arr = _x(3, 2, 3, 8, 8)
    np.savez(tmp_path / "calib.npz", x=arr)
    got = [f["x"] for f, _ in open_samples(str(tmp_path / "calib.npz"), conv_specs)]
    assert [g.shape for g in got] == [(2, 3, 8, 8)] * 3
    np.testing.assert_array_equal(np.stack(got), arr)


def test_split_npz(tmp_path, conv_specs):
    arr = _x(6, 3, 8, 8)
    np.savez(tmp_path / "calib.npz", x=arr)
    src = open_samples(tmp_path / "calib.npz", conv_specs)
    assert len(src) == 6
    got = list(src)
    assert len(got) == 6
    for i, (feed, _) in enumerate(got):
        assert feed["x"].shape == (1, 3, 8, 8)
        np.testing.assert_array_equal(feed["x"], arr[i:i + 1])


def test_npz_with_two_inputs_label_and_text(tmp_path, two_specs):
    x = _x(4, 1, 4)
    ids = np.arange(8, dtype=np.int64).reshape(4, 1, 2)
    label = np.array([3, 1, 4, 1], dtype=np.int64)
    text = np.array(["a", "bb", "ccc", "dddd"])
    np.savez(tmp_path / "d.npz", x=x, ids=ids, label=label, text=text)
    src = open_samples(tmp_path / "d.npz", two_specs)
    got = list(src)
    assert len(got) == 4
    for i, (feed, lab) in enumerate(got):
        assert set(feed) == {"x", "ids"}
        np.testing.assert_array_equal(feed["x"], x[i])
        np.testing.assert_array_equal(feed["ids"], ids[i])
        assert feed["ids"].dtype == np.int64
        assert lab == label[i]
    assert "text" in src.ignored_keys
    assert not ({"x", "ids"} & src.ignored_keys)


def test_scalar_input_stacked_as_rank1(tmp_path):
    specs = input_specs(scalar_model())
    k = np.array([7, -2, 0], dtype=np.int64)
    np.savez(tmp_path / "k.npz", k=k)
    src = open_samples(tmp_path / "k.npz", specs)
    got = list(src)
    assert len(src) == 3 and len(got) == 3
    for i, (feed, _) in enumerate(got):
        assert isinstance(feed["k"], np.ndarray) and feed["k"].ndim == 0 and feed["k"].dtype == np.int64
        assert feed["k"] == k[i]
    # and onnxruntime accepts those feeds
    sess = collect_mod.make_session(scalar_model())
    assert [float(sess.run(None, f)[0]) for f, _ in got] == [7.0, -2.0, 0.0]


def test_scalar_input_given_as_scalar_is_an_error(tmp_path):
    specs = input_specs(scalar_model())
    np.savez(tmp_path / "k.npz", k=np.int64(3))
    with pytest.raises(CalibrationDataError, match="'k'"):
        open_samples(tmp_path / "k.npz", specs)


# ---------------------------------------------------------------------------------------------- folders
def test_folder_of_npz_with_different_shapes_sorted(tmp_path, dyn_specs):
    shapes = {"c.npz": (1, 3, 8, 8), "a.npz": (1, 3, 5, 7), "b.npz": (2, 3, 4, 4), "d.npz": (1, 3, 1, 9)}
    arrays = {}
    for i, (name, shape) in enumerate(shapes.items()):  # written out of order
        arrays[name] = _x(*shape, seed=i)
        np.savez(tmp_path / name, x=arrays[name], label=np.int64(i))
    (tmp_path / "notes.txt").write_text("not a sample")
    src = open_samples(tmp_path, dyn_specs)
    assert len(src) == 4
    got = list(src)
    order = sorted(shapes)
    assert [f["x"].shape for f, _ in got] == [shapes[n] for n in order]
    for (feed, label), name in zip(got, order):
        np.testing.assert_array_equal(feed["x"], arrays[name])
        assert label == list(shapes).index(name)


def _write_pb_set(folder, arrays: list[np.ndarray], names: list[str]):
    folder.mkdir(parents=True)
    for i, (arr, name) in enumerate(zip(arrays, names)):
        (folder / f"input_{i}.pb").write_bytes(numpy_helper.from_array(arr, name).SerializeToString())


def test_model_zoo_layout(tmp_path, conv_specs):
    arrays = [_x(1, 3, 8, 8, seed=i) for i in range(3)]
    for i, arr in enumerate(arrays):
        _write_pb_set(tmp_path / f"test_data_set_{i}", [arr], ["x"])
    src = open_samples(tmp_path, conv_specs)
    assert len(src) == 3
    got = list(src)
    assert len(got) == 3
    for (feed, label), arr in zip(got, arrays):
        assert label is None and list(feed) == ["x"]
        np.testing.assert_array_equal(feed["x"], arr)
        assert feed["x"].dtype == np.float32


def test_model_zoo_single_set_folder(tmp_path, conv_specs):
    arr = _x(1, 3, 8, 8, seed=5)
    _write_pb_set(tmp_path / "test_data_set_0", [arr], ["x"])
    _write_pb_set(tmp_path / "test_data_set_1", [_x(1, 3, 8, 8, seed=6)], ["x"])
    src = open_samples(tmp_path / "test_data_set_0", conv_specs)
    assert len(src) == 1
    (feed, _), = list(src)
    np.testing.assert_array_equal(feed["x"], arr)


def test_model_zoo_unnamed_tensors_map_by_position(tmp_path, two_specs):
    x, ids = _x(2, 4), np.array([[1, 2], [3, 4]], np.int64)
    _write_pb_set(tmp_path / "test_data_set_0", [x, ids], ["", ""])
    (feed, _), = list(open_samples(tmp_path, two_specs))
    np.testing.assert_array_equal(feed["x"], x)
    np.testing.assert_array_equal(feed["ids"], ids)


# ---------------------------------------------------------------------------------------------- iterables
def test_generator_of_feeds(conv_specs):
    arrays = [_x(1, 3, 8, 8, seed=i) for i in range(4)]
    made = []

    def gen():
        for i, a in enumerate(arrays):
            made.append(i)
            yield {"x": a, "label": i, "text": "caption"}

    src = open_samples(gen(), conv_specs)
    assert isinstance(src, IterableSource)
    assert made == []  # lazy: nothing is read until iterated
    got = list(src)
    assert [lab for _, lab in got] == [0, 1, 2, 3]
    for (feed, _), a in zip(got, arrays):
        assert list(feed) == ["x"]
        np.testing.assert_array_equal(feed["x"], a)
    assert "text" in src.ignored_keys and "x" not in src.ignored_keys


def test_list_of_feeds_is_sized(conv_specs):
    src = open_samples([{"x": _x(1, 3, 8, 8)}, {"x": _x(2, 3, 8, 8)}], conv_specs)
    assert len(src) == 2
    assert [f["x"].shape[0] for f, _ in src] == [1, 2]


def test_one_dict_is_refused(conv_specs):
    with pytest.raises(CalibrationDataError, match="iterable"):
        open_samples({"x": _x(1, 3, 8, 8)}, conv_specs)


def test_non_dict_sample_in_iterable(conv_specs):
    with pytest.raises(CalibrationDataError, match="sample 1"):
        list(open_samples([{"x": _x(1, 3, 8, 8)}, _x(1, 3, 8, 8)], conv_specs))


# ---------------------------------------------------------------------------------------------- errors
def _feed_error(feed, specs) -> str:
    with pytest.raises(CalibrationDataError) as exc_info:
        list(open_samples([feed], specs))
    return str(exc_info.value)


def test_error_missing_input(conv_specs):
    msg = _feed_error({"image": _x(1, 3, 8, 8), "label": 1}, conv_specs)
    assert "'x'" in msg and "image" in msg


def test_error_missing_input_in_npz(tmp_path, conv_specs):
    np.savez(tmp_path / "d.npz", image=_x(2, 3, 8, 8))
    with pytest.raises(CalibrationDataError) as exc_info:
        open_samples(tmp_path / "d.npz", conv_specs)
    assert "'x'" in str(exc_info.value) and "d.npz" in str(exc_info.value)


def test_error_float64_for_float32(conv_specs):
    msg = _feed_error({"x": np.zeros((1, 3, 8, 8), np.float64)}, conv_specs)
    assert "'x'" in msg and "float64" in msg and "float32" in msg


def test_error_float64_for_float32_in_npz(tmp_path, conv_specs):
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 3, 8, 8), np.float64))
    with pytest.raises(CalibrationDataError) as exc_info:
        list(open_samples(tmp_path / "d.npz", conv_specs))
    assert "'x'" in str(exc_info.value) and "d.npz" in str(exc_info.value) and "float64" in str(exc_info.value)


def test_error_int32_for_int64(two_specs):
    msg = _feed_error({"x": _x(1, 4), "ids": np.zeros((1, 2), np.int32)}, two_specs)
    assert "'ids'" in msg and "int32" in msg and "int64" in msg


@pytest.mark.parametrize("shape", [(3, 8, 8), (1, 1, 3, 8, 8), (8,)])
def test_error_wrong_rank(conv_specs, shape):
    msg = _feed_error({"x": np.zeros(shape, np.float32)}, conv_specs)
    assert "'x'" in msg and "rank" in msg


@pytest.mark.parametrize("shape", [(1, 4, 8, 8), (1, 3, 8, 7), (2, 3, 9, 8)])
def test_error_wrong_fixed_dim(conv_specs, shape):
    msg = _feed_error({"x": np.zeros(shape, np.float32)}, conv_specs)
    assert "'x'" in msg and "axis" in msg


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_error_nan_inf(conv_specs, bad):
    x = np.zeros((1, 3, 8, 8), np.float32)
    x[0, 1, 2, 3] = bad
    msg = _feed_error({"x": x}, conv_specs)
    assert "'x'" in msg and "NaN or Inf" in msg


def test_error_nan_in_npz_names_file_and_sample(tmp_path, conv_specs):
    x = _x(3, 3, 8, 8)
    x[2, 0, 0, 0] = np.nan
    np.savez(tmp_path / "d.npz", x=x)
    src = open_samples(tmp_path / "d.npz", conv_specs)
    it = iter(src)
    next(it), next(it)
    with pytest.raises(CalibrationDataError) as exc_info:
        next(it)
    assert "'x'" in str(exc_info.value) and "d.npz" in str(exc_info.value) and "sample 2" in str(exc_info.value)


@pytest.mark.parametrize("name,content", [("data.txt", b"hello"), ("data.npy", None), ("data.csv", b"1,2,3\n")])
def test_error_not_npz_file(tmp_path, conv_specs, name, content):
    path = tmp_path / name
    if content is None:
        np.save(path, _x(1, 3, 8, 8))
    else:
        path.write_bytes(content)
    with pytest.raises(CalibrationDataError) as exc_info:
        open_samples(path, conv_specs)
    assert name in str(exc_info.value)


def test_error_missing_path(tmp_path, conv_specs):
    with pytest.raises(CalibrationDataError) as exc_info:
        open_samples(tmp_path / "nope.npz", conv_specs)
    assert "nope.npz" in str(exc_info.value)


def test_error_empty_folder(tmp_path, conv_specs):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationDataError) as exc_info:
        open_samples(tmp_path / "empty", conv_specs)
    assert "empty" in str(exc_info.value)


@pytest.mark.parametrize("corrupt", [b"this is not a zip file", b"", b"PK\x03\x04garbage-after-zip-magic"])
def test_error_corrupt_npz_in_folder(tmp_path, conv_specs, corrupt):
    np.savez(tmp_path / "a.npz", x=_x(1, 3, 8, 8))
    (tmp_path / "b.npz").write_bytes(corrupt)
    src = open_samples(tmp_path, conv_specs)
    it = iter(src)
    next(it)  # a.npz is fine
    with pytest.raises(CalibrationDataError) as exc_info:
        next(it)
    assert "b.npz" in str(exc_info.value)


def test_error_truncated_npz_in_folder(tmp_path, conv_specs):
    np.savez(tmp_path / "good.npz", x=_x(1, 3, 8, 8))
    data = (tmp_path / "good.npz").read_bytes()
    (tmp_path / "trunc.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(CalibrationDataError) as exc_info:
        list(open_samples(tmp_path, conv_specs))
    assert "trunc.npz" in str(exc_info.value)


def test_error_corrupt_single_npz(tmp_path, conv_specs):
    (tmp_path / "bad.npz").write_bytes(b"\x00\x01garbage")
    with pytest.raises(CalibrationDataError) as exc_info:
        open_samples(tmp_path / "bad.npz", conv_specs)
    assert "bad.npz" in str(exc_info.value)


def test_error_corrupt_pb(tmp_path, conv_specs):
    (tmp_path / "test_data_set_0").mkdir()
    (tmp_path / "test_data_set_0" / "input_0.pb").write_bytes(b"\xff\xff\xff garbage")
    with pytest.raises(CalibrationDataError) as exc_info:
        list(open_samples(tmp_path, conv_specs))
    assert "input_0.pb" in str(exc_info.value)


def test_error_stacked_counts_disagree(tmp_path, two_specs):
    np.savez(tmp_path / "d.npz", x=_x(5, 1, 4), ids=np.zeros((4, 1, 2), np.int64))
    with pytest.raises(CalibrationDataError) as exc_info:
        open_samples(tmp_path / "d.npz", two_specs)
    msg = str(exc_info.value)
    assert "d.npz" in msg and "'x': 5" in msg and "'ids': 4" in msg


def test_error_npz_wrong_rank(tmp_path, conv_specs):
    np.savez(tmp_path / "d.npz", x=_x(3, 8, 8))
    with pytest.raises(CalibrationDataError) as exc_info:
        open_samples(tmp_path / "d.npz", conv_specs)
    assert "'x'" in str(exc_info.value) and "d.npz" in str(exc_info.value)


# ---------------------------------------------------------------------------------------------- split_holdout
@SETTINGS
@given(n=st.integers(0, 60), fraction=st.sampled_from([0.0, 0.05, 0.1, 0.2, 0.25, 1 / 3, 0.5, 0.9, 1.0]),
       limit=st.integers(0, 30))
def test_split_holdout(n, fraction, limit):
    items = [({"x": np.float32(i)}, i) for i in range(n)]
    calib_iter, held = split_holdout(iter(items), fraction, limit)
    assert held == []  # nothing is read before the calibration iterator is consumed
    calib = list(calib_iter)
    k = max(2, int(round(1 / fraction))) if fraction > 0 else 0
    calib_ids = [lab for _, lab in calib]
    held_ids = [lab for _, lab in held]
    assert sorted(calib_ids + held_ids) == list(range(n))
    assert not set(calib_ids) & set(held_ids)
    assert calib_ids == sorted(calib_ids)  # streamed in order
    expected_held = [i for i in range(n) if k and i % k == k - 1][:limit]
    assert held_ids == expected_held
    assert len(held) <= limit


def test_split_holdout_known_answer():
    calib_iter, held = split_holdout(((None, i) for i in range(10)), 0.25, 2)
    assert [lab for _, lab in calib_iter] == [0, 1, 2, 4, 5, 6, 8, 9]
    assert [lab for _, lab in held] == [3, 7]


# ---------------------------------------------------------------------------------------------- collect_ranges
TENSORS = ["x", "c", "y"]


def test_collect_ranges_matches_numpy():
    model = builders.conv_model()
    feeds = builders.feeds(model, n=5, seed=3, batch=2)
    before = model.SerializeToString()
    table = collect_ranges(model, TENSORS, [(f, None) for f in feeds])
    assert model.SerializeToString() == before  # the extra outputs were added for the run only
    assert table.samples == 5 and not table.synthetic and set(table.ranges) == set(TENSORS)
    xs = np.stack([f["x"] for f in feeds])
    assert table.get("x").min == float(xs.min()) and table.get("x").max == float(xs.max())
    assert table.get("x").samples == 5 and table.get("x").method == "minmax"
    # intermediate and output ranges agree with a plain onnxruntime run
    sess = collect_mod.make_session(augmented_model(model, ["c"]))
    cs = np.stack([sess.run(["c"], f)[0] for f in feeds])
    assert table.get("c").min == float(cs.min()) and table.get("c").max == float(cs.max())
    assert table.get("y").min == max(0.0, float(cs.min())) and table.get("y").max == float(cs.max())


def test_collect_ranges_independent_of_batching():
    model = builders.conv_model()
    singles = builders.feeds(model, n=8, seed=7, batch=1)
    pairs = [{"x": np.concatenate([singles[2 * i]["x"], singles[2 * i + 1]["x"]])} for i in range(4)]
    t1 = collect_ranges(model, TENSORS, [(f, None) for f in singles])
    t2 = collect_ranges(model, TENSORS, [(f, None) for f in pairs])
    assert (t1.samples, t2.samples) == (8, 4)
    for name in TENSORS:
        r1, r2 = t1.get(name), t2.get(name)
        assert (r1.min, r1.max) == (r2.min, r2.max), name


def test_collect_ranges_independent_of_batch_size_option():
    """Where collect_ranges can itself concatenate samples (batch_size), the ranges do not depend on it."""
    if "batch_size" not in inspect.signature(collect_ranges).parameters:
        pytest.skip("collect_ranges has no batch_size option")
    model = builders.conv_model()
    singles = builders.feeds(model, n=8, seed=11, batch=1)
    specs = input_specs(model)
    tables = [collect_ranges(model, TENSORS, [(f, None) for f in singles], batch_size=b, specs=specs)
              for b in (1, 3, 8)]
    for t in tables:
        assert t.samples == 8
        for name in TENSORS:
            assert (t.get(name).min, t.get(name).max) == (tables[0].get(name).min, tables[0].get(name).max), name


class _RecordingObserver(MinMaxObserver):
    instances: list = []

    def __init__(self, options=None):
        super().__init__(options)
        _RecordingObserver.instances.append(self)


def _state_arrays(obj) -> int:
    """Number of arrays (or containers) held in an observer's state."""
    n = 0
    for v in vars(obj).values():
        if isinstance(v, (np.ndarray, list, tuple, dict, set)):
            n += 1
    return n


class _TrackingSession:
    """Wraps an onnxruntime session: keeps weak references to every array it returns, and records how
    many arrays of earlier runs are still alive at each new run."""

    def __init__(self, session):
        self._session = session
        self.refs: list[weakref.ref] = []
        self.alive_at_run: list[int] = []

    def run(self, names, feed):
        self.alive_at_run.append(sum(r() is not None for r in self.refs))
        out = self._session.run(names, feed)
        self.refs.extend(weakref.ref(a) for a in out)
        return out


def _collect_streamed(model, n: int, monkeypatch) -> tuple[CalibrationTable, _TrackingSession, list]:
    rng = np.random.default_rng(n)
    inputs: list[weakref.ref] = []

    def gen():  # one sample alive at a time, never stored by the caller
        for _ in range(n):
            x = rng.normal(size=(4, 3, 8, 8)).astype(np.float32)
            inputs.append(weakref.ref(x))
            yield {"x": x}, None

    real = collect_mod.make_session
    sessions: list[_TrackingSession] = []

    def tracking_make_session(*args, **kwargs):
        sessions.append(_TrackingSession(real(*args, **kwargs)))
        return sessions[-1]

    monkeypatch.setattr(collect_mod, "make_session", tracking_make_session)
    _RecordingObserver.instances = []
    table = collect_ranges(model, TENSORS, gen())
    gc.collect()
    (session,) = sessions
    assert len(session.alive_at_run) == n
    assert sum(r() is not None for r in session.refs) == 0, "activations outlive collect_ranges"
    assert sum(r() is not None for r in inputs) == 0, "input samples outlive collect_ranges"
    return table, session, list(_RecordingObserver.instances)


def test_collect_ranges_memory_is_constant(monkeypatch):
    monkeypatch.setitem(observers_mod.OBSERVERS, "minmax", _RecordingObserver)
    model = builders.conv_model()
    t20, s20, obs20 = _collect_streamed(model, 20, monkeypatch)
    t200, s200, obs200 = _collect_streamed(model, 200, monkeypatch)
    assert (t20.samples, t200.samples) == (20, 200)
    # at most one earlier run's activations are alive when the next run starts, however many samples
    assert max(s20.alive_at_run) <= len(TENSORS) and max(s200.alive_at_run) <= len(TENSORS), \
        (max(s20.alive_at_run), max(s200.alive_at_run))
    # the observers: one per tensor, O(1) scalar state
    assert len(obs20) == len(obs200) == len(TENSORS)
    for obs in obs20 + obs200:
        assert _state_arrays(obs) == 0, vars(obs)
        for v in vars(obs).values():
            assert isinstance(v, (int, float, np.integer, np.floating)), (type(v), v)
        assert np.ndim(obs.min) == 0 and np.ndim(obs.max) == 0
    assert [o.count for o in obs200] == [200] * len(TENSORS)


def test_collect_ranges_no_samples():
    with pytest.raises(CalibrationDataError):
        collect_ranges(builders.conv_model(), TENSORS, [])


# ---------------------------------------------------------------------------------------------- observers
batches = st.lists(hnp.arrays(np.float32, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
                              elements=st.floats(allow_nan=False, allow_infinity=False, width=32)), max_size=6)


def _observe(arrays) -> MinMaxObserver:
    obs = MinMaxObserver()
    for a in arrays:
        obs.update(a)
    return obs


@SETTINGS
@given(a=batches, b=batches)
def test_minmax_merge_equals_observing_concatenation(a, b):
    merged = _observe(a).merge(_observe(b))
    whole = _observe(a + b)
    assert (merged.min, merged.max, merged.count) == (whole.min, whole.max, whole.count)
    assert merged.seen == whole.seen
    flat = [x.ravel() for x in a + b if x.size]
    if flat:
        cat = np.concatenate(flat)
        assert whole.range() == (float(cat.min()), float(cat.max()))
    else:
        assert not whole.seen
    for v in vars(whole).values():
        assert isinstance(v, (int, float))


def test_minmax_merge_does_not_mutate():
    a, b = _observe([np.float32([1, 2])]), _observe([np.float32([-3])])
    m = a.merge(b)
    assert (a.min, a.max, a.count) == (1.0, 2.0, 1) and (b.min, b.max, b.count) == (-3.0, -3.0, 1)
    assert (m.min, m.max, m.count) == (-3.0, 2.0, 2)


# ---------------------------------------------------------------------------------------------- CalibrationTable
def _table_tuple(t: CalibrationTable):
    return t.samples, t.synthetic, {k: dataclasses.asdict(v) for k, v in t.ranges.items()}


def test_table_json_round_trip(tmp_path):
    t = CalibrationTable({"x": TensorRange(-1.5, 2.25, "minmax", 8),
                          "conv/out:0": TensorRange(float(np.float32(1e-38)), float(np.float32(0.1)), "minmax", 3),
                          "ü": TensorRange(-3.4028234663852886e38, 5e-324, "percentile", 1),
                          "z": TensorRange(0.0, 0.0)}, samples=8, synthetic=True)
    back = CalibrationTable.from_json(t.to_json())
    assert _table_tuple(back) == _table_tuple(t)
    json.loads(t.to_json())  # is JSON
    t.save(tmp_path / "table.json")
    assert _table_tuple(CalibrationTable.load(tmp_path / "table.json")) == _table_tuple(t)


@SETTINGS
@given(ranges=st.dictionaries(st.text(min_size=1, max_size=8),
                              st.tuples(st.floats(allow_nan=False, allow_infinity=False),
                                        st.floats(allow_nan=False, allow_infinity=False), st.integers(0, 10**6)),
                              max_size=5),
       samples=st.integers(0, 10**6), synthetic=st.booleans())
def test_table_json_round_trip_property(ranges, samples, synthetic):
    t = CalibrationTable({k: TensorRange(min(a, b), max(a, b), "minmax", n) for k, (a, b, n) in ranges.items()},
                         samples=samples, synthetic=synthetic)
    assert _table_tuple(CalibrationTable.from_json(t.to_json())) == _table_tuple(t)


GARBAGE = [
    "", "not json", "{", "[]", "null", "42", '"text"', "{}",
    '{"ranges": 5}', '{"ranges": []}', '{"ranges": {"x": 5}}', '{"ranges": {"x": {"max": 1.0}}}',
    '{"ranges": {"x": {"min": "low", "max": 1.0}}}', '{"ranges": {"x": {"min": null, "max": 1.0}}}',
    '{"ranges": {"x": {"min": 0.0, "max": 1.0, "samples": "many"}}}',
    # structurally valid JSON whose top-level fields are garbage
    '{"ranges": {}, "samples": "many"}', '{"ranges": {}, "samples": null}', '{"ranges": {}, "samples": [1]}',
    # ranges that no scale can be computed from
    '{"ranges": {"x": {"min": NaN, "max": 1.0}}}', '{"ranges": {"x": {"min": -Infinity, "max": 1.0}}}',
    '{"ranges": {"x": {"min": 0.0, "max": Infinity}}}', '{"ranges": {"x": {"min": 2.0, "max": -2.0}}}',
]


@pytest.mark.parametrize("text", GARBAGE)
def test_table_from_json_garbage(text):
    with pytest.raises(CalibrationDataError) as exc_info:
        CalibrationTable.from_json(text, source="t.json")
    assert "t.json" in str(exc_info.value)


def test_table_load_errors(tmp_path):
    with pytest.raises(CalibrationDataError, match="missing.json"):
        CalibrationTable.load(tmp_path / "missing.json")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CalibrationDataError, match="bin.json"):
        CalibrationTable.load(tmp_path / "bin.json")


def test_stacked_npz_streams_one_sample_at_a_time(tmp_path):
    """A 32 MB stacked file is read row by row: iterating it never holds more than a few samples."""
    import tracemalloc

    specs = [InputSpec("x", np.float32, ("N", 3, 64, 64))]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((170, 1, 3, 64, 64)).astype(np.float32)  # 49 KB a sample
    np.savez_compressed(tmp_path / "big.npz", x=x, label=np.arange(170))
    del x
    tracemalloc.start()
    src = open_samples(tmp_path / "big.npz", specs)
    seen = 0
    for feed, label in src:
        assert feed["x"].shape == (1, 3, 64, 64) and label == seen
        seen += 1
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert seen == 170
    assert peak < 1_000_000, peak  # the whole array is 8.4 MB; a sample 49 KB
    # random access (validation picks samples by index) reads the same rows
    np.testing.assert_array_equal(src.feed(5)[0]["x"], src.feed(5)[0]["x"])
    with np.load(tmp_path / "big.npz") as z:
        np.testing.assert_array_equal(src.feed(100)[0]["x"], z["x"][100])
        np.testing.assert_array_equal(src.feed(3)[0]["x"], z["x"][3])
