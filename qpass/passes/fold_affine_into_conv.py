"""a -> Mul(k) -> Add(b) (scalar constants) read only by pad-free Convs => those Convs read a, W * k, bias + b * sum(W).

Paddle's LearnableAffineBlock writes a scalar scale and bias after each activation (PP-LCNetV3, the backbone of the
PP-OCRv4/v5 detectors and recognizers). Between the activation and the next Conv they are two float ops, and they
keep the activation's own output from being the tensor the Conv quantizes (so a hard-swish there cannot run on
integer kernels: qpass/passes/integer_hard_swish.py). Conv is linear in its input, so for every output channel m,
``Conv(k * a + b) = Conv'(a)`` with ``W' = k * W`` and ``bias'_m = bias_m + b * sum(W_m)``: exact where every tap
reads the input, that is a Conv without padding (a 1 x 1 pointwise Conv, or pads 0). With padding the border taps read
0 where ``k * a + b`` would give b, so such a reader keeps the block (and none of its readers folds).

Only the Mul -> Add pair (a lone scalar Mul may be the end of a GELU that onnxruntime fuses), float32 constant
weights (and bias), ``auto_pad`` NOTSET or VALID, finite k != 0 and b, an affine output read only by such Convs as
their data input and not a graph output.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import NameAllocator, is_float32, is_onnx_op, scalar_behind
from ..pass_manager import Pass, PassContext, PassResult


def _scalar(t: gs.Tensor) -> float | None:
    found = scalar_behind(t)
    return None if found is None else found[0]


def _split(node: gs.Node) -> tuple[gs.Tensor, float] | None:
    """(the computed input, the scalar constant) of a two-input default-domain ``node``, else None."""
    if not is_onnx_op(node) or len(node.inputs) != 2 or len(node.outputs) != 1:
        return None
    for a, c in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
        value = _scalar(c)
        if value is not None and _scalar(a) is None:
            return a, value
    return None


def _affine(node: gs.Node, outputs: set[str]) -> tuple[gs.Tensor, float, float, list[gs.Node]] | None:
    """(a, k, b, the two nodes) when ``node``'s output is ``Add(Mul(a, k), b)`` with scalar constants, the Mul's
    output read by the Add alone. A lone scalar Mul is left: the last Mul(0.5) of an erf GELU is one, and onnxruntime
    fuses the GELU only with it."""
    if node.op != "Add":
        return None
    found = _split(node)
    if found is None:
        return None
    m, b = found
    mul = m.inputs[0] if isinstance(m, gs.Variable) and len(m.inputs) == 1 else None
    if mul is None or mul.op != "Mul" or len(m.outputs) != 1 or m.name in outputs:
        return None
    inner = _split(mul)
    return None if inner is None else (inner[0], inner[1], b, [mul, node])


def _pad_free_conv(n: gs.Node, t: gs.Tensor) -> bool:
    if n.op != "Conv" or not is_onnx_op(n) or len(n.inputs) < 2 or n.inputs[0] is not t or t in n.inputs[1:]:
        return False
    w = n.inputs[1]
    bias = n.inputs[2] if len(n.inputs) > 2 and n.inputs[2].name else None
    if not isinstance(w, gs.Constant) or not is_float32(w) or (bias is not None and not isinstance(bias, gs.Constant)):
        return False
    if n.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return False
    return not any(int(p) for p in n.attrs.get("pads", ()))


class FoldAffineIntoConv(Pass):
    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        new_name = NameAllocator(graph)
        outputs = {t.name for t in graph.outputs}
        folded = 0
        for node in [n for n in graph.nodes if n.op == "Add"]:
            if not node.outputs or node.outputs[0].name in outputs:
                continue
            found = _affine(node, outputs)
            y = node.outputs[0]
            if found is None or not y.outputs or not all(_pad_free_conv(r, y) for r in y.outputs):
                continue
            a, k, b, nodes = found
            if k == 0:
                continue
            for conv in list(y.outputs):
                w = np.asarray(conv.inputs[1].values, dtype=np.float32)
                has_bias = len(conv.inputs) > 2 and conv.inputs[2].name  # else no bias, or an empty name for none
                bias = np.asarray(conv.inputs[2].values, dtype=np.float32) if has_bias else np.zeros(w.shape[0], np.float32)
                base = conv.name or y.name
                new_w = gs.Constant(new_name(f"{base}_weight_affine"), (w * np.float32(k)).astype(np.float32))
                new_b = gs.Constant(new_name(f"{base}_bias_affine"),
                                    (bias + np.float32(b) * w.reshape(w.shape[0], -1).sum(axis=1)).astype(np.float32))
                conv.inputs[0], conv.inputs[1] = a, new_w
                if len(conv.inputs) > 2:
                    conv.inputs[2] = new_b
                else:
                    conv.inputs.append(new_b)
            for n in nodes:
                n.inputs.clear()
                n.outputs.clear()
            folded += 1
        if folded:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(modified=bool(folded), stats={"affine": folded} if folded else {})
