"""Q/DQ scale and zero point read through Identity chains => read the constant itself, as one-element scalars where per tensor.

Exporters leave Q/DQ parameters behind Identity nodes (PyTorch's exporter shares one zero point among several
QuantizeLinear nodes that way) and write per-tensor scales as one-element vectors. The integer-operator lowering
and the plan importer read a Q/DQ's parameters as constants, and qpass's own QDQ form writes per-tensor
parameters as scalars; this pass gives an imported model that form. Values are unchanged.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import NameAllocator, constant_behind
from ..pass_manager import Pass, PassContext, PassResult

QDQ = ("QuantizeLinear", "DequantizeLinear")


def through_identity(t: gs.Tensor) -> gs.Tensor:
    """The tensor an Identity chain ending in ``t`` starts from (``t`` itself when no Identity produces it); the
    value of a Constant node at its start."""
    seen = 0
    while isinstance(t, gs.Variable) and len(t.inputs) == 1 and t.inputs[0].op == "Identity" and seen < 64:
        t, seen = t.inputs[0].inputs[0], seen + 1
    value = constant_behind(t)  # a Constant node's value (value, value_float, ...)
    return t if value is None else value


class CanonicalQDQParams(Pass):
    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        changed = 0
        names = NameAllocator(graph)
        scalars: dict[str, gs.Constant] = {}
        known = graph.tensors()
        copies: dict[str, gs.Constant] = {}  # by the tensor read: constant_behind makes a new value object per call
        for node in graph.nodes:
            if node.op not in QDQ:
                continue
            for i in (0, 1, 2):
                if i >= len(node.inputs) or not node.inputs[i].name:
                    continue
                src = through_identity(node.inputs[i])
                if not isinstance(src, gs.Constant):
                    continue
                if known.get(src.name) is not src:  # a Constant node's value: an initializer of its own name
                    src = copies.setdefault(node.inputs[i].name, gs.Constant(names(node.inputs[i].name or "constant"),
                                                                             np.asarray(src.values)))
                if i == 0 and node.op == "QuantizeLinear":  # a fake-quantized weight given by a Constant node
                    if src is not node.inputs[0]:
                        node.inputs[0] = src
                        changed += 1
                    continue
                if i == 0:
                    continue
                if src is not node.inputs[i]:
                    node.inputs[i] = src
                    changed += 1
                values = np.asarray(src.values)
                if values.ndim == 1 and values.size == 1:
                    if src.name not in scalars:
                        scalars[src.name] = gs.Constant(names(f"{src.name}_scalar"), values.reshape(()))
                    node.inputs[i] = scalars[src.name]
                    changed += 1
        if changed:
            graph.cleanup(remove_unused_graph_inputs=False)
        return PassResult(modified=bool(changed), stats={"changed": changed} if changed else {})
