"""The working IR: onnx-graphsurgeon import/export with model metadata kept, and small graph helpers."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter, check_duplicate_node_names, update_import_domains
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues
from onnx_graphsurgeon.logger import G_LOGGER

from .errors import UnsupportedModelError
from .io import ModelMeta
from .ops import QUANT_OPS



#: value types onnx-graphsurgeon cannot export (its exporter fails with an UnboundLocalError on them)
_UNEXPORTABLE = frozenset({"optional_type", "map_type", "opaque_type"})
_KNOWN_ELEM_TYPES = frozenset(onnx.TensorProto.DataType.values())


def unexportable_values(model: onnx.ModelProto) -> list[str]:
    """Values (any graph, subgraphs included) whose type the onnx-graphsurgeon round trip cannot carry."""
    found: list[str] = []

    def bad(t: onnx.TypeProto) -> str | None:
        kind = t.WhichOneof("value")
        if kind in _UNEXPORTABLE:
            return kind[: -len("_type")]
        if kind in ("tensor_type", "sparse_tensor_type"):
            elem = getattr(t, kind).elem_type
            # the checker lets an unknown element type through where only ops of unknown domains read the value
            return None if elem in _KNOWN_ELEM_TYPES else f"tensor of unknown element type {elem}"
        if kind == "sequence_type":
            inner = bad(t.sequence_type.elem_type) if t.sequence_type.HasField("elem_type") else None
            return f"sequence of {inner}" if inner else None
        return None

    def walk(g: onnx.GraphProto, where: str) -> None:
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            kind = bad(vi.type)
            if kind:
                found.append(f"'{vi.name}' ({kind}{where})")
        for n in g.node:
            for sub in proto_bodies(n):
                walk(sub, f" in a {n.op_type} body")

    walk(model.graph, "")
    return found


class WorkingGraph:
    """Pairs a gs.Graph with the model-level metadata needed to export it faithfully."""

    def __init__(self, model: onnx.ModelProto, *, outer_initializers: "set[str] | frozenset[str] | None" = None):
        """``outer_initializers``: the names to keep top-level on export (default: the model's own initializers;
        a stage re-importing a prepared model passes the input model's, so its output is the same as in one pass)."""
        bad = unexportable_values(model)
        if bad:
            raise UnsupportedModelError(f"{len(bad)} value(s) of a type qpass cannot rewrite, e.g. {bad[0]}",
                                        subject="model", hint="qpass handles tensor and sequence-of-tensor values only")
        self.meta = ModelMeta.of(model)
        self.outer_initializers = (set(outer_initializers) if outer_initializers is not None
                                   else {t.name for t in model.graph.initializer})
        self.graph = gs.import_onnx(model)
        self.renamed_nodes = sum(unique_node_names(s.graph) for s in scopes(self.graph))

    def export(self, graph: gs.Graph | None = None) -> onnx.ModelProto:
        graph = graph or self.graph
        model = export_onnx(graph)
        hoist_outer_initializers(model, self.outer_initializers)
        return self.meta.restore(model, opset=graph.opset)


def export_onnx(graph: gs.Graph) -> onnx.ModelProto:
    """``gs.export_onnx(graph, do_type_check=True)``, byte for byte, with the main graph's weights copied once.

    onnx-graphsurgeon (0.6.1) builds a GraphProto holding a copy of every initializer (``make_graph``) and copies that
    graph into the model (``make_model``): two copies of the weights at once, 1.3 GB on a 651 MB model, on top of the
    protos they are read from (docs/benchmark-notes.md). Here the graph goes into the model without its
    initializers, which are then appended to the model's graph (one copy); serialised fields are written in field
    order, so the bytes are the same (tests/test_graph_export.py)."""
    check_duplicate_node_names(graph.nodes, level=G_LOGGER.WARNING)
    nodes = [OnnxExporter.export_node(node) for node in graph.nodes]
    inputs = [OnnxExporter.export_value_info_proto(inp, True) for inp in graph.inputs]
    outputs = [OnnxExporter.export_value_info_proto(out, True) for out in graph.outputs]
    tensor_map = graph.tensors()
    initializer = [OnnxExporter.export_tensor_proto(t) for t in tensor_map.values()
                   if isinstance(t, gs.Constant) and not isinstance(t._values, SparseValues)]
    sparse = [OnnxExporter.export_sparse_tensor_proto(t) for t in tensor_map.values()
              if isinstance(t, gs.Constant) and isinstance(t._values, SparseValues)]
    for t in graph.inputs + graph.outputs:
        tensor_map.pop(t.name, None)
    value_info = [OnnxExporter.export_value_info_proto(t, True) for t in tensor_map.values()
                  if isinstance(t, gs.Variable) and (t.dtype is not None or t.shape is not None)]
    shell = onnx.helper.make_graph(nodes=nodes, name=graph.name, inputs=inputs, outputs=outputs,
                                   sparse_initializer=sparse, doc_string=graph.doc_string, value_info=value_info)
    del nodes, value_info
    model = onnx.helper.make_model(shell, functions=[OnnxExporter.export_function(f) for f in graph.functions],
                                   opset_imports=update_import_domains(graph))
    del shell
    model.graph.initializer.extend(initializer)
    del initializer
    model.producer_name = graph.producer_name
    model.producer_version = graph.producer_version
    if graph.ir_version is not None:
        model.ir_version = graph.ir_version
    return model


def unique_node_names(graph: gs.Graph) -> int:
    """Suffix every repeated node name (``conv`` -> ``conv_1``); returns how many were renamed.

    The ONNX checker accepts duplicate node names, the verifier run after every pass does not; without
    this a model with two nodes named alike fails in the first pass, which then takes the blame.
    """
    taken = {n.name for n in graph.nodes if n.name}
    seen: set[str] = set()
    renamed = 0
    for node in graph.nodes:
        if not node.name:
            continue
        if node.name in seen:
            i = 1
            while f"{node.name}_{i}" in taken:
                i += 1
            node.name = f"{node.name}_{i}"
            taken.add(node.name)
            renamed += 1
        seen.add(node.name)
    return renamed


def hoist_outer_initializers(model: onnx.ModelProto, outer_names: set[str]) -> int:
    """Move initializers that were top-level in the input model back out of the subgraphs.

    onnx-graphsurgeon's export writes every outer-scope constant that a subgraph reads into that subgraph
    (measured with 0.6.1: Silero VAD's LSTM weights, read by both If branches and by no top-level node, came
    out once per branch, and no longer at the top level). Subgraphs resolve such names in the outer scope,
    so one top-level copy serves them all. Returns the number of subgraph copies removed.
    """
    main = model.graph
    have = {t.name for t in main.initializer}
    removed = 0

    def walk(g: onnx.GraphProto) -> None:
        nonlocal removed
        for node in g.node:
            for attr in node.attribute:
                subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else (
                    list(attr.graphs) if attr.type == onnx.AttributeProto.GRAPHS else [])
                for sub in subs:
                    keep = []
                    for t in sub.initializer:
                        if t.name in outer_names:
                            if t.name not in have:
                                main.initializer.append(t)
                                have.add(t.name)
                            removed += 1
                        else:
                            keep.append(t)
                    if len(keep) != len(sub.initializer):
                        del sub.initializer[:]
                        sub.initializer.extend(keep)
                    walk(sub)

    walk(main)
    return removed


def constant_values(c: gs.Constant) -> np.ndarray:
    """The values of ``c``, read without caching them in ``c`` (``c.values`` keeps what it loads, and a gs tensor
    sits in reference cycles that only the cycle collector frees: a pass that replaces every weight would hold all
    of them in float until then)."""
    lazy = c._values
    return lazy.load() if isinstance(lazy, LazyValues) else c.values


def qdq_constants(node: gs.Node) -> tuple[np.ndarray, np.ndarray] | None:
    """(scale as float32, zero point; uint8 zeros when omitted) of a QuantizeLinear/DequantizeLinear whose
    parameters are constants, else None."""
    scale = node.inputs[1] if len(node.inputs) > 1 else None
    zp = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    if not isinstance(scale, gs.Constant) or (zp is not None and not isinstance(zp, gs.Constant)):
        return None
    s = np.asarray(scale.values, dtype=np.float32)
    return s, (np.asarray(zp.values) if zp is not None else np.zeros(s.shape, np.uint8))


def is_onnx_op(node: gs.Node) -> bool:
    """The node is an operator of the default ONNX domain (a ``Conv`` of a vendor domain is another op)."""
    return (getattr(node, "domain", None) or "") in ("", "ai.onnx")


def node_label(node: gs.Node) -> str:
    return node.name or f"{node.op}({node.outputs[0].name if node.outputs else '?'})"


def proto_node_label(node: onnx.NodeProto) -> str:
    """:func:`node_label` of a NodeProto (a plan's label for a node read from a ModelProto)."""
    return node.name or f"{node.op_type}({node.output[0] if node.output else '?'})"


#: body attributes of control-flow nodes -> the short name a nested node's label uses (``If_0/then/Conv_3``)
BODY_ATTRS = {"then_branch": "then", "else_branch": "else", "body": "body"}


@dataclass(frozen=True)
class Scope:
    """A graph of the model and where it lives: ``prefix`` is prepended to its nodes' labels ("" for the top-level
    graph), ``owners`` are the op types of the control-flow nodes it is nested in (outermost first), ``owner`` the
    innermost such node (None at the top level) and ``branch`` its attribute's short name (then / else / body)."""

    graph: gs.Graph
    prefix: str = ""
    owners: tuple[str, ...] = ()
    owner: "gs.Node | None" = None
    branch: str = ""

    def label(self, node: gs.Node) -> str:
        return self.prefix + node_label(node)


def proto_bodies(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The subgraphs an ONNX node holds in its attributes (If branches, Loop/Scan bodies), in attribute order."""
    out: list[onnx.GraphProto] = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            out.append(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            out.extend(a.graphs)
    return out


def proto_graphs(graph: onnx.GraphProto):
    """``graph`` and every body nested in it, outermost first, as (graph, the node owning it or None)."""
    yield graph, None
    for node in graph.node:
        for g in proto_bodies(node):
            for inner, owner in proto_graphs(g):
                yield inner, owner if owner is not None else node


def read_in_bodies(graph: onnx.GraphProto) -> set[str]:
    """Names the bodies nested in ``graph``'s nodes read: their nodes' inputs and the values they return as is (an
    outer value a rewrite of ``graph`` must not remove or rename alone)."""
    return {x for inner, owner in proto_graphs(graph) if owner is not None
            for x in [i for n in inner.node for i in n.input] + [o.name for o in inner.output] if x}


def constant_tensors(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """The constant values of every graph of ``model`` by name: initializers and ``Constant`` nodes' values
    (``value_float(s)`` as float tensors). Names are unique across scopes, so a body's read of an outer constant
    resolves here too."""
    out: dict[str, onnx.TensorProto] = {}
    for g, _ in proto_graphs(model.graph):
        out.update((t.name, t) for t in g.initializer)
        for n in g.node:
            if n.op_type != "Constant" or n.domain not in ("", "ai.onnx") or not n.output:
                continue
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = a.t
                elif a.name in ("value_float", "value_floats"):
                    values = np.array(a.f if a.name == "value_float" else list(a.floats), np.float32)
                    out[n.output[0]] = numpy_helper.from_array(values, n.output[0])
    return out


def bodies(node: gs.Node) -> list[tuple[str, gs.Graph]]:
    """The subgraphs a node holds as attributes, with their attribute names (If branches, Loop/Scan bodies)."""
    found = []
    for attr, value in node.attrs.items():
        for body in (value if isinstance(value, (list, tuple)) else [value]):
            if isinstance(body, gs.Graph):
                found.append((attr, body))
    order = list(BODY_ATTRS)  # then before else, whatever order the attributes were written in
    return sorted(found, key=lambda ab: order.index(ab[0]) if ab[0] in order else len(order))


def scopes(graph: gs.Graph, _parent: Scope | None = None) -> list[Scope]:
    """The top-level graph and every body nested in it (depth first, in node order)."""
    here = _parent or Scope(graph)
    found = [here]
    for node in graph.nodes:
        for attr, body in bodies(node):
            short = BODY_ATTRS.get(attr, attr)
            found += scopes(body, Scope(body, f"{here.label(node)}/{short}/", here.owners + (node.op,), node, short))
    return found


def scoped_labels(graph: gs.Graph) -> dict[int, tuple[str, Scope]]:
    """id(node) -> (its label, its scope), for the nodes of every graph of the model."""
    return {id(n): (s.label(n), s) for s in scopes(graph) for n in s.graph.nodes}


def constant_behind(t: gs.Tensor) -> gs.Constant | None:
    """The constant ``t`` is, or that a Constant node (or an Identity chain of one) produces; None otherwise.
    Exporters hold weights and fold parameters so (paddle2onnx: every BatchNormalization parameter)."""
    if isinstance(t, gs.Constant):
        return t
    if not isinstance(t, gs.Variable) or len(t.inputs) != 1:
        return None
    node = t.inputs[0]
    if not is_onnx_op(node):
        return None
    if node.op == "Constant":
        if isinstance(node.attrs.get("value"), gs.Constant):
            return node.attrs["value"]
        for key, dtype in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                           ("value_ints", np.int64)):
            if key in node.attrs:
                return gs.Constant(f"{t.name}_value", np.asarray(node.attrs[key], dtype=dtype))
        return None
    if node.op == "Identity" and node.inputs:
        return constant_behind(node.inputs[0])
    if node.op in ("Reshape", "Unsqueeze", "Squeeze") and node.inputs:
        value = _reshaped_constant(node)
        return None if value is None else gs.Constant(f"{t.name}_value", value)
    return None


def scalar_behind(t: gs.Tensor) -> tuple[float, int] | None:
    """(value, rank) of a one-element finite float constant behind ``t`` (:func:`constant_behind`), else None; a
    larger constant is judged by its shape and not loaded."""
    c = constant_behind(t)
    if c is None or int(np.prod(c.shape)) != 1:
        return None
    v = np.asarray(constant_values(c))
    return (float(v.reshape(())), v.ndim) if v.dtype.kind == "f" and np.isfinite(v).all() else None


def _reshaped_constant(node: gs.Node) -> np.ndarray | None:
    """The value of a Reshape/Unsqueeze/Squeeze of a constant by constant shape or axes (a bias an exporter reshaped to
    [1, C, 1, 1]); None when any of them is not constant."""
    data = constant_behind(node.inputs[0])
    if data is None:
        return None
    x = np.asarray(data.values)
    arg = constant_behind(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1].name else None
    if len(node.inputs) > 1 and node.inputs[1].name and arg is None:
        return None
    try:
        if node.op == "Reshape":
            if arg is None or int(node.attrs.get("allowzero", 0)):
                return None
            shape = [x.shape[i] if d == 0 else int(d) for i, d in enumerate(np.asarray(arg.values).ravel())]
            return x.reshape(shape)
        axes = np.asarray(arg.values).ravel().tolist() if arg is not None else node.attrs.get("axes")
        if node.op == "Unsqueeze":
            rank = x.ndim + len(axes)
            if not all(-rank <= int(a) < rank for a in axes):
                return None
            for a in sorted(int(a) % rank for a in axes):
                x = np.expand_dims(x, a)
            return x
        if axes is None:
            return np.squeeze(x)
        if not all(-x.ndim <= int(a) < x.ndim for a in axes):
            return None
        return np.squeeze(x, axis=tuple(int(a) % x.ndim for a in axes))
    except (ValueError, TypeError, IndexError):
        return None


def producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if isinstance(tensor, gs.Variable) and tensor.inputs else None


def is_float32(tensor: gs.Tensor) -> bool:
    dtype = tensor.dtype
    if dtype is None:
        return False
    try:
        return np.dtype(dtype) == np.float32
    except TypeError:
        return dtype == onnx.TensorProto.FLOAT


def op_types(model: onnx.ModelProto) -> set[str]:
    """Op types of every node (any graph, subgraphs included)."""
    found: set[str] = set()

    def walk(g: onnx.GraphProto) -> None:
        for n in g.node:
            found.add(n.op_type)
            for sub in proto_bodies(n):
                walk(sub)

    walk(model.graph)
    return found


def used_quant_ops(model: onnx.ModelProto) -> set[str]:
    """Quantization op types already present (any graph, subgraphs included)."""
    return op_types(model) & QUANT_OPS


class NameAllocator:
    """Hands out tensor/node names not yet used in the graph."""

    def __init__(self, graph: gs.Graph):
        self.used = set(graph.tensors().keys()) | {n.name for n in graph.nodes if n.name}
        for s in scopes(graph)[1:]:  # names inside bodies too: a new tensor must not shadow one there
            self.used |= set(s.graph.tensors().keys()) | {n.name for n in s.graph.nodes if n.name}

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.used:
            name = f"{base}_{i}"
            i += 1
        self.used.add(name)
        return name
