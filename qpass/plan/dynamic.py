"""build_dynamic_plan: the prepared graph -> the plan of dynamic quantization (MatMul/Gemm with a constant weight:
int8 weights per output channel, their input activation quantized at run time, uint8 asymmetric).

The activations get specs with ``dynamic`` set: calibration measures nothing for them (QuantPlan.calibrate skips
them) and the rewrite (qpass.passes.insert_dynamic) writes DynamicQuantizeLinear where static QDQ writes a Q/DQ pair.
The same specs can be set on a static plan by an override (``{"tensor": "x", "spec": {"dynamic": true, "dtype":
"uint8", "symmetric": false}}``), which mixes both modes per tensor.
"""
from __future__ import annotations

from dataclasses import replace

import onnx_graphsurgeon as gs

from ..config import QuantConfig
from ..graph import is_float32, is_onnx_op, node_label
from ..pass_manager import Skip
from .spec import NodePlan, QSpec, QuantPlan, TensorPlan, WeightPlan
from .targets import output_channel_axis

#: an embedding table's spec: int8, one scale per row (the weight-only mode's; rows dequantized after the lookup)
EMBEDDING_ROWS = QSpec(dtype="int8", symmetric=True, granularity="channel", axis=0)

#: ops dynamic quantization rewrites (MatMulInteger carries them; Conv stays float: static quantization handles it)
DYNAMIC_OPS = ("MatMul", "Gemm")
#: the activation spec DynamicQuantizeLinear computes at run time: uint8, a zero point from the range
DYNAMIC_ACTIVATION = QSpec(dtype="uint8", symmetric=False, dynamic=True)
#: ops kept float in dynamic mode with the reason the report gives
NOT_DYNAMIC = {
    "Conv": "Conv kept in float in dynamic mode (ConvInteger measured slower than float Conv on onnxruntime's CPU "
            "provider; static quantization handles Conv)",
    "LSTM": "LSTM kept in float: standard ONNX has no integer LSTM (DynamicQuantizeLSTM is a Microsoft contrib op)",
    "GRU": "GRU kept in float: standard ONNX has no integer GRU",
}


def build_dynamic_plan(graph: gs.Graph, config: QuantConfig) -> QuantPlan:
    """Every top-level MatMul/Gemm (of ``config.op_types``) whose second input is a constant 2-D float32 weight and
    first a float activation: weight int8 symmetric per output channel (per tensor with ``per_channel`` off), input
    quantized at run time; with ``weight_only_embeddings``, embedding tables (Gather of rows from a constant 2-D
    table) int8 per row. Nodes inside If/Loop/Scan bodies and the ops of NOT_DYNAMIC are reported and stay float."""
    from .policy import _planned_table  # policy imports this module

    nodes, skips, readers = [], [], {}
    for node in graph.nodes:
        label = node_label(node)
        if node.op == "Gather" and _planned_table(node, config):
            nodes.append(NodePlan(label, node.op, (), WeightPlan(0, node.inputs[0].name, EMBEDDING_ROWS)))
            continue
        if any(isinstance(a, gs.Graph) or (isinstance(a, list) and a and isinstance(a[0], gs.Graph))
               for a in node.attrs.values()):
            skips.append(Skip(label, node.op, "body of a control-flow node: dynamic mode quantizes the top-level "
                                              "graph only; kept in float"))
            continue
        if node.op in NOT_DYNAMIC and is_onnx_op(node):
            skips.append(Skip(label, node.op, NOT_DYNAMIC[node.op]))
            continue
        if node.op not in DYNAMIC_OPS or node.op not in config.op_types or not is_onnx_op(node):
            continue
        if config.is_excluded(node.name or ""):
            skips.append(Skip(label, node.op, "excluded by configuration"))
            continue
        if len(node.inputs) < 2:
            continue
        x, w = node.inputs[0], node.inputs[1]
        if not (isinstance(x, gs.Variable) and is_float32(x)):
            skips.append(Skip(label, node.op, f"input '{x.name}' is not a float32 activation; kept in float"))
            continue
        if not (isinstance(w, gs.Constant) and is_float32(w)):
            skips.append(Skip(label, node.op, f"input '{w.name}' is not a constant float32 weight; kept in float "
                                              "(two run-time operands: not quantized dynamically)"))
            continue
        if len(w.shape) != 2:
            skips.append(Skip(label, node.op, f"weight '{w.name}' has rank {len(w.shape)}, not 2; kept in float"))
            continue
        if node.op == "Gemm" and int(node.attrs.get("transA", 0)):
            skips.append(Skip(label, node.op, "Gemm with transA: kept in float"))
            continue
        axis = output_channel_axis(node, 2)[0] if config.per_channel else None
        spec = QSpec(dtype="int8", symmetric=True, granularity="channel" if axis is not None else "tensor", axis=axis)
        nodes.append(NodePlan(label, node.op, (0,), WeightPlan(1, w.name, spec)))
        readers.setdefault(x.name, []).append(label)
    tensors = {name: TensorPlan(name, DYNAMIC_ACTIVATION, name, tuple(r)) for name, r in readers.items()}
    return QuantPlan(tuple(nodes), tensors, tuple(skips))


def dynamic_part(plan: QuantPlan, graph: gs.Graph) -> tuple[QuantPlan, QuantPlan]:
    """``plan`` (overrides applied) split into what InsertDynamicQuantization writes (the activations with dynamic
    specs, the nodes reading them, embedding tables) and the rest, InsertQDQ's (with the planning skips, reported
    once)."""
    full = plan.with_overrides()
    wanted = {name: t for name, t in full.tensors.items() if t.spec.dynamic}
    labels = {n.node for n in full.nodes if n.op_type == "Gather"}
    for name, t in wanted.items():
        labels |= set(t.readers) if t.readers is not None else {
            node_label(n) for n in graph.nodes if any(i.name == name for i in n.inputs)}
    static = {name: t for name, t in full.tensors.items() if name not in wanted}
    return (replace(full, nodes=tuple(n for n in full.nodes if n.node in labels), tensors=wanted, skipped=()),
            replace(full, nodes=tuple(n for n in full.nodes if n.node not in labels), tensors=static))
