"""DQ(a) -> MatMul <- DQ(w), then Add(bias), a 2-D => Gemm(DQ(a), DQ(w), DQ(int32 bias)), so the runtime runs it in int8.

onnxruntime's level-1 MatMulAddFusion turns a 2-D MatMul followed by a bias Add into a float Gemm before its
QDQ fusions run, so the weight's DequantizeLinear then runs on every inference and the Gemm stays float
(measured on Magika's last Dense: 0.215 ms of 2.81 ms node time). Written as a standard Gemm whose bias is an
int32 DequantizeLinear (scale = activation scale x weight scale per channel, zero point 0, as for Conv), the
same computation is fused into one integer kernel (QGemm with a float output) and the weight DQ disappears.

Only for the QDQ form, a MatMul whose first input is the DQ of a per-tensor activation with a known rank of 2,
whose second input is the DQ of a stored 2-D weight (per-tensor, or per-channel on axis 1), whose output is
read by one Add and nothing else (not a graph output), and whose other Add input is a float constant of shape
[N] or [1, N]. A bias that would overflow int32 keeps the MatMul + Add, with the reason in the report.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import NameAllocator, constant_behind, is_onnx_op, node_label
from ..pass_manager import Pass, PassContext, PassResult, Skip
from ..qparams import int32_bias


def _dq_of(t: gs.Tensor) -> gs.Node | None:
    if not isinstance(t, gs.Variable) or len(t.inputs) != 1:
        return None
    n = t.inputs[0]
    return n if n.op == "DequantizeLinear" and is_onnx_op(n) else None


def _const(t: gs.Tensor) -> np.ndarray | None:
    c = constant_behind(t)  # an initializer or a Constant node (a TensorFlow or Paddle export's bias)
    return None if c is None else np.asarray(c.values)


def _plan(mm: gs.Node, graph_outputs: set[str]) -> tuple[gs.Node, tuple[np.ndarray, np.ndarray, int | None] | str] | None:
    """(the bias Add, :func:`int32_bias`'s int32 bias, scale and axis or why there is none) when ``mm`` has the
    pattern, else None."""
    if len(mm.inputs) != 2 or len(mm.outputs) != 1:
        return None
    a, w, y = mm.inputs[0], mm.inputs[1], mm.outputs[0]
    a_dq, w_dq = _dq_of(a), _dq_of(w)
    if a_dq is None or w_dq is None or y.name in graph_outputs or len(y.outputs) != 1:
        return None
    if a.shape is None or len(a.shape) != 2 or a.dtype not in (np.float32, None):
        return None
    add = y.outputs[0]
    if add.op != "Add" or not is_onnx_op(add) or len(add.inputs) != 2:
        return None
    bias = _const(add.inputs[1] if add.inputs[0] is y else add.inputs[0])
    wq = _const(w_dq.inputs[0])
    s_a = _const(a_dq.inputs[1]) if len(a_dq.inputs) > 1 else None
    s_w = _const(w_dq.inputs[1]) if len(w_dq.inputs) > 1 else None
    if bias is None or wq is None or s_a is None or s_w is None or wq.ndim != 2 or s_a.size != 1:
        return None
    n = wq.shape[1]
    if bias.dtype != np.float32 or bias.shape not in ((n,), (1, n)):
        return None
    if s_w.size != 1 and (s_w.shape != (n,) or int(w_dq.attrs.get("axis", 1)) % 2 != 1):
        return None
    return add, int32_bias(bias.reshape(n), s_a.reshape(()), s_w, 0)


class MatMulBiasToGemm(Pass):
    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        new_name = NameAllocator(graph)
        outputs = {t.name for t in graph.outputs}
        done, skipped = 0, []
        for mm in [n for n in graph.nodes if n.op == "MatMul" and is_onnx_op(n)]:
            plan = _plan(mm, outputs)
            if plan is None:
                continue
            add, bias = plan
            if isinstance(bias, str):  # the MatMul + float bias Add stay as they are
                skipped.append(Skip(node_label(mm), mm.op, f"not written as Gemm: {bias}"))
                continue
            q, scale, axis = bias
            base = mm.name or mm.outputs[0].name
            bias_f = gs.Variable(new_name(f"{base}_bias_dequantized"), dtype=np.float32, shape=[len(q)])
            bias_dq = gs.Node("DequantizeLinear", new_name(f"{base}_bias_DequantizeLinear"),
                              attrs={"axis": axis} if axis is not None else {},  # none: per-tensor, valid below opset 13
                              inputs=[gs.Constant(new_name(f"{base}_bias_quantized"), q),
                                      gs.Constant(new_name(f"{base}_bias_scale"), scale),
                                      gs.Constant(new_name(f"{base}_bias_zero_point"), np.zeros(scale.shape, np.int32))],
                              outputs=[bias_f])
            gemm = gs.Node("Gemm", new_name(f"{base}_Gemm"), inputs=[mm.inputs[0], mm.inputs[1], bias_f],
                           outputs=[add.outputs[0]])
            for n in (mm, add):
                n.inputs.clear()
                n.outputs.clear()
            graph.nodes.extend([bias_dq, gemm])
            done += 1
        if done:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(modified=bool(done), skipped=tuple(skipped), stats={"Gemm": done} if done else {})
