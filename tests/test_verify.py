"""The structural verifier's Q/DQ rules for float16 / bfloat16 scales, int4 / uint4 values and blocked quantization.

Each rule has a valid model that must pass and an invalid one whose error (message and node) is checked, so that
a test fails when its rule is removed. Where the ONNX checker, which ``verify_model`` runs first, already rejects
a model, the verifier's own Q/DQ pass is called directly on the graph.
"""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from qpass.errors import VerificationError
from qpass.qparams import INT_TYPES, blocked_shape, make_initializer
from qpass.verify import _verify_qdq, verify_model

FLOAT, FLOAT16, BFLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16


def _scale(name: str, values, elem_type: int = FLOAT) -> TensorProto:
    values = np.asarray(values, np.float32)
    return helper.make_tensor(name, elem_type, values.shape, values.ravel().tolist())


def _values(qtype: str, shape) -> np.ndarray:
    dtype, qmin, qmax = INT_TYPES[qtype]
    n = int(np.prod(shape))
    return (np.arange(n) % (qmax - qmin + 1) + qmin).astype(dtype).reshape(shape)


def dq_model(qtype: str, shape, scale_shape, *, zp_qtype: str | None = "same", scale_type: int = FLOAT,
             scale_value: float = 0.5, opset: int = 21, **attrs):
    """One DequantizeLinear "dq" of an initializer of ``qtype`` values, with a scale (and zero point) initializer."""
    zp_qtype = qtype if zp_qtype == "same" else zp_qtype
    inits = [make_initializer("x", _values(qtype, shape), qtype),
             _scale("s", np.full(scale_shape, scale_value), scale_type)]
    inputs = ["x", "s"]
    if zp_qtype is not None:
        inits.append(make_initializer("z", np.zeros(scale_shape, INT_TYPES[zp_qtype][0]), zp_qtype))
        inputs.append("z")
    node = helper.make_node("DequantizeLinear", inputs, ["y"], name="dq", **attrs)
    graph = helper.make_graph([node], "g", [], [helper.make_tensor_value_info("y", scale_type, list(shape))],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def q_model(qtype: str, shape, scale_shape, *, scale_type: int = FLOAT, x_type: int | None = None,
            scale_values=None, opset: int = 21, **attrs):
    """One QuantizeLinear "q" of a graph input of ``shape`` (names for symbolic dimensions) to ``qtype``."""
    x_type = scale_type if x_type is None else x_type
    scale = (numpy_helper.from_array(np.asarray(scale_values), "s") if scale_values is not None
             else _scale("s", np.full(scale_shape, 0.5), scale_type))
    zp = make_initializer("z", np.zeros(scale_shape, INT_TYPES[qtype][0]), qtype)
    node = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"], name="q", **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", x_type, list(shape))],
                              [helper.make_tensor_value_info("y", zp.data_type, list(shape))], initializer=[scale, zp])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _rejects(model, match: str, node: str, *, checker_first: bool = False):
    """``verify_model`` (or, with ``checker_first``, only the Q/DQ rules: the ONNX checker would reject the
    model before them) raises naming ``node``."""
    with pytest.raises(VerificationError, match=match) as info:
        if checker_first:
            _verify_qdq(model.graph)
        else:
            verify_model(model)
    assert info.value.subject == f"node '{node}'"


# ---------------------------------------------------------------------------------------------- float16 / bfloat16 scales
@pytest.mark.parametrize("scale_type", [FLOAT16, BFLOAT16])
def test_half_scales_accepted(scale_type):
    verify_model(dq_model("int8", (4, 6), (), scale_type=scale_type, opset=19))
    verify_model(dq_model("uint8", (4, 6), (6,), scale_type=scale_type, opset=19, axis=1))
    verify_model(q_model("int8", (2, 4), (4,), scale_type=scale_type, opset=19, axis=1))
    verify_model(dq_model("int4", (4, 40), (4, 3), scale_type=scale_type, axis=1, block_size=16))


def test_scale_of_another_type_rejected():
    # opset 19 QuantizeLinear takes int32 input and scale (the ONNX checker accepts it); qpass's scales are floats
    model = q_model("uint8", (4,), (), x_type=TensorProto.INT32, scale_values=np.int32(2), opset=19)
    _rejects(model, "scale must be float32, float16 or bfloat16", "q")


@pytest.mark.parametrize("scale_type", [FLOAT16, BFLOAT16])
@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_half_scales_must_be_finite_and_positive(scale_type, bad):
    _rejects(dq_model("int8", (4, 6), (6,), scale_type=scale_type, scale_value=bad, opset=19, axis=1),
             "scale must be finite and > 0", "dq")


@pytest.mark.parametrize("scale_type", [FLOAT16, BFLOAT16])
def test_half_scale_values_and_zero_point_types_must_agree(scale_type):
    model = dq_model("int8", (4, 6), (), zp_qtype="uint8", scale_type=scale_type, opset=19)
    _rejects(model, "quantized input and zero point differ in type", "dq", checker_first=True)
    with pytest.raises(VerificationError):  # the whole verifier rejects it too (its ONNX checker first)
        verify_model(model)


# ---------------------------------------------------------------------------------------------- int4 / uint4
@pytest.mark.parametrize("qtype", ["int4", "uint4"])
def test_4bit_values_accepted(qtype):
    verify_model(dq_model(qtype, (3, 5), ()))  # an odd count: the last byte half used
    verify_model(dq_model(qtype, (3, 5), (5,), axis=1))
    verify_model(dq_model(qtype, (3, 5), (), zp_qtype=None))
    verify_model(q_model(qtype, ("N", 8), (8,), axis=1))


@pytest.mark.parametrize("values,zp", [("int4", "uint4"), ("uint4", "int4"), ("int4", "int8"), ("uint8", "uint4")])
def test_4bit_values_and_zero_point_types_must_agree(values, zp):
    _rejects(dq_model(values, (3, 5), (), zp_qtype=zp), "quantized input and zero point differ in type", "dq",
             checker_first=True)


def test_4bit_zero_point_shape_must_match_scale():
    model = dq_model("int4", (3, 5), (5,), axis=1)
    model.graph.initializer[2].CopyFrom(make_initializer("z", np.zeros((3,), np.int8), "int4"))
    _rejects(model, "zero point shape \\[3\\] != scale shape \\[5\\]", "dq")


# ---------------------------------------------------------------------------------------------- block_size
@pytest.mark.parametrize("shape,axis,block", [((4, 40), 1, 16), ((4, 48), 1, 16), ((40, 6), 0, 32), ((70, 3), 0, 32),
                                              ((4, 10), 1, 16), ((2, 33, 3), 1, 16), ((3, 33), -1, 32), ((40,), 0, 16)])
@pytest.mark.parametrize("qtype", ["int4", "uint4", "int8"])
def test_blocked_scales_accepted(qtype, shape, axis, block):
    sshape = blocked_shape(shape, axis, block)
    verify_model(dq_model(qtype, shape, sshape, axis=axis, block_size=block))
    verify_model(dq_model(qtype, shape, sshape, zp_qtype=None, axis=axis, block_size=block))
    verify_model(q_model(qtype, shape, sshape, axis=axis, block_size=block))


def test_blocked_scale_with_a_symbolic_dimension_accepted():
    # the batch dimension is not a number: only the known ones are compared
    verify_model(q_model("int4", ("N", 40), (4, 3), axis=1, block_size=16))


@pytest.mark.parametrize("shape,scale_shape,axis,expected", [
    ((4, 40), (4, 2), 1, "\\[4, 3\\]"),       # too few blocks on the axis (40 / 16 -> 3)
    ((4, 40), (4, 4), 1, "\\[4, 3\\]"),       # too many
    ((4, 40), (3, 3), 1, "\\[4, 3\\]"),       # another dimension differs
    ((40, 6), (2, 6), 0, "\\[3, 6\\]"),
    ((40,), (2,), 0, "\\[3\\]"),
    ((2, 33, 3), (2, 2, 3), -2, "\\[2, 3, 3\\]"),
])
def test_blocked_scale_shape_rejected(shape, scale_shape, axis, expected):
    _rejects(dq_model("int4", shape, scale_shape, axis=axis, block_size=16),
             f"blocked scale shape .* does not fit input shape .* block_size 16: expected {expected}", "dq")


def test_blocked_scale_shape_of_a_graph_input_rejected():
    _rejects(q_model("uint4", (4, 40), (4, 2), axis=1, block_size=16), "expected \\[4, 3\\]", "q")
    _rejects(q_model("uint4", ("N", 40), (4, 2), axis=1, block_size=16), "expected \\[\\?, 3\\]", "q")


def test_blocked_scale_rank_must_be_the_input_rank():
    _rejects(dq_model("int4", (4, 40), (12,), axis=1, block_size=16), "blocked scale has rank 1, input has rank 2",
             "dq")
    _rejects(dq_model("int4", (4, 40), (1, 4, 3), axis=1, block_size=16), "blocked scale has rank 3", "dq")


@pytest.mark.parametrize("block", [-1, -16])
def test_block_size_must_be_positive(block):
    _rejects(dq_model("int4", (4, 40), (4, 3), axis=1, block_size=block), f"block_size must be > 0, not {block}", "dq")


@pytest.mark.parametrize("attrs", [{"axis": 1}, {"axis": 1, "block_size": 0}])
def test_scale_of_rank_above_one_needs_block_size(attrs):
    # block_size 0 is the ONNX default (not blocked): a 2-D scale is then neither per tensor nor per axis
    _rejects(dq_model("int4", (4, 40), (4, 3), **attrs), "scale of rank 2 needs a block_size attribute", "dq")
    verify_model(dq_model("int8", (4, 40), (40,), **attrs))  # block_size 0 with a per-axis scale is fine


def test_blocked_axis_must_be_in_range():
    _rejects(dq_model("int4", (4, 40), (4, 3), axis=2, block_size=16), "axis 2 out of range for rank 2", "dq")


def test_a_dequantize_scale_gathered_from_a_constant_table_is_checked_by_its_table():
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from qpass.errors import VerificationError
    from qpass.verify import verify_model

    def model(scale_values):
        nodes = [helper.make_node("Gather", ["Q", "ids"], ["q"]), helper.make_node("Gather", ["S", "ids"], ["s"]),
                 helper.make_node("DequantizeLinear", ["q", "s"], ["y"], name="dq", axis=-1, block_size=4)]
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N"])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                                  [numpy_helper.from_array(np.ones((3, 4), np.int8), "Q"),
                                   numpy_helper.from_array(np.asarray(scale_values, np.float32).reshape(3, 1), "S")])
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
        m.ir_version = 10
        return m

    verify_model(model([0.5, 1.0, 2.0]))
    with pytest.raises(VerificationError, match="finite and > 0"):
        verify_model(model([0.5, 0.0, 2.0]))
