"""plan_quantization: which tensors get Q/DQ, who reads them, and whose range they share."""
from __future__ import annotations

import onnx

from qpass.config import QuantConfig
from qpass.graph import WorkingGraph
from qpass.plan.placement import plan_quantization
from tests import builders


def _plan(model, **cfg):
    wg = WorkingGraph(onnx.shape_inference.infer_shapes(model))
    return plan_quantization(wg.graph, QuantConfig(**cfg))


def _summary(plan):
    return {q.name: ("all" if q.consumers is None else len(q.consumers), q.range_of) for q in plan.tensors.values()}


def test_digits_cnn_plan_folds_relu_and_shares_ranges_through_maxpool_and_flatten():
    plan = _plan(onnx.load(str(builders.DIGITS_MODEL)))
    assert _summary(plan) == {
        "input": (1, "input"),                                   # first Conv's input: only the Conv reads DQ
        "/1/Relu_output_0": ("all", "/1/Relu_output_0"),         # Conv1 output, after its Relu
        "/3/Relu_output_0": ("all", "/3/Relu_output_0"),         # Conv2 output, after its Relu
        "/4/MaxPool_output_0": (1, "/3/Relu_output_0"),          # MaxPool and Flatten share Conv2's range
        "/5/Flatten_output_0": (1, "/3/Relu_output_0"),
        "/7/Relu_output_0": ("all", "/7/Relu_output_0"),         # Gemm1 output, after its Relu
    }
    # the last Gemm writes the graph output: nothing reads it, so it stays float
    assert plan.calibrate == ["input", "/1/Relu_output_0", "/3/Relu_output_0", "/7/Relu_output_0"]


def test_outputs_can_be_turned_off_or_limited_to_quantized_readers():
    model = onnx.load(str(builders.DIGITS_MODEL))
    assert set(_summary(_plan(model, quantize_outputs=False))) == {"input", "/1/Relu_output_0", "/5/Flatten_output_0",
                                                                  "/7/Relu_output_0"}
    # with 'quantized' readers only, Conv2's output (read by MaxPool -> Flatten -> Gemm) still qualifies
    assert "/3/Relu_output_0" in _summary(_plan(model, output_consumers="quantized"))


def test_matmul_outputs_stay_float_by_default():
    plan = _plan(builders.matmul_model())
    assert set(_summary(plan)) == {"x"}
    plan = _plan(builders.matmul_model(), quantize_outputs=("MatMul",))
    assert set(_summary(plan)) == {"x", "m"}


def test_activation_matmuls_are_quantized_only_when_asked():
    model = builders.matmul_model(act_x_act=True)
    off = _plan(model)
    assert [t.node.name for t in off.targets] == ["matmul"] and any(s.node == "matmul_act" for s in off.skips)
    on = _plan(model, activation_matmuls=True)
    act = next(t for t in on.targets if t.node.name == "matmul_act")
    assert act.activations == [0, 1] and act.weight is None
    assert {"y", "yt"} <= set(_summary(on))  # both inputs of the activation x activation MatMul get Q/DQ


def test_residual_add_concat_and_pooling_run_in_int8_when_their_inputs_are_quantized():
    plan = _plan(builders.residual_model())
    assert _summary(plan) == {
        "x": (1, "x"),
        "r1": ("all", "r1"),   # conv1 after its Relu: read by conv2, the Add and the Concat
        "c2": ("all", "c2"),   # conv2's output, read by the Add
        "a": ("all", "a"),     # the Add's own range, after its Relu (QLinearAdd)
        "cc": ("all", "cc"),   # the Concat's own range (QLinearConcat), read by conv3
        "g": ("all", "g"),     # GlobalAveragePool's own range (QLinearGlobalAveragePool)
        "f": (1, "g"),         # Flatten shares it on the way to the Gemm
        "z": ("all", "z"),     # the Gemm's output is quantized (read by a float Add) ...
    }
    # ... but that Add reads a graph input that nothing quantizes, so it is not a join and stays float
    assert "out" not in plan.tensors
    assert plan.tensors["r1"].consumers is None


def test_joins_can_be_turned_off_or_limited():
    model = builders.residual_model()
    # off: the joins read float; only compute inputs and outputs are quantized ("cc" is conv3's input)
    assert set(_summary(_plan(model, neighbour_ops=()))) == {"x", "r1", "c2", "cc", "f", "z"}
    only_add = _summary(_plan(model, neighbour_ops=("Add",)))
    assert "a" in only_add and "g" not in only_add
    assert "a" not in _summary(_plan(model, exclude_nodes=("add",)))


def _conv_then(*readers: str) -> onnx.ModelProto:
    """x -> Conv -> c, read by one node of each op type in ``readers`` (outputs y0, y1, ..)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "W")
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1])]
    nodes += [helper.make_node(op, ["c"], [f"y{i}"], name=f"r{i}") for i, op in enumerate(readers)]
    outs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["N", 4, 8, 8]) for i in range(len(readers))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])], outs, [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])


def test_exclude_before_keeps_a_compute_node_float_when_only_those_ops_read_it():
    alone = _conv_then("HardSwish")
    assert [t.node.name for t in _plan(alone).targets] == ["conv"]
    plan = _plan(alone, exclude_before=("HardSwish",))
    assert plan.targets == [] and plan.tensors == {}
    assert [(s.node, s.reason) for s in plan.skips] == [("conv", "its output is read only by HardSwish (exclude_before)")]
    # another reader that is not listed keeps the Conv quantized
    assert [t.node.name for t in _plan(_conv_then("HardSwish", "Relu"), exclude_before=("HardSwish",)).targets] == ["conv"]


def test_exclude_before_must_be_a_list_of_op_types():
    import pytest

    from qpass.errors import ConfigError

    with pytest.raises(ConfigError, match="exclude_before"):
        QuantConfig(exclude_before="HardSwish")
    assert QuantConfig(exclude_before=["HardSwish"]).exclude_before == ("HardSwish",)
