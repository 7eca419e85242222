"""bind: a QuantPlan's node and tensor names -> the graph's nodes and tensors, overrides applied, for the rewrite passes."""
from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from ..errors import PlanError
from ..graph import scopes
from ..pass_manager import Skip
from .spec import QSpec, QuantPlan
from .targets import Target, output_channel_axis


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


def _check_weight_axis(node: gs.Node, w: gs.Constant, spec: QSpec, where: str) -> None:
    """A per-channel weight scale sits on the node's output channels (its int32 bias scale is per output channel
    too); a block axis is one of the weight's axes."""
    rank = len(w.shape)
    if spec.granularity == "channel":
        expected, why = output_channel_axis(node, rank)
        if spec.axis != expected:
            raise PlanError(f"per-channel weight scales of this {node.op} go on axis {expected} (its output channels), "
                            f"the plan says {spec.axis}" if expected is not None else
                            f"per-channel weight scales are not possible here: {why or 'no output-channel axis'}",
                            subject=where, hint="use granularity 'tensor'" if expected is None else None)
    elif spec.granularity == "block" and not 0 <= spec.axis < rank:
        raise PlanError(f"block axis {spec.axis} is not an axis of the rank-{rank} weight", subject=where)


def bind(plan: QuantPlan, graph: gs.Graph) -> BoundPlan:
    """The plan (its overrides applied) on ``graph``; a name the graph lacks raises :class:`PlanError`."""
    plan = plan.with_overrides()
    nodes = {s.label(n): n for s in scopes(graph) for n in s.graph.nodes}
    graph_tensors = dict(graph.tensors())
    for s in scopes(graph)[1:]:  # tensors of the bodies (a branch's own values)
        for name, t in s.graph.tensors().items():
            graph_tensors.setdefault(name, t)

    def find(label: str, what: str) -> gs.Node:
        node = nodes.get(label)
        if node is None:
            raise PlanError(f"{what} '{label}' is not a node of this model", subject="plan",
                            hint="the plan was made for another model, or for this one before other preparation")
        return node

    targets, seen = [], set()
    for np_ in plan.nodes:
        node = find(np_.node, "node")
        where = f"plan: node '{np_.node}'"
        if np_.node in seen:
            raise PlanError("is listed twice", subject=where)
        seen.add(np_.node)
        if node.op != np_.op_type:
            raise PlanError(f"is a {node.op}, the plan says {np_.op_type}", subject=where)
        for i in np_.activations:
            if not 0 <= i < len(node.inputs) or not isinstance(node.inputs[i], gs.Variable):
                raise PlanError(f"activation input {i} is not a variable input of this {node.op}", subject=where)
        t = Target(node, activations=list(np_.activations), notes=list(np_.notes), label=np_.node)
        if np_.weight is not None:
            w = np_.weight
            if not 0 <= w.input < len(node.inputs) or node.inputs[w.input].name != w.tensor or not isinstance(
                    node.inputs[w.input], gs.Constant):
                raise PlanError(f"has no constant weight '{w.tensor}' at input {w.input}", subject=where)
            _check_weight_axis(node, node.inputs[w.input], w.spec, where)
            t.weight, t.weight_spec = w.input, w.spec
            t.weight_axis = w.spec.axis if w.spec.granularity == "channel" else None
        if np_.bias is not None:
            b = np_.bias
            if not 0 <= b.input < len(node.inputs) or node.inputs[b.input].name != b.tensor:
                raise PlanError(f"has no bias '{b.tensor}' at input {b.input}", subject=where)
            rank = len(node.inputs[b.input].shape or ())
            if b.axis not in (None, -1) and not 0 <= b.axis < max(rank, 1):
                raise PlanError(f"bias axis {b.axis} is not an axis of '{b.tensor}' (rank {rank})", subject=where)
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
