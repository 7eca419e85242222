"""ConstantsToInitializers inside bodies: a branch's (or a Loop body's) Constant weights become its initializers."""
from __future__ import annotations

import numpy as np

from qpass.graph import WorkingGraph
from qpass.pass_manager import PassContext
from qpass.passes.constants_to_initializers import ConstantsToInitializers
from qpass.runtime import make_session
from qpass.verify import verify_model

from ..subgraph_models import digits_in_if, matmul_in_loop


def _branch(model, attr):
    return next(a.g for a in model.graph.node[0].attribute if a.name == attr)


def test_branch_constants_become_branch_initializers_once_and_compute_the_same():
    model = digits_in_if()
    wg = WorkingGraph(model)
    result = ConstantsToInitializers().run(wg.graph, PassContext())
    assert result.modified and result.stats == {"Conv": 4, "Gemm": 4}  # the else branch's 2 Conv + 2 Gemm, W and B
    out = wg.export()
    verify_model(out)
    other = _branch(out, "else_branch")
    assert len(other.initializer) == 8 and [n.op_type for n in other.node].count("Constant") == 1
    assert {t.name for t in out.graph.initializer} == {t.name for t in model.graph.initializer}  # then reads these
    assert not ConstantsToInitializers().run(wg.graph, PassContext()).modified
    x = np.random.default_rng(0).random((3, 1, 8, 8), np.float32)
    for flag in (True, False):
        feed = {"input": x, "flag": np.array(flag)}
        np.testing.assert_array_equal(make_session(out).run(None, feed)[0], make_session(model).run(None, feed)[0])


def test_a_loop_body_constant_weight_becomes_a_body_initializer():
    wg = WorkingGraph(matmul_in_loop())
    assert ConstantsToInitializers().run(wg.graph, PassContext()).stats == {"MatMul": 1}
    body = wg.export().graph.node[0].attribute[0].g
    assert [n.op_type for n in body.node] == ["Identity", "MatMul"] and len(body.initializer) == 1
