"""float_before_log: the compute nodes that compute what a Log reads stay float, and why that matters."""
from __future__ import annotations

import onnx
import pytest

import qpass
from qpass.config import QuantConfig
from qpass.graph import WorkingGraph
from qpass.plan.targets import find_targets, log_feeders
from tests import builders


def _targets(model, **cfg):
    wg = WorkingGraph(onnx.shape_inference.infer_shapes(model))
    return find_targets(wg.graph, QuantConfig(**cfg))


def test_the_transform_convs_before_a_log_stay_float_and_the_classifier_after_it_is_quantized():
    targets, skips = _targets(builders.log_spectrogram_model())
    assert [t.node.name for t in targets] == ["classifier"]
    reasons = {s.node: s.reason for s in skips}
    assert set(reasons) == {"stft_re", "stft_im"} and all("Log 'log'" in r for r in reasons.values())


def test_quantize_before_log_turns_the_rule_off():
    targets, skips = _targets(builders.log_spectrogram_model(), float_before_log=False)
    assert sorted(t.node.name for t in targets) == ["classifier", "stft_im", "stft_re"] and not skips


def test_an_activation_function_between_stops_the_walk():
    targets, _ = _targets(builders.log_spectrogram_model(relu_before_log=True))
    assert sorted(t.node.name for t in targets) == ["classifier", "stft_im", "stft_re"]


def test_the_walk_marks_at_most_two_compute_nodes_in_a_row():
    """Log <- Conv c <- Conv b <- Conv a: c and b are marked, a is not (LOG_PATH_COMPUTE)."""
    from onnx import TensorProto, helper, numpy_helper
    import numpy as np
    w = numpy_helper.from_array(np.ones((1, 1, 3), np.float32), "W")
    nodes = [helper.make_node("Conv", [i, "W"], [o], name=o, pads=[1, 1]) for i, o in (("x", "a"), ("a", "b"), ("b", "c"))]
    nodes.append(helper.make_node("Log", ["c"], ["y"], name="log"))
    model = builders._model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8])],
                            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 8])], [w])
    graph = WorkingGraph(model).graph
    marked = log_feeders(graph, ("Conv",))
    assert sorted(n.name for n in graph.nodes if id(n) in marked) == ["b", "c"]


def test_keeping_the_transform_float_is_what_keeps_the_log_spectrogram_accurate(tmp_path):
    """Quiet tones (down to -40 dB): with the transform quantized, the 8-bit error floor lifts the quiet bins' log
    power; kept float, only the classifier's error is left."""
    model, feeds = builders.log_spectrogram_model(), builders.tone_feeds(32)
    kept = qpass.quantize(model, feeds, output=tmp_path / "kept.onnx", collapse_check=False, per_layer=False, latency=False)
    quantized = qpass.quantize(model, feeds, output=tmp_path / "all.onnx", float_before_log=False, collapse_check=False,
                               collapse_rescue=False, per_layer=False, latency=False)
    sqnr_kept = kept.report.validation["outputs"][0]["sqnr_db"]
    sqnr_all = quantized.report.validation["outputs"][0]["sqnr_db"]
    assert sum(kept.report.quantized_nodes.values()) == 1 and sum(quantized.report.quantized_nodes.values()) == 3
    assert sqnr_kept > sqnr_all + 10, (sqnr_kept, sqnr_all)


def test_float_before_log_must_be_a_bool():
    with pytest.raises(qpass.errors.ConfigError):
        QuantConfig(float_before_log="yes")
