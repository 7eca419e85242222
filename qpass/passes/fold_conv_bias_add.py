"""Conv(x, W[, b]) -> Add(c) with c a per-channel constant => Conv(x, W, b + c).

Exporters such as Paddle's write the Conv bias as a separate Add. Folded, the bias is quantized to
int32 with the Conv and the Conv's output (the tensor after the bias) is the one quantized, so the
runtime can fuse DQ -> Conv -> Q. Only a constant whose non-unit dimension is the channel axis
((C,1,1), (1,C,1,1) and the like, never a (C,) that would broadcast along the last axis).
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import NameAllocator, constant_behind, is_float32, is_onnx_op
from ..pass_manager import Pass, PassContext, PassResult


def channel_values(c: gs.Constant, out_rank: int, channels: int) -> np.ndarray | None:
    v = np.asarray(c.values)
    if v.dtype != np.float32 or v.ndim > out_rank:
        return None
    shape = (1,) * (out_rank - v.ndim) + tuple(v.shape)  # numpy broadcasting aligns on the right
    if v.size == 1:
        return np.full(channels, float(v.reshape(())), dtype=np.float32)
    if shape[1] == channels and all(d == 1 for i, d in enumerate(shape) if i != 1):
        return v.reshape(channels).astype(np.float32)
    return None


class FoldConvBiasAdd(Pass):
    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        new_name = NameAllocator(graph)
        outputs = {t.name for t in graph.outputs}
        folded = 0
        for conv in [n for n in graph.nodes if n.op == "Conv" and is_onnx_op(n)]:
            if not conv.outputs:
                continue
            y = conv.outputs[0]
            w = conv.inputs[1] if len(conv.inputs) > 1 else None
            if y.name in outputs or len(y.outputs) != 1 or not isinstance(w, gs.Constant) or not is_float32(w):
                continue
            add = y.outputs[0]
            if add.op != "Add" or not is_onnx_op(add) or len(add.inputs) != 2 or len(add.outputs) != 1:
                continue
            other = add.inputs[1] if add.inputs[0] is y else add.inputs[0]
            other = None if other is y else constant_behind(other)  # an initializer or a Constant node
            if other is None:
                continue
            channels = int(np.asarray(w.values).shape[0])
            rank = len(np.asarray(w.values).shape)  # conv output rank equals weight rank
            values = channel_values(other, rank, channels)
            if values is None:
                continue
            has_bias = len(conv.inputs) > 2 and conv.inputs[2].name
            if has_bias and not isinstance(conv.inputs[2], gs.Constant):
                continue
            old = np.asarray(conv.inputs[2].values, dtype=np.float32) if has_bias else np.zeros(channels, np.float32)
            bias = gs.Constant(new_name(f"{conv.name or w.name}_bias"), (old + values).astype(np.float32))
            if has_bias:
                conv.inputs[2] = bias
            else:
                conv.inputs.append(bias)
            conv.outputs[0] = add.outputs[0]
            add.inputs.clear()
            add.outputs.clear()
            folded += 1
        if folded:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(modified=bool(folded), stats={"Add": folded} if folded else {})
