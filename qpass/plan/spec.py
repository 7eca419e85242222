"""The quantization plan as data: a QSpec per tensor, the compute nodes to rewrite, and user overrides; JSON in and out.

A plan is computed once from the prepared graph (:func:`qpass.plan.policy.build_plan`), saved in the report, and can
be written to a file, edited (a node's ``"precision": "float"``, a tensor's ``"dtype"``, or an ``overrides`` entry
by node name, op type or regular expression) and loaded again to rewrite the same prepared model without planning or
calibrating again. Nodes are named by their node name, or ``Op(first output)`` when unnamed (output names are unique).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..calib.methods import METHODS as CALIB_METHODS
from ..errors import PlanError
from ..pass_manager import Skip

PLAN_SCHEMA_VERSION = 1
#: integer types a QSpec may name ("float" keeps the tensor unquantized)
DTYPES = ("int2", "int4", "uint4", "int8", "uint8", "int16", "uint16", "int32", "nf4", "float")
GRANULARITIES = ("tensor", "channel", "block")
PRECISIONS = ("quantized", "float")


@dataclass(frozen=True)
class QSpec:
    """How one tensor is quantized.

    Attributes:
        dtype: integer type of the quantized values (int2, int4, uint4, int8, uint8, int16, uint16, int32), "nf4"
            (4-bit codes of the NF4 codebook; weight-only) or "float".
        symmetric: zero point 0 (True) or from the range (False).
        granularity: "tensor" (one scale), "channel" (one scale per index of ``axis``) or "block" (one scale per
            ``block_size`` consecutive values along ``axis``, the opset-21 blocked form).
        axis: the channel or block axis; None for "tensor".
        block_size: values per block; only with "block".
        method: calibration method of an activation's range (minmax, percentile, mse, entropy); None for weights,
            whose range comes from their values.
        dynamic: the range is computed at run time (DynamicQuantizeLinear) instead of calibrated.
    """

    dtype: str = "int8"
    symmetric: bool = True
    granularity: str = "tensor"
    axis: int | None = None
    block_size: int | None = None
    method: str | None = None
    dynamic: bool = False

    def __post_init__(self) -> None:
        where = f"spec {self.to_dict()}"
        if self.dtype not in DTYPES:
            raise PlanError(f"dtype {self.dtype!r} is not one of {list(DTYPES)}", subject=where)
        if not isinstance(self.symmetric, bool) or not isinstance(self.dynamic, bool):
            raise PlanError("symmetric and dynamic must be true or false", subject=where)
        if self.granularity not in GRANULARITIES:
            raise PlanError(f"granularity {self.granularity!r} is not one of {list(GRANULARITIES)}", subject=where)
        if self.granularity == "tensor" and (self.axis is not None or self.block_size is not None):
            raise PlanError("granularity 'tensor' takes no axis or block_size", subject=where)
        if self.granularity != "tensor" and (not isinstance(self.axis, int) or isinstance(self.axis, bool)):
            raise PlanError(f"granularity {self.granularity!r} needs an integer axis", subject=where)
        if self.granularity == "block" and not (isinstance(self.block_size, int) and not isinstance(self.block_size, bool)
                                                and self.block_size > 0):
            raise PlanError("granularity 'block' needs a positive integer block_size", subject=where)
        if self.granularity == "channel" and self.block_size is not None:
            raise PlanError("granularity 'channel' takes no block_size", subject=where)
        if self.method is not None and self.method not in CALIB_METHODS:
            raise PlanError(f"method {self.method!r} is not one of {list(CALIB_METHODS)}", subject=where)

    @property
    def quantized(self) -> bool:
        return self.dtype != "float"

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "spec") -> "QSpec":
        if not isinstance(data, dict):
            raise PlanError(f"a spec must be a table, not {type(data).__name__}", subject=where)
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise PlanError(f"unknown spec key(s) {unknown}", subject=where,
                            hint=f"known keys: {[f.name for f in fields(cls)]}")
        return cls(**data)

    def with_changes(self, changes: dict[str, Any], *, where: str = "spec") -> "QSpec":
        """This spec with some fields replaced (an override); the result is validated as a whole."""
        merged = {**self.to_dict(), **changes}
        if merged.get("granularity") == "tensor":  # an axis or block size the new granularity has no use for
            merged["axis"], merged["block_size"] = changes.get("axis"), changes.get("block_size")
        elif merged.get("granularity") == "channel":
            merged["block_size"] = changes.get("block_size")
        return QSpec.from_dict(merged, where=where)


@dataclass(frozen=True)
class WeightPlan:
    """A compute node's constant weight: its input slot, initializer name and spec."""

    input: int
    tensor: str
    spec: QSpec


@dataclass(frozen=True)
class BiasPlan:
    """A compute node's constant bias: int32 with scale s_x * s_w (``dtype`` "int32") or left float ("float").
    ``axis``: the bias DequantizeLinear's channel axis; None for a scalar bias; -1 where it stays float."""

    input: int
    tensor: str
    dtype: str = "int32"
    axis: int | None = 0


@dataclass(frozen=True)
class NodePlan:
    """One compute node to rewrite: which inputs are activations, its weight and bias, and notes for the report."""

    node: str
    op_type: str
    activations: tuple[int, ...] = ()
    weight: WeightPlan | None = None
    bias: BiasPlan | None = None
    notes: tuple[str, ...] = ()
    precision: str = "quantized"


@dataclass(frozen=True)
class TensorPlan:
    """One activation that gets a QuantizeLinear/DequantizeLinear pair.

    ``range_of``: the tensor whose calibrated range it uses (itself, or the input of the data movement it came
    through). ``readers``: the nodes that read the dequantized value; None for every reader."""

    name: str
    spec: QSpec
    range_of: str
    readers: tuple[str, ...] | None = ()


#: what an override may match on, and what it may set
_MATCH_KEYS = ("node", "node_regex", "op_type", "tensor", "tensor_regex")
_SET_KEYS = ("precision", "weight", "spec")


@dataclass(frozen=True)
class Override:
    """A user's change to the plan: one match key and what to set.

    ``{"node": "conv1", "precision": "float"}`` keeps a node in float; ``{"op_type": "Gemm", "weight": {"granularity":
    "tensor", "axis": null}}`` changes weight specs; ``{"tensor_regex": ".*attn.*", "spec": {"dtype": "uint16"}}``
    changes activation specs; ``{"tensor": "x", "precision": "float"}`` drops an activation's Q/DQ pair."""

    match: str
    value: str
    precision: str | None = None
    weight: dict | None = None
    spec: dict | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {self.match: self.value}
        for key in _SET_KEYS:
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        return d

    @classmethod
    def from_dict(cls, data: Any, *, where: str) -> "Override":
        if not isinstance(data, dict):
            raise PlanError("an override must be a table", subject=where)
        keys = [k for k in _MATCH_KEYS if k in data]
        unknown = sorted(set(data) - set(_MATCH_KEYS) - set(_SET_KEYS))
        if unknown or len(keys) != 1:
            raise PlanError(f"an override needs exactly one of {list(_MATCH_KEYS)} and only {list(_SET_KEYS)} besides",
                            subject=where, hint=f"got keys {sorted(data)}")
        match, value = keys[0], data[keys[0]]
        if not isinstance(value, str):
            raise PlanError(f"'{match}' must be a string", subject=where)
        if match.endswith("_regex"):
            try:
                re.compile(value)
            except re.error as exc:
                raise PlanError(f"invalid regular expression {value!r} ({exc})", subject=where) from None
        precision = data.get("precision")
        if precision is not None and precision not in PRECISIONS:
            raise PlanError(f"precision {precision!r} is not one of {list(PRECISIONS)}", subject=where)
        for key in ("weight", "spec"):
            if data.get(key) is not None and not isinstance(data[key], dict):
                raise PlanError(f"'{key}' must be a table of spec fields", subject=where)
        if match in ("tensor", "tensor_regex") and data.get("weight") is not None:
            raise PlanError("a tensor override sets 'spec' or 'precision', not 'weight'", subject=where)
        if match not in ("tensor", "tensor_regex") and data.get("spec") is not None:
            raise PlanError("a node override sets 'weight' or 'precision'; activations are set by 'tensor'", subject=where)
        if precision is None and data.get("weight") is None and data.get("spec") is None:
            raise PlanError("an override must set 'precision', 'weight' or 'spec'", subject=where)
        return cls(match, value, precision, data.get("weight"), data.get("spec"))

    def matches_node(self, node: NodePlan) -> bool:
        if self.match == "node":
            return node.node == self.value
        if self.match == "node_regex":
            return re.fullmatch(self.value, node.node) is not None
        return self.match == "op_type" and node.op_type == self.value

    def matches_tensor(self, name: str) -> bool:
        if self.match == "tensor":
            return name == self.value
        return self.match == "tensor_regex" and re.fullmatch(self.value, name) is not None


@dataclass(frozen=True)
class QuantPlan:
    """Tensor -> spec for every activation to quantize, the compute nodes to rewrite, what planning skipped and why,
    and the overrides still to apply. Immutable and picklable; :meth:`with_overrides` applies the overrides."""

    nodes: tuple[NodePlan, ...] = ()
    tensors: dict[str, TensorPlan] = field(default_factory=dict)
    skipped: tuple[Skip, ...] = ()
    overrides: tuple[Override, ...] = ()
    #: statistics calibration must collect besides ranges, by tensor (e.g. {"x": ("gram",)} for GPTQ)
    statistics: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def calibrate(self) -> list[str]:
        """The tensors whose range calibration must measure (each shared range once, in plan order); a dynamic
        spec's range is computed at run time, not calibrated."""
        return list(dict.fromkeys(t.range_of for t in self.tensors.values() if not t.spec.dynamic))

    def methods(self) -> dict[str, str]:
        """Calibration method per calibrated tensor: its own spec's, or (a shared range whose source tensor is not
        itself quantized) that of the first tensor using it."""
        out: dict[str, str] = {}
        for t in self.tensors.values():
            if t.range_of not in out and not t.spec.dynamic:
                source = self.tensors.get(t.range_of, t)
                out[t.range_of] = source.spec.method or "minmax"
        return out

    def node(self, name: str) -> NodePlan | None:
        return next((n for n in self.nodes if n.node == name), None)

    # ------------------------------------------------------------------ overrides
    def with_overrides(self, extra: tuple[Override, ...] | list[Override] = ()) -> "QuantPlan":
        """The plan with its overrides (and ``extra``, applied after them) folded into the nodes and tensors.

        A node moved to float leaves every tensor's reader list, and is reported as skipped; an activation moved
        to float loses its Q/DQ pair (a compute node reading it then stays float, for want of a range). An
        override that matches nothing is an error: a typo would otherwise change nothing silently."""
        overrides = tuple(self.overrides) + tuple(extra)
        if not overrides:
            return self.without_float_nodes()
        nodes = list(self.nodes)
        tensors = dict(self.tensors)
        skipped = list(self.skipped)
        for i, ov in enumerate(overrides):
            where = f"plan override {i} {ov.to_dict()}"
            hit = False
            if ov.match in ("tensor", "tensor_regex"):
                for name, tp in list(tensors.items()):
                    if not ov.matches_tensor(name):
                        continue
                    hit = True
                    if ov.precision == "float":
                        del tensors[name]
                        continue
                    if ov.spec:
                        tensors[name] = replace(tp, spec=tp.spec.with_changes(ov.spec, where=where))
            else:
                for j, np_ in enumerate(nodes):
                    if np_ is None or not ov.matches_node(np_):
                        continue
                    hit = True
                    if ov.precision is not None:
                        nodes[j] = replace(np_, precision=ov.precision)
                    if ov.weight and np_.weight is not None:
                        w = np_.weight
                        nodes[j] = replace(nodes[j], weight=replace(w, spec=w.spec.with_changes(ov.weight, where=where)))
            if not hit:
                raise PlanError("matches no node or tensor of the plan", subject=where,
                                hint="node names are as in the plan's 'nodes' list (Op(output) when unnamed); "
                                     "tensors as in its 'tensors' table")
        return QuantPlan(tuple(nodes), tensors, tuple(skipped), (), self.statistics).without_float_nodes()

    def without_float_nodes(self) -> "QuantPlan":
        """Nodes marked ``precision: float`` dropped (reported as skipped) and removed from every reader list."""
        floats = [n for n in self.nodes if n.precision == "float"]
        if not floats:
            return self
        gone = {n.node for n in floats}
        tensors = {}
        for name, tp in self.tensors.items():
            if tp.readers is not None:
                readers = tuple(r for r in tp.readers if r not in gone)
                if not readers:
                    continue  # nothing reads its Q/DQ pair any more
                tp = replace(tp, readers=readers)
            tensors[name] = tp
        skipped = tuple(self.skipped) + tuple(Skip(n.node, n.op_type, "kept in float by the plan") for n in floats)
        return QuantPlan(tuple(n for n in self.nodes if n.precision != "float"), tensors, skipped, self.overrides,
                         self.statistics)

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        def node(n: NodePlan) -> dict:
            d: dict[str, Any] = {"node": n.node, "op_type": n.op_type, "precision": n.precision,
                                 "activations": list(n.activations)}
            if n.weight is not None:
                d["weight"] = {"input": n.weight.input, "tensor": n.weight.tensor, "spec": n.weight.spec.to_dict()}
            if n.bias is not None:
                d["bias"] = {"input": n.bias.input, "tensor": n.bias.tensor, "dtype": n.bias.dtype, "axis": n.bias.axis}
            if n.notes:
                d["notes"] = list(n.notes)
            return d

        return {
            "schema_version": PLAN_SCHEMA_VERSION,
            "nodes": [node(n) for n in self.nodes],
            "tensors": {k: {"spec": t.spec.to_dict(), "range_of": t.range_of,
                            "readers": None if t.readers is None else list(t.readers)} for k, t in self.tensors.items()},
            "skipped": [s.to_dict() for s in self.skipped],
            "overrides": [o.to_dict() for o in self.overrides],
            "statistics": {k: list(v) for k, v in self.statistics.items()},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "plan") -> "QuantPlan":
        if not isinstance(data, dict) or "nodes" not in data or "tensors" not in data:
            raise PlanError("not a qpass plan (no 'nodes' and 'tensors')", subject=source)
        if data.get("schema_version", PLAN_SCHEMA_VERSION) != PLAN_SCHEMA_VERSION:
            raise PlanError(f"plan schema_version {data.get('schema_version')} is not {PLAN_SCHEMA_VERSION}",
                            subject=source)
        try:
            nodes = tuple(_node_from_dict(n, f"{source}: node {i}") for i, n in enumerate(data["nodes"]))
            tensors = {}
            for name, t in data["tensors"].items():
                readers = t.get("readers", [])
                if not (readers is None or isinstance(readers, list)):
                    raise PlanError(f"tensor '{name}': readers must be a list of node names or null", subject=source)
                tensors[name] = TensorPlan(name, QSpec.from_dict(t["spec"], where=f"{source}: tensor '{name}'"),
                                           str(t.get("range_of", name)), None if readers is None else tuple(map(str, readers)))
            skipped = tuple(Skip(str(s["node"]), str(s["op_type"]), str(s["reason"])) for s in data.get("skipped", ()))
            overrides = tuple(Override.from_dict(o, where=f"{source}: override {i}")
                              for i, o in enumerate(data.get("overrides", ())))
            statistics = {str(k): tuple(str(x) for x in v) for k, v in data.get("statistics", {}).items()}
        except PlanError:
            raise
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise PlanError(f"malformed plan ({type(exc).__name__}: {exc})", subject=source) from None
        return cls(nodes, tensors, skipped, overrides, statistics)

    @classmethod
    def from_json(cls, text: str, *, source: str = "plan") -> "QuantPlan":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise PlanError(f"not JSON ({exc})", subject=source) from None
        return cls.from_dict(data, source=source)

    def save(self, path: str | Path) -> Path:
        from ..io import write_text_atomic

        return write_text_atomic(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "QuantPlan":
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise PlanError(f"cannot read ({exc})", subject=str(path)) from None
        return cls.from_json(text, source=str(path))


def _node_from_dict(d: Any, where: str) -> NodePlan:
    if not isinstance(d, dict):
        raise PlanError("a node entry must be a table", subject=where)
    known = {"node", "op_type", "precision", "activations", "weight", "bias", "notes"}
    unknown = sorted(set(d) - known)
    if unknown:
        raise PlanError(f"unknown node key(s) {unknown}", subject=where, hint=f"known keys: {sorted(known)}")
    precision = d.get("precision", "quantized")
    if precision not in PRECISIONS:
        raise PlanError(f"precision {precision!r} is not one of {list(PRECISIONS)}", subject=where)
    w = d.get("weight")
    weight = None if w is None else WeightPlan(int(w["input"]), str(w["tensor"]),
                                               QSpec.from_dict(w["spec"], where=f"{where} weight"))
    b = d.get("bias")
    bias = None
    if b is not None:
        if b.get("dtype", "int32") not in ("int32", "float"):
            raise PlanError(f"bias dtype {b.get('dtype')!r} is not int32 or float", subject=where)
        axis = b.get("axis", 0)
        bias = BiasPlan(int(b["input"]), str(b["tensor"]), str(b.get("dtype", "int32")), None if axis is None else int(axis))
    for key in ("activations", "notes"):
        if not isinstance(d.get(key, []), list):
            raise PlanError(f"'{key}' must be a list", subject=where)
    if any(isinstance(i, bool) or not isinstance(i, int) for i in d.get("activations", [])):
        raise PlanError("'activations' must list input indices", subject=where)
    return NodePlan(str(d["node"]), str(d["op_type"]), tuple(d.get("activations", ())), weight, bias,
                    tuple(str(x) for x in d.get("notes", ())), precision)
