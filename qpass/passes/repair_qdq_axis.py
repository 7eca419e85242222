"""A Q/DQ ``axis`` outside [-rank, rank) => the one axis whose size matches the scale (or none, per tensor); else refused, naming the node.

Tools write Q/DQ nodes whose ``axis`` does not fit the rank of the tensor they read (an axis counted for another
layout, or one left on a per-tensor scale); onnxruntime refuses such a model. The repair is made only where it
is unambiguous: a one-element scale needs no axis (it is dropped); a per-channel scale of length C goes to the
single axis of size C. Anything else (no such axis, several, an unknown rank or shape) raises
:class:`UnsupportedModelError` naming the node, the axis and the rank.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import UnsupportedModelError
from ..graph import node_label
from ..pass_manager import Pass, PassContext, PassResult, Skip
from .qdq_params import QDQ, through_identity


def _shape(t: gs.Tensor) -> tuple | None:
    """The tensor's shape; a QuantizeLinear's output has its input's (shape inference stops at a bad axis)."""
    if isinstance(t, gs.Constant):
        return tuple(np.shape(t.values))
    if t.shape is None and len(t.inputs) == 1 and t.inputs[0].op == "QuantizeLinear":
        return _shape(t.inputs[0].inputs[0])
    return tuple(t.shape) if t.shape is not None else None


class RepairQDQAxis(Pass):
    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        skipped: list[Skip] = []
        for node in graph.nodes:
            if node.op not in QDQ or "axis" not in node.attrs or len(node.inputs) < 2:
                continue
            axis = int(node.attrs["axis"])
            shape = _shape(node.inputs[0])
            scale = through_identity(node.inputs[1])
            size = int(np.size(scale.values)) if isinstance(scale, gs.Constant) else None
            if shape is not None and -len(shape) <= axis < len(shape):
                continue
            label = node_label(node)
            if size == 1:
                del node.attrs["axis"]
                skipped.append(Skip(label, node.op, f"axis {axis} is out of range for rank {len(shape) if shape else '?'}"
                                                    "; dropped (the scale is per tensor)"))
                continue
            if shape is None or size is None:
                raise UnsupportedModelError(f"axis {axis} cannot be checked: the rank of '{node.inputs[0].name}' or the "
                                            "scale is unknown", subject=f"node '{label}' ({node.op})",
                                            hint="give the model with shapes inferable, or fix the axis")
            fits = [i for i, d in enumerate(shape) if isinstance(d, (int, np.integer)) and int(d) == size]
            if len(fits) != 1:
                why = "no axis" if not fits else f"axes {fits}"
                raise UnsupportedModelError(f"axis {axis} is out of range for rank {len(shape)} (shape {list(shape)}), "
                                            f"and {why} of that shape match(es) the {size} scales: cannot repair it "
                                            "unambiguously", subject=f"node '{label}' ({node.op})",
                                            hint="fix the node's axis attribute in the model")
            node.attrs["axis"] = fits[0]
            skipped.append(Skip(label, node.op, f"axis {axis} is out of range for rank {len(shape)}; repaired to "
                                                f"{fits[0]}, the only axis of size {size}"))
        return PassResult(modified=bool(skipped), skipped=tuple(skipped), stats={"repaired": len(skipped)} if skipped else {})
