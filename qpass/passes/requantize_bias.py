"""Bias of Conv/ConvTranspose/Gemm(DQ(x), DQ(W), b) given in float or on another grid => int32 DQ at s_x * s_w, zero point 0 (qpass's QDQ bias form).

An imported model may hold a float bias (PyTorch's QAT export), a bias behind its own 8-bit Q/DQ pair (which
rounds it far more coarsely than the accumulator it is added to), or an int32 bias at a scale that is not the
product of the input and weight scales. Integer operators add the bias to the int32 accumulator, so it must be
int32 at s_x * s_w: the bias's value (dequantized where it was quantized) is quantized so, as onnxruntime's
quantizer and qpass's InsertQDQ write it. A bias that would overflow int32 stays as it was, with the reason.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import NameAllocator, node_label
from ..ops import BIAS_OPS
from ..pass_manager import Pass, PassContext, PassResult, Skip
from ..qparams import int32_bias


def _dq(t: gs.Tensor) -> gs.Node | None:
    p = t.inputs[0] if isinstance(t, gs.Variable) and len(t.inputs) == 1 else None
    return p if p is not None and p.op == "DequantizeLinear" else None


def _constants(dq: gs.Node) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    q, s = dq.inputs[0], dq.inputs[1]
    z = dq.inputs[2] if len(dq.inputs) > 2 and dq.inputs[2].name else None
    if not (isinstance(q, gs.Constant) and isinstance(s, gs.Constant)) or (z is not None and not isinstance(z, gs.Constant)):
        return None
    zero = np.asarray(z.values) if z is not None else np.zeros((), np.asarray(q.values).dtype)
    return np.asarray(q.values), np.asarray(s.values, dtype=np.float32), zero


def dequantized(dq: gs.Node, values: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    q, s, z = values
    if s.size > 1:
        shape = [1] * q.ndim
        shape[int(dq.attrs.get("axis", 1)) % q.ndim] = s.size
        s, z = s.reshape(shape), z.reshape(shape)
    return ((q.astype(np.float32) - z.astype(np.float32)) * s).astype(np.float32)


class RequantizeBias(Pass):
    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        names = NameAllocator(graph)
        done = {"float": 0, "requantized": 0}
        skipped: list[Skip] = []
        for node in list(graph.nodes):
            if node.op not in BIAS_OPS or len(node.inputs) < 3 or not node.inputs[2].name:
                continue
            xdq, wdq = _dq(node.inputs[0]), _dq(node.inputs[1])
            x = _constants_scale(xdq)
            w = _constants(wdq) if wdq is not None else None
            if x is None or w is None or x.size != 1:
                continue  # not an (activation, constant weight) Q/DQ node unit: nothing to align the bias with
            b = node.inputs[2]
            bdq = _dq(b)
            if isinstance(b, gs.Constant):
                value, kind = np.asarray(b.values, dtype=np.float32), "float"
            elif bdq is not None and _constants(bdq) is not None:
                got = _constants(bdq)
                value, kind = dequantized(bdq, got), "requantized"
            else:
                continue
            if value.ndim != 1:
                skipped.append(Skip(node_label(node), node.op, f"bias of rank {value.ndim} left as it was"))
                continue
            result = int32_bias(value, x.reshape(()), w[1], axis=0)
            if isinstance(result, str):
                skipped.append(Skip(node_label(node), node.op, result))
                continue
            q, scale, axis = result
            if kind == "requantized":
                old_q, old_s, old_z = got
                if old_q.dtype == np.int32 and not np.any(old_z) and old_s.shape == scale.shape and \
                        np.array_equal(old_s, scale) and np.array_equal(old_q, q):
                    continue  # already qpass's form
                skipped.append(Skip(node_label(node), node.op,
                                    f"bias Q/DQ ({old_q.dtype}, scale {float(np.max(old_s)):.3g}) replaced by int32 at "
                                    "input scale x weight scale"))
            base = b.name if isinstance(b, gs.Constant) else (bdq.inputs[0].name or node_label(node))
            attrs = {"axis": int(axis)} if axis is not None else {}
            out = gs.Variable(names(f"{base}_dequantized"), dtype=np.float32, shape=list(value.shape))
            graph.nodes.append(gs.Node("DequantizeLinear", names(f"{base}_DequantizeLinear"), attrs=attrs, inputs=[
                gs.Constant(names(f"{base}_int32"), q), gs.Constant(names(f"{base}_scale"), scale),
                gs.Constant(names(f"{base}_zero_point"), np.zeros(scale.shape, np.int32))], outputs=[out]))
            node.inputs[2] = out
            done[kind] += 1
        stats = {k: v for k, v in done.items() if v}
        if stats:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(modified=bool(stats), skipped=tuple(skipped), stats=stats)


def _constants_scale(dq: gs.Node | None) -> np.ndarray | None:
    """The (constant) scale of an activation's DequantizeLinear."""
    if dq is None or len(dq.inputs) < 2 or not isinstance(dq.inputs[1], gs.Constant):
        return None
    return np.asarray(dq.inputs[1].values, dtype=np.float32)
