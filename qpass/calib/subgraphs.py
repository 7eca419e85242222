"""Values of tensors inside If branches: each branch run as a model of its own, on the values the main run computed.

onnxruntime returns a graph's own tensors as extra outputs, never a body's. For each If whose branches hold a wanted
tensor, the main run also outputs the If's condition and the outer-scope values the branches read; after each run
the branch the condition chose runs as a standalone model (its inputs: those outer values; its initializers: the
outer initializers it reads; its outputs: the wanted tensors and what an If nested in it needs, the same way
again). A batch of samples runs its branch once, on the batch, exactly as the main run did. A branch that no run
took yields nothing; :meth:`BranchValues.not_taken` says which, so the caller reports it. Tensors inside Loop or
Scan bodies (their inputs change per iteration) are not reached here: :meth:`BranchValues.unreachable` lists them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import CalibrationDataError

#: If attributes -> the condition value that takes them
BRANCHES = (("then_branch", True), ("else_branch", False))


def has_bodies(model: onnx.ModelProto) -> bool:
    """The top-level graph has a node holding a subgraph (If, Loop, Scan, ...)."""
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in model.graph.node
               for a in n.attribute)


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    subs: list[onnx.GraphProto] = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            subs.append(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            subs.extend(a.graphs)
    return subs


def defined(g: onnx.GraphProto) -> set[str]:
    """Names a graph defines itself: its inputs, initializers and node outputs (not those of its bodies)."""
    names = {v.name for v in g.input} | {t.name for t in g.initializer}
    names |= {o for n in g.node for o in n.output if o}
    return names


def defined_within(g: onnx.GraphProto) -> set[str]:
    """Names defined in a graph or any body nested in it."""
    names = defined(g)
    for n in g.node:
        for sub in _subgraphs(n):
            names |= defined_within(sub)
    return names


def free_names(g: onnx.GraphProto) -> set[str]:
    """Outer-scope names a graph reads (its nodes' and its bodies' inputs that it does not define)."""
    reads = {i for n in g.node for i in n.input if i}
    for n in g.node:
        for sub in _subgraphs(n):
            reads |= free_names(sub)
    reads |= {o.name for o in g.output}  # a branch may output an outer value as is
    return reads - defined(g)


@dataclass
class _Branch:
    """One If branch whose subtree holds wanted tensors, run as a model of its own (built on first use)."""

    where: str
    graph: onnx.GraphProto
    wanted: list[str]
    level: "_Level | None" = None
    runs: int = 0
    #: the outer values it reads that are not initializers (its model's inputs), and its session
    feeds: list[str] = field(default_factory=list)
    session: object = None


@dataclass
class _IfPlan:
    node: str
    cond: str
    branches: dict[bool, _Branch] = field(default_factory=dict)


class _Level:
    """A graph run by onnxruntime (the main model, or a branch as a model) and the Ifs in it to follow."""

    def __init__(self, graph: onnx.GraphProto, wanted: list[str], inits: dict[str, onnx.TensorProto], prefix: str):
        self.graph, self.inits, self.prefix = graph, inits, prefix
        own = {o for n in graph.node for o in n.output if o} | {v.name for v in graph.input}
        self.here = [n for n in dict.fromkeys(wanted) if n in own]
        wanted = set(wanted)
        self.ifs: list[_IfPlan] = []
        self.unreachable: dict[str, str] = {}
        helpers: list[str] = []
        for node in graph.node:
            label = f"{prefix}{node.name or node.op_type}"
            if node.op_type != "If":
                for sub in _subgraphs(node):
                    for name in sorted(wanted & defined_within(sub)):
                        self.unreachable[name] = f"inside the body of {node.op_type} '{label}'"
                continue
            plan = _IfPlan(label, node.input[0])
            for attr, value in BRANCHES:
                body = next((a.g for a in node.attribute if a.name == attr), None)
                mine = wanted & defined_within(body) if body is not None else set()
                if mine:
                    short = attr.split("_")[0]
                    plan.branches[value] = _Branch(f"{label}/{short}", body, sorted(mine))
                    helpers += sorted(free_names(body))
            if plan.branches:
                self.ifs.append(plan)
                helpers.append(plan.cond)
        # what the run fetches: the wanted tensors and the helpers that this graph's nodes compute (the others are
        # its inputs or initializers, read from the feed or the model)
        seen = set(self.here)
        self.fetch = list(self.here) + [h for h in helpers if h in own and not (h in seen or seen.add(h))]

    def expand(self, values: dict[str, np.ndarray], session_for: Callable[[onnx.ModelProto, str], object],
               model: onnx.ModelProto) -> dict[str, np.ndarray]:
        """The wanted values computed below this level, given ``values`` (this level's feed and fetched outputs)."""
        out: dict[str, np.ndarray] = {}
        for plan in self.ifs:
            cond = self._value(plan.cond, values)
            branch = plan.branches.get(bool(np.asarray(cond).reshape(-1)[0]))
            if branch is None:
                continue
            branch.runs += 1
            if branch.level is None:
                inner_inits = {**self.inits, **{t.name: t for t in branch.graph.initializer}}
                branch.level = _Level(branch.graph, branch.wanted, inner_inits, f"{branch.where}/")
                branch.feeds = sorted(n for n in free_names(branch.graph) if n not in self.inits)
                if branch.level.fetch:  # else it only holds Ifs whose inputs come from outside: nothing to run
                    branch.session = session_for(_branch_model(branch, model, values, self.inits), branch.where)
            feed = {n: self._value(n, values) for n in branch.feeds}
            try:
                got = branch.session.run(branch.level.fetch, feed) if branch.session is not None else []
            except Exception as exc:  # noqa: BLE001 - onnxruntime raises several unrelated types
                raise CalibrationDataError(f"onnxruntime failed on the branch model: {str(exc).splitlines()[0]}",
                                           subject=f"If branch '{branch.where}'") from None
            inner = {**feed, **dict(zip(branch.level.fetch, got))}
            out.update({n: inner[n] for n in branch.level.here})
            out.update(branch.level.expand(inner, session_for, model))
        return out

    def _value(self, name: str, values: dict[str, np.ndarray]) -> np.ndarray:
        if name in values:
            return values[name]
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        raise CalibrationDataError("an If branch reads a value the calibration run did not produce",
                                   subject=f"tensor '{name}'")

    def branches(self) -> Iterable[_Branch]:
        for plan in self.ifs:
            for branch in plan.branches.values():
                yield branch
                if branch.level is not None:
                    yield from branch.level.branches()

    def all_unreachable(self) -> dict[str, str]:
        found = dict(self.unreachable)
        for b in self.branches():
            if b.level is not None:
                found.update(b.level.unreachable)
        return found


def _value_info(name: str, value: np.ndarray) -> onnx.ValueInfoProto:
    """An input of the value's element type and rank, every dimension named (samples may differ in shape)."""
    value = np.asarray(value)
    elem = helper.np_dtype_to_tensor_dtype(value.dtype)
    return helper.make_tensor_value_info(name, elem, [f"{name}_d{i}" for i in range(value.ndim)])


def _branch_model(branch: _Branch, model: onnx.ModelProto, values: dict[str, np.ndarray],
                  inits: dict[str, onnx.TensorProto]) -> onnx.ModelProto:
    """The branch as a model: inputs the outer values it reads (typed from this run's values), initializers the
    outer initializers it reads and its own, outputs what its level fetches."""
    g = onnx.GraphProto()
    g.CopyFrom(branch.graph)
    g.name = f"{branch.where} (qpass calibration)"
    free = free_names(branch.graph)
    del g.input[:]
    for name in sorted(free):
        if name in inits:
            g.initializer.append(inits[name])
        elif name in values:
            g.input.append(_value_info(name, values[name]))
    described = {vi.name: vi for vi in g.value_info}
    del g.output[:]
    for name in branch.level.fetch:
        g.output.append(described.get(name) or onnx.ValueInfoProto(name=name))
    out = helper.make_model(g, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    out.functions.extend(model.functions)
    return out


class BranchValues:
    """For a model and the tensors wanted from it: what its main run must fetch (:attr:`fetch`), and the values of
    the wanted tensors inside If branches after each run (:meth:`expand`)."""

    def __init__(self, model: onnx.ModelProto, wanted: Iterable[str],
                 session_for: Callable[[onnx.ModelProto, str], object]):
        """``session_for(model, where)``: an onnxruntime session for a branch model (``where`` names the branch)."""
        self.model = model
        main_inits = {t.name: t for t in model.graph.initializer}
        self.top = _Level(model.graph, list(wanted), main_inits, "")
        self._session_for = session_for
        #: what the main run outputs: the wanted tensors of the top-level graph (in the caller's order), then
        #: the conditions and outer values the branches need
        self.fetch = self.top.fetch
        #: whether any wanted tensor lies in a body (if not, the main run alone gives every value)
        self.needed = bool(self.top.ifs or self.top.unreachable)

    def expand(self, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Wanted tensor -> value, for the tensors in the branches this run took (``values``: the main run's feed
        and fetched outputs)."""
        return self.top.expand(values, self._session_for, self.model)

    def not_taken(self) -> list[str]:
        """The branches holding wanted tensors that no run took, each with the tensors left without a value."""
        return [f"{b.where} ({len(b.wanted)} tensor(s))" for b in self.top.branches() if b.runs == 0]

    def unreachable(self) -> dict[str, str]:
        """Wanted tensors no branch run computes (inside Loop/Scan bodies), with where they are."""
        return self.top.all_unreachable()
