"""collect_ranges with every method: batch-size invariance, per-tensor methods, and the pipeline's --method wiring."""
from __future__ import annotations

import numpy as np
import pytest

import qpass
from qpass.calib.collect import batchable, collect_ranges
from qpass.calib.observers import RangeOptions
from qpass.calib.data import input_specs
from qpass.calib.histogram import subsample_stride
from qpass.calib.methods import METHODS
from tests import builders


def _samples(model, n=12):
    rng = np.random.default_rng(7)
    return [({"x": (rng.standard_t(3, (1, 3, 8, 8))).astype(np.float32)}, None) for _ in range(n)]


@pytest.mark.parametrize("method", METHODS)
def test_ranges_do_not_depend_on_the_calibration_batch_size(method):
    model = builders.conv_model()
    specs = input_specs(model)
    assert batchable(specs)
    tensors = ["x", "c"]
    tables = [collect_ranges(model, tensors, _samples(model), methods=method, batch_size=b, specs=specs).to_json()
              for b in (1, 4, 5, 12)]
    assert all(t == tables[0] for t in tables)


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_subsampled_histograms_do_not_depend_on_the_batch_size_either(method):
    """With a cap below the tensor's size (192 values a sample: stride 5), batching still changes nothing."""
    model = builders.conv_model()
    specs = input_specs(model)
    opts = RangeOptions(hist_sample=50)
    tables = [collect_ranges(model, ["x", "c"], _samples(model), methods=method, batch_size=b, specs=specs,
                             options=opts).to_json() for b in (1, 4, 5, 12)]
    assert all(t == tables[0] for t in tables)
    exact = collect_ranges(model, ["x", "c"], _samples(model), methods=method, options=RangeOptions(hist_sample=0))
    assert exact.to_json() != tables[0]  # the cap really applied (a different, subsampled histogram)


def test_subsampled_range_keeps_the_exact_min_and_max():
    model = builders.conv_model()
    sub = collect_ranges(model, ["c"], _samples(model), methods="percentile", options=RangeOptions(hist_sample=50)).get("c")
    full = collect_ranges(model, ["c"], _samples(model), methods="minmax").get("c")
    assert (sub.observed_min, sub.observed_max) == (full.min, full.max)


def test_methods_differ_and_stay_inside_the_observed_range():
    model = builders.conv_model()
    ranges = {}
    for m in METHODS:
        r = collect_ranges(model, ["c"], _samples(model, 30), methods=m, options=RangeOptions(percentile=99.0)).get("c")
        assert r.observed_min <= r.min <= r.max <= r.observed_max
        assert r.method == m
        ranges[m] = (r.min, r.max)
    assert ranges["percentile"][1] < ranges["minmax"][1]  # the 99th percentile of a t(3) clips


def test_per_tensor_method_table():
    model = builders.conv_model()
    table = collect_ranges(model, ["x", "c"], _samples(model), methods={"x": "minmax", "c": "entropy"})
    assert table.get("x").method == "minmax" and table.get("c").method == "entropy"


def test_pipeline_applies_method_overrides_by_tensor_and_op():
    model = builders.conv_model()
    feeds = [s[0] for s in _samples(model, 10)]
    r = qpass.quantize(model, feeds, method="entropy", tensor_methods={"x": "percentile"})
    assert r.report.calibration["methods_used"] == {"percentile": 1}
    r = qpass.quantize(model, feeds, method="minmax", op_methods={"Conv": "mse"})
    assert r.report.calibration["methods_used"] == {"mse": 1}


def test_non_batchable_inputs_fall_back_to_one_sample_per_run():
    # a fixed first axis cannot be concatenated; the result must still be right
    model = builders.conv_model()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    specs = input_specs(model)
    assert not batchable(specs)
    a = collect_ranges(model, ["x"], _samples(model), batch_size=6, specs=specs)
    b = collect_ranges(model, ["x"], _samples(model), batch_size=1, specs=specs)
    assert a.to_json() == b.to_json()


@pytest.mark.parametrize("method", ["percentile", "mse"])
def test_late_samples_under_the_smaller_cap_do_not_depend_on_the_batch_size(method):
    """From the 5th sample on the cap drops to an eighth (96 -> 12 values); batches straddling that sample
    (sizes 4, 5, 12) give the same ranges as one sample at a time, and the smaller cap really applied."""
    model = builders.conv_model()
    specs = input_specs(model)
    opts = RangeOptions(hist_sample=96, hist_full_samples=5)
    tables = [collect_ranges(model, ["x", "c"], _samples(model), methods=method, batch_size=b, specs=specs,
                             options=opts).to_json() for b in (1, 4, 5, 12)]
    assert all(t == tables[0] for t in tables)
    all_full = collect_ranges(model, ["x", "c"], _samples(model), methods=method,
                              options=RangeOptions(hist_sample=96, hist_full_samples=12)).to_json()
    assert all_full != tables[0]


def test_late_cap_counts_fewer_values_per_sample():
    from qpass.calib.observers import LATE_CAP_DIVISOR
    from qpass.calib.observers import make_observer

    obs = make_observer("percentile", RangeOptions(bins=256, hist_sample=4096, hist_full_samples=2))
    x = np.random.default_rng(0).standard_normal((3, 64, 64)).astype(np.float32)  # 4096 values a sample
    obs.update(x, float(x.min()), float(x.max()), samples=3)
    # two samples in full (stride 1), the third under a cap of 4096 / 8 = 512: stride 11 (a prime dividing no
    # dim), its 373 counted values weighing 11 each
    assert LATE_CAP_DIVISOR == 8
    assert obs.hist.count == 2 * 4096 + 11 * 373
    assert int(obs.hist.counts.sum()) == obs.hist.count
    assert (obs.minmax.min, obs.minmax.max) == (float(x.min()), float(x.max()))


@pytest.mark.parametrize("batch", [1, 7])
def test_a_value_at_one_position_in_every_sample_is_counted_once_per_sample_on_average(batch):
    """A transformer's outlier feature sits at the same position of every sample. Walking every sample from
    position 0 with stride p would count it p times per sample or never; starting sample i at i mod p counts
    it once per sample over any p consecutive samples, whatever the batching."""
    from qpass.calib.observers import make_observer

    obs = make_observer("percentile", RangeOptions(bins=256, hist_sample=1024, hist_full_samples=1000))
    n = 4096
    stride = subsample_stride((1, n), 1024)
    assert stride > 1 and 3 % stride != 0
    x = np.full((stride * 7, n), 0.5, np.float32)
    x[:, 3] = 100.0  # the outlier, at a position the stride-from-0 walk never visits
    for i in range(0, len(x), batch):
        chunk = x[i:i + batch]
        obs.update(chunk, float(chunk.min()), float(chunk.max()), samples=len(chunk))
    edges = obs.hist.edges()
    top = int(obs.hist.counts[np.searchsorted(edges, 100.0, side="right") - 1])
    assert top == len(x)  # one per sample, as the full data has
    assert obs.hist.count == pytest.approx(len(x) * n, rel=1e-3)


def test_an_activation_that_turns_nan_names_its_tensor_and_sample_and_stops_the_run():
    """The input is finite, but an activation turns NaN (Sqrt of a negative input) on sample 2 of 6: the error
    names that tensor and sample, and no later sample is read."""
    import onnx
    from onnx import TensorProto, helper

    from qpass.errors import CalibrationDataError

    graph = helper.make_graph([helper.make_node("Sqrt", ["x"], ["s"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("s", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    given = []

    def samples():
        for i in range(6):
            given.append(i)
            yield {"x": np.full((1, 4), -1.0 if i == 2 else 1.0, np.float32)}, None

    with pytest.raises(CalibrationDataError) as err:
        collect_ranges(model, ["s"], samples(), methods="entropy")
    assert "sample 2" in str(err.value) and "NaN" in str(err.value) and "'s'" in err.value.subject
    assert given == [0, 1, 2]


@pytest.mark.parametrize("activation_type, conv_method", [("uint8", "percentile"), ("int8", "percentile"),
                                                           ("uint16", "minmax"), ("int16", "minmax")])
def test_auto_clips_conv_tensors_only_on_an_8_bit_grid(activation_type, conv_method):
    """auto: percentile where a Conv reads or writes the tensor on an 8-bit grid, min-max elsewhere and at 16 bits
    (measured: percentile's clipping costs every shared CNN accuracy at 16 bits, docs/benchmark-notes.md)."""
    cfg = qpass.QuantConfig(activation_type=activation_type)
    assert cfg.method_for("c", {"Conv"}) == conv_method
    assert cfg.method_for("c", {"ConvTranspose", "Relu"}) == conv_method
    assert cfg.method_for("m", {"MatMul"}) == "minmax"
    # explicit choices still win at 16 bits
    assert qpass.QuantConfig(activation_type=activation_type, method="percentile").method_for("c", {"Conv"}) == "percentile"
    assert qpass.QuantConfig(activation_type=activation_type, op_methods={"Conv": "mse"}).method_for("c", {"Conv"}) == "mse"


def test_auto_at_16_bits_calibrates_with_min_max_end_to_end():
    model = builders.conv_model()
    feeds = [s[0] for s in _samples(model, 10)]
    assert qpass.quantize(model, feeds).report.calibration["methods_used"] == {"percentile": 1}
    r = qpass.quantize(model, feeds, activation_type="uint16", target_opset=21)
    assert r.report.calibration["methods_used"] == {"minmax": 1}
