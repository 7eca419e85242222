"""The QDQ-import passes on small hand-built graphs, with answers computed by hand."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

import qpass
from qpass.cli import main
from qpass.errors import UnsupportedModelError
from qpass.graph import WorkingGraph
from qpass.pass_manager import PassContext
from qpass.passes.drop_duplicate_qdq import DropDuplicateQDQ
from qpass.passes.fold_fake_quant_weights import FoldFakeQuantWeights
from qpass.passes.repair_qdq_axis import RepairQDQAxis
from qpass.passes.requantize_bias import RequantizeBias
from tests import builders


def _init(name, value):
    return numpy_helper.from_array(np.asarray(value), name)


def _conv_model(w_shape=(4, 3, 3, 3), axis=0, w_scale=None, bias=None, bias_qdq=None, extra_pair=False):
    """x -> Q/DQ (uint8, s 0.02, z 128) -> Conv(W behind a float fake-quant pair, per channel on ``axis``, bias)."""
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.2, w_shape).astype(np.float32)
    c = w_shape[0]
    w_scale = np.asarray(w_scale if w_scale is not None else np.full(c, 0.01), np.float32)
    inits = [_init("w", w), _init("sx", np.float32(0.02)), _init("zx", np.uint8(128)), _init("sw", w_scale),
             _init("zw", np.zeros(w_scale.shape, np.int8))]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"], name="qx"),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"], name="dqx")]
    x_in = "xd"
    if extra_pair:
        nodes += [helper.make_node("QuantizeLinear", ["xd", "sx", "zx"], ["xq2"], name="qx2"),
                  helper.make_node("DequantizeLinear", ["xq2", "sx", "zx"], ["xd2"], name="dqx2")]
        x_in = "xd2"
    attrs = {"axis": axis} if w_scale.size > 1 or axis != 0 else {}
    nodes += [helper.make_node("QuantizeLinear", ["w", "sw", "zw"], ["wq"], name="qw", **attrs),
              helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], name="dqw", **attrs)]
    conv_in = [x_in, "wd"]
    if bias is not None:
        inits.append(_init("b", np.asarray(bias, np.float32)))
        conv_in.append("b")
        if bias_qdq is not None:  # float bias -> Q(int8, scale) -> DQ
            inits += [_init("sb", np.float32(bias_qdq)), _init("zb", np.int8(0))]
            nodes += [helper.make_node("QuantizeLinear", ["b", "sb", "zb"], ["bq"], name="qb"),
                      helper.make_node("DequantizeLinear", ["bq", "sb", "zb"], ["bd"], name="dqb")]
            conv_in[2] = "bd"
    nodes.append(helper.make_node("Conv", conv_in, ["y"], name="conv", pads=[1, 1, 1, 1]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, w_shape[1], 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, w_shape[0], 6, 6])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _graph(model):
    return WorkingGraph(model).graph


def _feed(seed=1, c=3):
    return {"x": np.random.default_rng(seed).uniform(-2, 2, (1, c, 6, 6)).astype(np.float32)}


def test_fake_quantized_weight_is_folded_to_known_integers():
    # x / s in float32, rounded half to even, saturated: 0.75/0.5=1.5 -> 2, 1.25/0.5=2.5 -> 2, -0.5 -> -1, 100 -> 127
    w = np.array([0.75, 1.25, -0.5, 100.0], np.float32)
    g = gs.Graph(nodes=[], opset=13)
    x = gs.Variable("x", np.float32, [4])
    wc = gs.Constant("w", w)
    wq, wd, y = gs.Variable("wq"), gs.Variable("wd", np.float32), gs.Variable("y", np.float32)
    s, z = gs.Constant("s", np.array(0.5, np.float32)), gs.Constant("z", np.array(0, np.int8))
    g.nodes = [gs.Node("QuantizeLinear", "q", inputs=[wc, s, z], outputs=[wq]),
               gs.Node("DequantizeLinear", "dq", inputs=[wq, s, z], outputs=[wd]),
               gs.Node("Mul", "mul", inputs=[x, wd], outputs=[y])]
    g.inputs, g.outputs = [x], [y]
    result = FoldFakeQuantWeights().run(g, PassContext())
    assert result.modified and result.stats == {"folded": 1}
    dq = next(n for n in g.nodes if n.op == "DequantizeLinear")
    assert isinstance(dq.inputs[0], gs.Constant) and dq.inputs[0].values.dtype == np.int8
    assert dq.inputs[0].values.tolist() == [2, 2, -1, 127]
    assert not any(n.op == "QuantizeLinear" for n in g.nodes)


def test_per_channel_fold_keeps_the_models_outputs_and_stores_int8():
    model = _conv_model(bias=np.linspace(-0.3, 0.3, 4))
    out = qpass.quantize(model, val=[_feed(i) for i in range(4)], per_layer=False, latency=False)
    inits = {i.name: numpy_helper.to_array(i) for i in out.model.graph.initializer}
    assert not [n for n, v in inits.items() if v.dtype == np.float32 and v.size > 8]  # no float weight left
    assert any(v.dtype == np.int8 and v.shape == (4, 3, 3, 3) for v in inits.values())
    # against itself before the rewrite: only the float bias, now int32 at s_x * s_w, may move the output (far
    # below one step of the weights' grid)
    assert out.report.validation["outputs"][0]["max_abs_error"] < 1e-5
    assert "itself" in out.report.validation["reference"]


def test_axis_out_of_range_is_repaired_to_the_only_matching_axis():
    model = _conv_model(axis=4)  # rank 4, 4 scales: only axis 0 has size 4
    g = _graph(model)
    result = RepairQDQAxis().run(g, PassContext())
    assert result.modified
    assert [n.attrs["axis"] for n in g.nodes if n.name in ("qw", "dqw")] == [0, 0]
    assert "repaired to 0" in result.skipped[0].reason
    out = qpass.quantize(model, val=[_feed()], per_layer=False, latency=False)  # onnxruntime refuses the input
    assert out.report.quantized_nodes == {"Conv": 1}


def test_ambiguous_axis_is_refused_naming_the_node(tmp_path, capsys):
    model = _conv_model(w_shape=(3, 3, 3, 3), axis=7, w_scale=np.full(3, 0.01))  # every axis has size 3
    with pytest.raises(UnsupportedModelError, match=r"node 'qw'.*axis 7 is out of range for rank 4"):
        qpass.quantize(model, val=[_feed()])
    path = tmp_path / "bad_axis.onnx"
    onnx.save(model, str(path))
    assert main(["run", str(path), "-q"]) == 2
    assert "cannot repair it unambiguously" in capsys.readouterr().err


def test_bias_qdq_pair_becomes_int32_at_input_times_weight_scale():
    bias = np.array([0.123, -0.456, 0.05, 1.0], np.float32)
    model = _conv_model(bias=bias, bias_qdq=0.1)  # the pair rounds it to [0.1, -0.5, 0.0, 1.0]
    g = _graph(model)
    FoldFakeQuantWeights().run(g, PassContext())
    result = RequantizeBias().run(g, PassContext())
    assert result.stats == {"requantized": 1} and "replaced by int32" in result.skipped[0].reason
    conv = next(n for n in g.nodes if n.op == "Conv")
    dq = conv.inputs[2].inputs[0]
    q, s = dq.inputs[0].values, dq.inputs[1].values
    assert q.dtype == np.int32 and np.allclose(s, np.float32(0.02) * np.float32(0.01))
    # by hand: the pair's value / (0.02 * 0.01) = [500, -2500, 0, 5000]
    assert q.tolist() == [500, -2500, 0, 5000] and dq.attrs["axis"] == 0


def test_float_bias_becomes_int32_and_lowers_to_qlinearconv():
    bias = np.array([0.0107, -0.2, 0.3, 0.0], np.float32)
    model = _conv_model(bias=bias)
    g = _graph(model)
    FoldFakeQuantWeights().run(g, PassContext())
    assert RequantizeBias().run(g, PassContext()).stats == {"float": 1}
    dq = next(n for n in g.nodes if n.op == "Conv").inputs[2].inputs[0]
    assert dq.inputs[0].values.tolist() == [54, -1000, 1500, 0]  # 0.0107 / 2e-4 = 53.5 -> 54 (float32: 53.50000x)
    out = qpass.quantize(model, val=[_feed(i) for i in range(3)], format="qop", per_layer=False, latency=False)
    assert "ConvInteger" in {n.op_type for n in out.model.graph.node} or \
        "QLinearConv" in {n.op_type for n in out.model.graph.node}


def test_duplicated_pair_is_dropped_and_changes_nothing():
    model = _conv_model(extra_pair=True)
    g = _graph(model)
    assert DropDuplicateQDQ().run(g, PassContext()).stats == {"dropped": 1}
    g.cleanup()
    assert sorted(n.name for n in g.nodes if n.op == "QuantizeLinear") == ["qw", "qx"]
    out = qpass.quantize(model, val=[_feed(i) for i in range(3)], per_layer=False, latency=False)
    assert out.report.validation["outputs"][0]["max_abs_error"] == 0.0


def test_unsorted_qdq_model_is_sorted_on_load_and_said_so():
    model = _conv_model()
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))  # the Conv first: the ONNX checker refuses the order
    out = qpass.quantize(model, val=[_feed()], per_layer=False, latency=False)
    assert any("not topologically sorted" in w for w in out.report.warnings)
    assert out.report.quantized_nodes == {"Conv": 1}
    float_model = onnx.load(str(builders.DIGITS_MODEL))  # a float model left unsorted is still refused
    nodes = list(float_model.graph.node)
    del float_model.graph.node[:]
    float_model.graph.node.extend(reversed(nodes))
    with pytest.raises(qpass.QpassError, match="topologically sorted"):
        qpass.quantize(float_model, builders.DIGITS_CALIB)
