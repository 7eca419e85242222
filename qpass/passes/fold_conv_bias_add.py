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


def _conv_and_constant_after(conv: gs.Node, op: str, outputs: set[str]) -> tuple[gs.Node, gs.Constant, np.ndarray] | None:
    """(the ``op`` node, the Conv's weight, the per-channel values of the op's constant) when ``conv``'s output is read
    only by an ``op`` (Add or Mul) of it and a constant with one value per channel (or one value), the Conv's weight is
    a float32 constant, its bias (if any) a constant and its output not a graph output; None otherwise."""
    if not conv.outputs or (len(conv.inputs) > 2 and conv.inputs[2].name and not isinstance(conv.inputs[2], gs.Constant)):
        return None
    y = conv.outputs[0]
    w = conv.inputs[1] if len(conv.inputs) > 1 else None
    if y.name in outputs or len(y.outputs) != 1 or not isinstance(w, gs.Constant) or not is_float32(w):
        return None
    node = y.outputs[0]
    if node.op != op or not is_onnx_op(node) or len(node.inputs) != 2 or len(node.outputs) != 1:
        return None
    other = node.inputs[1] if node.inputs[0] is y else node.inputs[0]
    other = None if other is y else constant_behind(other)  # an initializer, a Constant node, a reshaped constant
    if other is None:
        return None
    shape = np.asarray(w.values).shape  # the Conv output's rank equals the weight's
    values = channel_values(other, len(shape), int(shape[0]))
    return None if values is None or not np.all(np.isfinite(values)) else (node, w, values)


class FoldAfterConv(Pass):
    """A Conv whose output only ``op`` (with a per-channel constant) reads takes the op into its weight and bias
    (:meth:`fold`); the op's output becomes the Conv's."""

    op = ""

    def fold(self, conv: gs.Node, w: gs.Constant, values: np.ndarray, new_name: NameAllocator) -> bool:
        """Rewrite ``conv``'s weight and bias to include the op with ``values``; False: leave it."""
        raise NotImplementedError

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        new_name = NameAllocator(graph)
        outputs = {t.name for t in graph.outputs}
        folded = 0
        for conv in [n for n in graph.nodes if n.op == "Conv" and is_onnx_op(n)]:
            found = _conv_and_constant_after(conv, self.op, outputs)
            if found is None or not self.fold(conv, found[1], found[2], new_name):
                continue
            node = found[0]
            conv.outputs[0] = node.outputs[0]
            node.inputs.clear()
            node.outputs.clear()
            folded += 1
        if folded:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(modified=bool(folded), stats={self.op: folded} if folded else {})


class FoldConvBiasAdd(FoldAfterConv):
    op = "Add"

    def fold(self, conv: gs.Node, w: gs.Constant, values: np.ndarray, new_name: NameAllocator) -> bool:
        has_bias = len(conv.inputs) > 2 and conv.inputs[2].name
        old = np.asarray(conv.inputs[2].values, dtype=np.float32) if has_bias else np.zeros(len(values), np.float32)
        bias = gs.Constant(new_name(f"{conv.name or w.name}_bias"), (old + values).astype(np.float32))
        if has_bias:
            conv.inputs[2] = bias
        else:
            conv.inputs.append(bias)
        return True
