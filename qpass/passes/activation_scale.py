"""MatMul(X, W_i) for the planned readers of X -> MatMul(X / s, diag(s) W_i), 1/s folded into X's producer or a Mul(X, 1/s).

Activation-aware weight scaling (:mod:`qpass.weights.awq`) before the weight-only quantizer: the planned
MatMul/Gemm nodes that read one input form a group (a layer's q/k/v projections, its gate/up projections); their
per-input-channel scales ``s`` are searched from the input's mean |x| and Gram matrix in the calibration table.
The rewrite (weights' rows times ``s``, ``1/s`` folded into X's producer where exact, else a ``Mul``) is
:mod:`.input_scales`'s, shared with SmoothQuant. The scaled input gets a new name, and its Gram matrix
``diag(1/s) H diag(1/s)`` is added to the table under that name (entries of existing names are left as they were)
for the quantizer's clipping search or GPTQ.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs

from ..calib.stats import Gram
from ..graph import NameAllocator, is_float32, node_label
from ..pass_manager import Pass, PassContext, PassResult, Skip
from ..plan.bind import bind
from ..weights.awq import search_scales
from .input_scales import apply_scales, finish, group_weights, require_plan_and_table


class ActivationScale(Pass):
    def __init__(self, grid: int = 20, qtypes: tuple[str, ...] = ("int4", "uint4")):
        #: alpha candidates: 0, 1/grid, ..., 1
        self.grid = grid
        #: a group is scaled when one of its weights is planned as one of these types (an 8-bit weight's rounding
        #: error is 16x smaller than a 4-bit one's, and the search costs as much: the int8 output head is left alone)
        self.qtypes = tuple(qtypes)

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        require_plan_and_table(ctx, self.name, "each input's mean |x| and Gram matrix")

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
        modified, counts = finish(graph, done, "scaled", "groups left unscaled (alpha 0)")
        return PassResult(modified=modified, skipped=tuple(skipped), stats=counts)

    def _scale(self, graph: gs.Graph, targets: list, stats, names: NameAllocator) -> str:
        """Scale one group; returns how ("folded", "Mul", "unchanged") or why not."""
        x = targets[0].node.inputs[0]
        gram, absmean = stats.get(x.name, "gram"), stats.get(x.name, "absmean")
        if gram is None or absmean is None or not gram.rows:
            return f"no mean |x| and Gram matrix of input '{x.name}' in the table (already scaled, or not calibrated)"
        if not any(t.weight_spec.dtype in self.qtypes for t in targets):
            return f"weights planned as {targets[0].weight_spec.dtype}, not {'/'.join(self.qtypes)}: not scaled"
        group = group_weights(targets, x)
        if isinstance(group, str):
            return group
        weights = [g.values for g in group]
        specs = [(g.target.weight_spec.block_size, g.target.weight_spec.dtype, g.target.weight_spec.symmetric)
                 for g in group]
        k = weights[0].shape[0]
        if gram.matrix.shape != (k, k) or absmean.mean.shape != (k,):
            return f"statistics of '{x.name}' do not match the weights' {k} input features; not scaled"
        h = np.asarray(gram.matrix, dtype=np.float64) / gram.rows
        s, alpha, _ = search_scales(weights, specs, absmean.mean, h, grid=self.grid)
        if alpha == 0.0:
            return "unchanged"
        how, scaled_input = apply_scales(graph, x, targets, group, s, names)
        outer = s.astype(np.float64)[:, None] * s.astype(np.float64)[None, :]
        stats.set(scaled_input.name, "gram", Gram(np.asarray(gram.matrix, dtype=np.float64) / outer, gram.rows))
        return how
