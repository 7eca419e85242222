"""build_plan: the prepared graph and the configuration -> a QuantPlan (placement and targets turned into per-tensor specs).

The only place that turns configuration fields (activation type, weight type, per-channel, bias, calibration
method) into specs; rewrite passes read the plan, not the configuration.
"""
from __future__ import annotations

import onnx_graphsurgeon as gs

from ..config import QuantConfig
from ..graph import node_label
from .placement import plan_quantization
from .spec import BiasPlan, NodePlan, QSpec, QuantPlan, TensorPlan, WeightPlan
from .targets import Target


def activation_spec(config: QuantConfig, method: str) -> QSpec:
    return QSpec(dtype=config.activation_type, symmetric=config.activation_symmetric, method=method)


def weight_spec(config: QuantConfig, axis: int | None) -> QSpec:
    if axis is None:
        return QSpec(dtype=config.weight_type, symmetric=True)
    return QSpec(dtype=config.weight_type, symmetric=True, granularity="channel", axis=axis)


def node_plan(t: Target, config: QuantConfig) -> NodePlan:
    node = t.node
    weight = bias = None
    if t.weight is not None:
        weight = WeightPlan(t.weight, node.inputs[t.weight].name, weight_spec(config, t.weight_axis))
    if t.bias is not None:
        bias = BiasPlan(t.bias, node.inputs[t.bias].name, config.bias, t.bias_axis)
    return NodePlan(node_label(node), node.op, tuple(t.activations), weight, bias, tuple(t.notes))


def build_plan(graph: gs.Graph, config: QuantConfig) -> QuantPlan:
    """Which nodes and activations to quantize, with what spec, for ``graph`` (prepared) under ``config``."""
    placed = plan_quantization(graph, config)
    labels = {id(n): node_label(n) for n in graph.nodes}
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    calibrate = set(placed.calibrate)
    methods = {name: config.method_for(name, ops) for name, ops in placed.related_ops().items() if name in calibrate}
    tensors = {}
    for q in placed.tensors.values():
        readers = None if q.consumers is None else tuple(labels[i] for i in sorted(q.consumers, key=order.__getitem__))
        tensors[q.name] = TensorPlan(q.name, activation_spec(config, methods.get(q.range_of, "minmax")), q.range_of,
                                     readers)
    return QuantPlan(tuple(node_plan(t, config) for t in placed.targets), tensors, tuple(placed.skips))
