"""Float constant W -> QuantizeLinear(s, z) -> DequantizeLinear => integer constant Q(W) -> DequantizeLinear (the same values, 4x smaller).

A model trained with quantization-aware training arrives from PyTorch's exporter with its weights stored in
float and fake-quantized at run time. The integers the QuantizeLinear would compute are computed here, as ONNX
defines them (x / s in float32, rounded half to even, plus the zero point, saturated to its type), and stored
in the zero point's type, so the DequantizeLinear reads exactly what it read before.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import NameAllocator
from ..pass_manager import Pass, PassContext, PassResult


def quantize_linear(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int | None) -> np.ndarray:
    """ONNX QuantizeLinear in float32 arithmetic, as onnxruntime computes it."""
    x = np.asarray(x, dtype=np.float32)
    scale = np.asarray(scale, dtype=np.float32)
    zero_point = np.asarray(zero_point)
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * x.ndim
        shape[axis % x.ndim] = scale.size
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    else:
        scale, zero_point = scale.reshape(()), zero_point.reshape(())
    info = np.iinfo(zero_point.dtype)
    q = np.rint(x / scale).astype(np.float64) + zero_point.astype(np.float64)
    return np.clip(q, info.min, info.max).astype(zero_point.dtype)


class FoldFakeQuantWeights(Pass):
    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        names = NameAllocator(graph)
        folded = 0
        for q in list(graph.nodes):
            if q.op != "QuantizeLinear" or len(q.inputs) < 2:
                continue
            x, scale = q.inputs[0], q.inputs[1]
            zp = q.inputs[2] if len(q.inputs) > 2 and q.inputs[2].name else None
            if not (isinstance(x, gs.Constant) and isinstance(scale, gs.Constant)) or \
                    (zp is not None and not isinstance(zp, gs.Constant)):
                continue
            y = q.outputs[0]
            if not y.outputs or any(n.op != "DequantizeLinear" for n in y.outputs):
                continue
            z = np.asarray(zp.values) if zp is not None else np.zeros((), np.uint8)
            values = quantize_linear(np.asarray(x.values), np.asarray(scale.values), z, q.attrs.get("axis", 1))
            const = gs.Constant(names(f"{x.name}_quantized"), values)
            for dq in list(y.outputs):
                dq.inputs[0] = const
            q.inputs.clear()
            q.outputs.clear()
            folded += 1
        if folded:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(modified=bool(folded), stats={"folded": folded} if folded else {})
