"""Values of tensors inside If branches and Loop/Scan bodies: each body run as a model of its own, on the values the
main run computed.

onnxruntime returns a graph's own tensors as extra outputs, never a body's. For each If whose branches hold a wanted
tensor, the main run also outputs the If's condition and the outer-scope values the branches read; after each run
the branch the condition chose runs as a standalone model (its inputs: those outer values; its initializers: the
outer initializers it reads; its outputs: the wanted tensors and what an If nested in it needs, the same way
again). A batch of samples runs its branch once, on the batch, exactly as the main run did. A branch that no run
took yields nothing; :meth:`BranchValues.not_taken` says which, so the caller reports it.

A Loop or Scan body's inputs change per iteration, so its iterations are replayed one by one: the main run fetches
the node's inputs (trip count, condition, initial loop-carried values or states, scanned sequences), and the body
model runs once per iteration on the carried values of the previous one (and, for a Scan, that step's slices), its
wanted tensors observed at every iteration. What cannot be followed (a Scan of opset 8, a body under an op that is
not If/Loop/Scan) is listed by :meth:`BranchValues.unreachable` with its reason.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import CalibrationDataError
from ..graph import proto_bodies

#: If attributes -> the condition value that takes them
BRANCHES = (("then_branch", True), ("else_branch", False))


def has_bodies(model: onnx.ModelProto) -> bool:
    """The top-level graph has a node holding a subgraph (If, Loop, Scan, ...)."""
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in model.graph.node
               for a in n.attribute)


def defined(g: onnx.GraphProto) -> set[str]:
    """Names a graph defines itself: its inputs, initializers and node outputs (not those of its bodies)."""
    names = {v.name for v in g.input} | {t.name for t in g.initializer}
    names |= {o for n in g.node for o in n.output if o}
    return names


def defined_within(g: onnx.GraphProto) -> set[str]:
    """Names defined in a graph or any body nested in it."""
    names = defined(g)
    for n in g.node:
        for sub in proto_bodies(n):
            names |= defined_within(sub)
    return names


def free_names(g: onnx.GraphProto) -> set[str]:
    """Outer-scope names a graph reads (its nodes' and its bodies' inputs that it does not define)."""
    reads = {i for n in g.node for i in n.input if i}
    for n in g.node:
        for sub in proto_bodies(n):
            reads |= free_names(sub)
    reads |= {o.name for o in g.output}  # a branch may output an outer value as is
    return reads - defined(g)


#: iterations of one Loop run followed at most (a Loop that never stops would not have finished the main run)
MAX_ITERATIONS = 100_000


@dataclass
class _Body:
    """One If branch or Loop/Scan body whose subtree holds wanted tensors, run as a model of its own (built on
    first use). ``carry``: the body outputs a Loop/Scan iteration passes on (its condition and loop-carried
    values)."""

    where: str
    graph: onnx.GraphProto
    wanted: list[str]
    carry: list[str] = field(default_factory=list)
    level: "_Level | None" = None
    runs: int = 0
    #: the outer values it reads that are not initializers (inputs of its model), its fetch list and session
    feeds: list[str] = field(default_factory=list)
    fetch: list[str] = field(default_factory=list)
    session: object = None


@dataclass
class _Plan:
    """A control-flow node of a level: an If (its branches by condition value), a Loop or a Scan (its body)."""

    node: onnx.NodeProto
    label: str
    bodies: dict = field(default_factory=dict)  # If: True/False -> _Body; Loop/Scan: "body" -> _Body


def _attr(node: onnx.NodeProto, name: str, default=None):
    a = next((a for a in node.attribute if a.name == name), None)
    return default if a is None else helper.get_attribute_value(a)


class _Level:
    """A graph run by onnxruntime (the main model, or a body as a model) and the control flow in it to follow."""

    def __init__(self, graph: onnx.GraphProto, wanted: list[str], inits: dict[str, onnx.TensorProto], prefix: str,
                 opset: int):
        self.graph, self.inits, self.prefix, self.opset = graph, inits, prefix, opset
        own = {o for n in graph.node for o in n.output if o} | {v.name for v in graph.input}
        self.here = [n for n in dict.fromkeys(wanted) if n in own]
        wanted = set(wanted)
        self.plans: list[_Plan] = []
        self.unreachable: dict[str, str] = {}
        helpers: list[str] = []
        for node in graph.node:
            label = f"{prefix}{node.name or node.op_type}"
            plan = _Plan(node, label)
            for attr, body in ((a.name, a.g) for a in node.attribute if a.type == onnx.AttributeProto.GRAPH):
                mine = sorted(wanted & defined_within(body))
                if not mine:
                    continue
                if node.op_type == "If" and attr in dict(BRANCHES):
                    plan.bodies[dict(BRANCHES)[attr]] = _Body(f"{label}/{attr.split('_')[0]}", body, mine)
                elif (node.op_type == "Loop" or (node.op_type == "Scan" and opset >= 9)) and attr == "body":
                    outs = [o.name for o in body.output]
                    carry = outs[: 1 + max(len(node.input) - 2, 0)] if node.op_type == "Loop" else \
                        outs[: len(node.input) - int(_attr(node, "num_scan_inputs", 0))]
                    plan.bodies["body"] = _Body(f"{label}/body", body, mine, carry)
                else:
                    why = "Scan of opset 8 (batched form) is not followed" if node.op_type == "Scan" else \
                        f"{node.op_type} bodies are not followed"
                    for name in mine:
                        self.unreachable[name] = f"inside {label}/{attr}: {why}"
                    continue
                helpers += sorted(free_names(body)) + [i for i in node.input if i]
            if plan.bodies:
                self.plans.append(plan)
        # what the run fetches: the wanted tensors and the helpers that this graph's nodes compute (the others are
        # its inputs or initializers, read from the feed or the model)
        seen = set(self.here)
        self.fetch = list(self.here) + [h for h in helpers if h in own and not (h in seen or seen.add(h))]

    # ------------------------------------------------------------------ running
    def expand(self, values: dict[str, np.ndarray], session_for: Callable[[onnx.ModelProto, str], object],
               model: onnx.ModelProto) -> dict[str, list[np.ndarray]]:
        """The wanted values computed below this level (a list per tensor: one per iteration of a Loop or Scan),
        given ``values`` (this level's feed and fetched outputs)."""
        out: dict[str, list[np.ndarray]] = {}
        for plan in self.plans:
            node = plan.node
            if node.op_type == "If":
                body = plan.bodies.get(bool(np.asarray(self._value(node.input[0], values)).reshape(-1)[0]))
                if body is not None:
                    self._run(body, {}, values, session_for, model, out)
            elif node.op_type == "Loop":
                self._loop(plan, values, session_for, model, out)
            else:
                self._scan(plan, values, session_for, model, out)
        return out

    def _loop(self, plan: _Plan, values, session_for, model, out) -> None:
        node, body = plan.node, plan.bodies["body"]
        names = [i.name for i in body.graph.input]
        trips = int(np.asarray(self._value(node.input[0], values)).reshape(())) if node.input[0] else None
        cond = bool(np.asarray(self._value(node.input[1], values)).reshape(-1)[0]) if len(node.input) > 1 and \
            node.input[1] else True
        carried = [self._value(n, values) for n in node.input[2:]]
        i = 0
        while (trips is None or i < trips) and cond and i < MAX_ITERATIONS:
            feed = {names[0]: np.array(i, np.int64), names[1]: np.array(cond), **dict(zip(names[2:], carried))}
            got = self._run(body, feed, values, session_for, model, out)
            cond = bool(np.asarray(got[body.carry[0]]).reshape(-1)[0])
            carried = [got[n] for n in body.carry[1:]]
            i += 1

    def _scan(self, plan: _Plan, values, session_for, model, out) -> None:
        node, body = plan.node, plan.bodies["body"]
        names = [i.name for i in body.graph.input]
        n_scan = int(_attr(node, "num_scan_inputs", 0))
        n_state = len(node.input) - n_scan
        axes = list(_attr(node, "scan_input_axes", None) or [0] * n_scan)
        backward = list(_attr(node, "scan_input_directions", None) or [0] * n_scan)
        state = [self._value(n, values) for n in node.input[:n_state]]
        seqs = [np.asarray(self._value(n, values)) for n in node.input[n_state:]]
        steps = seqs[0].shape[axes[0]] if seqs else 0
        for t in range(min(steps, MAX_ITERATIONS)):
            feed = dict(zip(names[:n_state], state))
            for j, seq in enumerate(seqs):
                feed[names[n_state + j]] = np.take(seq, steps - 1 - t if backward[j] else t, axis=axes[j])
            got = self._run(body, feed, values, session_for, model, out)
            state = [got[n] for n in body.carry]

    def _run(self, body: _Body, inputs: dict[str, np.ndarray], values: dict[str, np.ndarray], session_for, model,
             out: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
        """Run ``body`` once on its own ``inputs`` and the outer ``values`` it reads; add its wanted values to
        ``out``; return what it computed."""
        body.runs += 1
        if body.level is None:
            inner_inits = {**self.inits, **{t.name: t for t in body.graph.initializer}}
            body.level = _Level(body.graph, body.wanted, inner_inits, f"{body.where}/", self.opset)
            body.feeds = sorted(n for n in free_names(body.graph) if n not in self.inits)
            body.fetch = list(dict.fromkeys(body.level.fetch + body.carry))
            if body.fetch:  # else it only holds control flow whose inputs come from outside: nothing to run
                body.session = session_for(_body_model(body, model, values, self.inits), body.where)
        feed = {**{n: self._value(n, values) for n in body.feeds}, **inputs}
        try:
            got = body.session.run(body.fetch, feed) if body.session is not None else []
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises several unrelated types
            raise CalibrationDataError(f"onnxruntime failed on the body model: {str(exc).splitlines()[0]}",
                                       subject=f"'{body.where}'") from None
        inner = {**feed, **dict(zip(body.fetch, got))}
        for n in body.level.here:
            out.setdefault(n, []).append(inner[n])
        for n, vs in body.level.expand(inner, session_for, model).items():
            out.setdefault(n, []).extend(vs)
        return inner

    def _value(self, name: str, values: dict[str, np.ndarray]) -> np.ndarray:
        if name in values:
            return values[name]
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        raise CalibrationDataError("a body reads a value the calibration run did not produce",
                                   subject=f"tensor '{name}'")

    def bodies(self) -> Iterable[_Body]:
        for plan in self.plans:
            for body in plan.bodies.values():
                yield body
                if body.level is not None:
                    yield from body.level.bodies()

    def all_unreachable(self) -> dict[str, str]:
        found = dict(self.unreachable)
        for b in self.bodies():
            if b.level is not None:
                found.update(b.level.unreachable)
        return found


def _value_info(name: str, value: np.ndarray) -> onnx.ValueInfoProto:
    """An input of the value's element type and rank, every dimension named (samples may differ in shape)."""
    value = np.asarray(value)
    elem = helper.np_dtype_to_tensor_dtype(value.dtype)
    return helper.make_tensor_value_info(name, elem, [f"{name}_d{i}" for i in range(value.ndim)])


def _body_model(body: _Body, model: onnx.ModelProto, values: dict[str, np.ndarray],
                inits: dict[str, onnx.TensorProto]) -> onnx.ModelProto:
    """The body as a model: inputs its own (a Loop/Scan body's) and the outer values it reads (typed from this
    run's values), initializers the outer initializers it reads and its own, outputs what its run fetches."""
    g = onnx.GraphProto()
    g.CopyFrom(body.graph)
    g.name = f"{body.where} (qpass calibration)"
    for name in sorted(free_names(body.graph)):
        if name in inits:
            g.initializer.append(inits[name])
        elif name in values:
            g.input.append(_value_info(name, values[name]))
    described = {vi.name: vi for vi in list(g.value_info) + list(body.graph.output)}
    del g.output[:]
    for name in body.fetch:
        g.output.append(described.get(name) or onnx.ValueInfoProto(name=name))
    out = helper.make_model(g, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    out.functions.extend(model.functions)
    return out


class BranchValues:
    """For a model and the tensors wanted from it: what its main run must fetch (:attr:`fetch`), and the values of
    the wanted tensors inside If branches and Loop/Scan bodies after each run (:meth:`expand`)."""

    def __init__(self, model: onnx.ModelProto, wanted: Iterable[str],
                 session_for: Callable[[onnx.ModelProto, str], object]):
        """``session_for(model, where)``: an onnxruntime session for a body model (``where`` names the body)."""
        self.model = model
        main_inits = {t.name: t for t in model.graph.initializer}
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        self.top = _Level(model.graph, list(wanted), main_inits, "", opset)
        self._session_for = session_for
        #: what the main run outputs: the wanted tensors of the top-level graph (in the caller's order), then
        #: the conditions, inputs and outer values the bodies need
        self.fetch = self.top.fetch
        #: whether any wanted tensor lies in a body (if not, the main run alone gives every value)
        self.needed = bool(self.top.plans or self.top.unreachable)

    def expand(self, values: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
        """Wanted tensor -> its values (one per body run: a Loop or Scan gives one per iteration), for the tensors
        in the bodies this run reached (``values``: the main run's feed and fetched outputs)."""
        return self.top.expand(values, self._session_for, self.model)

    def not_taken(self) -> list[str]:
        """The branches (and bodies) holding wanted tensors that no run reached, each with the tensors left without
        a value."""
        return [f"{b.where} ({len(b.wanted)} tensor(s))" for b in self.top.bodies() if b.runs == 0]

    def unreachable(self) -> dict[str, str]:
        """Wanted tensors no body run computes, with where they are and why."""
        return self.top.all_unreachable()
