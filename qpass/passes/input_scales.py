"""MatMul(X, W_i) for a group of readers of X -> MatMul(X / s, diag(s) W_i): the rewrite both input-scaling passes share.

Not a pass: :mod:`.activation_scale` (AWQ, weight-only) and :mod:`.smooth_quant` (SmoothQuant, static int8) choose
the per-input-channel scales ``s`` their own way and call :func:`group_weights` and :func:`apply_scales`. The
weights' input rows are multiplied by ``s`` in place (their names, which a plan holds, stay), and the input is
divided by ``s`` exactly where a producer allows: a ``Mul`` by a constant broadcast along the last axis (a norm's
weight), a ``LayerNormalization`` / ``RMSNormalization`` over the last axis (scale and bias), or a ``Mul`` of an
operand that is a ``MatMul`` by a constant weight read nowhere else (the FFN up projection: its columns); the
producer's output must be read by the group only. Otherwise a standard ``Mul(X, 1/s)`` feeds the group. The
scaled input gets a new name.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import PreconditionError
from ..graph import NameAllocator, is_float32


def require_plan_and_table(ctx, subject: str, what: str) -> None:
    """The preconditions of an input-scaling pass: a plan, and a calibration table holding ``what``."""
    if ctx.plan is None:
        raise PreconditionError("needs a plan", subject=subject)
    if ctx.calib is None:
        raise PreconditionError(f"needs calibration statistics ({what})", subject=subject, hint="give --calib DATA")


def float_constant(t) -> bool:
    return isinstance(t, gs.Constant) and is_float32(t)  # from the dtype: no weight is loaded to ask


@dataclass
class GroupWeight:
    """One distinct weight of a group: the constant, whether its node reads it transposed (Gemm transB), the first
    plan target reading it, and its values as ``[K, N]`` (float32)."""

    constant: gs.Constant
    transposed: bool
    target: object
    values: np.ndarray


def group_weights(targets: list, x: gs.Variable) -> list[GroupWeight] | str:
    """The distinct weights of the MatMul/Gemm ``targets`` (plan targets, weight at input 1) that read ``x``, each as
    ``[K, N]``, or why the group cannot be scaled (a weight that is not a constant 2-D float32 tensor, or that a node
    outside the group reads, or input features that differ)."""
    readers = {id(t.node) for t in targets}
    out: list[GroupWeight] = []
    seen: set[int] = set()
    for t in targets:
        w = t.node.inputs[1]
        if not float_constant(w) or len(w.shape) != 2:
            return f"weight '{w.name}' is not a constant 2-D float32 tensor; not scaled"
        if any(id(r) not in readers for r in w.outputs):
            return f"weight '{w.name}' is read outside the nodes reading '{x.name}'; not scaled"
        if id(w) in seen:
            continue
        seen.add(id(w))
        transposed = bool(t.node.op == "Gemm" and int(t.node.attrs.get("transB", 0)))
        values = np.asarray(w.values, dtype=np.float32)
        out.append(GroupWeight(w, transposed, t, values.T if transposed else values))
    if any(g.values.shape[0] != out[0].values.shape[0] for g in out):
        return f"the weights reading '{x.name}' have different input features; not scaled"
    return out


def apply_scales(graph: gs.Graph, x: gs.Variable, targets: list, weights: list[GroupWeight], s: np.ndarray,
                 names: NameAllocator) -> tuple[str, gs.Variable]:
    """Multiply the weights' input rows by ``s`` and divide the group's input by it: folded into ``x``'s producer
    (``x`` renamed) where exact, else through a new ``Mul(x, 1/s)`` the group reads. Returns ``("folded" | "Mul",
    the scaled input)``. The caller runs ``graph.cleanup().toposort()`` after its last group."""
    readers = {id(t.node) for t in targets}
    for g in weights:
        scaled = g.values * s[:, None]
        g.constant.values = np.ascontiguousarray(scaled.T if g.transposed else scaled, dtype=np.float32)
    inverse = (1.0 / s.astype(np.float64)).astype(np.float32)
    if _fold(graph, x, readers, inverse, names):
        x.name = names(f"{x.name}_activation_scaled")
        return "folded", x
    scaled_input = gs.Variable(names(f"{x.name}_activation_scaled"), dtype=np.float32, shape=x.shape)
    graph.nodes.append(gs.Node("Mul", names(f"{x.name}_activation_scale"),
                               inputs=[x, gs.Constant(names(f"{x.name}_inverse_scale"), inverse)],
                               outputs=[scaled_input]))
    for t in targets:
        t.node.inputs[0] = scaled_input
    return "Mul", scaled_input


def finish(graph: gs.Graph, done: Counter, verb: str, unchanged: str) -> tuple[bool, dict]:
    """After a pass's last group: the graph cleaned up where a group changed it, whether one did, and the pass's
    counts (``done``: groups by how, "folded" / "Mul" / "unchanged"; ``unchanged``: the name of the last count)."""
    modified = bool(done["folded"] or done["Mul"])
    if modified:
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    counts = {f"groups {verb}, folded into the producer": done["folded"], f"groups {verb} through a Mul": done["Mul"],
              unchanged: done["unchanged"]}
    return modified, {k: v for k, v in counts.items() if v}


def _fold(graph: gs.Graph, x: gs.Variable, readers: set[int], inverse: np.ndarray, names: NameAllocator) -> bool:
    """Multiply ``x`` by ``inverse`` along its last axis inside its producer, when that is exact and ``x`` is read by
    the group only."""
    if x in graph.outputs or len(x.inputs) != 1 or any(id(r) not in readers for r in x.outputs):
        return False
    p, k = x.inputs[0], inverse.shape[0]
    if p.op in ("LayerNormalization", "RMSNormalization") and int(p.attrs.get("axis", -1)) == -1:
        operands = [i for i in (1, 2) if i < len(p.inputs) and p.inputs[i].name]
        if all(float_constant(p.inputs[i]) and list(p.inputs[i].shape) == [k] for i in operands) and 1 in operands:
            for i in operands:
                _set(p, i, np.asarray(p.inputs[i].values) * inverse, names)
            return True
        return False
    if p.op != "Mul" or len(p.inputs) != 2:
        return False
    for i, c in enumerate(p.inputs):  # a Mul by a constant along the last axis: a norm's weight
        shape = list(c.shape) if float_constant(c) else None
        if shape is not None and all(d == 1 for d in shape[:-1]) and (not shape or shape[-1] in (1, k)):
            new_shape = (shape[:-1] if shape else []) + [k]
            _set(p, i, (np.asarray(c.values) * inverse).reshape(new_shape).astype(np.float32), names)
            return True
    for b in p.inputs:  # a Mul of a MatMul by a constant weight read only there (the FFN up projection)
        m = b.inputs[0] if isinstance(b, gs.Variable) and len(b.inputs) == 1 else None
        if m is None or m.op != "MatMul" or b in graph.outputs or len(b.outputs) != 1 or len(m.inputs) != 2:
            continue
        w = m.inputs[1]
        if float_constant(w) and len(w.shape) == 2 and w.shape[1] == k and list(w.outputs) == [m]:
            w.values = (np.asarray(w.values, dtype=np.float32) * inverse[None, :]).astype(np.float32)
            return True
    return False


def _set(node: gs.Node, i: int, values: np.ndarray, names: NameAllocator) -> None:
    """Input ``i`` of ``node`` (a constant) becomes ``values``: in place when only ``node`` reads it."""
    c = node.inputs[i]
    values = np.ascontiguousarray(values, dtype=np.float32)
    if len(c.outputs) == 1:
        c.values = values
    else:
        node.inputs[i] = gs.Constant(names(f"{c.name}_activation_scaled"), values)
