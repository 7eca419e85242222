"""Analysis (not a pass): which activation tensors get a Q/DQ pair, whose range each uses, and which consumers read it.

The plan, from the compute targets of :mod:`targets`:

* an activation input of a quantized compute op is quantized for the quantized consumers only, so
  float neighbours (a residual Add, a LayerNorm) keep reading the exact tensor;
* the output of a quantized compute op is quantized for all its consumers, after folding a single
  Relu or Clip consumer into it (quantize the activation's output; onnxruntime then drops the Relu),
  so that the runtime can fuse DQ -> op -> Q into one integer kernel;
* a join or pooling op (a residual Add, Concat, AveragePool, GlobalAveragePool; ``config.neighbour_ops``)
  whose float inputs are all quantized (or data movement of quantized tensors) reads them dequantized and
  gets its own quantized output, so that int8 flows through it (onnxruntime runs DQ -> op -> Q as one
  QLinearAdd / QLinearConcat / QLinearAveragePool kernel) instead of converting to float and back;
* a data-movement op (Reshape, Transpose, Flatten, Squeeze, Unsqueeze, Identity, MaxPool, ...) between
  two quantized tensors reads the dequantized input and its output shares the input's range, so the
  pair around it is lossless and removable.

Calibration needs ranges only for the tensors in :attr:`Plan.calibrate`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import onnx_graphsurgeon as gs

from ..config import QuantConfig
from ..graph import is_float32, is_onnx_op
from ..ops import DATA_MOVEMENT, RANGE_FOLDING
from ..pass_manager import Skip
from .targets import Target, find_targets, quantizable_scopes



@dataclass
class QTensor:
    name: str
    #: None: every consumer in the graph reads DQ; else only these nodes (by id)
    consumers: set[int] | None = field(default_factory=set)
    #: the tensor whose calibrated range this one uses (itself unless shared)
    range_of: str = ""


@dataclass
class Plan:
    targets: list[Target]
    skips: list[Skip]
    tensors: dict[str, QTensor]

    def related_ops(self) -> dict[str, set[str]]:
        """For each calibrated tensor, the compute op types that read it or (through a folded Relu/Clip) write it:
        what ``op_methods`` in the config is keyed by."""
        related: dict[str, set[str]] = {name: set() for name in self.calibrate}
        for tg in self.targets:
            names = [tg.node.inputs[i].name for i in tg.activations]
            if tg.node.outputs:
                y = _folded_output(tg.node.outputs[0])
                names.append(y.name)
            for n in names:
                root = self.tensors[n].range_of if n in self.tensors else None
                if root in related:
                    related[root].add(tg.node.op)
        return related

    @property
    def calibrate(self) -> list[str]:
        seen: dict[str, None] = {}
        for q in self.tensors.values():
            seen.setdefault(q.range_of, None)
        return list(seen)


def _consumed_by_q(t: gs.Tensor) -> bool:
    return any(c.op == "QuantizeLinear" for c in t.outputs)


def _folded_output(y: gs.Variable) -> gs.Variable:
    """y, or the output of a single Relu/Clip that is y's only consumer."""
    if len(y.outputs) == 1 and y.outputs[0].op in RANGE_FOLDING and is_onnx_op(y.outputs[0]) and y.outputs[0].inputs[0] is y:
        act = y.outputs[0]
        if act.op == "Clip" and any(not isinstance(t, gs.Constant) for t in act.inputs[1:] if t.name):
            return y
        return act.outputs[0]
    return y


def _quantized(t: gs.Tensor, tensors: dict, depth: int = 0) -> bool:
    """t is planned, or data movement (possibly chained) of a planned tensor."""
    if t.name in tensors:
        return True
    prod = t.inputs[0] if isinstance(t, gs.Variable) and len(t.inputs) == 1 else None
    return (prod is not None and prod.op in DATA_MOVEMENT and is_onnx_op(prod) and bool(prod.inputs)
            and depth < 8 and _quantized(prod.inputs[0], tensors, depth + 1))


def _neighbour_inputs(node: gs.Node) -> list[gs.Tensor] | None:
    """The float activations a join/pooling node would read dequantized, or None if it cannot run in int8."""
    if node.op == "Add":
        ins = list(node.inputs)
        if len(ins) != 2 or any(isinstance(t, gs.Constant) or not is_float32(t) for t in ins):
            return None  # a bias or constant Add is not a residual join
        return ins
    if node.op == "Concat":
        ins = [t for t in node.inputs if t.name]
        return ins if ins and all(is_float32(t) and not isinstance(t, gs.Constant) for t in ins) else None
    # AveragePool / GlobalAveragePool: one input
    return [node.inputs[0]] if node.inputs and is_float32(node.inputs[0]) else None


def _all_quantized_readers(y: gs.Tensor, targets: list[Target], depth: int = 0) -> bool:
    """Every reader of y is a quantized compute op, or a data-movement op whose readers all are."""
    ids = {id(t.node) for t in targets}
    for c in y.outputs:
        if id(c) in ids:
            continue
        if c.op in DATA_MOVEMENT and is_onnx_op(c) and depth < 8 and c.outputs and all(
                _all_quantized_readers(o, targets, depth + 1) for o in c.outputs):
            continue
        return False
    return True


def plan_quantization(graph: gs.Graph, config: QuantConfig) -> Plan:
    """The plan over the top-level graph and the If branches: each graph is placed on its own (its targets, joins
    and data movement), into one table of tensors (a tensor of an outer graph that a branch reads is planned once,
    its readers merged)."""
    targets, skips = find_targets(graph, config)
    tensors: dict[str, QTensor] = {}
    share: dict[str, str] = {}
    where = {id(n): i for i, s in enumerate(quantizable_scopes(graph)) for n in s.graph.nodes}
    for i, scope in enumerate(quantizable_scopes(graph)):
        mine = [t for t in targets if where.get(id(t.node)) == i]
        if mine or i == 0:
            _place(scope.graph, mine, targets, config, tensors, share)
    for q in tensors.values():
        root, hops = q.name, 0
        while root in share and hops <= len(share):
            root, hops = share[root], hops + 1
        q.range_of = root
    return Plan(targets, skips, tensors)


def _place(graph: gs.Graph, targets: list[Target], all_targets: list[Target], config: QuantConfig,
           tensors: dict[str, QTensor], share: dict[str, str]) -> None:
    """Add to ``tensors`` (and ``share``: tensor -> the tensor whose range it shares) what ``graph``'s own nodes
    need; ``targets`` are the compute targets among them."""
    own = {id(n) for n in graph.nodes}

    def want(t: gs.Tensor, consumer: gs.Node | None) -> None:
        q = tensors.setdefault(t.name, QTensor(t.name, set(), t.name))
        if consumer is None:
            q.consumers = None
        elif q.consumers is not None:
            q.consumers.add(id(consumer))

    for tg in targets:
        for i in tg.activations:
            want(tg.node.inputs[i], tg.node)
    if config.quantize_outputs:
        for tg in targets:
            if tg.node.op not in config.quantize_outputs or len(tg.node.outputs) != 1:
                continue
            y = _folded_output(tg.node.outputs[0])
            if not is_float32(y) or _consumed_by_q(y) or not y.outputs:
                continue  # already quantized, or only a graph output: nothing downstream to run in int8
            if config.output_consumers == "quantized" and not _all_quantized_readers(y, all_targets):
                continue
            want(y, None)
    # joins and pooling whose inputs are all quantized: quantized inputs for them, a quantized output of
    # their own; in graph order, so a chain of residual blocks is followed through
    if config.neighbour_ops:
        for node in graph.nodes:
            if node.op not in config.neighbour_ops or not is_onnx_op(node) or len(node.outputs) != 1:
                continue
            if config.is_excluded(node.name or ""):
                continue
            ins = _neighbour_inputs(node)
            if not ins or not all(_quantized(t, tensors) for t in ins):
                continue
            y = _folded_output(node.outputs[0])
            if not is_float32(y) or _consumed_by_q(y) or not y.outputs:
                continue
            for t in ins:
                want(t, node)
            want(y, None)
    # data movement between quantized tensors shares the producer's range: walk back from each planned
    # tensor through data-movement ops; if a planned tensor is reached, every tensor on the way shares its range
    by_name = graph.tensors()
    for q in list(tensors.values()):
        chain: list[tuple[gs.Tensor, gs.Node]] = []
        t = by_name.get(q.name)
        while t is not None:
            prod = t.inputs[0] if isinstance(t, gs.Variable) and len(t.inputs) == 1 else None
            if (prod is None or id(prod) not in own or prod.op not in DATA_MOVEMENT or not is_onnx_op(prod)
                    or not prod.inputs or not is_float32(prod.inputs[0])):
                break
            src = prod.inputs[0]
            chain.append((src, prod))
            if src.name in tensors and src.name != q.name:
                break
            t = src
        if chain and chain[-1][0].name in tensors:
            dst = q.name
            for src, prod in chain:
                want(src, prod)
                share[dst] = src.name
                dst = src.name

