"""DQ(q) read by several float element-wise ops => DQ(q) -> Add(2**-60) -> those ops, so the runtime fuses their pattern.

onnxruntime gives every reader of a DequantizeLinear its own copy (EnsureUniqueDQForNodeUnit) before its
pattern fusions run. A GELU written out as ``x -> Div -> Erf -> Add -> Mul(x) -> Mul`` reads ``x`` twice, so
with ``x`` a DQ output the two readers end up reading two different copies and the Gelu fusion no longer
matches: measured on the shared OCR models, 13 GELUs each stayed as five float ops plus two DQs. The folded
Conv bias is what puts the DQ right before the GELU (with the bias as a separate Add, that Add was the single
reader). An Add of 2**-60 is the one reader here: onnxruntime removes an Add of 0 (and an Identity), not this
one. It is exact on every value a DQ can produce except 0, which becomes 2**-60 (about 8.7e-19): a non-zero DQ
value is a multiple of its scale, and any value of magnitude 2**-36 (1.5e-11) or more absorbs 2**-60 exactly.
The addend is not smaller on purpose: an earlier 2**-126 (the smallest normal float) turned every exact zero
into a value whose halves and products are subnormal floats, which the CPU computes slowly: the detector's
21 fused Gelus took 66.6 ms a run instead of 13.2 (onnxruntime profile). 2**-60 squared is still normal.

Only where every reader (seen through Identity chains, which the runtime removes) is a float element-wise op
whose output is not quantized: a reader that is a compute op, a QuantizeLinear or part of an integer node
unit (its output goes to a QuantizeLinear) keeps reading the DQ directly, as the runtime's QDQ fusions need.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import NameAllocator, is_onnx_op
from ..pass_manager import Pass, PassContext, PassResult

#: float element-wise ops (and the reductions of a decomposed normalisation) whose patterns the runtime fuses
FLOAT_READERS = frozenset({"Div", "Mul", "Add", "Sub", "Erf", "Sigmoid", "Tanh", "Pow", "Sqrt", "ReduceMean",
                           "HardSigmoid", "Exp"})
#: the addend: exact on every non-zero value a DequantizeLinear produces, and far from the subnormal floats
GUARD_VALUE = np.float32(2.0 ** -60)


def effective_readers(t: gs.Variable, graph_outputs: set[str]) -> list[gs.Node] | None:
    """The nodes that read ``t`` once Identity nodes are removed; None when ``t`` (or an Identity of it) is a
    graph output, which must keep its exact value."""
    readers: list[gs.Node] = []
    stack = [t]
    while stack:
        v = stack.pop()
        if v.name in graph_outputs:
            return None
        for n in v.outputs:
            if n.op == "Identity" and is_onnx_op(n) and n.outputs:
                stack.append(n.outputs[0])
            else:
                readers.append(n)
    return readers


def _is_float_reader(n: gs.Node) -> bool:
    if n.op not in FLOAT_READERS or not is_onnx_op(n):
        return False
    return not any(r.op == "QuantizeLinear" for o in n.outputs for r in o.outputs)


class SingleReaderDequantize(Pass):
    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        new_name = NameAllocator(graph)
        outputs = {t.name for t in graph.outputs}
        guarded = 0
        for dq in [n for n in graph.nodes if n.op == "DequantizeLinear" and is_onnx_op(n)]:
            if len(dq.outputs) != 1 or dq.outputs[0].dtype not in (np.float32, None):
                continue
            x = dq.outputs[0]
            readers = effective_readers(x, outputs)
            if not readers or len(readers) < 2 or not all(_is_float_reader(r) for r in readers):
                continue
            y = gs.Variable(new_name(f"{x.name}_single_reader"), dtype=x.dtype, shape=x.shape)
            for r in list(x.outputs):
                for i, t in enumerate(r.inputs):
                    if t is x:
                        r.inputs[i] = y
            tiny = gs.Constant(new_name(f"{x.name}_fusion_guard"), np.array([GUARD_VALUE], np.float32))
            graph.nodes.append(gs.Node("Add", new_name(f"{dq.name or x.name}_single_reader"), inputs=[x, tiny],
                                       outputs=[y]))
            guarded += 1
        if guarded:
            graph.toposort()
        return PassResult(modified=bool(guarded), stats={"DequantizeLinear": guarded} if guarded else {})
