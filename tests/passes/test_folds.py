"""FoldBatchNorm, FoldConvScaleMul and FoldConvBiasAdd: exact wiring, unchanged numerics, idempotence, and what they refuse."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qpass.graph import WorkingGraph
from qpass.pass_manager import PassContext
from qpass.passes.constants_to_initializers import ConstantsToInitializers
from qpass.passes.fold_batchnorm import FoldBatchNorm
from qpass.passes.fold_conv_bias_add import FoldConvBiasAdd
from qpass.passes.fold_conv_scale_mul import FoldConvScaleMul
from qpass.verify import verify_model

RNG = np.random.default_rng(0)


def _conv_then(node_after, extra_inits, *, conv_bias=True, out="y"):
    w = RNG.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W")] + extra_inits
    conv_in = ["x", "W"]
    if conv_bias:
        inits.append(numpy_helper.from_array(RNG.normal(0, 0.1, 4).astype(np.float32), "B"))
        conv_in.append("B")
    nodes = [helper.make_node("Conv", conv_in, ["c"], name="conv", pads=[1, 1, 1, 1]), node_after]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _bn_model(**kw):
    p = [numpy_helper.from_array(v.astype(np.float32), n) for n, v in (
        ("s", RNG.uniform(0.5, 2, 4)), ("b", RNG.normal(0, 1, 4)), ("m", RNG.normal(0, 1, 4)), ("v", RNG.uniform(0.1, 2, 4)))]
    bn = helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"], name="bn", epsilon=1e-3)
    return _conv_then(bn, p, **kw)


def _add_model(shape):
    c = numpy_helper.from_array(RNG.normal(0, 1, shape).astype(np.float32), "bias")
    return _conv_then(helper.make_node("Add", ["c", "bias"], ["y"], name="add"), [c], conv_bias=False)


def _apply(model, p):
    wg = WorkingGraph(onnx.shape_inference.infer_shapes(model))
    result = p.run(wg.graph, PassContext())
    out = wg.export()
    verify_model(out)
    return wg, result, out


def _run(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


X = RNG.normal(0, 1, (1, 3, 6, 6)).astype(np.float32)


@pytest.mark.parametrize("conv_bias", [True, False])
def test_batchnorm_folds_into_the_conv(conv_bias):
    model = _bn_model(conv_bias=conv_bias)
    wg, result, out = _apply(model, FoldBatchNorm())
    assert result.modified and result.stats == {"BatchNormalization": 1}
    assert [n.op_type for n in out.graph.node] == ["Conv"]
    conv = out.graph.node[0]
    assert len(conv.input) == 3 and conv.output[0] == "y"  # the graph output name is kept
    np.testing.assert_allclose(_run(out, X), _run(model, X), rtol=1e-5, atol=1e-5)
    again = FoldBatchNorm().run(wg.graph, PassContext())
    assert not again.modified


def test_batchnorm_after_a_conv_read_elsewhere_is_not_folded():
    model = _bn_model()
    model.graph.output.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, None))
    _, result, out = _apply(model, FoldBatchNorm())
    assert not result.modified and "read elsewhere" in result.skipped[0].reason
    assert [n.op_type for n in out.graph.node] == ["Conv", "BatchNormalization"]


@pytest.mark.parametrize("shape", [(1, 4, 1, 1), (4, 1, 1), (1,)])
def test_per_channel_add_folds_into_the_conv_bias(shape):
    model = _add_model(shape)
    wg, result, out = _apply(model, FoldConvBiasAdd())
    assert result.modified and [n.op_type for n in out.graph.node] == ["Conv"]
    assert out.graph.node[0].output[0] == "y"
    np.testing.assert_allclose(_run(out, X), _run(model, X), rtol=1e-6, atol=1e-6)
    assert not FoldConvBiasAdd().run(wg.graph, PassContext()).modified


@pytest.mark.parametrize("shape", [(6,), (1, 4, 6, 6), (1, 1, 1, 6)])
def test_add_that_is_not_per_channel_is_left_alone(shape):
    # a (6,) constant broadcasts along the last (width) axis, not the channels
    _, result, out = _apply(_add_model(shape), FoldConvBiasAdd())
    assert not result.modified and [n.op_type for n in out.graph.node] == ["Conv", "Add"]


def test_identity_of_an_initializer_becomes_a_weight():
    w = numpy_helper.from_array(RNG.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "W")
    nodes = [helper.make_node("Identity", ["W"], ["W_id"], name="id"),
             helper.make_node("Conv", ["x", "W_id"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    wg, result, out = _apply(model, ConstantsToInitializers())
    assert result.stats == {"Conv": 1}
    assert [n.op_type for n in out.graph.node] == ["Conv"]
    assert out.graph.node[0].input[1] in {t.name for t in out.graph.initializer}
    np.testing.assert_array_equal(_run(out, X), _run(model, X))
    assert not ConstantsToInitializers().run(wg.graph, PassContext()).modified


def _as_constant_nodes(model, names):
    """The same model with the initializers ``names`` moved into Constant nodes (as paddle2onnx writes them)."""
    inits = {t.name: t for t in model.graph.initializer}
    consts = [helper.make_node("Constant", [], [n], name=f"const_{n}", value=inits[n]) for n in names]
    kept = [t for t in model.graph.initializer if t.name not in names]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    nodes = consts + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def test_batchnorm_with_parameters_in_constant_nodes_folds():
    model = _as_constant_nodes(_bn_model(), ["s", "b", "m", "v"])
    _, result, out = _apply(model, FoldBatchNorm())
    assert result.stats == {"BatchNormalization": 1} and [n.op_type for n in out.graph.node] == ["Conv"]
    np.testing.assert_allclose(_run(out, X), _run(model, X), rtol=1e-5, atol=1e-5)


def _mul_add_model(scale_shape, *, constant_nodes=False):
    """Conv -> Mul(scale) -> Add(bias): Paddle's LearnableAffineBlock on a Conv's output."""
    k = numpy_helper.from_array(RNG.uniform(-2, 2, scale_shape).astype(np.float32), "k")
    b = numpy_helper.from_array(np.float32(0.25), "lab_bias")
    model = _conv_then(helper.make_node("Mul", ["k", "c"], ["m"], name="mul"), [k, b], out="y")
    model.graph.node.append(helper.make_node("Add", ["m", "lab_bias"], ["y"], name="add"))
    return _as_constant_nodes(model, ["k", "lab_bias"]) if constant_nodes else model


@pytest.mark.parametrize("shape", [(1, 4, 1, 1), (4, 1, 1), (1,), ()])
@pytest.mark.parametrize("constant_nodes", [False, True])
def test_scale_mul_then_bias_add_fold_into_the_conv(shape, constant_nodes):
    model = _mul_add_model(shape, constant_nodes=constant_nodes)
    wg, result, _ = _apply(model, FoldConvScaleMul())
    assert result.stats == {"Mul": 1}
    assert FoldConvBiasAdd().run(wg.graph, PassContext()).stats == {"Add": 1}
    out = wg.export()
    verify_model(out)
    assert [n.op_type for n in out.graph.node] == ["Conv"] and out.graph.node[0].output[0] == "y"
    np.testing.assert_allclose(_run(out, X), _run(model, X), rtol=1e-5, atol=1e-5)
    assert not FoldConvScaleMul().run(wg.graph, PassContext()).modified


@pytest.mark.parametrize("shape", [(6,), (1, 4, 6, 6)])
def test_scale_mul_that_is_not_per_channel_is_left_alone(shape):
    _, result, out = _apply(_mul_add_model(shape), FoldConvScaleMul())
    assert not result.modified and [n.op_type for n in out.graph.node] == ["Conv", "Mul", "Add"]


def test_scale_mul_of_a_conv_output_read_elsewhere_is_left_alone():
    model = _mul_add_model((1,))
    model.graph.output.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, None))
    _, result, _ = _apply(model, FoldConvScaleMul())
    assert not result.modified


def test_with_per_tensor_weights_only_a_uniform_scale_folds():
    _, result, _ = _apply(_mul_add_model((1, 4, 1, 1)), FoldConvScaleMul(per_channel_weights=False))
    assert not result.modified  # four different values would widen the one weight range
    _, result, _ = _apply(_mul_add_model((1,)), FoldConvScaleMul(per_channel_weights=False))
    assert result.stats == {"Mul": 1}


def test_bias_scale_bias_in_any_order_folds_into_one_conv_even_through_a_reshaped_constant_bias():
    """PP-OCRv5's form: Conv -> Add(Reshape(Constant bias, [1, C, 1, 1])) -> Mul(scale) -> Add(bias)."""
    from qpass.passes.fold_conv_affine import FoldConvAffine

    b = numpy_helper.from_array(RNG.normal(0, 1, 4).astype(np.float32), "b_flat")
    shape = numpy_helper.from_array(np.array([1, 4, 1, 1], np.int64), "b_shape")
    k = numpy_helper.from_array(np.float32(1.5), "k")
    b2 = numpy_helper.from_array(np.float32(-0.25), "b2")
    model = _conv_then(helper.make_node("Reshape", ["b_flat", "b_shape"], ["b4"], name="reshape"),
                       [b, shape, k, b2], conv_bias=False, out="y")
    model.graph.node.extend([helper.make_node("Add", ["c", "b4"], ["a1"], name="bias"),
                             helper.make_node("Mul", ["a1", "k"], ["m"], name="scale"),
                             helper.make_node("Add", ["m", "b2"], ["y"], name="bias2")])
    model = _as_constant_nodes(model, ["b_flat", "b_shape"])
    wg, result, out = _apply(model, FoldConvAffine())
    assert result.stats == {"Add": 2, "Mul": 1}
    assert [n.op_type for n in out.graph.node] == ["Conv"] and out.graph.node[0].output[0] == "y"
    np.testing.assert_allclose(_run(out, X), _run(model, X), rtol=1e-5, atol=1e-5)
    assert not FoldConvAffine().run(wg.graph, PassContext()).modified


def test_constant_behind_reads_reshape_unsqueeze_and_squeeze_of_constants():
    import onnx_graphsurgeon as gs
    from qpass.graph import constant_behind

    c = gs.Constant("c", np.arange(6, dtype=np.float32))
    def out_of(op, *extra, **attrs):
        y = gs.Variable(f"{op}_y")
        gs.Node(op, inputs=[c, *extra], outputs=[y], attrs=attrs)
        return constant_behind(y)
    assert out_of("Reshape", gs.Constant("s", np.array([0, 3, -1][1:], np.int64))).values.shape == (3, 2)
    assert out_of("Unsqueeze", gs.Constant("a", np.array([0, 2], np.int64))).values.shape == (1, 6, 1)
    assert out_of("Unsqueeze", axes=[-1]).values.shape == (6, 1)  # opset < 13: axes as an attribute
    assert out_of("Reshape", gs.Variable("dynamic_shape")) is None
    assert out_of("Squeeze", gs.Constant("bad_axis", np.array([3], np.int64))) is None  # invalid: left to the checker
    assert out_of("Unsqueeze", gs.Constant("bad_axes", np.array([5], np.int64))) is None
