"""Dead nodes and tensors removed, nodes topologically sorted (subgraphs untouched otherwise)."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from ..pass_manager import Pass, PassContext, PassResult


def _signature(graph: gs.Graph) -> tuple:
    return tuple((n.op, tuple(t.name for t in n.inputs), tuple(t.name for t in n.outputs)) for n in graph.nodes)


class Cleanup(Pass):
    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        before = _signature(graph)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(modified=_signature(graph) != before)
