"""Mul(Cast(Gather(E_q int8 [V, D], ids)), Gather(scale[V, 1], ids)) (or the same as a blocked DequantizeLinear) -> com.microsoft.GatherBlockQuantized(E_q + 128 as uint8, ids, scale, gather_axis=0, quantize_axis=1, block_size=D, bits=8).

onnxruntime's contrib form of the int8 embedding lookup (only with ``--allow-contrib-ops``). onnxruntime takes block
sizes that are powers of two >= 16 only, so a table whose row length D is not one keeps the standard form; so does
a table a tied head also reads (its uint8 codes would be a second copy).
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import NameAllocator, is_onnx_op, node_label
from ..pass_manager import Pass, PassContext, PassResult, Skip


def _producer(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if isinstance(t, gs.Variable) and len(t.inputs) == 1 else None


class ContribGatherBlockQuantized(Pass):
    role = "lower"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        names = NameAllocator(graph)
        skipped, done = [], 0
        for dq in list(graph.nodes):
            if dq.op not in ("DequantizeLinear", "Mul") or not is_onnx_op(dq) or len(dq.inputs) != 2:
                continue
            rows, scales = _producer(dq.inputs[0]), _producer(dq.inputs[1])
            if dq.op == "Mul":  # Mul(Cast(rows to float), scale rows)
                if rows is None or rows.op != "Cast" or len(dq.inputs[0].outputs) != 1:
                    continue
                rows = _producer(rows.inputs[0])
            if rows is None or scales is None or rows.op != "Gather" or scales.op != "Gather":
                continue
            table, scale, ids = rows.inputs[0], scales.inputs[0], rows.inputs[1]
            if not (isinstance(table, gs.Constant) and isinstance(scale, gs.Constant) and scales.inputs[1] is ids):
                continue
            values = np.asarray(table.values)
            if values.dtype != np.int8 or values.ndim != 2:
                continue
            d = int(values.shape[1])
            reason = None
            if d < 16 or d & (d - 1):
                reason = f"row length {d} is not a power of two >= 16 (onnxruntime's block sizes)"
            elif len(table.outputs) != 1 or len(scale.outputs) != 1:
                reason = f"table '{table.name}' has other readers (a tied head): its uint8 codes would be a second copy"
            if reason:
                skipped.append(Skip(node_label(rows), "Gather", f"kept as Gather -> DequantizeLinear: {reason}"))
                continue
            codes = gs.Constant(names(f"{table.name}_codes"), (values.astype(np.int16) + 128).astype(np.uint8))
            graph.nodes.append(gs.Node("GatherBlockQuantized", names(f"{rows.name or table.name}_GatherBlockQuantized"),
                                       attrs={"gather_axis": 0, "quantize_axis": 1, "block_size": d, "bits": 8},
                                       inputs=[codes, ids, scale], outputs=list(dq.outputs), domain="com.microsoft"))
            dq.outputs.clear()
            done += 1
        if done:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(modified=bool(done), skipped=tuple(skipped),
                          stats={"GatherBlockQuantized": done} if done else {})
