"""DQ(q; s, z) -> Q(s, z) -> DQ(s, z) => DQ(q; s, z): a second Q/DQ pair with the first one's scale, zero point and axis is dropped.

Quantizing a dequantized value again on the grid it came from gives back the same integers, so a duplicated
pair (two fake-quantize modules in a row, a tool that inserts a pair where one is already present) changes no
value: its readers read the first pair's output. A pair with other parameters is a requantization and stays.
"""
from __future__ import annotations

import onnx_graphsurgeon as gs

from ..graph import node_label, qdq_constants
from ..pass_manager import Pass, PassContext, PassResult, Skip


def _params(node: gs.Node) -> tuple | None:
    """(scale bytes, scale shape, zero point bytes, zero point dtype, axis) of a Q/DQ whose parameters are constants."""
    got = qdq_constants(node)
    if got is None:
        return None
    s, z = got
    axis = node.attrs.get("axis", 1) if s.size > 1 else None
    return s.tobytes(), s.shape, z.tobytes(), str(z.dtype), axis


class DropDuplicateQDQ(Pass):
    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        outputs = {t.name for t in graph.outputs}
        dropped = 0
        skipped: list[Skip] = []
        for q in list(graph.nodes):
            if q.op != "QuantizeLinear" or not q.inputs or not isinstance(q.inputs[0], gs.Variable):
                continue
            src = q.inputs[0].inputs[0] if len(q.inputs[0].inputs) == 1 else None
            if src is None or src.op != "DequantizeLinear":
                continue
            first = _params(src)
            if first is None or first != _params(q):
                continue
            dqs = [n for n in q.outputs[0].outputs if n.op == "DequantizeLinear" and _params(n) == first]
            for dq in dqs:
                y = dq.outputs[0]
                if y.name in outputs:
                    skipped.append(Skip(node_label(dq), dq.op, "duplicated Q/DQ pair on a graph output; kept"))
                    continue
                for reader in list(y.outputs):
                    for i, t in enumerate(reader.inputs):
                        if t is y:
                            reader.inputs[i] = src.outputs[0]
                dropped += 1
        if dropped:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(modified=bool(dropped), skipped=tuple(skipped), stats={"dropped": dropped} if dropped else {})
