"""The verifier walks If branches: Q/DQ rules hold there, with scales of the branch or of an enclosing graph."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qpass.errors import VerificationError
from qpass.verify import verify_model


def _if_model(*, scale_in_branch: bool, scale_value: float = 0.5) -> onnx.ModelProto:
    """flag -> If: then DequantizeLinear(q (int8, in the branch), s) -> y; else Identity(x); s in the branch or the
    main graph."""
    q = numpy_helper.from_array(np.arange(-3, 3, dtype=np.int8), "q")
    s = numpy_helper.from_array(np.array(scale_value, np.float32), "s")
    z = numpy_helper.from_array(np.array(0, np.int8), "z")
    then = helper.make_graph([helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y_then"], name="dq")], "then",
                             [], [helper.make_tensor_value_info("y_then", TensorProto.FLOAT, [6])],
                             initializer=[q, z] + ([s] if scale_in_branch else []))
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["y_else"], name="id")], "else", [],
                              [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, [6])])
    graph = helper.make_graph([helper.make_node("If", ["flag"], ["y"], name="If_0", then_branch=then,
                                                else_branch=other)], "g",
                              [helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
                               helper.make_tensor_value_info("x", TensorProto.FLOAT, [6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [6])],
                              initializer=[] if scale_in_branch else [s])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("scale_in_branch", [True, False])
def test_a_branch_dq_with_a_constant_scale_of_its_own_or_outer_graph_passes(scale_in_branch):
    verify_model(_if_model(scale_in_branch=scale_in_branch))


@pytest.mark.parametrize("scale_in_branch", [True, False])
def test_a_bad_scale_inside_a_branch_is_found_and_named(scale_in_branch):
    with pytest.raises(VerificationError, match="scale must be finite and > 0") as err:
        verify_model(_if_model(scale_in_branch=scale_in_branch, scale_value=0.0))
    assert "If_0/then_branch: dq" in str(err.value)


def test_a_duplicate_node_name_inside_a_branch_is_found():
    model = _if_model(scale_in_branch=True)
    then = model.graph.node[0].attribute[0].g if model.graph.node[0].attribute[0].name == "then_branch" else \
        model.graph.node[0].attribute[1].g
    then.node.append(helper.make_node("Identity", ["y_then"], ["y2"], name="dq"))
    with pytest.raises(VerificationError, match="duplicate node name"):
        verify_model(model)
