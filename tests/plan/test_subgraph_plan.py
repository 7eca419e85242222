"""Planning inside bodies: If branch targets with labels that say where they live, Loop bodies skipped with a reason."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from qpass import QuantConfig
from qpass.graph import WorkingGraph
from qpass.plan.bind import bind
from qpass.plan.policy import build_plan
from qpass.plan.spec import QuantPlan
from qpass.stages import plan, prepare

from ..subgraph_models import digits_in_if, matmul_in_loop, matmul_in_scan, nested_if


def _plan(model) -> QuantPlan:
    return plan(prepare(model))


def test_nested_labels_are_unique_and_say_where_the_node_lives():
    p = _plan(nested_if()[0])
    assert [n.node for n in p.nodes] == ["If_0/then/If_1/then/mm", "If_0/then/If_1/else/mm", "If_0/else/mm"]
    assert all(n.weight is not None and n.weight.spec.granularity == "channel" for n in p.nodes)
    # each branch's MatMul input is the outer x, read inside three different graphs: one tensor, readers merged
    assert p.tensors["x"].readers == ("If_0/then/If_1/then/mm", "If_0/then/If_1/else/mm", "If_0/else/mm")


def test_the_plan_of_nested_nodes_is_stable_and_round_trips_through_json():
    first, second = _plan(digits_in_if()), _plan(digits_in_if())
    assert first.to_dict() == second.to_dict()
    labels = [n.node for n in first.nodes]
    assert len(labels) == len(set(labels)) == 8
    assert labels[:2] == ["If_0/then//0/Conv", "If_0/then//2/Conv"] and labels[4] == "If_0/else//0/Conv"
    loaded = QuantPlan.from_json(first.to_json())
    assert loaded.to_dict() == first.to_dict()
    wg = WorkingGraph(prepare(digits_in_if()).model)
    bound = bind(loaded, wg.graph)
    assert [t.label for t in bound.targets] == labels
    assert all(t.node.op in ("Conv", "Gemm") for t in bound.targets)


def test_constant_weights_in_a_branch_become_initializers_of_that_branch():
    prepared = prepare(digits_in_if())
    node = prepared.model.graph.node[0]
    other = next(a.g for a in node.attribute if a.name == "else_branch")
    weights = {t.name for t in other.initializer}
    assert len(weights) == 8  # 4 weights and 4 biases of the else branch, now its initializers
    assert [n.op_type for n in other.node].count("Constant") == 1  # the input scale (not a weight) stays


def test_loop_and_scan_bodies_are_planned_with_their_labels():
    loop = _plan(matmul_in_loop())
    assert [n.node for n in loop.nodes] == ["Loop_0/body/mm"]
    assert loop.tensors["v_in"].readers == ("Loop_0/body/mm",)  # a body input, quantized inside the body
    scan = _plan(matmul_in_scan()[0])
    assert [n.node for n in scan.nodes] == ["Scan_0/body/mm"]
    assert set(scan.tensors) >= {"x_t"}


def test_a_top_level_graph_plans_as_before_when_there_are_no_bodies():
    from ..builders import conv_model

    wg = WorkingGraph(conv_model())
    p = build_plan(wg.graph, QuantConfig())
    assert [n.node for n in p.nodes] == ["conv"]
    assert isinstance(wg.graph, gs.Graph)
