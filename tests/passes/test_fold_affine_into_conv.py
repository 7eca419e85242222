"""FoldAffineIntoConv: a scalar scale and bias before pad-free Convs go into their weights and biases."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import qpass
from qpass.graph import WorkingGraph
from qpass.pass_manager import PassContext
from qpass.passes.fold_affine_into_conv import FoldAffineIntoConv

RNG = np.random.default_rng(5)
K, B = 0.6, -0.25


def _model(readers=("pointwise",), affine="Mul, Add", bias=True, output_affine=False) -> onnx.ModelProto:
    """x -> Relu -> [Mul(K)] [Add(B)] -> readers; a pointwise (1x1), a depthwise 3x3 without padding, a padded 3x3."""
    inits = [numpy_helper.from_array(np.array(K, np.float32), "k"), numpy_helper.from_array(np.array(B, np.float32), "b")]
    nodes = [helper.make_node("Relu", ["x"], ["a"])]
    t = "a"
    if "Mul" in affine:
        nodes.append(helper.make_node("Mul", [t, "k"], ["scaled"]))
        t = "scaled"
    if "Add" in affine:
        nodes.append(helper.make_node("Add", ["b", t], ["shifted"]))
        t = "shifted"
    outputs = []
    for i, kind in enumerate(readers):
        shape, attrs = {"pointwise": ((6, 4, 1, 1), {}), "depthwise": ((4, 1, 3, 3), {"group": 4}),
                        "padded": ((6, 4, 3, 3), {"pads": [1, 1, 1, 1]})}[kind]
        inits.append(numpy_helper.from_array(RNG.normal(0, 0.5, shape).astype(np.float32), f"W{i}"))
        ins = [t, f"W{i}"]
        if bias:
            inits.append(numpy_helper.from_array(RNG.normal(0, 0.5, shape[0]).astype(np.float32), f"B{i}"))
            ins.append(f"B{i}")
        nodes.append(helper.make_node("Conv", ins, [f"y{i}"], name=f"conv{i}", **attrs))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None))
    if output_affine:
        outputs.append(helper.make_tensor_value_info(t, TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _fold(model):
    wg = WorkingGraph(model)
    result = FoldAffineIntoConv().run(wg.graph, PassContext())
    return wg.export(), result


def _run(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})


@pytest.mark.parametrize("readers", [("pointwise",), ("depthwise",), ("pointwise", "depthwise")])
def test_the_affine_goes_into_every_reading_conv_and_the_outputs_stay(readers):
    model = _model(readers)
    new, result = _fold(model)
    assert result.modified and result.stats == {"affine": 1}
    assert [n.op_type for n in new.graph.node] == ["Relu"] + ["Conv"] * len(readers)
    assert all(n.input[0] == "a" for n in new.graph.node if n.op_type == "Conv")
    x = RNG.normal(0, 1, (1, 4, 6, 6)).astype(np.float32)
    for want, got in zip(_run(model, x), _run(new, x)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_the_folded_weight_and_bias_by_hand():
    model = _model(("pointwise",), bias=False)  # no bias: the fold adds one
    w = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "W0"))
    new, _ = _fold(model)
    conv = next(n for n in new.graph.node if n.op_type == "Conv")
    inits = {i.name: numpy_helper.to_array(i) for i in new.graph.initializer}
    np.testing.assert_allclose(inits[conv.input[1]], K * w, rtol=1e-6)
    np.testing.assert_allclose(inits[conv.input[2]], B * w.sum(axis=(1, 2, 3)), rtol=1e-6)


@pytest.mark.parametrize("case", ["padded reader", "a padded reader beside a pointwise one", "graph output",
                                  "not a Conv", "a lone Mul (a GELU's last Mul(0.5))", "a lone Add"])
def test_a_fold_that_would_not_be_exact_or_breaks_a_fusion_is_left_alone(case):
    if case.startswith("a lone"):
        model = _model(("pointwise",), "Mul" if "Mul" in case else "Add")
    elif case == "padded reader":  # the border taps would read B where the original reads 0
        model = _model(("padded",))
    elif case == "a padded reader beside a pointwise one":
        model = _model(("pointwise", "padded"))
    elif case == "graph output":
        model = _model(("pointwise",), output_affine=True)
    else:
        model = _model(("pointwise",))
        add = next(n for n in model.graph.node if n.op_type == "Add")
        model.graph.node.insert(list(model.graph.node).index(add) + 1,
                                helper.make_node("Sigmoid", ["shifted"], ["gate"]))
        model.graph.output.append(helper.make_tensor_value_info("gate", TensorProto.FLOAT, None))
    new, result = _fold(model)
    assert not result.modified
    assert [n.op_type for n in new.graph.node] == [n.op_type for n in model.graph.node]


def test_paddle_style_block_quantizes_with_the_hard_swish_on_integer_kernels():
    """Conv -> hard-swish -> Mul(k) -> Add(b) -> pointwise Conv (PP-LCNetV3): after the fold the hard-swish's own
    output is what the pointwise Conv quantizes, so the default run writes it as Add and Mul between Q/DQ."""
    inits = [numpy_helper.from_array(RNG.normal(0, 0.4, (8, 4, 3, 3)).astype(np.float32), "W1"),
             numpy_helper.from_array(RNG.normal(0, 0.3, (6, 8, 1, 1)).astype(np.float32), "W2"),
             numpy_helper.from_array(np.array(K, np.float32), "k"), numpy_helper.from_array(np.array(B, np.float32), "b")]
    nodes = [helper.make_node("Conv", ["x", "W1"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("HardSwish", ["c"], ["h"]),
             helper.make_node("Mul", ["h", "k"], ["m"]), helper.make_node("Add", ["m", "b"], ["lab"]),
             helper.make_node("Conv", ["lab", "W2"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    feeds = [{"x": RNG.normal(0, 1, (1, 4, 8, 8)).astype(np.float32)} for _ in range(16)]
    q = qpass.quantize(model, feeds, val_fraction=0.0, validate=False).model
    ops = [n.op_type for n in q.graph.node]
    assert "HardSwish" not in ops and ops.count("Mul") == 1 and ops.count("Add") == 1  # the gate's Add, the product
    x = {"x": RNG.normal(0, 1, (1, 4, 8, 8)).astype(np.float32)}
    ref = _run(model, x["x"])[0]
    got = _run(q, x["x"])[0]
    assert 10 * np.log10((ref ** 2).sum() / ((got - ref) ** 2).sum()) > 25


def test_a_conv_whose_bias_is_an_empty_name_gets_the_folded_bias_in_its_place():
    model = _model(("pointwise",), bias=False)
    next(n for n in model.graph.node if n.op_type == "Conv").input.append("")  # [X, W, ""]: no bias, written out
    new, result = _fold(model)
    assert result.modified
    conv = next(n for n in new.graph.node if n.op_type == "Conv")
    assert len(conv.input) == 3 and conv.input[2]  # four inputs would not load (onnxruntime: INVALID_GRAPH)
    x = RNG.normal(0, 1, (1, 4, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(_run(new, x)[0], _run(model, x)[0], rtol=1e-5, atol=1e-5)
