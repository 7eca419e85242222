"""QDQ -> integer operators (format "qop"), standard ONNX only.

* ``Conv(DQ(xq), DQ(wq), DQ(bq)) [-> Relu] -> Q(y)``  =>  ``QLinearConv(xq, sx, zx, wq, sw, zw, sy, zy, bq)``
  (a Relu between is dropped when the output zero point is the integer minimum, so it clips nothing);
* ``MatMul(DQ(xq), DQ(wq)) -> Q(y)``  =>  ``QLinearMatMul(xq, sx, zx, wq, sw, zw, sy, zy)``;
* ``MatMul(DQ(xq), DQ(wq)) [-> Add(bias)]``  =>  ``MatMulInteger(xq, wq, zx, 0) [-> Add(int32 bias / (sx*sw))] -> Cast(float) -> Mul(sx*sw)``;
* ``Gemm(DQ(xq), DQ(wq), DQ(bq))``  =>  the same integer sequence on the (pre-transposed) int8 weight, ``alpha``
  folded into the scale, and ``beta * bias`` added in int32 when it is the int32 bias (else in float);
* ``Conv`` without an output Q  =>  ``ConvInteger(xq, wq, zx, zw) [-> Add(int32 bias)] -> Cast -> Mul(sx*sw)``.

Weights keep their per-channel scales (weight zero points are 0: symmetric). Anything else stays in
QDQ form with a recorded reason.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import NameAllocator, node_label
from ..ops import INTEGER_KERNELS
from ..pass_manager import Pass, PassContext, PassResult, Skip


def _producer(t: gs.Tensor, op: str) -> gs.Node | None:
    p = t.inputs[0] if isinstance(t, gs.Variable) and len(t.inputs) == 1 else None
    return p if p is not None and p.op == op else None


def _const(t: gs.Tensor) -> np.ndarray | None:
    return np.asarray(t.values) if isinstance(t, gs.Constant) else None


class _DQ:
    """A DequantizeLinear feeding a compute op: its integer input, scale, zero point and axis."""

    def __init__(self, node: gs.Node):
        self.node = node
        self.q = node.inputs[0]
        self.scale = node.inputs[1]
        self.zp = node.inputs[2] if len(node.inputs) > 2 else None
        self.axis = node.attrs.get("axis")

    @property
    def scale_value(self) -> np.ndarray:
        return np.asarray(self.scale.values, dtype=np.float32)


class LowerToQOperator(Pass):
    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        self._graph = graph
        self._names = NameAllocator(graph)
        done: Counter = Counter()
        skipped: list[Skip] = []
        outputs = {t.name for t in graph.outputs}
        for node in list(graph.nodes):
            if node.op == "ConvTranspose" and any(_producer(t, "DequantizeLinear") for t in node.inputs[:2]):
                skipped.append(Skip(node_label(node), node.op, "standard ONNX has no integer ConvTranspose; kept as QDQ"))
                continue
            if node.op not in INTEGER_KERNELS or not node.outputs:
                continue
            dqs = [_producer(t, "DequantizeLinear") for t in node.inputs[:2]]
            if not all(dqs):
                continue
            x, w = _DQ(dqs[0]), _DQ(dqs[1])
            if _const(w.q) is None or isinstance(x.q, gs.Constant) or x.scale_value.size != 1:
                skipped.append(Skip(node_label(node), node.op, "inputs are not (activation, constant weight) Q/DQ; kept as QDQ"))
                continue
            bias = None
            if len(node.inputs) > 2 and node.inputs[2].name:
                bdq = _producer(node.inputs[2], "DequantizeLinear")
                bias = _DQ(bdq) if bdq is not None and _const(bdq.inputs[0]) is not None else None
                if bias is None and node.op == "Conv":
                    skipped.append(Skip(node_label(node), node.op, "float bias; kept as QDQ"))
                    continue
            kind = self._lower(node, x, w, bias, outputs)
            if kind:
                done[kind] += 1
            else:
                skipped.append(Skip(node_label(node), node.op, "pattern not supported by the qop lowering; kept as QDQ"))
        if done:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(modified=bool(done), skipped=tuple(skipped), stats=dict(done))

    # ------------------------------------------------------------------ helpers
    def _const_node(self, base: str, value: np.ndarray) -> gs.Constant:
        return gs.Constant(self._names(base), np.asarray(value))

    def _var(self, base: str, dtype) -> gs.Variable:
        return gs.Variable(self._names(base), dtype=dtype)

    def _add(self, op: str, base: str, inputs, outputs, **attrs) -> None:
        self._graph.nodes.append(gs.Node(op, self._names(base), attrs=attrs, inputs=inputs, outputs=outputs))

    def _output_q(self, node: gs.Node, outputs: set[str]) -> tuple[gs.Node | None, gs.Node | None]:
        """The QuantizeLinear reading the node's output (through a dropped Relu), and that Relu."""
        y = node.outputs[0]
        if y.name in outputs or len(y.outputs) != 1:
            return None, None
        nxt = y.outputs[0]
        relu = None
        if nxt.op == "Relu" and nxt.outputs[0].name not in outputs and len(nxt.outputs[0].outputs) == 1:
            relu, nxt = nxt, nxt.outputs[0].outputs[0]
        if nxt.op != "QuantizeLinear" or (len(nxt.inputs) > 2 and _const(nxt.inputs[2]) is None):
            return None, None
        if relu is not None:
            zp = _const(nxt.inputs[2]) if len(nxt.inputs) > 2 else np.zeros((), np.uint8)
            if zp.size != 1 or int(zp) != np.iinfo(zp.dtype).min:
                return None, None  # the Relu would clip values the output can represent
        return nxt, relu

    # ------------------------------------------------------------------ rewrites
    def _lower(self, node: gs.Node, x: _DQ, w: _DQ, bias: _DQ | None, outputs: set[str]) -> str | None:
        if node.op == "Gemm" and (int(node.attrs.get("transA", 0)) or len(_const(w.q).shape) != 2):
            return None
        q_out, relu = self._output_q(node, outputs)
        if node.op == "Conv" and q_out is not None:
            zp_x = x.zp if x.zp is not None else self._const_node("zx", np.zeros((), np.uint8))
            zp_w = w.zp if w.zp is not None else self._const_node("zw", np.zeros(w.scale_value.shape, np.int8))
            zp_y = q_out.inputs[2] if len(q_out.inputs) > 2 else self._const_node("zy", np.zeros((), np.uint8))
            ins = [x.q, x.scale, zp_x, w.q, w.scale, zp_w, q_out.inputs[1], zp_y]
            if bias is not None:
                ins.append(bias.q)
            self._add("QLinearConv", f"{node.name or 'conv'}_quant", ins, [q_out.outputs[0]], **node.attrs)
            self._detach(node, relu, q_out)
            return "QLinearConv"
        if node.op == "MatMul" and q_out is not None and relu is None and np.asarray(w.q.values).ndim == 2:
            zp_x = x.zp if x.zp is not None else self._const_node("zx", np.zeros((), np.uint8))
            zp_w = w.zp if w.zp is not None else self._const_node("zw", np.zeros(w.scale_value.shape, np.int8))
            zp_y = q_out.inputs[2] if len(q_out.inputs) > 2 else self._const_node("zy", np.zeros((), np.uint8))
            self._add("QLinearMatMul", f"{node.name or 'matmul'}_quant",
                      [x.q, x.scale, zp_x, w.q, w.scale, zp_w, q_out.inputs[1], zp_y], [q_out.outputs[0]])
            self._detach(node, None, q_out)
            return "QLinearMatMul"
        return self._integer_sequence(node, x, w, bias)

    def _detach(self, *nodes: gs.Node | None) -> None:
        for n in nodes:
            if n is not None:
                n.inputs.clear()
                n.outputs.clear()

    def _integer_sequence(self, node: gs.Node, x: _DQ, w: _DQ, bias: _DQ | None) -> str | None:
        """(Conv|MatMul)Integer -> [+ int32 bias] -> Cast -> Mul(sx*sw) [-> float bias], writing the node's output."""
        wq = np.asarray(w.q.values)
        sw = w.scale_value
        sx = float(x.scale_value.reshape(()))
        zp_x = x.zp if x.zp is not None else self._const_node("zx", np.zeros((), np.uint8))
        y = node.outputs[0]
        base = node.name or node.op.lower()
        float_bias = None
        if node.op == "Conv":
            op, m = "ConvInteger", wq.shape[0]
            shape = (1, m) + (1,) * (wq.ndim - 2)
            w_in = w.q
            attrs = dict(node.attrs)
        else:
            attrs = {}
            if node.op == "Gemm":
                if int(node.attrs.get("transB", 0)):
                    wq = wq.T  # [N, K] -> [K, N]: the per-channel scale now runs along the last axis
                w_in = self._const_node(f"{w.q.name}_kn", np.ascontiguousarray(wq))
            else:
                w_in = w.q
                if wq.ndim != 2:
                    return None
            op, m = "MatMulInteger", wq.shape[-1]
            shape = (m,)
            alpha = float(node.attrs.get("alpha", 1.0))
            sw = sw * np.float32(alpha) if node.op == "Gemm" else sw
        if bias is not None and node.op == "Gemm" and float(node.attrs.get("alpha", 1.0)) != 1.0:
            return None  # the int32 bias was quantized with sx*sw, not alpha*sx*sw
        acc = self._var(f"{base}_int32", np.int32)
        zp_w = self._const_node(f"{base}_zw", np.zeros((), wq.dtype))  # symmetric weights: one scalar zero
        self._add(op, f"{base}_integer", [x.q, w_in, zp_x, zp_w], [acc], **attrs)
        scale = (np.float64(sx) * sw.astype(np.float64)).astype(np.float32)
        scale = scale.reshape(shape) if scale.size > 1 else scale.reshape(())
        if node.op == "Gemm":
            beta = float(node.attrs.get("beta", 1.0))
            b = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
            if b is not None and bias is not None and beta == 1.0:
                pass  # int32 below
            elif b is not None:
                float_bias, bias = b, None
        if bias is not None:
            bq = np.asarray(bias.q.values).astype(np.int32)
            summed = self._var(f"{base}_int32_bias", np.int32)
            self._add("Add", f"{base}_bias_int32", [acc, self._const_node(f"{base}_bias_q", bq.reshape(shape if bq.size > 1 else bq.shape))], [summed])
            acc = summed
        as_float = self._var(f"{base}_float", np.float32)
        self._add("Cast", f"{base}_cast", [acc], [as_float], to=1)
        if float_bias is not None:
            scaled = self._var(f"{base}_scaled", np.float32)
            self._add("Mul", f"{base}_rescale", [as_float, self._const_node(f"{base}_scale", scale)], [scaled])
            beta = float(node.attrs.get("beta", 1.0))
            bterm = float_bias if beta == 1.0 else self._const_node(f"{base}_beta_bias", np.asarray(_float_value(float_bias)) * np.float32(beta))
            node.inputs.clear()
            node.outputs.clear()
            self._add("Add", f"{base}_bias", [scaled, bterm], [y])
        else:
            node.inputs.clear()
            node.outputs.clear()
            self._add("Mul", f"{base}_rescale", [as_float, self._const_node(f"{base}_scale", scale)], [y])
        return op


def _float_value(t: gs.Tensor) -> np.ndarray:
    if isinstance(t, gs.Constant):
        return np.asarray(t.values, dtype=np.float32)
    dq = t.inputs[0]
    q = np.asarray(dq.inputs[0].values)
    s = np.asarray(dq.inputs[1].values, dtype=np.float32)
    return (q.astype(np.float32) * s).astype(np.float32)
