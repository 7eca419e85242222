"""Cast chains between float types collapse: `Cast(Cast(x, to=B), to=C) -> Cast(x, to=C)`, and a Cast to x's own type is removed.

A model-level pass, run after :mod:`qpass.passes.convert_float16`: the chains are the Casts inserted at fp32/half
boundaries meeting each other (or a Cast of the input model). Only float types (float32, float16, bfloat16, double)
are merged: a round trip through a narrower float only loses precision, so dropping it is exact or better. A Cast
whose output is a graph output keeps that name (an Identity when nothing is left to convert).
"""
from __future__ import annotations

import onnx
from onnx import TensorProto

from ..pass_manager import PassResult
from ..graph import proto_graphs, read_in_bodies
from .convert_float16 import rename_reads, value_types

FLOATS = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE})


def _to(node: onnx.NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None)


class MergeCasts:
    """Collapse float Cast chains and no-op Casts, in every graph of the model, until none is left."""

    role = "rewrite"
    name = "merge_casts"

    def apply(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, PassResult]:
        types = value_types(model)
        merged = removed = 0
        changed = True
        while changed:
            changed = False
            for g, _ in proto_graphs(model.graph):
                m, r = self._graph(g, types)
                merged, removed = merged + m, removed + r
                changed = changed or bool(m or r)
        return model, PassResult(bool(merged or removed), (), {"merged": merged, "removed": removed})

    def _graph(self, g: onnx.GraphProto, types: dict[str, int]) -> tuple[int, int]:
        producer = {o: n for n in g.node for o in n.output if o}
        outputs = {o.name for o in g.output}
        in_bodies = read_in_bodies(g)
        merged = removed = 0
        drop: set[str] = set()  # output names of the Casts removed
        for node in list(g.node):
            if node.op_type != "Cast" or node.domain not in ("", "ai.onnx") or node.output[0] in drop:
                continue
            to = _to(node)
            src = node.input[0]
            first = producer.get(src)
            if (first is not None and first.op_type == "Cast" and first.domain in ("", "ai.onnx")
                    and first.output[0] not in drop and types.get(first.input[0]) in FLOATS
                    and _to(first) in FLOATS and to in FLOATS):
                node.input[0] = first.input[0]  # read past the first Cast
                src = first.input[0]
                merged += 1
                if not any(src_ in (first.output[0],) for n in g.node for src_ in n.input) and \
                        first.output[0] not in outputs and first.output[0] not in in_bodies:
                    drop.add(first.output[0])
            if types.get(src) == to and to is not None:
                out = node.output[0]
                if out in outputs:
                    node.op_type = "Identity"
                    del node.attribute[:]
                else:
                    rename_reads(g, out, src)
                    if out in in_bodies:
                        in_bodies.add(src)
                    drop.add(node.output[0])
                removed += 1
            types[node.output[0]] = to if to is not None else types.get(node.output[0])
        if drop:
            kept = [n for n in g.node if not (n.op_type == "Cast" and n.output and n.output[0] in drop)]
            del g.node[:]
            g.node.extend(kept)
        return merged, removed

