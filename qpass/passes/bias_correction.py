"""Op(DQ(x), DQ(W)[, B]) -> Op(DQ(x), DQ(W), B + shift): each measured Conv/ConvTranspose/Gemm bias (a MatMul's bias Add constant) moves by its output's per-channel mean shift.

``shift`` is the table's ``"bias_shift"`` statistic of the node's output tensor (for a MatMul, of the output of
the Add that adds its constant bias): the float model's per-channel output mean minus the quantized model's,
measured by :func:`qpass.stages.correct_biases`. An int32 bias (DequantizeLinear of int32 at s_x * s_w) is
re-quantized at its own scale, q + round(shift / scale), so it stays what integer kernels fuse; a float bias gets
the shift added; a Conv/ConvTranspose/Gemm without a bias gets one (int32 at s_x * s_w when ``bias`` is "int32"
and both its input and weight come from DequantizeLinear, float otherwise). A Gemm's bias is scaled by beta,
so its shift is divided by beta. What cannot be corrected is skipped with the reason.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import NameAllocator, is_onnx_op, node_label, producer
from ..pass_manager import Pass, PassContext, PassResult, Skip
from ..qparams import INT32_MAX, int32_bias

#: ops whose third input is a per-output-channel bias, and the output axis of their channels
BIAS_INPUT_OPS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1}
#: the statistic kind this pass reads
SHIFT = "bias_shift"


def correction_site(node: gs.Node) -> tuple[str, str] | None:
    """Where a node's output mean is measured and which observer measures it: (tensor name, ``"mean_axis1"`` or
    ``"mean_last"``), or None when the node has no bias this pass can move. Conv/ConvTranspose/Gemm: their own
    output along axis 1. MatMul: the output of the Add that is its only reader and adds a float constant along the
    last axis (the bias MatMulBiasToGemm folds)."""
    if not is_onnx_op(node) or not node.outputs:
        return None
    if node.op in BIAS_INPUT_OPS:
        if node.op == "Gemm" and int(node.attrs.get("transA", 0)) not in (0, 1):
            return None
        return node.outputs[0].name, "mean_axis1"
    if node.op == "MatMul":
        add = _bias_add(node)
        if add is not None:
            return add.outputs[0].name, "mean_last"
    return None


def _bias_add(matmul: gs.Node) -> gs.Node | None:
    """The Add after ``matmul`` that adds a float constant of one value per output feature (shape [N] or [1,..,N])."""
    y = matmul.outputs[0]
    if len(y.outputs) != 1:
        return None
    add = y.outputs[0]
    if add.op != "Add" or not is_onnx_op(add) or len(add.inputs) != 2 or len(add.outputs) != 1:
        return None
    c = add.inputs[1] if add.inputs[0] is y else add.inputs[0]
    if c is y or not isinstance(c, gs.Constant) or np.asarray(c.values).dtype != np.float32:
        return None
    shape = np.shape(c.values)
    if not shape or any(d != 1 for d in shape[:-1]):
        return None
    return add


def _dq_scale(t: gs.Tensor) -> tuple[np.ndarray, int | None] | None:
    """The scale (and axis) of the DequantizeLinear that produces ``t``, when its scale is a constant."""
    p = producer(t)
    if p is None or p.op != "DequantizeLinear" or len(p.inputs) < 2 or not isinstance(p.inputs[1], gs.Constant):
        return None
    axis = p.attrs.get("axis")
    return np.asarray(p.inputs[1].values, dtype=np.float32), (None if axis is None else int(axis))


class BiasCorrection(Pass):
    """``bias``: the dtype of a bias this pass adds ("int32" or "float", as the configuration's ``bias``)."""

    def __init__(self, bias: str = "int32"):
        self.bias = bias

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if ctx.calib is None or ctx.plan is None:
            return PassResult(False)
        self._names = NameAllocator(graph)
        self._graph = graph
        by_label = {node_label(n): n for n in graph.nodes}
        skipped: list[Skip] = []
        corrected, added = 0, 0
        for planned in ctx.plan.nodes:
            node = by_label.get(planned.node)
            site = correction_site(node) if node is not None else None
            if site is None:
                continue
            shift = ctx.calib.statistics.get(site[0], SHIFT)
            if shift is None:
                continue
            delta = np.asarray(shift.mean, dtype=np.float64)
            if not np.all(np.isfinite(delta)):
                skipped.append(Skip(planned.node, node.op, "bias correction: the measured shift is not finite"))
                continue
            if not np.any(delta):
                continue
            why = self._apply(node, delta)
            if isinstance(why, str):
                skipped.append(Skip(planned.node, node.op, f"bias not corrected: {why}"))
                continue
            corrected += 1
            added += why
        if corrected:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        stats = {"corrected": corrected} if corrected else {}
        if added:
            stats["bias_added"] = added
        return PassResult(modified=bool(corrected), skipped=tuple(skipped), stats=stats)

    # ------------------------------------------------------------------ one node
    def _apply(self, node: gs.Node, delta: np.ndarray) -> int | str:
        """Move ``node``'s bias by ``delta``; 1 when a bias was added, 0 when one was moved, or why not."""
        if node.op == "MatMul":
            add = _bias_add(node)
            c = add.inputs[1] if add.inputs[0] is node.outputs[0] else add.inputs[0]
            values = np.asarray(c.values, dtype=np.float32)
            if values.shape[-1] != delta.size:
                return f"{delta.size} channels measured, the bias Add has {values.shape[-1]}"
            new = (values.astype(np.float64) + delta.reshape(values.shape)).astype(np.float32)
            add.inputs[add.inputs.index(c)] = gs.Constant(self._names(f"{c.name}_corrected"), new)
            return 0
        if node.op == "Gemm":
            beta = float(node.attrs.get("beta", 1.0))
            has_c = len(node.inputs) > 2 and node.inputs[2].name
            if has_c and beta == 0.0:
                return "Gemm with beta = 0 ignores its bias"
            delta = delta / (beta if has_c else 1.0)
        if len(node.inputs) > 2 and node.inputs[2].name:
            return self._move(node, delta)
        return self._add(node, delta)

    def _move(self, node: gs.Node, delta: np.ndarray) -> int | str:
        b = node.inputs[2]
        if isinstance(b, gs.Constant):
            values = np.asarray(b.values)
            if values.dtype != np.float32:
                return f"bias '{b.name}' is {values.dtype}, not float32"
            shaped = _per_channel(values.shape, delta)
            if shaped is None:
                return f"bias of shape {list(values.shape)} is not one value per output channel ({delta.size})"
            node.inputs[2] = gs.Constant(self._names(f"{b.name}_corrected"),
                                         (values.astype(np.float64) + shaped).astype(np.float32))
            return 0
        dq = producer(b)
        if dq is None or dq.op != "DequantizeLinear" or not isinstance(dq.inputs[0], gs.Constant):
            return f"bias '{b.name}' is neither a constant nor a DequantizeLinear of one"
        q = np.asarray(dq.inputs[0].values)
        if q.dtype != np.int32:
            return f"bias '{b.name}' is quantized to {q.dtype}, not int32"
        shaped = _per_channel(q.shape, delta)
        if shaped is None:
            return f"bias of shape {list(q.shape)} is not one value per output channel ({delta.size})"
        scale = np.asarray(dq.inputs[1].values, dtype=np.float64)
        zp = dq.inputs[2] if len(dq.inputs) > 2 else None
        if zp is not None and (not isinstance(zp, gs.Constant) or np.any(np.asarray(zp.values))):
            return f"bias '{b.name}' has a nonzero zero point"
        scale = scale.reshape(q.shape) if scale.size > 1 else scale.reshape(())
        moved = np.rint(q.astype(np.float64) + shaped / scale)
        if np.any(np.abs(moved) > INT32_MAX):
            return "the corrected bias overflows int32 at its scale"
        names = self._names
        new_q = gs.Constant(names(f"{dq.inputs[0].name}_corrected"), moved.astype(np.int32))
        out = gs.Variable(names(f"{b.name}_corrected"), dtype=np.float32, shape=list(q.shape))
        self._graph.nodes.append(gs.Node("DequantizeLinear", names(f"{dq.name}_corrected"), attrs=dict(dq.attrs),
                                   inputs=[new_q, *dq.inputs[1:]], outputs=[out]))
        node.inputs[2] = out
        return 0

    def _add(self, node: gs.Node, delta: np.ndarray) -> int | str:
        values = delta.astype(np.float32)
        x, w = _dq_scale(node.inputs[0]), _dq_scale(node.inputs[1])
        base = f"{node.name or node.outputs[0].name}_bias"
        if self.bias == "int32" and x is not None and w is not None and np.size(x[0]) == 1:
            got = int32_bias(values, x[0], w[0], 0)
            if isinstance(got, str):
                return got
            q, scale, axis = got
            zp = gs.Constant(self._names(f"{base}_zero_point"), np.zeros(scale.shape, dtype=np.int32))
            out = gs.Variable(self._names(f"{base}_dequantized"), dtype=np.float32, shape=list(q.shape))
            attrs = {"axis": int(axis)} if axis is not None else {}
            self._graph.nodes.append(gs.Node(
                "DequantizeLinear", self._names(f"{base}_DequantizeLinear"), attrs=attrs,
                inputs=[gs.Constant(self._names(f"{base}_quantized"), q),
                        gs.Constant(self._names(f"{base}_scale"), np.asarray(scale, dtype=np.float32)), zp],
                outputs=[out]))
            bias: gs.Tensor = out
        else:
            bias = gs.Constant(self._names(base), values)
        if len(node.inputs) > 2:
            node.inputs[2] = bias
        else:
            node.inputs.append(bias)
        return 1


def _per_channel(shape: tuple[int, ...], delta: np.ndarray) -> np.ndarray | None:
    """``delta`` shaped like a bias of ``shape`` that holds one value per channel ([C], or [1, C] for a Gemm)."""
    shape = tuple(int(d) for d in shape)
    if int(np.prod(shape)) != delta.size or (len(shape) > 1 and any(d != 1 for d in shape[:-1])):
        return None
    return delta.reshape(shape)

