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


def _graph(nodes, inits, x_shape=(1, 4, 8)):
    from onnx import TensorProto, helper
    model = builders._model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                            [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x_shape))], inits)
    return WorkingGraph(onnx.shape_inference.infer_shapes(model)).graph


def _marked(graph):
    marked = log_feeders(graph, ("Conv",))
    return sorted(n.name for n in graph.nodes if id(n) in marked)


def test_a_residual_stream_and_a_relu6_stop_the_walk():
    """x -> [Conv a -> Clip(0, 6) -> Conv b] + x -> Abs -> + eps -> Log: the residual Add joins two computed tensors
    that are not magnitudes, and the ReLU6 clamps from above: nothing is marked."""
    import numpy as np
    from onnx import helper, numpy_helper
    w = numpy_helper.from_array(np.full((4, 4, 1), 0.1, np.float32), "W")
    c = [numpy_helper.from_array(np.float32(v), n) for v, n in ((0, "lo"), (6, "hi"), (1e-6, "eps"))]
    nodes = [helper.make_node("Conv", ["x", "W"], ["a"], name="a"),
             helper.make_node("Clip", ["a", "lo", "hi"], ["r"], name="relu6"),
             helper.make_node("Conv", ["r", "W"], ["b"], name="b"),
             helper.make_node("Add", ["b", "x"], ["res"], name="residual"),
             helper.make_node("Abs", ["res"], ["m"]), helper.make_node("Add", ["m", "eps"], ["p"]),
             helper.make_node("Log", ["p"], ["y"], name="log")]
    assert _marked(_graph(nodes, [w] + c)) == []
    # the same with a lower clamp only (log(clip(x, eps))) instead of the residual join: b and a are marked
    nodes = nodes[:3] + [helper.make_node("Clip", ["b", "eps"], ["cl"], name="floor"),
                         helper.make_node("Log", ["cl"], ["y"], name="log")]
    assert _marked(_graph(nodes, [w] + c)) == ["b"]  # the ReLU6 between b and a stops the walk


def test_a_log_inside_an_if_branch_keeps_the_outer_transform_float():
    """Conv -> If(then: Log(|conv| + eps), else: conv): the Conv the branch's Log reads stays float."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper
    eps = numpy_helper.from_array(np.float32(1e-6), "eps")
    then = helper.make_graph([helper.make_node("Abs", ["c"], ["m"]), helper.make_node("Add", ["m", "eps"], ["p"]),
                              helper.make_node("Log", ["p"], ["t_out"], name="branch_log")], "then", [],
                             [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [1, 4, 8])], [eps])
    other = helper.make_graph([helper.make_node("Identity", ["c"], ["e_out"])], "else", [],
                              [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [1, 4, 8])])
    w = numpy_helper.from_array(np.full((4, 4, 1), 0.1, np.float32), "W")
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="outer_conv"),
             helper.make_node("If", ["flag"], ["y"], name="if", then_branch=then, else_branch=other)]
    model = builders._model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8]),
                                    helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8])], [w])
    targets, skips = _targets(model)
    assert targets == [] and [s.node for s in skips] == ["outer_conv"] and "branch_log" in skips[0].reason
