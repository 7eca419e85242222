"""x -> Q -> DQ -> consumers for each planned activation; W -> int8 W_q -> DQ(axis) -> Op; B -> int32 B_q (scale s_x*s_w, zp 0) -> DQ -> Op.

The QDQ format: only standard ONNX QuantizeLinear / DequantizeLinear. Which activations get a pair,
which consumers read it and every spec come from the plan (:mod:`qpass.plan`); activation ranges come from the
calibration table; weight ranges from the constants.
Inside If branches too: a pair goes into the graph whose nodes read it (a branch quantizes the outer values it
reads there), weights and their scales become initializers of the branch that holds the node.
A bias whose integer value would overflow int32 widens its channel's weight scale until it fits (recorded in the
report); only where that cannot apply (a scalar bias on per-channel weights, say) does it stay float, with the reason.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import PreconditionError
from ..graph import NameAllocator, constant_values, scopes
from ..config import WEIGHT_TYPES
from ..ops import PER_CHANNEL_MIN_OPSET
from ..pass_manager import Pass, PassContext, PassResult, Skip
from ..plan.bind import BoundPlan, bind
from ..plan.dynamic import dynamic_part
from ..plan.targets import Target
from ..qparams import INT32_MAX, INT_TYPES, compute_qparams, int32_bias, quantize, weight_qparams

#: activation types this pass writes (QuantizeLinear at run time; 4-bit activations are not written)
ACTIVATION_DTYPES = ("uint8", "int8", "uint16", "int16")


class InsertQDQ(Pass):
    #: its stats count the compute nodes it quantized (what the report's quantized_nodes sums)
    role = "quantize"

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        if ctx.calib is None or ctx.plan is None:
            raise PreconditionError("needs a plan and a calibration table", subject=self.name)
        static = dynamic_part(ctx.plan, graph)[1]
        per_channel = [n.node for n in static.nodes if n.weight is not None and n.weight.spec.granularity == "channel"]
        if per_channel and graph.opset < PER_CHANNEL_MIN_OPSET:
            raise PreconditionError(f"per-channel DequantizeLinear needs opset >= {PER_CHANNEL_MIN_OPSET}, graph has {graph.opset}",
                                    subject=per_channel[0], hint="use --target-opset 13 or --per-tensor")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        plan = bind(dynamic_part(ctx.plan, graph)[1], graph)  # the dynamic part is InsertDynamicQuantization's
        self._names = NameAllocator(graph)
        self._graph = graph
        self._scopes = {id(sc.graph): sc for sc in scopes(graph)}
        #: id(node) -> the graph (top level or an If branch) that holds it; Q/DQ nodes go where their readers are
        self._home = {id(n): sc.graph for sc in self._scopes.values() for n in sc.graph.nodes}
        self._into = graph
        self._weights: dict[tuple[str, int | None], tuple[gs.Variable, np.ndarray]] = {}
        self._dq_source: dict[str, str] = {}
        self._planned = {q.name for q in plan.tensors}
        skipped = list(plan.skips)
        act_scales = self._quantize_activations(plan, ctx, skipped)
        done: Counter = Counter()
        for t in plan.targets:
            if self._quantize_target(t, ctx, act_scales, skipped):
                done[t.node.op] += 1
        if act_scales or done:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        stats = dict(done)
        return PassResult(modified=bool(act_scales or done), skipped=tuple(skipped), stats=stats)

    # ------------------------------------------------------------------ activations
    def _quantize_activations(self, plan: BoundPlan, ctx: PassContext, skipped: list[Skip]) -> dict[str, np.ndarray]:
        """Insert one Q/DQ pair per planned tensor and rewire its readers; returns tensor name -> scale."""
        tensors = dict(self._graph.tensors())
        for sc in list(self._scopes.values())[1:]:
            for name, t in sc.graph.tensors().items():
                tensors.setdefault(name, t)
        scales: dict[str, np.ndarray] = {}
        for q in plan.tensors:
            x = tensors[q.name]
            if not q.spec.quantized:
                continue
            if q.spec.dtype not in ACTIVATION_DTYPES:
                skipped.append(Skip(q.name, "activation", f"{q.spec.dtype} activations are not written by static QDQ "
                                                          f"(only {', '.join(ACTIVATION_DTYPES)}); left in float"))
                continue
            if q.spec.granularity != "tensor":
                skipped.append(Skip(q.name, "activation", f"{q.spec.granularity} activation specs are not written by "
                                                          "static QDQ; left in float"))
                continue
            readers = [n for n in list(x.outputs) if q.consumers is None or id(n) in q.consumers]
            rng = ctx.calib.get(q.range_of)
            if rng is None:
                inside = [self._scopes[id(self._home[id(n)])] for n in readers if self._home.get(id(n)) is not self._graph]
                why = (f" (read inside {inside[0].prefix[:-1]}: no calibration sample took that branch)"
                       if inside and len(inside) == len(readers) else "")
                skipped.append(Skip(q.name, "activation", f"no calibration range for '{q.range_of}'{why}; left in float"))
                continue
            if not readers:
                continue
            self._into = self._graph_for(x, readers)
            try:
                scale, zp = compute_qparams(rng.min, rng.max, q.spec.dtype, symmetric=q.spec.symmetric)
            except ValueError as exc:
                skipped.append(Skip(q.name, "activation", f"range [{rng.min:.4g}, {rng.max:.4g}] unusable ({exc}); left in float"))
                continue
            dq = self._qdq_nodes(x, None, scale, zp, None, x.name)
            for node in readers:
                for i, inp in enumerate(node.inputs):
                    if inp is x:
                        node.inputs[i] = dq
            scales[q.name] = scale
            self._dq_source[dq.name] = q.name
        return scales

    def _graph_for(self, x: gs.Tensor, readers: list[gs.Node]) -> gs.Graph:
        """Where x's Q/DQ pair goes: the graph of its readers when they all lie in one (an If branch reading an
        outer value quantizes it there), else the graph that produces x (its value is visible in every body)."""
        homes = {id(self._home.get(id(n), self._graph)): self._home.get(id(n), self._graph) for n in readers}
        if len(homes) == 1:
            return next(iter(homes.values()))
        made = x.inputs[0] if isinstance(x, gs.Variable) and x.inputs else None
        if made is not None and id(made) in self._home:
            return self._home[id(made)]
        return next((sc.graph for sc in self._scopes.values() if any(i is x for i in sc.graph.inputs)), self._graph)

    # ------------------------------------------------------------------ per compute node
    def _quantize_target(self, t: Target, ctx: PassContext, act_scales: dict[str, np.ndarray], skipped: list[Skip]) -> bool:
        node, label = t.node, t.label
        self._into = self._home.get(id(node), self._graph)
        act_scale = None
        for i in t.activations:
            src = node.inputs[i]
            name = self._dq_source.get(src.name, src.name)
            if name not in act_scales:
                why = "has no calibration range" if name in self._planned else "is not quantized by the plan"
                skipped.append(Skip(label, node.op, f"input '{name}' {why}; node left in float"))
                return False
            act_scale = act_scales[name]
        w_scale = None
        if t.weight is not None:
            spec = t.weight_spec
            if spec is not None and (spec.granularity == "block" or spec.dtype not in WEIGHT_TYPES or not spec.symmetric):
                skipped.append(Skip(label, node.op, f"weight spec {spec.dtype} {spec.granularity}"
                                                    f"{'' if spec.symmetric else ' asymmetric'} is not written by static "
                                                    "QDQ; node left in float"))
                return False
            floor = self._bias_scale_floor(node, t, act_scale)
            try:
                dq, w_scale, widened = self._weight_dq(node.inputs[t.weight], t.weight_axis,
                                                       spec.dtype if spec else "int8", floor)
            except ValueError as exc:
                skipped.append(Skip(label, node.op, f"weight '{node.inputs[t.weight].name}' not quantizable ({exc})"))
                return False
            node.inputs[t.weight] = dq
            if widened:
                skipped.append(Skip(label, node.op, f"weight scale widened at {widened} channel(s) so the "
                                                    "int32 bias fits (bias / (input scale x weight scale) <= 2**31-1)"))
        for note in t.notes:
            skipped.append(Skip(label, node.op, note))
        if t.bias is not None and t.bias_dtype == "float":
            pass  # kept as the float initializer, as configured
        elif t.bias is not None:
            if act_scale is None or w_scale is None:
                skipped.append(Skip(label, node.op, "bias kept in float: its input or weight is not quantized here"))
            elif t.weight_axis is not None and t.bias_axis in (None, -1):
                pass  # reason already in notes / scalar bias with per-channel weight
            else:
                reason = self._bias_dq(node, t, act_scale, w_scale)
                if reason:
                    skipped.append(Skip(label, node.op, reason))
        return True

    # ------------------------------------------------------------------ builders
    def _qdq_nodes(self, src: gs.Tensor, q_values: np.ndarray | None, scale: np.ndarray, zp: np.ndarray,
                   axis: int | None, base: str) -> gs.Variable:
        scale_c = gs.Constant(self._names(f"{base}_scale"), np.asarray(scale, dtype=np.float32))
        zp_c = gs.Constant(self._names(f"{base}_zero_point"), np.asarray(zp))
        attrs = {"axis": int(axis)} if axis is not None else {}
        if q_values is None:  # activation: quantize at run time
            q = gs.Variable(self._names(f"{base}_quantized"), dtype=zp.dtype, shape=src.shape)
            self._into.nodes.append(gs.Node("QuantizeLinear", self._names(f"{base}_QuantizeLinear"),
                                             inputs=[src, scale_c, zp_c], outputs=[q]))
            shape = src.shape
        else:
            q = gs.Constant(self._names(f"{base}_quantized"), q_values)
            shape = list(q_values.shape)
        dq = gs.Variable(self._names(f"{base}_dequantized"), dtype=np.float32, shape=shape)
        self._into.nodes.append(gs.Node("DequantizeLinear", self._names(f"{base}_DequantizeLinear"), attrs=attrs,
                                         inputs=[q, scale_c, zp_c], outputs=[dq]))
        return dq

    def _bias_scale_floor(self, node: gs.Node, t: Target, act_scale: np.ndarray | None) -> np.ndarray | None:
        """The smallest weight scale, per output channel, at which the int32 bias |b| / (s_x * s_w) fits in int32.

        A bias that would overflow at the weights' own scale gets its channel's weight scale widened to this
        floor, as onnxruntime's quantizer does, rather than a float bias: onnxruntime's optimizer re-quantizes a
        float bias to int32 itself, and with 16-bit activation scales its result was wrong (measured on the
        OCR detector, docs/benchmark-notes.md)."""
        if t.bias is None or t.bias_dtype != "int32" or act_scale is None or np.size(act_scale) != 1:
            return None
        b = node.inputs[t.bias]
        if not isinstance(b, gs.Constant):
            return None
        values = np.abs(np.asarray(b.values, dtype=np.float64)).reshape(-1)
        s_x = float(np.asarray(act_scale).reshape(()))
        if values.size == 0 or not np.all(np.isfinite(values)) or not s_x > 0:
            return None
        floor = values / (s_x * INT32_MAX) * (1 + 1e-5)  # margin above float32 rounding of the scale
        return floor if t.weight_axis is not None else np.asarray(floor.max())

    def _weight_dq(self, w: gs.Constant, axis: int | None, dtype: str,
                   floor: np.ndarray | None = None) -> tuple[gs.Variable, np.ndarray, int]:
        """The weight's DQ and scale (shared by every node with the same scale), and how many channels of the scale
        ``floor`` widened."""
        values = np.asarray(constant_values(w), dtype=np.float32)  # not cached in w: freed once quantized
        scale, zp = weight_qparams(values, axis, dtype)
        widened = 0
        if floor is not None and (floor.shape == np.shape(scale) or floor.ndim == 0) and np.any(floor > scale):
            widened = int(np.count_nonzero(np.broadcast_to(floor > scale, np.shape(scale))))
            scale = np.maximum(scale, floor).astype(np.float32)
        key = (w.name, axis, scale.tobytes(), id(self._into))
        if key not in self._weights:
            q = quantize(values, scale, zp, axis=axis)
            self._weights[key] = (self._qdq_nodes(w, q, scale, zp, axis, w.name), scale)
        return (*self._weights[key], widened)

    def _bias_dq(self, node: gs.Node, t: Target, act_scale: np.ndarray, w_scale: np.ndarray) -> str | None:
        b = node.inputs[t.bias]
        got = int32_bias(b.values, act_scale, w_scale, t.bias_axis)
        if isinstance(got, str):
            return got
        q, scale, axis = got
        zp = np.zeros(scale.shape, dtype=INT_TYPES["int32"][0])
        node.inputs[t.bias] = self._qdq_nodes(b, q, scale, zp, axis, b.name)
        return None

