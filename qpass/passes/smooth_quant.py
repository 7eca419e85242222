"""MatMul(X, W_i) for the statically quantized readers of X -> MatMul(X / s, diag(s) W_i), s_j = max|X_j|^a / max|W_j|^(1-a).

SmoothQuant before static int8 quantization (:mod:`qpass.weights.smooth`): the planned MatMul/Gemm nodes with a
constant weight whose activation input X the plan quantizes form a group per X (a layer's q/k/v projections, its
gate/up projections); the strength ``a`` of each group is searched on the calibration table's sample of X's rows
(``"rows"``) with X's per-channel min and max (``"chanrange"``), by the group's output error with X and the weights
fake-quantized as the plan quantizes them; ``a = 0`` (no migration) is a candidate, and wins ties. The rewrite is
:mod:`.input_scales`'s (weights' rows times ``s``; ``1/s`` folded into X's producer where exact, else a ``Mul``).
It runs on the prepared model, before planning and calibration: the smoothed activations' ranges are measured by
the run's normal calibration of the smoothed model (a second pass over the data), not derived.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import NameAllocator, is_float32, node_label
from ..pass_manager import Pass, PassContext, PassResult, Skip
from ..plan.bind import bind
from ..plan.spec import QSpec, QuantPlan
from ..weights.smooth import search_strength
from .input_scales import apply_scales, finish, group_weights, require_plan_and_table

#: the statistics of each group's input the search needs
STATISTICS = ("chanrange", "rows")
#: activation types the search scores (8-bit grids: 16-bit activations have no outlier problem worth the search)
EIGHT_BIT = ("uint8", "int8")


def smooth_groups(plan: QuantPlan, graph: gs.Graph) -> tuple[dict[str, tuple[QSpec, list]], list[Skip]]:
    """Input name -> (its activation spec, the plan targets (MatMul/Gemm with a constant weight at input 1) that read
    it quantized to an 8-bit type), and the candidates left out with why."""
    bound = bind(plan, graph)
    quantized = {t.name: t for t in bound.tensors}
    groups: dict[str, tuple[QSpec, list]] = {}
    skipped: list[Skip] = []
    top = {id(n) for n in graph.nodes}
    for t in bound.targets:
        node = t.node
        if node.op not in ("MatMul", "Gemm") or t.weight != 1 or t.weight_spec is None or 0 not in t.activations:
            continue
        x = node.inputs[0]
        q = quantized.get(x.name)
        if q is None or (q.consumers is not None and id(node) not in q.consumers) or q.spec.dtype not in EIGHT_BIT:
            continue
        if id(node) not in top:
            skipped.append(Skip(t.label, node.op, "inside an If/Loop/Scan body: not smoothed"))
        elif node.op == "Gemm" and int(node.attrs.get("transA", 0)):
            skipped.append(Skip(node_label(node), node.op, "transposed Gemm input: not smoothed"))
        elif isinstance(x, gs.Variable) and is_float32(x):
            groups.setdefault(x.name, (q.spec, []))[1].append(t)
    return groups, skipped


def statistics_needed(plan: QuantPlan, graph: gs.Graph) -> dict[str, tuple[str, ...]]:
    """What calibration must measure for :class:`SmoothQuant` on ``graph``: tensor -> statistic kinds."""
    return {name: STATISTICS for name in smooth_groups(plan, graph)[0]}


class SmoothQuant(Pass):
    def __init__(self, grid: int = 10, alpha: float | None = None):
        #: strength candidates: 0 (no migration), 1/grid, ..., 1
        self.grid = grid
        #: a fixed strength instead of the search (still against no migration)
        self.alpha = alpha

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        require_plan_and_table(ctx, self.name, "each input's per-channel range and a sample of its rows")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        groups, skipped = smooth_groups(ctx.plan, graph)
        stats = ctx.calib.statistics
        names = NameAllocator(graph)
        done: Counter = Counter()
        strengths: dict[str, float] = {}
        ratios: dict[str, float] = {}
        for x_name, (act, targets) in groups.items():
            how = self._smooth(graph, act, targets, stats, names)
            if isinstance(how, tuple):
                done[how[0]] += 1
                if how[1]:
                    strengths[x_name], ratios[x_name] = how[1], how[2]
            else:
                skipped += [Skip(node_label(t.node), t.node.op, how) for t in targets]
        modified, out = finish(graph, done, "smoothed", "groups left alone (strength 0)")
        if strengths:
            out["strengths"] = strengths  # input name (before smoothing) -> chosen strength
            # -> the sampled output error with both operands quantized, smoothed over unsmoothed
            out["error_ratios"] = ratios
        return PassResult(modified=modified, skipped=tuple(skipped), stats=out)

    def _smooth(self, graph: gs.Graph, act: QSpec, targets: list, stats,
                names: NameAllocator) -> tuple[str, float, float] | str:
        """Smooth one group; returns (how: "folded" | "Mul" | "unchanged", strength, error ratio) or why not."""
        x = targets[0].node.inputs[0]
        chan, rows = stats.get(x.name, "chanrange"), stats.get(x.name, "rows")
        if chan is None or rows is None or not rows.rows.shape[0]:
            return f"no per-channel range and row sample of input '{x.name}' in the table (not calibrated)"
        group = group_weights(targets, x)
        if isinstance(group, str):
            return group
        k = group[0].values.shape[0]
        if chan.min.shape != (k,) or rows.rows.shape[1] != k:
            return f"statistics of '{x.name}' do not match the weights' {k} input features; not smoothed"
        spec = targets[0].weight_spec
        s, alpha, errors = search_strength(rows.rows, [g.values for g in group], chan.min, chan.max, act.dtype,
                                      act_symmetric=act.symmetric, weight_type=spec.dtype,
                                      per_channel=spec.granularity == "channel", grid=self.grid, alpha=self.alpha)
        if alpha == 0.0:
            return "unchanged", 0.0, 1.0
        how, _ = apply_scales(graph, x, targets, group, np.asarray(s, dtype=np.float32), names)
        return how, alpha, round(errors[alpha] / errors[0.0], 4)  # errors[0.0] > errors[alpha] >= 0

