"""The plan and calibration table of a model that already holds QuantizeLinear/DequantizeLinear (QDQ import).

What the model's Q/DQ nodes say, read back into qpass's artifacts: a :class:`TensorPlan` per quantized
activation (its spec from the zero point's type and the scale's shape, its readers), a :class:`NodePlan` per
compute node whose weight is dequantized from constant integers (weight spec, bias form), and a
:class:`CalibrationTable` range per activation: the real interval the integer grid covers,
``[(qmin - z) * s, (qmax - z) * s]``, from which :func:`qpass.qparams.compute_qparams` gives back ``s`` and ``z``.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..calib.stats import TensorRange
from ..calib.table import CalibrationTable
from ..graph import node_label, qdq_constants
from ..ops import BIAS_OPS, COMPUTE_OPS, QUANT_OPS
from .spec import DTYPES, BiasPlan, NodePlan, QSpec, QuantPlan, TensorPlan, WeightPlan

#: the quantization ops an imported model may hold (the integer operators are already lowered: not imported)
IMPORTABLE = frozenset({"QuantizeLinear", "DequantizeLinear"})


def holds_qdq(ops: set[str]) -> bool:
    """Whether a model with these op types is one QDQ import reads: QuantizeLinear present (activations or
    fake-quantized weights), no quantization op but Q/DQ. A model of DequantizeLinear alone (weight-only) is not."""
    return "QuantizeLinear" in ops and not (ops & QUANT_OPS) - IMPORTABLE


def spec_of(node: gs.Node) -> QSpec | None:
    """The spec a Q/DQ node's parameters describe (None when they are not constants or not a plan dtype)."""
    got = qdq_constants(node)
    if got is None:
        return None
    s, z = got
    dtype = str(z.dtype)
    if dtype not in DTYPES:
        return None
    info = np.iinfo(z.dtype)
    mid = 0 if info.min < 0 else (int(info.max) + 1) // 2
    symmetric = bool(np.all(z.astype(np.int64) == mid))
    if s.size > 1:
        return QSpec(dtype, symmetric, "channel", int(node.attrs.get("axis", 1)))
    return QSpec(dtype, symmetric)


def grid_range(node: gs.Node) -> TensorRange | None:
    """The real interval a per-tensor Q/DQ's integer grid covers."""
    got = qdq_constants(node)
    if got is None or got[0].size != 1:
        return None
    s, z = float(got[0].reshape(())), int(got[1].reshape(()))
    info = np.iinfo(got[1].dtype)
    return TensorRange(min=(int(info.min) - z) * s, max=(int(info.max) - z) * s, method="minmax")


def _dq(t: gs.Tensor) -> gs.Node | None:
    p = t.inputs[0] if isinstance(t, gs.Variable) and len(t.inputs) == 1 else None
    return p if p is not None and p.op == "DequantizeLinear" else None


def import_plan(graph: gs.Graph) -> tuple[QuantPlan, CalibrationTable]:
    """The plan and ranges the graph's Q/DQ nodes describe (top-level graph)."""
    tensors: dict[str, TensorPlan] = {}
    table = CalibrationTable()
    for q in graph.nodes:
        if q.op != "QuantizeLinear" or not q.inputs or isinstance(q.inputs[0], gs.Constant):
            continue
        spec, rng = spec_of(q), grid_range(q)
        if spec is None:
            continue
        x = q.inputs[0]
        readers = tuple(node_label(r) for dq in q.outputs[0].outputs if dq.op == "DequantizeLinear"
                        for y in dq.outputs for r in y.outputs)
        tensors[x.name] = TensorPlan(x.name, spec, x.name, readers)
        if rng is not None:
            table.statistics.set(x.name, "range", rng)
    nodes = []
    for node in graph.nodes:
        if node.op not in COMPUTE_OPS or len(node.inputs) < 2:
            continue
        slots = (1, 0) if node.op == "MatMul" else (1,)
        weight = None
        for slot in slots:
            dq = _dq(node.inputs[slot])
            spec = spec_of(dq) if dq is not None and isinstance(dq.inputs[0], gs.Constant) else None
            if spec is not None:
                weight = WeightPlan(slot, dq.inputs[0].name, spec)
                break
        if weight is None:
            continue
        acts = tuple(i for i in range(2) if i != weight.input and _dq(node.inputs[i]) is not None)
        bias = None
        if node.op in BIAS_OPS and len(node.inputs) > 2 and node.inputs[2].name:
            bdq = _dq(node.inputs[2])
            if bdq is not None and isinstance(bdq.inputs[0], gs.Constant):
                got = qdq_constants(bdq)
                axis = int(bdq.attrs.get("axis", 1)) if got is not None and got[0].size > 1 else None
                bias = BiasPlan(2, bdq.inputs[0].name, str(np.asarray(bdq.inputs[0].values).dtype), axis)
            else:
                bias = BiasPlan(2, node.inputs[2].name, "float", -1)
        nodes.append(NodePlan(node_label(node), node.op, acts, weight, bias, ("imported from the model's Q/DQ",)))
    return QuantPlan(tuple(nodes), tensors), table
