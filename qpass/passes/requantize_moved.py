"""Op(move(DQ(q; s, z)), DQ(W)) => Op(DQ(Q(move(...); s, z)), DQ(W)): a compute node reading a dequantized value through data movement gets that value's Q/DQ pair.

Exporters put one Q/DQ pair on a tensor and let the data movement after it (MaxPool, Flatten, Reshape, ...)
run in float: PyTorch's QAT export writes ``DQ -> MaxPool -> Flatten -> Gemm``. Data movement only moves or
selects values, so its output still lies on the DQ's grid and a pair with the same scale and zero point changes
no value; with it the compute node is a (DQ activation, DQ weight) unit, which the integer-operator lowering
reads (onnxruntime's QDQ transformer reasons the same way).
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import NameAllocator
from ..pass_manager import Pass, PassContext, PassResult

#: single-input ops whose every output value is one of their input values
MOVES = frozenset({"MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Slice",
                   "Gather", "Expand", "Tile", "SpaceToDepth", "DepthToSpace"})
COMPUTE = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def _producer(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if isinstance(t, gs.Variable) and len(t.inputs) == 1 else None


def moved_dq(t: gs.Tensor) -> gs.Node | None:
    """The per-tensor DequantizeLinear that ``t`` is data movement of (through at least one move), if any."""
    p, steps = _producer(t), 0
    while p is not None and p.op in MOVES and (p.op != "MaxPool" or len(p.outputs) == 1):
        p, steps = _producer(p.inputs[0]), steps + 1
    if p is None or p.op != "DequantizeLinear" or steps == 0:
        return None
    scale = p.inputs[1]
    zp = p.inputs[2] if len(p.inputs) > 2 and p.inputs[2].name else None
    if not isinstance(scale, gs.Constant) or np.size(scale.values) != 1 or (zp is not None and not isinstance(zp, gs.Constant)):
        return None
    return p


class RequantizeMoved(Pass):
    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        names = NameAllocator(graph)
        made: dict[str, gs.Variable] = {}
        for node in list(graph.nodes):
            if node.op not in COMPUTE or len(node.inputs) < 2:
                continue
            w = _producer(node.inputs[1])
            if w is None or w.op != "DequantizeLinear" or not isinstance(w.inputs[0], gs.Constant):
                continue
            x = node.inputs[0]
            dq = moved_dq(x)
            if dq is None:
                continue
            if x.name not in made:
                params = dq.inputs[1:3] if len(dq.inputs) > 2 and dq.inputs[2].name else dq.inputs[1:2]
                zdtype = np.asarray(params[1].values).dtype if len(params) > 1 else np.uint8
                q = gs.Variable(names(f"{x.name}_quantized"), dtype=zdtype, shape=x.shape)
                y = gs.Variable(names(f"{x.name}_dequantized"), dtype=np.float32, shape=x.shape)
                graph.nodes.append(gs.Node("QuantizeLinear", names(f"{x.name}_QuantizeLinear"), inputs=[x, *params],
                                           outputs=[q]))
                graph.nodes.append(gs.Node("DequantizeLinear", names(f"{x.name}_DequantizeLinear"), inputs=[q, *params],
                                           outputs=[y]))
                made[x.name] = y
            node.inputs[0] = made[x.name]
        if made:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(modified=bool(made), stats={"pairs": len(made)} if made else {})
