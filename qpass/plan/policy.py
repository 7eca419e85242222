"""build_plan: the prepared graph and the configuration -> a QuantPlan (placement and targets turned into per-tensor specs).

The only place that turns configuration fields (activation type, weight type, per-channel, bias, calibration
method) into specs; rewrite passes read the plan, not the configuration.
"""
from __future__ import annotations

from dataclasses import replace

import onnx_graphsurgeon as gs

from ..config import QuantConfig
from ..graph import is_float32, is_onnx_op, node_label, scoped_labels
from ..ops import DATA_MOVEMENT
from ..pass_manager import Skip
from .dynamic import build_dynamic_plan
from .placement import plan_quantization
from .roles import find_roles, tied_table
from .spec import BiasPlan, NodePlan, Override, QSpec, QuantPlan, TensorPlan, WeightPlan
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
    return NodePlan(t.label, node.op, tuple(t.activations), weight, bias, tuple(t.notes))


def build_plan(graph: gs.Graph, config: QuantConfig) -> QuantPlan:
    """Which nodes and activations to quantize, with what spec, for ``graph`` (prepared) under ``config``."""
    if config.weight_only:
        return build_weight_only_plan(graph, config)
    if config.dynamic:
        return build_dynamic_plan(graph, config)
    placed = plan_quantization(graph, config)
    scoped = scoped_labels(graph)  # nodes of If branches read planned tensors too
    labels = {key: label for key, (label, _) in scoped.items()}
    order = {key: i for i, key in enumerate(scoped)}
    calibrate = set(placed.calibrate)
    methods = {name: config.method_for(name, ops) for name, ops in placed.related_ops().items() if name in calibrate}
    tensors = {}
    for q in placed.tensors.values():
        readers = None if q.consumers is None else tuple(labels[i] for i in sorted(q.consumers, key=order.__getitem__))
        tensors[q.name] = TensorPlan(q.name, activation_spec(config, methods.get(q.range_of, "minmax")), q.range_of,
                                     readers)
    return QuantPlan(tuple(node_plan(t, config) for t in placed.targets), tensors, tuple(placed.skips))


#: weight-only algorithms that need each MatMul input's Gram matrix from calibration
NEEDS_GRAM = frozenset({"gptq", "awq", "awq-gptq"})
#: weight-only algorithms that also need each MatMul input's mean |x| per channel (activation-aware scaling)
NEEDS_ABSMEAN = frozenset({"awq", "awq-gptq"})


def _reaches_output(node: gs.Node, graph_outputs: set[str], depth: int = 0) -> bool:
    """The node's output is a graph output, directly or through data movement."""
    for y in node.outputs:
        if y.name in graph_outputs:
            return True
        if depth < 4 and any(r.op in DATA_MOVEMENT and _reaches_output(r, graph_outputs, depth + 1) for r in y.outputs):
            return True
    return False


def _heads(graph: gs.Graph) -> set[str]:
    """The output heads: of the MatMul/Gemm nodes with a constant 2-D weight whose output reaches a graph output
    (through data movement), those with the widest output (a language model's lm_head, not the key/value
    projections a model with a KV cache also outputs)."""
    outputs = {t.name for t in graph.outputs}
    width = {}
    for node in graph.nodes:
        w = node.inputs[1] if node.op in ("MatMul", "Gemm") and len(node.inputs) > 1 else None
        if isinstance(w, gs.Constant) and len(w.shape) == 2 and _reaches_output(node, outputs):
            transposed = node.op == "Gemm" and int(node.attrs.get("transB", 0))
            width[node_label(node)] = int(w.shape[0] if transposed else w.shape[1])
    widest = max(width.values(), default=0)
    return {label for label, n in width.items() if n == widest}


def weight_only_spec(config: QuantConfig, axis: int) -> QSpec:
    """Block-wise along the input dimension; int4/int8/nf4 symmetric, uint4 asymmetric, ternary as int2."""
    dtype = "int2" if config.weight_only == "ternary" else config.weight_only
    return QSpec(dtype=dtype, symmetric=config.weight_only != "uint4", granularity="block", axis=axis,
                 block_size=config.block_size)


def dependency_stages(graph: gs.Graph, plan: QuantPlan) -> dict[str, int]:
    """Planned node -> how many planned nodes lie before it on the longest path from the graph inputs (nodes that
    read the same input, like a layer's q/k/v projections, share a stage)."""
    planned = {n.node for n in plan.nodes}
    level: dict[str, int] = {}
    stages: dict[str, int] = {}
    for node in graph.nodes:
        before = max((level.get(t.name, 0) for t in node.inputs), default=0)
        label = node_label(node)
        after = before
        if label in planned:
            stages[label] = before
            after = before + 1
        for y in node.outputs:
            level[y.name] = after
    return stages


def _planned_table(node: gs.Node, config: QuantConfig) -> bool:
    """A Gather of rows from a constant 2-D float32 table that the weight-only plan stores int8 per row."""
    table = node.inputs[0] if node.op == "Gather" and node.inputs else None
    return (config.weight_only_embeddings and is_onnx_op(node) and isinstance(table, gs.Constant) and is_float32(table)
            and len(table.shape) == 2 and int(node.attrs.get("axis", 0)) == 0 and not config.is_excluded(node.name or ""))


def build_weight_only_plan(graph: gs.Graph, config: QuantConfig) -> QuantPlan:
    """The weight-only plan: every MatMul/Gemm (of ``config.op_types``) with a constant 2-D float32 weight gets a
    block-wise weight spec on its input-feature axis; activations stay float. GPTQ asks calibration for the Gram
    matrix of each such node's input."""
    nodes, skips, statistics = [], [], {}
    heads = _heads(graph)
    embeddings = {id(n): n.inputs[0] for n in graph.nodes if _planned_table(n, config)}
    tables = list(embeddings.values())  # only tables the plan stores int8 can be shared by a tied head
    for node in graph.nodes:
        if node.op == "Gather" and config.weight_only_embeddings and is_onnx_op(node):
            if id(node) in embeddings:
                rows = QSpec(dtype="int8", symmetric=True, granularity="channel", axis=0)
                nodes.append(NodePlan(node_label(node), node.op, (), WeightPlan(0, embeddings[id(node)].name, rows)))
            continue
        if node.op not in ("MatMul", "Gemm") or node.op not in config.op_types or not is_onnx_op(node):
            continue
        label = node_label(node)
        if config.is_excluded(node.name or ""):
            skips.append(Skip(label, node.op, "excluded by configuration"))
            continue
        if len(node.inputs) < 2:
            continue
        x, w = node.inputs[0], node.inputs[1]
        if not (isinstance(w, gs.Constant) and is_float32(w)):
            tr = w.inputs[0] if isinstance(w, gs.Variable) and len(w.inputs) == 1 else None
            if (config.weight_only_tied == "once" and tr is not None and tr.op == "Transpose" and tr.inputs
                    and any(tr.inputs[0] is t for t in tables)):
                continue  # Transpose(embedding table): the rewrite points it at the table's int8 rows
            skips.append(Skip(label, node.op, f"input '{w.name}' is not a constant float32 weight; kept in float"))
            continue
        if len(w.shape) != 2:
            skips.append(Skip(label, node.op, f"weight '{w.name}' has rank {len(w.shape)}, not 2; kept in float"))
            continue
        # MatMul: W [K, N], blocks along K (axis 0); Gemm with transB: W [N, K] (axis 1); alpha/transA change nothing
        axis = 1 if node.op == "Gemm" and int(node.attrs.get("transB", 0)) else 0
        spec = weight_only_spec(config, axis)
        if node_label(node) in heads and config.weight_only_head != "same":
            if config.weight_only_head == "float":
                skips.append(Skip(label, node.op, "output head kept in float (weight_only_head)"))
                continue
            spec = replace(spec, dtype="int8", symmetric=True)
        notes = ()
        table = tied_table(node, tables) if (label in heads and spec.dtype == "int8"
                                             and config.weight_only_tied == "once") else None
        if table is not None:  # the embedding's own quantization: one scale per row of the table (output channel)
            spec = QSpec(dtype="int8", symmetric=True, granularity="channel", axis=1 - axis)
            notes = (f"tied to embedding table '{table.name}': reads its int8 rows (stored once)",)
        nodes.append(NodePlan(label, node.op, (), WeightPlan(1, w.name, spec), notes=notes))
        if (config.algorithm in NEEDS_GRAM and isinstance(x, gs.Variable) and is_float32(x)
                and not (node.op == "Gemm" and int(node.attrs.get("transA", 0)))):  # x^T x of a transposed x is no Hessian
            statistics[x.name] = ("gram", "absmean") if config.algorithm in NEEDS_ABSMEAN else ("gram",)
    overrides = mix_overrides(graph, QuantPlan(tuple(nodes)), config.weight_only_mix) if nodes else ()
    return QuantPlan(tuple(nodes), {}, tuple(skips), overrides, statistics)


def more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's choice of layers that get more bits in its _M presets: the first and last eighth, and every third
    layer between."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


#: weight-only mixed-precision presets: role (qpass.plan.roles) -> weight spec changes, applied in the layers
#: chosen by :func:`more_bits`
_INT8 = {"dtype": "int8", "symmetric": True}
MIXES = {"k-mix": {"v_proj": _INT8, "ffn_down": _INT8},
         "k-mix-o": {"v_proj": _INT8, "o_proj": _INT8, "ffn_down": _INT8}}


def mix_overrides(graph: gs.Graph, plan: QuantPlan, mix: str) -> tuple[Override, ...]:
    """The preset as plan overrides by node name (kept in the saved plan, editable): each role's nodes in dependency
    order are its layers."""
    if mix == "none":
        return ()
    roles, stage = find_roles(graph), dependency_stages(graph, plan)
    planned = {n.node for n in plan.nodes if n.weight is not None and n.weight.spec.granularity == "block"}
    out = []
    for role, change in MIXES[mix].items():
        layers = sorted((label for label, r in roles.items() if r == role and label in planned), key=stage.__getitem__)
        out += [Override("node", label, weight=dict(change)) for i, label in enumerate(layers)
                if more_bits(i, len(layers))]
    return tuple(out)
