"""MatMul(X, W_i) for the planned readers of X -> MatMul(X / s, diag(s) W_i), 1/s folded into X's producer or a Mul(X, 1/s).

Activation-aware weight scaling (:mod:`qpass.weights.awq`) before the weight-only quantizer: the planned
MatMul/Gemm nodes that read one input form a group (a layer's q/k/v projections, its gate/up projections); their
per-input-channel scales ``s`` are searched from the input's mean |x| and Gram matrix in the calibration table.
The weights' input rows are multiplied by ``s`` in place (their names, which the plan holds, stay), and the input is
divided by ``s`` exactly where a producer allows: a ``Mul`` by a constant broadcast along the last axis (a norm's
weight), a ``LayerNormalization`` / ``RMSNormalization`` over the last axis (scale and bias), or a ``Mul`` of an
operand that is a ``MatMul`` by a constant weight read nowhere else (the FFN up projection: its columns); the
producer's output must be read by the group only. Otherwise a standard ``Mul(X, 1/s)`` feeds the group. The
scaled input gets a new name, and its Gram matrix ``diag(1/s) H diag(1/s)`` is added to the table under that
name (entries of existing names are left as they were) for the quantizer's clipping search or GPTQ.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs

from ..calib.stats import Gram
from ..errors import PreconditionError
from ..graph import NameAllocator, is_float32, node_label
from ..pass_manager import Pass, PassContext, PassResult, Skip
from ..plan.bind import bind
from ..weights.awq import search_scales


def _float_constant(t) -> bool:
    return isinstance(t, gs.Constant) and is_float32(t)  # from the dtype: no weight is loaded to ask


class ActivationScale(Pass):
    def __init__(self, grid: int = 20, qtypes: tuple[str, ...] = ("int4", "uint4")):
        #: alpha candidates: 0, 1/grid, ..., 1
        self.grid = grid
        #: a group is scaled when one of its weights is planned as one of these types (an 8-bit weight's rounding
        #: error is 16x smaller than a 4-bit one's, and the search costs as much: the int8 output head is left alone)
        self.qtypes = tuple(qtypes)

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        if ctx.plan is None:
            raise PreconditionError("needs a plan", subject=self.name)
        if ctx.calib is None:
            raise PreconditionError("activation-aware scaling needs calibration statistics (each input's mean |x| and "
                                    "Gram matrix)", subject=self.name, hint="give --calib DATA")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        bound = bind(ctx.plan, graph)
        stats = ctx.calib.statistics
        names = NameAllocator(graph)
        groups: dict[str, list] = {}
        skipped: list[Skip] = []
        for t in bound.targets:
            node, spec = t.node, t.weight_spec
            if node.op not in ("MatMul", "Gemm") or t.weight != 1 or spec is None or spec.granularity != "block":
                continue
            x = node.inputs[0]
            if node.op == "Gemm" and int(node.attrs.get("transA", 0)):
                skipped.append(Skip(node_label(node), node.op, "transposed Gemm input: not scaled"))
            elif isinstance(x, gs.Variable) and is_float32(x):
                groups.setdefault(x.name, []).append(t)
        done: Counter = Counter()
        for targets in groups.values():
            how = self._scale(graph, targets, stats, names)
            if how in ("folded", "Mul", "unchanged"):
                done[how] += 1
            else:
                skipped += [Skip(node_label(t.node), t.node.op, how) for t in targets]
        if done["folded"] or done["Mul"]:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        stats_out = {"groups scaled, folded into the producer": done["folded"],
                     "groups scaled through a Mul": done["Mul"], "groups left unscaled (alpha 0)": done["unchanged"]}
        return PassResult(modified=bool(done["folded"] or done["Mul"]), skipped=tuple(skipped),
                          stats={k: v for k, v in stats_out.items() if v})

    def _scale(self, graph: gs.Graph, targets: list, stats, names: NameAllocator) -> str:
        """Scale one group; returns how ("folded", "Mul", "unchanged") or why not."""
        x = targets[0].node.inputs[0]
        gram, absmean = stats.get(x.name, "gram"), stats.get(x.name, "absmean")
        if gram is None or absmean is None or not gram.rows:
            return f"no mean |x| and Gram matrix of input '{x.name}' in the table (already scaled, or not calibrated)"
        if not any(t.weight_spec.dtype in self.qtypes for t in targets):
            return f"weights planned as {targets[0].weight_spec.dtype}, not {'/'.join(self.qtypes)}: not scaled"
        readers = {id(t.node) for t in targets}
        weights, specs, seen = [], [], {}
        for t in targets:
            w = t.node.inputs[1]
            if not _float_constant(w) or len(w.shape) != 2:
                return f"weight '{w.name}' is not a constant 2-D float32 tensor; not scaled"
            if any(id(r) not in readers for r in w.outputs):
                return f"weight '{w.name}' is read outside the nodes reading '{x.name}'; not scaled"
            if id(w) in seen:
                continue
            transposed = t.node.op == "Gemm" and int(t.node.attrs.get("transB", 0))
            values = np.asarray(w.values, dtype=np.float32)
            seen[id(w)] = (w, bool(transposed))
            weights.append(values.T if transposed else values)
            specs.append((t.weight_spec.block_size, t.weight_spec.dtype, t.weight_spec.symmetric))
        k = weights[0].shape[0]
        if any(w.shape[0] != k for w in weights) or gram.matrix.shape != (k, k) or absmean.mean.shape != (k,):
            return f"statistics of '{x.name}' do not match the weights' {k} input features; not scaled"
        h = np.asarray(gram.matrix, dtype=np.float64) / gram.rows
        s, alpha, _ = search_scales(weights, specs, absmean.mean, h, grid=self.grid)
        if alpha == 0.0:
            return "unchanged"
        for (w, transposed), values in zip(seen.values(), weights):
            scaled = values * s[:, None]
            w.values = np.ascontiguousarray(scaled.T if transposed else scaled, dtype=np.float32)
        inverse = (1.0 / s.astype(np.float64)).astype(np.float32)
        how = "folded" if self._fold(graph, x, readers, inverse, names) else "Mul"
        scaled_input = x if how == "folded" else None
        if how == "folded":
            x.name = names(f"{x.name}_activation_scaled")
        else:
            scaled_input = gs.Variable(names(f"{x.name}_activation_scaled"), dtype=np.float32, shape=x.shape)
            graph.nodes.append(gs.Node("Mul", names(f"{x.name}_activation_scale"),
                                       inputs=[x, gs.Constant(names(f"{x.name}_inverse_scale"), inverse)],
                                       outputs=[scaled_input]))
            for t in targets:
                t.node.inputs[0] = scaled_input
        outer = s.astype(np.float64)[:, None] * s.astype(np.float64)[None, :]
        stats.set(scaled_input.name, "gram", Gram(np.asarray(gram.matrix, dtype=np.float64) / outer, gram.rows))
        return how

    def _fold(self, graph: gs.Graph, x: gs.Variable, readers: set[int], inverse: np.ndarray,
              names: NameAllocator) -> bool:
        """Multiply ``x`` by ``inverse`` along its last axis inside its producer, when that is exact and ``x`` is
        read by the group only."""
        if x in graph.outputs or len(x.inputs) != 1 or any(id(r) not in readers for r in x.outputs):
            return False
        p, k = x.inputs[0], inverse.shape[0]
        if p.op in ("LayerNormalization", "RMSNormalization") and int(p.attrs.get("axis", -1)) == -1:
            operands = [i for i in (1, 2) if i < len(p.inputs) and p.inputs[i].name]
            if all(_float_constant(p.inputs[i]) and list(p.inputs[i].shape) == [k] for i in operands) and 1 in operands:
                for i in operands:
                    self._set(p, i, np.asarray(p.inputs[i].values) * inverse, names)
                return True
            return False
        if p.op != "Mul" or len(p.inputs) != 2:
            return False
        for i, c in enumerate(p.inputs):  # a Mul by a constant along the last axis: a norm's weight
            shape = list(c.shape) if _float_constant(c) else None
            if shape is not None and all(d == 1 for d in shape[:-1]) and (not shape or shape[-1] in (1, k)):
                new_shape = (shape[:-1] if shape else []) + [k]
                self._set(p, i, (np.asarray(c.values) * inverse).reshape(new_shape).astype(np.float32), names)
                return True
        for b in p.inputs:  # a Mul of a MatMul by a constant weight read only there (the FFN up projection)
            m = b.inputs[0] if isinstance(b, gs.Variable) and len(b.inputs) == 1 else None
            if m is None or m.op != "MatMul" or b in graph.outputs or len(b.outputs) != 1 or len(m.inputs) != 2:
                continue
            w = m.inputs[1]
            if _float_constant(w) and len(w.shape) == 2 and w.shape[1] == k and list(w.outputs) == [m]:
                w.values = (np.asarray(w.values, dtype=np.float32) * inverse[None, :]).astype(np.float32)
                return True
        return False

    @staticmethod
    def _set(node: gs.Node, i: int, values: np.ndarray, names: NameAllocator) -> None:
        """Input ``i`` of ``node`` (a constant) becomes ``values``: in place when only ``node`` reads it."""
        c = node.inputs[i]
        values = np.ascontiguousarray(values, dtype=np.float32)
        if len(c.outputs) == 1:
            c.values = values
        else:
            node.inputs[i] = gs.Constant(names(f"{c.name}_activation_scaled"), values)
