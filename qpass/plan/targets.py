"""Analysis (not a pass): which compute nodes get quantized, on which inputs and axes, or why not.

What :mod:`qpass.plan.policy` turns into the plan's node entries; :mod:`qpass.plan.bind` checks a loaded plan's
weight axes against :func:`output_channel_axis`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import onnx_graphsurgeon as gs

from ..config import QuantConfig
from ..graph import Scope, constant_behind, is_float32, is_onnx_op, node_label, producer, scopes
from ..ops import BIAS_OPS, LOG_PATH_OPS, RECURRENT, WEIGHT_CHANNEL_AXIS
from ..pass_manager import Skip

if TYPE_CHECKING:
    from .spec import QSpec


@dataclass
class Target:
    """A compute node and the roles of its inputs (indices into ``node.inputs``)."""

    node: gs.Node
    activations: list[int] = field(default_factory=list)
    weight: int | None = None
    weight_axis: int | None = None
    bias: int | None = None
    bias_axis: int | None = None
    notes: list[str] = field(default_factory=list)
    #: set when bound from a plan: the weight's spec and the bias's dtype ("int32" or "float")
    weight_spec: "QSpec | None" = None
    bias_dtype: str = "int32"
    #: the node's label in the plan (``If_0/then/Conv_3`` inside a body; node_label at the top level)
    label: str = ""

    def __post_init__(self) -> None:
        self.label = self.label or node_label(self.node)


def _from_dq(t: gs.Tensor) -> bool:
    p = producer(t)
    return p is not None and p.op == "DequantizeLinear"


def _is_weight(t: gs.Tensor) -> bool:
    return isinstance(t, gs.Constant) and is_float32(t)


def _is_activation(t: gs.Tensor) -> bool:
    return isinstance(t, gs.Variable) and is_float32(t) and not _from_dq(t)


#: control-flow ops whose bodies get quantized: each is calibrated as a model of its own (qpass.calib.subgraphs), a
#: Loop or Scan body once per iteration; a Scan of opset 8 (the batched form) is not
CALIBRATED_BODIES = frozenset({"If", "Loop", "Scan"})
#: the first opset of the Scan that calibration follows
SCAN_MIN_OPSET = 9


def _calibrated(scope: Scope, opset: int) -> bool:
    return all(op in CALIBRATED_BODIES and (op != "Scan" or opset >= SCAN_MIN_OPSET) for op in scope.owners)


def quantizable_scopes(graph: gs.Graph) -> list[Scope]:
    """The top-level graph and the If branches and Loop/Scan bodies (nested in those only) whose compute gets
    quantized."""
    return [s for s in scopes(graph) if _calibrated(s, graph.opset)]


#: how many compute nodes in a row a Log's walk marks (a spectrogram: a filter bank after a transform)
LOG_PATH_COMPUTE = 2
#: ops whose output is a magnitude (a square, a power, a sum of them): an Add or Sub of two of these (re^2 + im^2) is
#: a power spectrum, one of anything else a residual join or a centring, where the walk stops
MAGNITUDE_OPS = frozenset({"Mul", "Pow", "Abs", "Sqrt", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2",
                           "ReduceMean"})


def _walks_through(node: gs.Node) -> bool:
    """Whether a Log's walk goes on upstream through ``node`` (one of LOG_PATH_OPS): not through a clamp from above
    (Clip with a max: a ReLU6 is an activation function), nor through an Add/Sub of two computed tensors unless both
    are magnitudes."""
    if node.op == "Clip":
        return len(node.inputs) < 3 or not node.inputs[2].name  # a lower bound only (log(clip(x, eps)))
    if node.op == "Max":
        return any(isinstance(t, gs.Constant) for t in node.inputs)  # log(max(x, eps))
    if node.op in ("Add", "Sub"):
        computed = [t for t in node.inputs if not isinstance(t, gs.Constant) and constant_behind(t) is None]
        return len(computed) < 2 or all(len(t.inputs) == 1 and t.inputs[0].op in MAGNITUDE_OPS for t in computed)
    return True


def log_feeders(graph: gs.Graph, op_types: tuple[str, ...] | frozenset[str]) -> dict[int, str]:
    """id(node) -> the Log it feeds, for the compute nodes whose output reaches a Log (of ``graph`` or of a body in it)
    through :data:`LOG_PATH_OPS` only (see :func:`_walks_through`), at most :data:`LOG_PATH_COMPUTE` compute nodes
    deep (config.float_before_log)."""
    found: dict[int, str] = {}
    for scope in scopes(graph):
        for log in scope.graph.nodes:
            if log.op != "Log" or not is_onnx_op(log) or not log.inputs:
                continue
            stack: list[tuple[gs.Tensor, int]] = [(log.inputs[0], 0)]
            seen: set[tuple[str, int]] = set()
            while stack:
                t, depth = stack.pop()
                if not isinstance(t, gs.Variable) or len(t.inputs) != 1 or (t.name, depth) in seen:
                    continue
                seen.add((t.name, depth))
                p = t.inputs[0]
                if not is_onnx_op(p):
                    continue
                if p.op in op_types:
                    found.setdefault(id(p), scope.label(log))
                    if depth + 1 < LOG_PATH_COMPUTE:
                        stack.extend((i, depth + 1) for i in p.inputs)
                elif p.op in LOG_PATH_OPS and _walks_through(p):
                    stack.extend((i, depth) for i in p.inputs)
    return found


def find_targets(graph: gs.Graph, config: QuantConfig) -> tuple[list[Target], list[Skip]]:
    """Targets in the top-level graph, If branches and Loop/Scan bodies, and the candidates skipped with a reason
    (recurrent ops; compute in a body calibration cannot follow).

    A node whose inputs are all already behind DequantizeLinear is neither (it is done).
    """
    targets: list[Target] = []
    skips: list[Skip] = []
    before_log = log_feeders(graph, config.op_types) if config.float_before_log else {}
    for scope in quantizable_scopes(graph):
        found, skipped = scope_targets(scope, config, before_log)
        targets += found
        skips += skipped
    skips.extend(subgraph_skips(graph, config))
    return targets, skips


def scope_targets(scope: Scope, config: QuantConfig, before_log: dict[int, str] | None = None) -> tuple[list[Target], list[Skip]]:
    """The targets among one graph's own nodes (not its bodies'), and the candidates skipped there; ``before_log``:
    :func:`log_feeders` of the whole model (a Log in a body can read an outer graph's Conv)."""
    targets: list[Target] = []
    skips: list[Skip] = []
    before_log = before_log or {}
    for node in scope.graph.nodes:
        if node.op not in config.op_types:
            continue
        label = scope.label(node)

        def skip(reason: str) -> None:
            skips.append(Skip(label, node.op, reason))

        if not is_onnx_op(node):
            skip(f"{node.op} of domain '{node.domain}' is not the ONNX operator; left alone")
            continue

        if config.is_excluded(node.name or "") or (scope.prefix and config.is_excluded(label)):
            skip("excluded by configuration")
            continue
        if config.exclude_before:
            readers = [r for y in node.outputs for r in y.outputs]
            if readers and all(r.op in config.exclude_before for r in readers):
                skip(f"its output is read only by {', '.join(sorted({r.op for r in readers}))} (exclude_before)")
                continue
        if id(node) in before_log:
            skip(f"computes what Log '{before_log[id(node)]}' reads (through linear and magnitude ops): 8-bit error "
                 "would be relative error without bound on its small values; kept in float (--quantize-before-log "
                 "quantizes it)")
            continue
        ins = node.inputs
        if len(ins) < 2:
            skip("fewer than two inputs")
            continue
        x, w = ins[0], ins[1]
        if _from_dq(w) and (_from_dq(x) or not _is_activation(x)):
            continue  # already quantized
        if not _is_weight(w):
            if _from_dq(w):
                pass
            elif isinstance(w, gs.Constant):
                skip(f"weight '{w.name}' is {w.dtype}, not float32")
                continue
            elif node.op == "MatMul":
                if config.activation_matmuls and _is_activation(x) and _is_activation(w):
                    targets.append(Target(node, activations=[0, 1], label=label))
                    continue
                skip("no constant weight (activation x activation MatMul) kept in float")
                continue
            else:
                skip(f"{node.op} with dynamic weight '{w.name}' kept in float")
                continue
        t = Target(node, label=label)
        if _is_activation(x):
            t.activations.append(0)
        elif not _from_dq(x):
            skip(f"input '{x.name}' is not a float32 activation")
            continue
        if _is_weight(w):
            t.weight = 1
            t.weight_axis = _weight_axis(node, w, config, t)
        if len(ins) > 2 and node.op in BIAS_OPS and ins[2] is not None and ins[2].name:
            b = ins[2]
            if _is_weight(b):
                t.bias = 2
                t.bias_axis = _bias_axis(node, b, w, t)
            elif not _from_dq(b):
                t.notes.append(f"bias '{b.name}' is not a float32 constant; kept as is")
        targets.append(t)
    return targets, skips


def subgraph_skips(graph: gs.Graph, config: QuantConfig) -> list[Skip]:
    """Recurrent ops anywhere, and compute ops in bodies calibration cannot follow: not quantized, and said so."""
    skips: list[Skip] = []
    for scope in scopes(graph):
        followed = _calibrated(scope, graph.opset)
        for node in scope.graph.nodes:
            if node.op in RECURRENT:
                where = f" (inside {scope.prefix[:-1]})" if scope.prefix else ""
                skips.append(Skip(scope.label(node), node.op, f"recurrent op{where}: not quantized; kept in float"))
            elif not followed and node.op in config.op_types:
                skips.append(Skip(scope.label(node), node.op,
                                  f"inside {scope.prefix[:-1]}, a body calibration does not follow (a Scan of "
                                  f"opset < {SCAN_MIN_OPSET}, or under an op other than If/Loop/Scan); kept in float"))
    return skips


def output_channel_axis(node: gs.Node, rank: int) -> tuple[int | None, str | None]:
    """The weight axis per-channel scales go on (its output channels), or None and the reason there is none."""
    if node.op == "ConvTranspose" and int(node.attrs.get("group", 1)) != 1:
        return None, "grouped ConvTranspose: per-tensor weight scale (output channels span axes 0 and 1)"
    if node.op in WEIGHT_CHANNEL_AXIS:
        return WEIGHT_CHANNEL_AXIS[node.op], None
    if node.op == "Gather":  # an embedding table: one scale per row (token)
        return (0 if int(node.attrs.get("axis", 0)) == 0 else None), None
    if node.op == "Gemm":
        return (0 if int(node.attrs.get("transB", 0)) else 1), None
    if node.op == "MatMul":
        if rank > 2:
            # one scale per column of a batched (rank > 2) B cannot be written in a form onnxruntime runs: its fused
            # MatMulIntegerToFloat (DQ -> MatMul at the default optimization level) rejects a 1-D per-axis zero point
            # for a B of rank > 2 ("b zero point is not valid")
            return None, f"MatMul weight of rank {rank}: per-tensor weight scale (per-column scales need a 2-D weight)"
        return (rank - 1 if rank == 2 else None), None
    return None, None


def _weight_axis(node: gs.Node, w: gs.Constant, config: QuantConfig, t: Target) -> int | None:
    if not config.per_channel:
        return None
    axis, note = output_channel_axis(node, len(w.shape))
    if note:
        t.notes.append(note)
    return axis


def _bias_axis(node: gs.Node, b: gs.Constant, w: gs.Tensor, t: Target) -> int | None:
    shape = tuple(b.shape)
    if len(shape) == 1:
        return 0
    if node.op == "Gemm" and len(shape) == 2 and shape[0] == 1:
        return 1
    if len(shape) == 0:
        return None
    t.notes.append(f"bias '{b.name}' of shape {list(shape)} kept in float (not one value per output channel)")
    return -1  # sentinel: do not quantize
