"""Observer updates on a worker thread beside onnxruntime (collect._Schedule): same ranges, same error handling."""
from __future__ import annotations

import threading

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from qpass.calib import collect, observers
from qpass.calib.collect import collect_ranges, overlap_may_pay
from qpass.calib.observers import RangeOptions
from qpass.calib.data import input_specs
from qpass.errors import CalibrationDataError
from tests import builders

RUNS_TO_DECIDE = 1 + 2 * collect.OVERLAP_PROBE_RUNS + collect.OVERLAP_WARMUP_RUNS


def _samples(n=20, seed=3):
    rng = np.random.default_rng(seed)
    return [({"x": rng.standard_t(3, (1, 3, 8, 8)).astype(np.float32)}, None) for _ in range(n)]


@pytest.fixture
def threads_seen(monkeypatch):
    """Two CPUs whatever the machine, and the names of the threads that ran observer updates."""
    monkeypatch.setattr(collect, "cpu_count", lambda: 2)
    seen: list[str] = []

    def recording_observer(name, options=None):
        obs = observers.make_observer(name, options)
        update = obs.update

        def recording(*args, **kwargs):
            seen.append(threading.current_thread().name)
            return update(*args, **kwargs)

        obs.update = recording
        return obs

    monkeypatch.setattr(collect, "make_observer", recording_observer)
    return seen


@pytest.mark.parametrize("method", ["percentile", "mse", "entropy"])
@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("hist_sample", [65536, 50])  # 50: below the tensors' size, so samples are subsampled
def test_overlapped_updates_give_the_same_ranges(threads_seen, method, batch_size, hist_sample):
    model = builders.conv_model()
    opts = RangeOptions(hist_sample=hist_sample)
    tables = {ov: collect_ranges(model, ["x", "c"], _samples(), methods=method, batch_size=batch_size, options=opts,
                                 specs=input_specs(model) if batch_size > 1 else None, overlap=ov).to_json()
              for ov in (False, True)}
    assert tables[True] == tables[False]
    assert any(name.startswith("qpass-observers") for name in threads_seen)  # the worker did run updates


def test_overlap_off_or_min_max_only_keeps_updates_on_the_calling_thread(threads_seen):
    model = builders.conv_model()
    collect_ranges(model, ["x", "c"], _samples(), methods="percentile", overlap=False)
    collect_ranges(model, ["x", "c"], _samples(), methods="minmax", overlap=True)  # no histogram: nothing to move
    assert threads_seen and not any(name.startswith("qpass-observers") for name in threads_seen)


@pytest.mark.parametrize("keep_below, kept", [(0.0, False), (1e9, True)])
def test_the_trial_keeps_the_overlap_only_when_it_is_faster(threads_seen, monkeypatch, keep_below, kept):
    """A timed trial (overlap=None) that the overlap loses returns the updates to the calling thread for the
    remaining runs; one it wins keeps them on the worker. The ranges are the same either way."""
    monkeypatch.setattr(collect, "overlap_may_pay", lambda run_s, update_s, cpus: True)
    monkeypatch.setattr(collect, "OVERLAP_KEEP_BELOW", keep_below)
    model = builders.conv_model()
    samples = _samples(RUNS_TO_DECIDE + 4)
    table = collect_ranges(model, ["x", "c"], samples, methods="entropy").to_json()
    assert table == collect_ranges(model, ["x", "c"], samples, methods="entropy", overlap=False).to_json()
    after = threads_seen[2 * RUNS_TO_DECIDE: 2 * (RUNS_TO_DECIDE + 4)]  # two observers a run
    assert len(after) == 8 and all(name.startswith("qpass-observers") == kept for name in after)


def test_a_nan_found_on_the_worker_names_its_sample_and_reads_at_most_one_more(threads_seen):
    graph = helper.make_graph([helper.make_node("Sqrt", ["x"], ["s"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("s", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    bad = 7  # overlapped from run 5 (sample 4) on
    given = []

    def samples():
        for i in range(12):
            given.append(i)
            yield {"x": np.full((1, 4), -1.0 if i == bad else 1.0, np.float32)}, None

    with pytest.raises(CalibrationDataError) as err:
        collect_ranges(model, ["s"], samples(), methods="entropy", overlap=True)
    assert f"sample {bad}" in str(err.value) and "'s'" in err.value.subject
    assert given[-1] in (bad, bad + 1)
    assert any(name.startswith("qpass-observers") for name in threads_seen)


def test_overlap_may_pay_follows_the_linear_scaling_bound():
    assert overlap_may_pay(0.0064, 0.0091, 2)  # orientation CNN: updates 1.4x its runs
    assert not overlap_may_pay(0.0185, 0.0147, 2)  # OCR recognizer: 0.8x
    assert overlap_may_pay(0.010, 0.001, 16)  # 16 CPUs: onnxruntime loses at most 1/15 of its speed
    assert not overlap_may_pay(0.010, 0.020, 1)  # nowhere to move them
    assert not overlap_may_pay(0.0004, 0.0009, 2)  # too short a run to pay for a second session


def test_default_options_still_collect_with_overlap_left_to_the_timing():
    model = builders.conv_model()
    table = collect_ranges(model, ["x", "c"], _samples(), methods="percentile", options=RangeOptions())
    assert set(table.ranges) == {"x", "c"}


def test_an_onnxruntime_failure_while_overlapping_is_the_error_reported_and_the_worker_stops(threads_seen):
    model = builders.conv_model()
    samples = _samples(12)
    samples[8] = ({"x": np.zeros((1, 5, 8, 8), np.float32)}, None)  # 5 channels: the Conv rejects it
    with pytest.raises(CalibrationDataError, match="onnxruntime failed on calibration sample 8"):
        collect_ranges(model, ["x", "c"], samples, methods="percentile", overlap=True)
    assert any(name.startswith("qpass-observers") for name in threads_seen)
    assert not any(t.name.startswith("qpass-observers") for t in threading.enumerate())


def test_the_report_says_where_the_updates_ran_and_calib_overlap_false_keeps_them_in_turn(threads_seen, monkeypatch):
    import qpass

    monkeypatch.setattr(collect, "overlap_may_pay", lambda run_s, update_s, cpus: True)
    monkeypatch.setattr(collect, "OVERLAP_KEEP_BELOW", 1e9)
    model = builders.conv_model()
    feeds = [s[0] for s in _samples(RUNS_TO_DECIDE + 4)]
    on = qpass.quantize(model, feeds, method="percentile", val_fraction=0.0, latency=False, per_layer=False)
    assert on.report.calibration["observer_thread"] is True
    off = qpass.quantize(model, feeds, method="percentile", val_fraction=0.0, latency=False, per_layer=False,
                         calib_overlap=False)
    assert off.report.calibration["observer_thread"] is False
    assert on.report.to_dict()["calibration"]["tensors"] == off.report.to_dict()["calibration"]["tensors"]
    with pytest.raises(Exception, match="calib_overlap"):
        qpass.QuantConfig(calib_overlap="yes")


def test_cpu_count_counts_hyper_threads_of_one_core_once(monkeypatch):
    """Four logical CPUs on two cores (siblings 0,2 and 1,3) are two cores, as onnxruntime's default pool counts;
    an unreadable topology falls back to the logical count."""
    import os
    from pathlib import Path

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    siblings = {"0": "0,2", "1": "1,3", "2": "0,2", "3": "1,3"}
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: siblings[self.parts[-3][3:]] + "\n")
    assert collect.cpu_count() == 2

    def unreadable(self, *a, **k):
        raise OSError("no sysfs")

    monkeypatch.setattr(Path, "read_text", unreadable)
    assert collect.cpu_count() == 4
