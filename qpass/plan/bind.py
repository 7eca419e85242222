"""bind: a QuantPlan's node and tensor names -> the graph's nodes and tensors, overrides applied, for the rewrite passes."""
from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from ..errors import PlanError
from ..graph import node_label
from ..pass_manager import Skip
from .spec import QSpec, QuantPlan
from .targets import Target


@dataclass
class BoundTensor:
    name: str
    spec: QSpec
    range_of: str
    #: None: every reader gets the dequantized value; else only these nodes (by id)
    consumers: set[int] | None


@dataclass
class BoundPlan:
    targets: list[Target]
    tensors: list[BoundTensor]
    skips: list[Skip]


def bind(plan: QuantPlan, graph: gs.Graph) -> BoundPlan:
    """The plan (its overrides applied) on ``graph``; a name the graph lacks raises :class:`PlanError`."""
    plan = plan.with_overrides()
    nodes = {node_label(n): n for n in graph.nodes}
    graph_tensors = graph.tensors()

    def find(label: str, what: str) -> gs.Node:
        node = nodes.get(label)
        if node is None:
            raise PlanError(f"{what} '{label}' is not a node of this model", subject="plan",
                            hint="the plan was made for another model, or for this one before other preparation")
        return node

    targets = []
    for np_ in plan.nodes:
        node = find(np_.node, "node")
        if node.op != np_.op_type:
            raise PlanError(f"node '{np_.node}' is a {node.op}, the plan says {np_.op_type}", subject="plan")
        t = Target(node, activations=list(np_.activations), notes=list(np_.notes))
        if np_.weight is not None:
            w = np_.weight
            if w.input >= len(node.inputs) or node.inputs[w.input].name != w.tensor:
                raise PlanError(f"node '{np_.node}' has no weight '{w.tensor}' at input {w.input}", subject="plan")
            t.weight, t.weight_spec = w.input, w.spec
            t.weight_axis = w.spec.axis if w.spec.granularity == "channel" else None
        if np_.bias is not None:
            b = np_.bias
            if b.input >= len(node.inputs) or node.inputs[b.input].name != b.tensor:
                raise PlanError(f"node '{np_.node}' has no bias '{b.tensor}' at input {b.input}", subject="plan")
            t.bias, t.bias_axis, t.bias_dtype = b.input, b.axis, b.dtype
        targets.append(t)
    tensors = []
    for tp in plan.tensors.values():
        if tp.name not in graph_tensors:
            raise PlanError(f"tensor '{tp.name}' is not in this model", subject="plan",
                            hint="the plan was made for another model")
        consumers = None if tp.readers is None else {id(find(r, f"reader of '{tp.name}'")) for r in tp.readers}
        tensors.append(BoundTensor(tp.name, tp.spec, tp.range_of, consumers))
    return BoundPlan(targets, tensors, list(plan.skipped))
