"""Float tensors -> float16 (or bfloat16) where every op's type constraints allow it: `Op(x:f32, W:f32) -> Op(x:f16, W:f16)`, with `Cast` at each fp32/half boundary.

A model-level pass (it rewrites the ModelProto, bodies of If/Loop/Scan included, since onnx-graphsurgeon has no
bfloat16 constants): each standard-domain node runs in half precision unless its op is blocked, a float tensor it
reads or writes is named in ``keep_tensors`` (measured out of half range), a tensor it writes belongs to an RMS
normalization's statistics (:func:`qpass.passes.rms_norm_divide.rms_statistics`), or the op's schema at the model's opset
does not allow the half type for a float slot (Range, opset-13 DequantizeLinear, ...). Slots fixed to
``tensor(float)`` by the schema (Resize's scales) stay float32 on a half node. Initializers and ``Constant`` /
``ConstantOfShape`` values follow their readers (a small one read in both types is stored twice). An If output is
half when every branch makes it half (the branches' outputs follow); Loop/Scan bodies' inputs and outputs keep their
types, so the node and its body stay consistent (Casts inside the body). Graph inputs/outputs stay float32 unless
``half_io``. Casts that undo each other are merged by :mod:`qpass.passes.merge_casts`.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..graph import proto_bodies, proto_graphs
from ..ops import CUDA_BFLOAT16_FROM
from ..pass_manager import PassResult, Skip

FLOAT = TensorProto.FLOAT
HALF_TYPES = {"float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}
_TYPE_STR = {TensorProto.FLOAT16: "tensor(float16)", TensorProto.BFLOAT16: "tensor(bfloat16)"}
#: the largest finite float16
FP16_MAX = 65504.0
#: float16's smallest subnormal is 2**-24; a value below half of it rounds to zero
FP16_TINY = 2.0 ** -25
#: float16's smallest normal value: below it a value keeps fewer than 11 significant bits
FP16_MIN_NORMAL = 2.0 ** -14
CONTROL_FLOW = frozenset({"If", "Loop", "Scan"})
#: a weight read both in half precision and in float32 is stored twice up to this many values (16 KB in float32),
#: beyond it converted once and cast at run time
SMALL_COPY_ELEMENTS = 4096
#: ops whose float output type comes from an attribute or that draw random numbers: left in float32
_GENERATORS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "EyeLike",
                         "Multinomial", "Bernoulli"})
_QDQ = frozenset({"QuantizeLinear", "DequantizeLinear"})


def to_half(values: np.ndarray, dtype: int) -> bytes:
    """The raw little-endian bytes of ``values`` in float16 or bfloat16 (round to nearest even)."""
    f = np.asarray(values, dtype=np.float32)
    if dtype == TensorProto.FLOAT16:
        return f.astype("<f2").tobytes()
    return bfloat16_bits(f).astype("<u2").tobytes()


def bfloat16_bits(f: np.ndarray) -> np.ndarray:
    """The bfloat16 bit patterns (uint16) of float32 ``f``, rounded to nearest even; NaN stays a (quiet) NaN."""
    u = np.ascontiguousarray(f, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return np.where(np.isnan(f), (u >> 16) | 0x40, rounded).astype(np.uint16)


def half_tensor(t: TensorProto, dtype: int) -> TensorProto:
    """A float32 TensorProto as a half one (same name and dims, raw data)."""
    out = TensorProto(name=t.name, data_type=dtype, dims=list(t.dims), raw_data=to_half(numpy_helper.to_array(t), dtype))
    if t.doc_string:
        out.doc_string = t.doc_string
    return out


#: a weight stays float32 when the values float16 flushes to zero hold more than this share of its sum of |x| (a
#: LayerNorm epsilon of 1e-12: all of it; the det model's Conv weights with 2 % of values below 2**-25: ~1e-9 of it)
WEIGHT_FLUSH_SHARE = 1e-3


def unsafe_values(values: np.ndarray, dtype: int) -> str | None:
    """Why float32 weight ``values`` cannot go to ``dtype`` (overflow to inf, or the values flushed to zero holding
    over ``WEIGHT_FLUSH_SHARE`` of the sum of |x|), else None. bfloat16 has float32's exponent range: only
    precision is lost."""
    if dtype != TensorProto.FLOAT16 or values.size == 0:
        return None
    a = np.abs(values.astype(np.float32, copy=False))
    finite = a[np.isfinite(a)]
    if finite.size and float(finite.max()) > FP16_MAX:
        return f"|x| up to {float(finite.max()):.4g} > float16's max {FP16_MAX:g}"
    flushed = (finite > 0) & (finite < FP16_TINY)
    if not flushed.any():
        return None
    mass = float(finite.sum(dtype=np.float64))
    lost = float(finite[flushed].sum(dtype=np.float64))
    if lost > WEIGHT_FLUSH_SHARE * mass:
        return f"{int(flushed.sum())} non-zero value(s) below {FP16_TINY:.3g} (flushed to 0 in float16) hold " \
               f"{lost / mass:.1%} of its sum of |x|"
    return None


def value_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every named value of the model, its bodies included (names are unique across scopes in
    ONNX), from shape inference of the skeleton, the declared inputs/outputs, initializers and Constant values."""
    from ..io import infer_shapes_skeleton

    types: dict[str, int] = {}
    inferred = infer_shapes_skeleton(model)
    for m in (inferred, model):
        for g, _ in proto_graphs(m.graph):
            for vi in list(g.value_info) + list(g.input) + list(g.output):
                if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                    types.setdefault(vi.name, vi.type.tensor_type.elem_type)
            for t in g.initializer:
                types[t.name] = t.data_type
            for n in g.node:
                if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
                    for a in n.attribute:
                        if a.name == "value":
                            types[n.output[0]] = a.t.data_type
                        elif a.name in ("value_float", "value_floats"):
                            types[n.output[0]] = FLOAT
    return types


def _key(node: onnx.NodeProto) -> str:
    """A node's identity across the pass (protobuf wrappers have no stable id()): its first output's name, unique in
    ONNX's single-assignment form."""
    out = next((o for o in node.output if o), None)
    return f"out:{out}" if out is not None else f"node:{node.name}:{node.op_type}"


def opset_of(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def _schema(node: onnx.NodeProto, opset: int):
    try:
        return onnx.defs.get_schema(node.op_type, opset, node.domain or "")
    except onnx.defs.SchemaError:
        return None


def _formal(params, i: int):
    """The formal parameter of actual slot ``i`` (a variadic last parameter takes the rest)."""
    if i < len(params):
        return params[i]
    if params and params[-1].option == onnx.defs.OpSchema.FormalParameterOption.Variadic:
        return params[-1]
    return None


@dataclass
class Decision:
    """Which nodes run in half precision and why the others do not."""

    half: set[str] = field(default_factory=set)  # _key() of the NodeProtos that run in half
    #: (node key, "in"/"out", slot) -> "follow" (the node's precision), "fixed" (float32) or "any" (takes any type)
    slots: dict[tuple[str, str, int], str] = field(default_factory=dict)
    skipped: list[Skip] = field(default_factory=list)


class ConvertFloat16:
    """Convert a model's float part to ``dtype`` ("float16" or "bfloat16"); see the module docstring.

    ``block_ops``: op types kept in float32. ``keep_nodes``: node names kept in float32. ``keep_tensors``: tensor
    names (activations or weights) that stay float32; the nodes reading or writing them run in float32.
    ``half_io``: the model's float inputs and outputs become half too."""

    role = "rewrite"
    name = "convert_float16"

    def __init__(self, dtype: str = "float16", *, half_io: bool = False, block_ops: tuple[str, ...] = (),
                 keep_nodes: tuple[str, ...] = (), keep_tensors: tuple[str, ...] | frozenset[str] = ()):
        if dtype not in HALF_TYPES:
            raise ValueError(f"dtype must be one of {sorted(HALF_TYPES)}, not {dtype!r}")
        self.dtype = dtype
        self.half = HALF_TYPES[dtype]
        self.half_io = half_io
        self.block_ops = frozenset(block_ops)
        self.keep_nodes = frozenset(keep_nodes)
        self.keep_tensors = frozenset(keep_tensors)
        self.norm_statistics: set[str] = set()

    # ------------------------------------------------------------------------------------------ decisions
    def decide(self, model: onnx.ModelProto, types: dict[str, int]) -> Decision:
        opset = opset_of(model)
        d = Decision()
        unsafe_weights = self.unsafe_weights_cache
        for g, _owner in proto_graphs(model.graph):
            for node in g.node:
                self._decide_node(node, opset, types, d, unsafe_weights)
        return d

    def unsafe_weights(self, model: onnx.ModelProto) -> dict[str, str]:
        """Float initializers and Constant values that cannot be held in the half type, with the reason."""
        out = {}
        for g, _ in proto_graphs(model.graph):
            for t in g.initializer:
                if t.data_type == FLOAT:
                    why = unsafe_values(numpy_helper.to_array(t), self.half)
                    if why:
                        out[t.name] = why
            for n in g.node:
                if n.op_type in ("Constant", "ConstantOfShape") and n.domain in ("", "ai.onnx"):
                    for a in n.attribute:
                        if a.name == "value" and a.t.data_type == FLOAT:
                            why = unsafe_values(numpy_helper.to_array(a.t), self.half)
                            if why and n.output:
                                out[n.output[0]] = why
        return out

    def _decide_node(self, node, opset, types, d: Decision, unsafe_weights: dict[str, str]) -> None:
        nid = _key(node)
        label = node.name or f"{node.op_type}({node.output[0] if node.output else ''})"
        floats_in = [i for i, x in enumerate(node.input) if x and types.get(x) == FLOAT]
        floats_out = [i for i, x in enumerate(node.output) if x and types.get(x) == FLOAT]
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            return  # follows its readers (below, in run)
        if not floats_in and not floats_out:
            return
        reason = None
        if node.domain not in ("", "ai.onnx"):
            reason = f"domain {node.domain}: not converted"
        elif node.op_type in CONTROL_FLOW:
            reason = None  # its bodies are converted inside, its interface keeps its types
            for i in floats_in:
                d.slots[(nid, "in", i)] = "any" if node.op_type == "If" else "fixed"
            for i in floats_out:
                d.slots[(nid, "out", i)] = "fixed"
            return
        elif node.op_type in self.block_ops:
            reason = f"op type {node.op_type} is in the block list"
        elif node.name and node.name in self.keep_nodes:
            reason = "node kept in float32"
        elif node.op_type in _GENERATORS:
            reason = f"{node.op_type} makes its float output from an attribute"
        elif self.half == TensorProto.BFLOAT16 and CUDA_BFLOAT16_FROM.get(node.op_type, 10**6) > opset:
            since = CUDA_BFLOAT16_FROM.get(node.op_type)
            reason = (f"{node.op_type} has no bfloat16 kernel in onnxruntime's CUDA provider"
                      + (f" before opset {since} (the model's is {opset}: --target-opset {since})" if since else ""))
        schema = _schema(node, opset) if reason is None else None
        if reason is None and schema is None:
            reason = f"no schema for {node.op_type} at opset {opset}"
        roles: dict[tuple[str, int], str] = {}
        if reason is None:
            constraints = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
            want = _TYPE_STR[self.half]
            groups: dict[str, list[tuple[str, int]]] = defaultdict(list)
            for kind, params, idx in (("in", schema.inputs, range(len(node.input))),
                                      ("out", schema.outputs, range(len(node.output)))):
                for i in idx:
                    p = _formal(params, i)
                    if p is not None:
                        groups[p.type_str].append((kind, i))
            float_slots = {("in", i) for i in floats_in} | {("out", i) for i in floats_out}
            for type_str, members in groups.items():
                floating = [m for m in members if m in float_slots]
                if not floating:
                    continue
                if type_str not in constraints:  # a fixed type such as tensor(float)
                    for m in floating:
                        roles[m] = "fixed"
                    continue
                has_out = any(k == "out" for k, _ in members)
                if not has_out and len(members) == 1:
                    roles[floating[0]] = "any"  # Shape's input, Cast's input: takes any type
                    continue
                if want not in constraints[type_str]:
                    reason = f"{node.op_type} (opset {opset}) has no {self.dtype} for its {type_str}"
                    break
                for m in floating:
                    roles[m] = "follow"
            if node.op_type == "Cast" and reason is None:
                to = next((a.i for a in node.attribute if a.name == "to"), None)
                if to == FLOAT and ("out", 0) in roles:  # an explicit Cast from half to float32 (a boundary) stays
                    roles[("out", 0)] = "fixed" if types.get(node.input[0]) in HALF_TYPES.values() else "follow"
            if node.op_type == "ConstantOfShape" and reason is None and floats_out:
                roles[("out", 0)] = "follow"
            if node.op_type in _QDQ and reason is None:
                scale = node.input[1] if len(node.input) > 1 else ""
                if scale in unsafe_weights or (scale and self._small_scale(scale)):
                    reason = "scale below float16's normal range (precision lost)"
        if reason is None:
            written = [node.output[i] for (k, i), r in roles.items() if r == "follow" and k == "out"]
            follows = [node.input[i] for (k, i), r in roles.items() if r == "follow" and k == "in"] + written
            bad = [t for t in follows if t in self.keep_tensors or t in unsafe_weights] + \
                  [t for t in written if t in self.norm_statistics]  # its readers may be half
            if bad:
                why = unsafe_weights.get(bad[0], "a normalization's statistics, computed in float32"
                                         if bad[0] in self.norm_statistics and bad[0] not in self.keep_tensors
                                         else "its range measured outside float16's")
                reason = f"tensor '{bad[0]}' stays float32 ({why})"
        if reason is not None:
            for i in floats_in:
                d.slots[(nid, "in", i)] = "fixed"
            for i in floats_out:
                d.slots[(nid, "out", i)] = "fixed"
            if node.op_type == "Cast":
                d.slots[(nid, "in", 0)] = "any"
            if node.op_type not in ("Shape", "Size", "Identity"):
                d.skipped.append(Skip(label, node.op_type, reason))
            return
        if not any(r == "follow" for r in roles.values()):
            for (k, i), r in roles.items():
                d.slots[(nid, k, i)] = r
            return
        d.half.add(nid)
        for (k, i), r in roles.items():
            d.slots[(nid, k, i)] = r

    def _small_scale(self, scale: str) -> bool:
        """A Q/DQ scale with a value below float16's normal range (an int32 bias's s_x * s_w): it would lose bits."""
        values = self._scales.get(scale)
        if values is None or self.half != TensorProto.FLOAT16:
            return False
        a = np.abs(values)
        return bool(np.any((a > 0) & (a < FP16_MIN_NORMAL)))

    # ------------------------------------------------------------------------------------------ rewrite
    def apply(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, PassResult]:
        """Rewrite ``model`` in place; returns it and what was done."""
        types = value_types(model)
        self._scales = {}
        for g, _ in proto_graphs(model.graph):
            for t in g.initializer:
                if t.data_type == FLOAT and t.name:
                    if int(np.prod(t.dims)) <= 4096:
                        self._scales[t.name] = numpy_helper.to_array(t).astype(np.float32)
        self.unsafe_weights_cache = self.unsafe_weights(model)
        from .rms_norm_divide import layer_norm_tensors, rms_statistics  # (it imports this module's helpers)

        self.norm_statistics = rms_statistics(model)
        if self.half == TensorProto.BFLOAT16:
            self.norm_statistics |= layer_norm_tensors(model)
        d = self.decide(model, types)
        stats = Rewriter(self, model, types, d).run()
        stats["half_nodes"] = len(d.half)
        stats["norm_statistics_float32"] = len(self.norm_statistics)
        ops: dict[str, int] = defaultdict(int)
        for g, _ in proto_graphs(model.graph):
            for n in g.node:
                if _key(n) in d.half:
                    ops[n.op_type] += 1
        stats["half_ops"] = dict(sorted(ops.items()))
        stats["float32_nodes"] = len(d.skipped)
        return model, PassResult(bool(d.half) or stats.get("io", 0) > 0, tuple(d.skipped), stats)


class Rewriter:
    """Applies a :class:`Decision`: sets tensor types, converts values, inserts Casts, renames graph outputs."""

    def __init__(self, conv: ConvertFloat16, model: onnx.ModelProto, types: dict[str, int], d: Decision):
        self.c, self.model, self.types, self.d = conv, model, types, d
        self.half = conv.half
        self.new_types: dict[str, int] = {}
        self.counter = 0
        self.used = set()
        for g, _ in proto_graphs(model.graph):
            self.used.update(x for n in g.node for x in list(n.input) + list(n.output))
            self.used.update(t.name for t in g.initializer)
            self.used.update(v.name for v in list(g.input) + list(g.output))
            self.used.update(n.name for n in g.node if n.name)

    def fresh(self, base: str) -> str:
        name = base
        while name in self.used:
            self.counter += 1
            name = f"{base}_{self.counter}"
        self.used.add(name)
        return name

    def run(self) -> dict:
        stats = {"casts": 0, "weights": 0, "constants": 0, "io": 0}
        self.stats = stats
        # 1. what each float value is wanted as, by its readers (all scopes)
        wants: dict[str, set[int]] = defaultdict(set)
        readers: dict[str, list] = defaultdict(list)
        for g, _ in proto_graphs(self.model.graph):
            for node in g.node:
                for i, x in enumerate(node.input):
                    if x and self.types.get(x) == FLOAT:
                        role = self.d.slots.get((_key(node), "in", i), "fixed")
                        if role != "any":
                            wants[x].add(self.half if role == "follow" and _key(node) in self.d.half else FLOAT)
                        readers[x].append((g, node, i, role))
                for a_body in proto_bodies(node):
                    for out in a_body.output:
                        if self.types.get(out.name) == FLOAT:
                            wants[out.name].add(FLOAT)
        main_outputs = {o.name for o in self.model.graph.output}
        for o in main_outputs:
            if self.types.get(o) == FLOAT:
                wants[o].add(self.half if self.c.half_io else FLOAT)
        # 2. the type each value is produced in; a small weight wanted in both types gets a float32 copy (a value
        # instead of a Cast kernel at every run)
        produced: dict[str, int] = {}
        self.copies: dict[str, str] = {}
        copies: list[tuple[onnx.GraphProto, onnx.NodeProto]] = []
        for g, owner in proto_graphs(self.model.graph):
            for vi in g.input:
                if self.types.get(vi.name) == FLOAT:
                    if owner is None and self.c.half_io and vi.name not in {t.name for t in g.initializer}:
                        produced[vi.name] = self.half
                        vi.type.tensor_type.elem_type = self.half
                        stats["io"] += 1
                    else:
                        produced[vi.name] = FLOAT
            for t in list(g.initializer):
                if t.data_type != FLOAT:
                    continue
                w = wants.get(t.name, set())
                if self.half in w and t.name not in self.c.keep_tensors and t.name not in self.c.unsafe_weights_cache:
                    if FLOAT in w and self._small(t) and t.name not in {vi.name for vi in g.input}:
                        copy = numpy_helper.from_array(numpy_helper.to_array(t), self.fresh(f"{t.name}_fp32"))
                        g.initializer.append(copy)
                        self.copies[t.name] = copy.name
                    t.CopyFrom(half_tensor(t, self.half))
                    produced[t.name] = self.half
                    stats["weights"] += 1
                    for vi in g.input:  # an initializer also listed as a graph input (IR < 4 style)
                        if vi.name == t.name and vi.type.HasField("tensor_type"):
                            vi.type.tensor_type.elem_type = self.half
                else:
                    produced[t.name] = FLOAT
            for node in g.node:
                nid = _key(node)
                if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and self.types.get(node.output[0]) == FLOAT:
                    w = wants.get(node.output[0], set())
                    if self.half in w and node.output[0] not in self.c.unsafe_weights_cache:
                        if FLOAT in w and all(self._small(a.t) if a.name == "value" else len(a.floats) <= SMALL_COPY_ELEMENTS
                                              for a in node.attribute):
                            copy = onnx.NodeProto()
                            copy.CopyFrom(node)
                            copy.output[0] = self.fresh(f"{node.output[0]}_fp32")
                            copy.name = self.fresh(f"{copy.output[0]}_Constant")
                            copies.append((g, copy))
                            self.copies[node.output[0]] = copy.output[0]
                        self._constant_to_half(node)
                        produced[node.output[0]] = self.half
                        stats["constants"] += 1
                    else:
                        produced[node.output[0]] = FLOAT
                    continue
                for i, x in enumerate(node.output):
                    if x and self.types.get(x) == FLOAT:
                        role = self.d.slots.get((nid, "out", i), "fixed")
                        produced[x] = self.half if role == "follow" and nid in self.d.half else FLOAT
                if nid in self.d.half:
                    if node.op_type == "Cast":
                        for a in node.attribute:
                            if a.name == "to" and a.i == FLOAT:
                                a.i = self.half
                    if node.op_type == "ConstantOfShape":
                        for a in node.attribute:
                            if a.name == "value" and a.t.data_type == FLOAT:
                                a.t.CopyFrom(half_tensor(a.t, self.half))
        for g, copy in copies:  # a Constant has no inputs: first in its graph
            g.node.insert(0, copy)
            produced[copy.output[0]] = FLOAT
        stats["float32_copies"] = len(self.copies)
        # values read from an enclosing scope that the producer loop did not see (none expected): float32
        self.produced = produced
        self._if_outputs_follow_branches(produced)
        # 3. Casts before readers whose wanted type differs, one per (graph, value, type)
        for g, _owner in proto_graphs(self.model.graph):
            self._cast_inputs(g, produced)
        # 4. outputs: the main graph's as asked (half_io), an If branch's as its If's output, other bodies' float32
        for g, owner in proto_graphs(self.model.graph):
            for j, o in enumerate(g.output):
                if self.types.get(o.name) != FLOAT:
                    continue
                if owner is None:
                    want = self.half if self.c.half_io else FLOAT
                elif owner.op_type == "If" and j < len(owner.output):
                    want = produced.get(owner.output[j], FLOAT)
                else:
                    want = FLOAT
                have = produced.get(o.name, FLOAT)
                if have != want:
                    self._cast_output(g, o.name, have, want)
                    o = g.output[j]
                if want != FLOAT:
                    o.type.tensor_type.elem_type = want
                    if owner is None:
                        stats["io"] += 1
        self._drop_unread_copies()
        # 5. declared value_info follows the new types
        for g, _ in proto_graphs(self.model.graph):
            for vi in g.value_info:
                if vi.name in produced and vi.type.HasField("tensor_type"):
                    vi.type.tensor_type.elem_type = produced[vi.name]
        return stats

    def _drop_unread_copies(self) -> None:
        """Remove the float32 copies nothing reads (a branch output wanted in float32 before its If went half)."""
        read = {x for g, _ in proto_graphs(self.model.graph) for n in g.node for x in n.input} | \
            {o.name for g, _ in proto_graphs(self.model.graph) for o in g.output}
        unread = {c for c in self.copies.values() if c not in read}
        if not unread:
            return
        for g, _ in proto_graphs(self.model.graph):
            keep_i = [t for t in g.initializer if t.name not in unread]
            if len(keep_i) != len(g.initializer):
                del g.initializer[:]
                g.initializer.extend(keep_i)
            keep_n = [n for n in g.node if not (n.op_type == "Constant" and n.output and n.output[0] in unread)]
            if len(keep_n) != len(g.node):
                del g.node[:]
                g.node.extend(keep_n)
        self.copies = {k: v for k, v in self.copies.items() if v not in unread}
        self.stats["float32_copies"] = len(self.copies)

    @staticmethod
    def _small(t: TensorProto) -> bool:
        """A weight small enough to be stored twice (float32 and half) rather than cast at run time."""
        return int(np.prod(t.dims)) <= SMALL_COPY_ELEMENTS

    def _if_outputs_follow_branches(self, produced: dict[str, int]) -> None:
        """An If output that every branch makes in half precision is half (no Cast to float32 at the end of each
        branch and back after the If). Repeated until nothing changes: a branch may return a nested If's output."""
        schema = _schema(helper.make_node("If", ["c"], ["y"]), opset_of(self.model))
        allowed = {t for c in (schema.type_constraints if schema else []) for t in c.allowed_type_strs}
        if _TYPE_STR[self.half] not in allowed:  # If-13 has no bfloat16 outputs, If-16 has
            return
        ifs = [n for g, _ in proto_graphs(self.model.graph) for n in g.node
               if n.op_type == "If" and n.domain in ("", "ai.onnx")]
        changed = True
        while changed:
            changed = False
            for node in reversed(ifs):  # nested Ifs first
                bodies = proto_bodies(node)
                for j, out in enumerate(node.output):
                    if not out or self.types.get(out) != FLOAT or produced.get(out) == self.half \
                            or out in self.c.keep_tensors:  # measured out of range: stays float32
                        continue
                    if bodies and all(j < len(b.output) and produced.get(b.output[j].name) == self.half
                                      for b in bodies):
                        produced[out] = self.half
                        self.stats["if_outputs"] = self.stats.get("if_outputs", 0) + 1
                        changed = True

    def _constant_to_half(self, node: onnx.NodeProto) -> None:
        for a in node.attribute:
            if a.name == "value":
                a.t.CopyFrom(half_tensor(a.t, self.half))
            elif a.name in ("value_float", "value_floats"):
                values = np.array(a.f if a.name == "value_float" else list(a.floats), dtype=np.float32)
                t = TensorProto(data_type=self.half, dims=[] if a.name == "value_float" else [values.size],
                                raw_data=to_half(values, self.half))
                node.ClearField("attribute")
                node.attribute.append(helper.make_attribute("value", t))
                return

    def _cast_inputs(self, g: onnx.GraphProto, produced: dict[str, int]) -> None:
        nodes = list(g.node)
        out: list[onnx.NodeProto] = []
        casts: dict[tuple[str, int], str] = {}
        for node in nodes:
            nid = _key(node)
            for i, x in enumerate(node.input):
                if not x or self.types.get(x) != FLOAT:
                    continue
                role = self.d.slots.get((nid, "in", i), "fixed")
                if role == "any":
                    continue
                want = self.half if role == "follow" and nid in self.d.half else FLOAT
                have = produced.get(x, FLOAT)
                if have == want:
                    continue
                if want == FLOAT and x in self.copies:
                    node.input[i] = self.copies[x]
                    continue
                key = (x, want)
                if key not in casts:
                    casts[key] = self.fresh(f"{x}_{'fp32' if want == FLOAT else self.c.dtype}")
                    out.append(helper.make_node("Cast", [x], [casts[key]], to=want,
                                                name=self.fresh(f"{casts[key]}_Cast")))
                    self.stats["casts"] += 1
                node.input[i] = casts[key]
            # a body reading an outer value directly: a Cast inside the body's readers handles it (next graph)
            out.append(node)
        del g.node[:]
        g.node.extend(out)

    def _cast_output(self, g: onnx.GraphProto, name: str, have: int, want: int) -> None:
        """Graph output ``name`` is made ``have`` but must leave as ``want``: its producer writes a renamed
        tensor, and a Cast writes ``name``."""
        inner = self.fresh(f"{name}_{'fp32' if have == FLOAT else self.c.dtype}")
        init = next((t for t in g.initializer if t.name == name), None)
        input_names = {v.name for v in g.input}
        if init is not None and name not in input_names:
            # an initializer that is also an output keeps its name there: the converted weight is renamed for its
            # readers, and the output is its float32 copy, or a Cast of it
            init.name = inner
            rename_reads(g, name, inner)
            self.produced[inner], self.produced[name] = have, want
            copy = self.copies.pop(name, None)
            if copy is not None and want == FLOAT:
                for t in g.initializer:
                    if t.name == copy:
                        t.name = name
                rename_reads(g, copy, name)
                self.copies[inner] = name
                return
            g.node.append(helper.make_node("Cast", [inner], [name], to=want, name=self.fresh(f"{name}_Cast")))
            self.stats["casts"] += 1
            return
        if init is not None or name in input_names or not any(name in n.output for n in g.node):
            # a graph input, initializer or outer value passed through: cast a copy
            g.node.append(helper.make_node("Cast", [name], [inner], to=want, name=self.fresh(f"{inner}_Cast")))
            for o in g.output:
                if o.name == name:
                    o.name = inner
            self.stats["casts"] += 1
            return
        _rename_value(g, name, inner)
        g.node.append(helper.make_node("Cast", [inner], [name], to=want, name=self.fresh(f"{name}_Cast")))
        self.produced[inner] = have
        self.stats["casts"] += 1


def rename_reads(g: onnx.GraphProto, old: str, new: str) -> None:
    """Nodes of ``g`` and its bodies that read value ``old`` read ``new`` instead."""
    for inner, _ in proto_graphs(g):
        for n in inner.node:
            for i, x in enumerate(n.input):
                if x == old:
                    n.input[i] = new


def _rename_value(g: onnx.GraphProto, old: str, new: str) -> None:
    """Rename value ``old`` to ``new`` in the nodes of ``g`` and its bodies (not in graph outputs)."""
    rename_reads(g, old, new)
    for inner, _ in proto_graphs(g):
        for n in inner.node:
            for i, x in enumerate(n.output):
                if x == old:
                    n.output[i] = new
        for vi in inner.value_info:
            if vi.name == old:
                vi.name = new
