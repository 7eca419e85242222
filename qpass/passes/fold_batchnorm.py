"""Conv(x, W, b) -> BatchNormalization(scale, B, mean, var) => Conv(x, W * k, (b - mean) * k + B), k = scale / sqrt(var + eps).

Folding comes before weight quantization, so the int8 weights carry the normalisation (otherwise the
per-channel scales describe the wrong weights and the BN runs in float after a quantized Conv).
Only inference-mode BN nodes whose parameters are constants (initializers or Constant nodes) and whose input is
read by nothing else.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import NameAllocator, constant_behind, is_float32, is_onnx_op, node_label
from ..pass_manager import Pass, PassContext, PassResult, Skip


class FoldBatchNorm(Pass):
    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        new_name = NameAllocator(graph)
        outputs = {t.name for t in graph.outputs}
        folded = 0
        skipped: list[Skip] = []
        for bn in [n for n in graph.nodes if n.op == "BatchNormalization" and is_onnx_op(n)]:
            x = bn.inputs[0]
            conv = x.inputs[0] if isinstance(x, gs.Variable) and len(x.inputs) == 1 else None
            if conv is None or conv.op != "Conv" or not is_onnx_op(conv):
                continue
            label = node_label(bn)
            params = [constant_behind(p) for p in bn.inputs[1:5]]  # initializers or Constant nodes
            if len(params) != 4 or not all(p is not None for p in params):
                skipped.append(Skip(label, bn.op, "BatchNormalization with non-constant parameters not folded"))
                continue
            if int(bn.attrs.get("training_mode", 0)) or len(bn.outputs) != 1:
                skipped.append(Skip(label, bn.op, "training-mode BatchNormalization not folded"))
                continue
            if len(x.outputs) != 1 or x.name in outputs:
                skipped.append(Skip(label, bn.op, "Conv output read elsewhere; BatchNormalization not folded"))
                continue
            w = conv.inputs[1]
            if not isinstance(w, gs.Constant) or not is_float32(w):
                skipped.append(Skip(label, bn.op, "Conv weight is not a float32 constant; not folded"))
                continue
            scale, beta, mean, var = (np.asarray(p.values, dtype=np.float64) for p in params)
            eps = float(bn.attrs.get("epsilon", 1e-5))
            k = scale / np.sqrt(var + eps)
            wv = np.asarray(w.values, dtype=np.float64)
            if k.shape != (wv.shape[0],):
                skipped.append(Skip(label, bn.op, f"{k.shape[0] if k.ndim else 1} BN channels vs {wv.shape[0]} Conv outputs"))
                continue
            b = np.asarray(conv.inputs[2].values, dtype=np.float64) if len(conv.inputs) > 2 and isinstance(conv.inputs[2], gs.Constant) else np.zeros(wv.shape[0])
            if len(conv.inputs) > 2 and not isinstance(conv.inputs[2], gs.Constant):
                skipped.append(Skip(label, bn.op, "Conv bias is not a constant; not folded"))
                continue
            w_new = (wv * k.reshape((-1,) + (1,) * (wv.ndim - 1))).astype(np.float32)
            b_new = ((b - mean) * k + beta).astype(np.float32)
            conv.inputs[1] = gs.Constant(new_name(f"{w.name}_bnfold"), w_new)
            bias = gs.Constant(new_name(f"{conv.name or w.name}_bias_bnfold"), b_new)
            if len(conv.inputs) > 2:
                conv.inputs[2] = bias
            else:
                conv.inputs.append(bias)
            y = bn.outputs[0]
            conv.outputs[0] = y  # the Conv now produces the BN's output tensor; the old one is orphaned
            bn.inputs.clear()
            bn.outputs.clear()
            folded += 1
        if folded:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(modified=bool(folded), skipped=tuple(skipped), stats={"BatchNormalization": folded} if folded else {})
