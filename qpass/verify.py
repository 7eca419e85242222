"""Structural invariants checked after every pass: ONNX checker, DAG, unique names, well-formed Q/DQ."""
from __future__ import annotations

import networkx as nx
import numpy as np
import onnx
from onnx import numpy_helper

from .errors import VerificationError
from .io import check_proto

_QDQ = {"QuantizeLinear", "DequantizeLinear"}
_INT_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16,
              onnx.TensorProto.INT32, onnx.TensorProto.INT4, onnx.TensorProto.UINT4, onnx.TensorProto.INT2}
#: scale types (float16 / bfloat16 from opset 19; the ONNX checker rejects them below it)
_SCALE_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


def node_graph(graph: onnx.GraphProto) -> nx.DiGraph:
    """Read-only networkx view: one vertex per node (by index), an edge per produced->consumed tensor."""
    g = nx.DiGraph()
    producer: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        g.add_node(i, op_type=node.op_type, name=node.name)
        for out in node.output:
            if out:
                producer[out] = i
    for i, node in enumerate(graph.node):
        for inp in node.input:
            if inp in producer:
                g.add_edge(producer[inp], i, tensor=inp)
    return g


def verify_model(model: onnx.ModelProto) -> None:
    """Raise :class:`VerificationError` naming the node or tensor that breaks an invariant."""
    check_proto(model, VerificationError)
    _verify_graph(model.graph, {}, "")


def _bodies(graph: onnx.GraphProto):
    """(node, attribute name, subgraph) for each If branch / Loop or Scan body of the graph's nodes."""
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield node, a.name, a.g
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield node, a.name, g


def _verify_graph(graph: onnx.GraphProto, outer_inits: dict[str, onnx.TensorProto], where: str) -> None:
    """The invariants in one graph, then in each body (whose Q/DQ may read scales of an enclosing graph)."""
    _verify_nodes(graph, where)
    inits = {**outer_inits, **{t.name: t for t in graph.initializer}}
    _verify_qdq(graph, inits, where)
    for node, attr, body in _bodies(graph):
        _verify_graph(body, inits, f"{where}{node.name or node.op_type}/{attr}: ")


def _verify_nodes(graph: onnx.GraphProto, where: str) -> None:
    if not nx.is_directed_acyclic_graph(node_graph(graph)):
        cycle = nx.find_cycle(node_graph(graph))
        raise VerificationError(f"graph has a cycle through nodes {[graph.node[a].name for a, _ in cycle]}",
                                subject=f"{where}graph" if where else "graph")
    seen: set[str] = set()
    for node in graph.node:
        if node.name:
            if node.name in seen:
                raise VerificationError("duplicate node name", subject=f"node '{where}{node.name}'")
            seen.add(node.name)
    produced: set[str] = set()
    for node in graph.node:
        for out in node.output:
            if out and out in produced:
                raise VerificationError("tensor produced twice", subject=f"tensor '{where}{out}'")
            produced.add(out)


def _verify_qdq(graph: onnx.GraphProto, inits: dict[str, onnx.TensorProto] | None = None, where_: str = "") -> None:
    """Q/DQ nodes of ``graph``; ``inits``: the initializers it can read (its own and those of enclosing graphs;
    default its own)."""
    inits = {t.name: t for t in graph.initializer} if inits is None else inits
    ranks = {}
    shapes: dict[str, list[int | None]] = {}  # None: a dimension that is not a known number
    for vi in list(graph.value_info) + list(graph.input) + list(graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            ranks[vi.name] = len(vi.type.tensor_type.shape.dim)
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None
                               for d in vi.type.tensor_type.shape.dim]
    for t in inits.values():
        ranks[t.name] = len(t.dims)
        shapes[t.name] = list(t.dims)
    gathered = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Gather" and n.input and n.input[0] in inits}
    # double-quantized scales: a DequantizeLinear of constants (checked as a DequantizeLinear itself), or a Mul of a
    # constant and a Cast of a constant
    cast_of_const = {n.output[0] for n in graph.node if n.op_type == "Cast" and n.input and n.input[0] in inits}
    scale_dqs = {n.output[0] for n in graph.node if n.input and (
        (n.op_type == "DequantizeLinear" and all(i in inits for i in n.input if i))
        or (n.op_type == "Mul" and len(n.input) == 2 and n.input[0] in cast_of_const and n.input[1] in inits))}
    for node in graph.node:
        if node.op_type not in _QDQ:
            continue
        where = f"node '{where_}{node.name or node.output[0]}'"
        if len(node.input) >= 2 and node.input[1] in gathered and node.op_type == "DequantizeLinear" and (
                len(node.input) < 3 or not node.input[2]):
            # rows of a constant scale table looked up at run time (an int8 embedding): the table is checked
            _check_scale_values(inits[gathered[node.input[1]]], where)
            continue
        if node.op_type == "DequantizeLinear" and len(node.input) >= 2 and node.input[1] in scale_dqs:
            continue
        if len(node.input) < 2 or node.input[1] not in inits:
            raise VerificationError("scale must be a constant initializer (or, for DequantizeLinear, a Gather of rows "
                                    "of one)", subject=where)
        scale = inits[node.input[1]]
        _check_scale_values(scale, where)
        zp = None
        if len(node.input) > 2 and node.input[2]:
            if node.input[2] not in inits:
                raise VerificationError("zero point must be a constant initializer", subject=where)
            zp = inits[node.input[2]]
            if zp.data_type not in _INT_TYPES:
                raise VerificationError("zero point must be an integer type", subject=where)
            if tuple(zp.dims) != tuple(scale.dims):
                raise VerificationError(f"zero point shape {list(zp.dims)} != scale shape {list(scale.dims)}",
                                        subject=where)
        if node.op_type == "DequantizeLinear" and node.input[0] in inits and zp is not None:
            if inits[node.input[0]].data_type != zp.data_type:
                raise VerificationError("quantized input and zero point differ in type", subject=where)
        block_size = next((a.i for a in node.attribute if a.name == "block_size"), 0)  # 0: the ONNX default
        if block_size != 0 or len(scale.dims) > 1:
            _verify_blocked(node, scale, block_size, ranks.get(node.input[0]), shapes.get(node.input[0]), where)
        elif len(scale.dims) == 1 and scale.dims[0] > 1:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            rank = ranks.get(node.input[0])
            if rank is not None and not (-rank <= axis < rank):
                raise VerificationError(f"axis {axis} out of range for rank {rank}", subject=where)
            shape = list(inits[node.input[0]].dims) if node.input[0] in inits else None
            if shape is not None and shape[axis] != scale.dims[0]:
                raise VerificationError(f"per-axis scale has {scale.dims[0]} values for axis of size {shape[axis]}",
                                        subject=where)


def _check_scale_values(scale: onnx.TensorProto, where: str) -> None:
    if scale.data_type not in _SCALE_TYPES:
        raise VerificationError("scale must be float32, float16 or bfloat16", subject=where)
    scale_arr = numpy_helper.to_array(scale)
    if scale.data_type != onnx.TensorProto.FLOAT:
        scale_arr = scale_arr.astype(np.float32)  # float16 / bfloat16: every value exact in float32
    if not np.all(np.isfinite(scale_arr)) or np.any(scale_arr <= 0):
        raise VerificationError("scale must be finite and > 0", subject=where)


def _verify_blocked(node: onnx.NodeProto, scale: onnx.TensorProto, block_size: int, rank: int | None,
                    shape: list[int | None] | None, where: str) -> None:
    """Blocked quantization (opset 21): ``block_size`` > 0, the scale has the input's rank and shape except
    ``ceil(dim / block_size)`` on ``axis``. Dimensions that are not known numbers are not compared."""
    if block_size <= 0:
        if block_size < 0:
            raise VerificationError(f"block_size must be > 0, not {block_size}", subject=where)
        raise VerificationError(f"scale of rank {len(scale.dims)} needs a block_size attribute (blocked "
                                f"quantization); per-axis scales are 1-D", subject=where)
    if rank is None:
        return
    if len(scale.dims) != rank:
        raise VerificationError(f"blocked scale has rank {len(scale.dims)}, input has rank {rank} "
                                f"(block_size {block_size})", subject=where)
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    if not -rank <= axis < rank:
        raise VerificationError(f"axis {axis} out of range for rank {rank}", subject=where)
    axis %= rank
    if shape is None:
        return
    expected = [None if d is None else (-(-d // block_size) if i == axis else d) for i, d in enumerate(shape)]
    if any(e is not None and e != s for e, s in zip(expected, scale.dims)):
        raise VerificationError(f"blocked scale shape {list(scale.dims)} does not fit input shape {_dims(shape)} "
                                f"with axis {axis}, block_size {block_size}: expected {_dims(expected)}",
                                subject=where)


def _dims(shape: list[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"
