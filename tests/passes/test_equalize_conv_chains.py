"""EqualizeConvChains: hand-computed equalized weights, the float function kept, and what it leaves alone."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qpass.config import QuantConfig
from qpass.errors import ConfigError
from qpass.graph import WorkingGraph
from qpass.pass_manager import PassContext
from qpass.passes.equalize_conv_chains import EqualizeConvChains
from qpass.recipes import prepare_passes
from qpass.verify import verify_model

RNG = np.random.default_rng(0)


def _model(nodes, inits, x_shape, *, extra_outputs=(), opset=14):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
                              + [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in extra_outputs],
                              initializer=[numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _apply(model, p=None):
    wg = WorkingGraph(onnx.shape_inference.infer_shapes(model))
    result = (p or EqualizeConvChains()).run(wg.graph, PassContext())
    out = wg.export()
    verify_model(out)
    return wg, result, out


def _run(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _assert_same_function(a, b, x=None):
    """Outputs equal up to float32 rounding: 1e-5 of the output's largest magnitude (sums of ~50 products)."""
    x = X if x is None else x
    ya, yb = _run(a, x), _run(b, x)
    assert np.abs(ya - yb).max() <= 1e-5 * np.abs(yb).max(), np.abs(ya - yb).max()


def _inits(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _conv_input(model, node_name, slot):
    node = next(n for n in model.graph.node if n.name == node_name)
    return _inits(model)[node.input[slot]]


def _pair_model(between, *, c_in=3, mid=6, c_out=4, group2=1, k2=1, extra_inits=None, extra_outputs=()):
    """x -> conv1 (3x3, pad 1, bias) -> between... -> conv2 (k2 x k2, group2, bias) -> y."""
    inits = {"W1": RNG.normal(0, 1, (mid, c_in, 3, 3)) * RNG.uniform(0.05, 3, (mid, 1, 1, 1)),
             "B1": RNG.normal(0, 0.5, mid),
             "W2": RNG.normal(0, 1, (c_out, mid // group2, k2, k2)) * RNG.uniform(0.05, 3, (1, mid // group2, 1, 1)),
             "B2": RNG.normal(0, 0.5, c_out), **(extra_inits or {})}
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1", pads=[1, 1, 1, 1])]
    t = "c1"
    for i, (op, extra_in, attrs) in enumerate(between):
        nodes.append(helper.make_node(op, [t, *extra_in], [f"a{i}"], name=f"act{i}", **attrs))
        t = f"a{i}"
    nodes.append(helper.make_node("Conv", [t, "W2", "B2"], ["y"], name="conv2", group=group2))
    return _model(nodes, inits, ("N", c_in, 8, 8), extra_outputs=extra_outputs)


X = RNG.normal(0, 1, (2, 3, 8, 8)).astype(np.float32)


def test_known_answer_pair_computed_by_hand():
    # r1 = max|W1[c]| = [4, 0.5]; r2 = max|W2[:, c]| = [1, 8]; s = sqrt(r1 / r2) = [2, 0.25]
    # W1 / s = [2, -2], b1 / s = [2 / 2, 1 / 0.25] = [1, 4]; W2[:, c] * s[c] = [[2, 0.5], [-0.5, 2], [1, -0.5]]
    inits = {"W1": [[[[4.0]]], [[[-0.5]]]], "B1": [2.0, 1.0],
             "W2": np.array([[1.0, 2.0], [-0.25, 8.0], [0.5, -2.0]]).reshape(3, 2, 1, 1), "B2": [0.1, 0.2, 0.3]}
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "W2", "B2"], ["y"], name="conv2")]
    model = _model(nodes, inits, (1, 1, 3, 3))
    _, result, out = _apply(model)
    assert result.modified and result.stats["pairs"] == 1 and result.stats["equalized"] == ["conv1 -> conv2"]
    np.testing.assert_allclose(_conv_input(out, "conv1", 1).reshape(-1), [2.0, -2.0], rtol=1e-6)
    np.testing.assert_allclose(_conv_input(out, "conv1", 2), [1.0, 4.0], rtol=1e-6)
    np.testing.assert_allclose(_conv_input(out, "conv2", 1).reshape(3, 2), [[2.0, 0.5], [-0.5, 2.0], [1.0, -0.5]],
                               rtol=1e-6)
    np.testing.assert_array_equal(_conv_input(out, "conv2", 2), np.float32([0.1, 0.2, 0.3]))  # conv2's bias kept
    x = RNG.normal(0, 1, (1, 1, 3, 3)).astype(np.float32)
    _assert_same_function(out, model, x)


def test_known_answer_with_activation_ranges():
    # a = max|relu output| per channel = [16, 2] (given); r2 = [1, 8]; s = sqrt(a / r2) = [4, 0.5]
    # W1 / s = [4 / 4, -0.5 / 0.5] = [1, -1], b1 / s = [0.5, 2]; W2[:, c] * s[c] = [[4, 1], [-1, 4], [2, -1]]
    inits = {"W1": [[[[4.0]]], [[[-0.5]]]], "B1": [2.0, 1.0],
             "W2": np.array([[1.0, 2.0], [-0.25, 8.0], [0.5, -2.0]]).reshape(3, 2, 1, 1), "B2": [0.1, 0.2, 0.3]}
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "W2", "B2"], ["y"], name="conv2")]
    model = _model(nodes, inits, (1, 1, 3, 3))
    _, result, out = _apply(model, EqualizeConvChains(activation_ranges={"r": np.array([16.0, 2.0])}))
    assert result.modified
    np.testing.assert_allclose(_conv_input(out, "conv1", 1).reshape(-1), [1.0, -1.0], rtol=1e-6)
    np.testing.assert_allclose(_conv_input(out, "conv1", 2), [0.5, 2.0], rtol=1e-6)
    np.testing.assert_allclose(_conv_input(out, "conv2", 1).reshape(3, 2), [[4.0, 1.0], [-1.0, 4.0], [2.0, -1.0]],
                               rtol=1e-6)
    x = RNG.normal(0, 1, (1, 1, 3, 3)).astype(np.float32)
    _assert_same_function(out, model, x)


def test_known_answer_random_pair_against_the_formula_in_numpy():
    model = _pair_model([("Relu", [], {})])
    w1, b1, w2 = (_inits(model)[k].astype(np.float64) for k in ("W1", "B1", "W2"))
    s = np.sqrt(np.abs(w1).max(axis=(1, 2, 3)) / np.abs(w2).max(axis=(0, 2, 3)))
    _, result, out = _apply(model)
    assert result.modified
    np.testing.assert_allclose(_conv_input(out, "conv1", 1), w1 / s[:, None, None, None], rtol=1e-5)
    np.testing.assert_allclose(_conv_input(out, "conv1", 2), b1 / s, rtol=1e-5)
    np.testing.assert_allclose(_conv_input(out, "conv2", 1), w2 * s[None, :, None, None], rtol=1e-5)
    r1 = np.abs(_conv_input(out, "conv1", 1)).max(axis=(1, 2, 3))
    r2 = np.abs(_conv_input(out, "conv2", 1)).max(axis=(0, 2, 3))
    np.testing.assert_allclose(r1, r2, rtol=1e-5)  # both ranges are sqrt(r1 r2) afterwards


SLOPE = RNG.uniform(0.05, 0.5, (6, 1, 1))
HOMOGENEOUS_CHAINS = {
    "relu": [("Relu", [], {})],
    "none": [],
    "identity_relu": [("Identity", [], {}), ("Relu", [], {}), ("Identity", [], {})],
    "leaky_relu": [("LeakyRelu", [], {"alpha": 0.1})],
    "prelu_per_channel": [("PRelu", ["slope"], {})],
    "maxpool": [("Relu", [], {}), ("MaxPool", [], {"kernel_shape": [2, 2], "strides": [2, 2]})],
    "clip_as_relu": [("Clip", ["zero"], {})],
}


@pytest.mark.parametrize("chain", sorted(HOMOGENEOUS_CHAINS))
@pytest.mark.parametrize("group2", [1, 2])
def test_homogeneous_chains_are_equalized_and_the_function_is_kept(chain, group2):
    model = _pair_model(HOMOGENEOUS_CHAINS[chain], group2=group2, k2=3,
                        extra_inits={"slope": SLOPE, "zero": np.float32(0.0)})
    wg, result, out = _apply(model)
    assert result.modified and result.stats["pairs"] == 1, result.skipped
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in model.graph.node]  # no node added
    _assert_same_function(out, model)
    assert not EqualizeConvChains().run(wg.graph, PassContext()).modified  # a second run changes nothing


@pytest.mark.parametrize("op, extra, attrs", [("HardSwish", [], {}), ("Clip", ["zero", "six"], {}),
                                               ("Sigmoid", [], {}), ("HardSigmoid", [], {}), ("Tanh", [], {})])
def test_a_non_homogeneous_activation_is_skipped_with_a_reason(op, extra, attrs):
    model = _pair_model([(op, extra, attrs)], extra_inits={"zero": np.float32(0.0), "six": np.float32(6.0)})
    _, result, out = _apply(model)
    assert not result.modified
    assert len(result.skipped) == 1 and f"({op}) is not positively homogeneous" in result.skipped[0].reason
    np.testing.assert_array_equal(_inits(out)["W1"], _inits(model)["W1"])


@pytest.mark.parametrize("where", ["read_elsewhere", "graph_output"])
def test_a_conv_output_read_elsewhere_is_skipped(where):
    if where == "graph_output":
        model = _pair_model([], extra_outputs=["c1"])
    else:
        model = _pair_model([("Relu", [], {})])
        model.graph.node.append(helper.make_node("Sigmoid", ["c1"], ["side"], name="side"))
        model.graph.output.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, None))
    _, result, out = _apply(model)
    assert not result.modified
    reason = result.skipped[0].reason
    assert ("read by 2 nodes" if where == "read_elsewhere" else "graph output") in reason
    np.testing.assert_array_equal(_inits(out)["W2"], _inits(model)["W2"])


def test_depthwise_triplet_balances_both_pairs():
    """conv1 (3 -> 6) -> Relu -> depthwise 3x3 (group 6) -> Relu -> conv2 (6 -> 4, 1x1)."""
    inits = {"W1": RNG.normal(0, 1, (6, 3, 1, 1)) * RNG.uniform(0.05, 4, (6, 1, 1, 1)), "B1": RNG.normal(0, 0.5, 6),
             "Wd": RNG.normal(0, 1, (6, 1, 3, 3)) * RNG.uniform(0.05, 4, (6, 1, 1, 1)), "Bd": RNG.normal(0, 0.5, 6),
             "W2": RNG.normal(0, 1, (4, 6, 1, 1)) * RNG.uniform(0.05, 4, (1, 6, 1, 1)), "B2": RNG.normal(0, 0.5, 4)}
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "Wd", "Bd"], ["cd"], name="dw", group=6, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["cd"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "W2", "B2"], ["y"], name="conv2")]
    model = _model(nodes, inits, ("N", 3, 8, 8))
    _, result, out = _apply(model)
    assert result.modified and result.stats["pairs"] == 2 and result.stats["Conv"] == 3
    _assert_same_function(out, model)
    w1, wd, w2 = (_conv_input(out, n, 1) for n in ("conv1", "dw", "conv2"))
    # the depthwise Conv's input channel c is its output channel c: both pairs balanced at convergence
    np.testing.assert_allclose(np.abs(w1).max(axis=(1, 2, 3)), np.abs(wd).max(axis=(1, 2, 3)), rtol=1e-4)
    np.testing.assert_allclose(np.abs(wd).max(axis=(1, 2, 3)), np.abs(w2).max(axis=(0, 2, 3)), rtol=1e-4)
    before = np.abs(inits["Wd"]).max(axis=(1, 2, 3))
    assert not np.allclose(np.abs(wd).max(axis=(1, 2, 3)), before)


def test_a_dead_channel_keeps_its_weights():
    model = _pair_model([("Relu", [], {})])
    w1 = _inits(model)["W1"].copy()
    w1[2] = 0.0
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w1, "W1"))
    _, result, out = _apply(model)
    assert result.modified
    np.testing.assert_array_equal(_conv_input(out, "conv2", 1)[:, 2], _inits(model)["W2"][:, 2])
    _assert_same_function(out, model)


def test_the_recipe_runs_it_only_when_configured():
    names = [p.name for p in prepare_passes(QuantConfig(equalize=True))]
    assert names.index("equalize_conv_chains") > names.index("fold_conv_affine")
    assert "equalize_conv_chains" not in [p.name for p in prepare_passes(QuantConfig())]
    # by default: on with per-tensor weights (where it measured better), off with per-channel ones
    assert "equalize_conv_chains" in [p.name for p in prepare_passes(QuantConfig(per_channel=False))]
    assert "equalize_conv_chains" not in [p.name for p in prepare_passes(QuantConfig(per_channel=False, equalize=False))]
    assert "equalize_conv_chains" not in [p.name for p in prepare_passes(QuantConfig(equalize=True, weight_only="int4"))]
    with pytest.raises(ConfigError):
        QuantConfig(equalize="yes")


def test_cli_flags_set_the_field():
    from qpass.cli import _config_from_args, build_parser

    parse = build_parser().parse_args
    assert _config_from_args(parse(["run", "m.onnx", "--equalize"])).equalize is True
    assert _config_from_args(parse(["run", "m.onnx", "--no-equalize"])).equalize is False


def test_quantize_with_equalize_records_the_pairs_in_the_report(tmp_path):
    import json

    import qpass

    model = _pair_model([("Relu", [], {})])
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8]))
    feeds = [{"x": RNG.normal(0, 1, (1, 3, 8, 8)).astype(np.float32)} for _ in range(8)]
    result = qpass.quantize(model, feeds, output=tmp_path / "q.onnx", equalize=True, latency=False, per_layer=False)
    record = next(p for p in json.loads(result.report_path.read_text())["passes"] if p["name"] == "equalize_conv_chains")
    assert record["modified"] and record["stats"]["equalized"] == ["conv1 -> conv2"]
    assert result.report.validation["outputs"][0]["cosine_mean"] > 0.99
