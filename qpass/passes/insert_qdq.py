"""x -> Q -> DQ -> Op for activations; W -> int8 W_q -> DQ(axis) -> Op for weights; B -> int32 B_q (scale s_x*s_w, zp 0) -> DQ -> Op.

The QDQ format: only standard ONNX QuantizeLinear / DequantizeLinear. Activation ranges come from
the calibration table; weight ranges from the constants (symmetric, per output channel when
configured). A bias whose integer value would overflow int32 stays float, with the reason recorded.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import PreconditionError
from ..graph import NameAllocator, node_label
from ..pass_manager import Pass, PassContext, PassResult, Skip
from ..qparams import INT_TYPES, compute_qparams, quantize, weight_qparams
from .targets import Target, find_targets

INT32_MAX = 2**31 - 1


class InsertQDQ(Pass):
    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        if ctx.calib is None:
            raise PreconditionError("needs a calibration table", subject=self.name)
        if ctx.config.per_channel and graph.opset < 13:
            raise PreconditionError(f"per-channel DequantizeLinear needs opset >= 13, graph has {graph.opset}",
                                    subject="graph", hint="use --target-opset 13 or --per-tensor")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        targets, skips = find_targets(graph, ctx.config)
        self._names = NameAllocator(graph)
        self._act: dict[str, tuple[gs.Variable, np.ndarray]] = {}
        self._weights: dict[tuple[str, int | None], tuple[gs.Variable, np.ndarray]] = {}
        self._graph = graph
        done: Counter = Counter()
        skipped = list(skips)
        for t in targets:
            if self._quantize_target(t, ctx, skipped):
                done[t.node.op] += 1
        if done:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(modified=bool(done), skipped=tuple(skipped), stats=dict(done))

    # ------------------------------------------------------------------ per node
    def _quantize_target(self, t: Target, ctx: PassContext, skipped: list[Skip]) -> bool:
        node, label = t.node, node_label(t.node)
        changed = False
        act_scale = None
        for i in t.activations:
            x = node.inputs[i]
            rng = ctx.calib.get(x.name)
            if rng is None:
                skipped.append(Skip(label, node.op, f"no calibration range for input '{x.name}'"))
                return changed
        for i in t.activations:
            dq, act_scale = self._activation_dq(node.inputs[i], ctx)
            node.inputs[i] = dq
            changed = True
        w_scale = None
        if t.weight is not None:
            dq, w_scale = self._weight_dq(node.inputs[t.weight], t.weight_axis, ctx)
            node.inputs[t.weight] = dq
            changed = True
        for note in t.notes:
            skipped.append(Skip(label, node.op, note))
        if t.bias is not None:
            if act_scale is None or w_scale is None:
                skipped.append(Skip(label, node.op, "bias kept in float: its input or weight is not quantized here"))
            elif t.weight_axis is not None and t.bias_axis in (None, -1):
                pass  # reason already in notes / scalar bias with per-channel weight
            else:
                reason = self._bias_dq(node, t, act_scale, w_scale)
                if reason:
                    skipped.append(Skip(label, node.op, reason))
        return changed

    # ------------------------------------------------------------------ builders
    def _qdq_nodes(self, src: gs.Tensor, q_values: np.ndarray | None, scale: np.ndarray, zp: np.ndarray,
                   axis: int | None, base: str) -> gs.Variable:
        scale_c = gs.Constant(self._names(f"{base}_scale"), np.asarray(scale, dtype=np.float32))
        zp_c = gs.Constant(self._names(f"{base}_zero_point"), np.asarray(zp))
        attrs = {"axis": int(axis)} if axis is not None else {}
        if q_values is None:  # activation: quantize at run time
            q = gs.Variable(self._names(f"{base}_quantized"), dtype=zp.dtype, shape=src.shape)
            self._graph.nodes.append(gs.Node("QuantizeLinear", self._names(f"{base}_QuantizeLinear"),
                                             inputs=[src, scale_c, zp_c], outputs=[q]))
            shape = src.shape
        else:
            q = gs.Constant(self._names(f"{base}_quantized"), q_values)
            shape = list(q_values.shape)
        dq = gs.Variable(self._names(f"{base}_dequantized"), dtype=np.float32, shape=shape)
        self._graph.nodes.append(gs.Node("DequantizeLinear", self._names(f"{base}_DequantizeLinear"), attrs=attrs,
                                         inputs=[q, scale_c, zp_c], outputs=[dq]))
        return dq

    def _activation_dq(self, x: gs.Variable, ctx: PassContext) -> tuple[gs.Variable, np.ndarray]:
        if x.name not in self._act:
            rng = ctx.calib.get(x.name)
            cfg = ctx.config
            scale, zp = compute_qparams(rng.min, rng.max, cfg.activation_type, symmetric=cfg.activation_symmetric)
            self._act[x.name] = (self._qdq_nodes(x, None, scale, zp, None, x.name), scale)
        return self._act[x.name]

    def _weight_dq(self, w: gs.Constant, axis: int | None, ctx: PassContext) -> tuple[gs.Variable, np.ndarray]:
        key = (w.name, axis)
        if key not in self._weights:
            values = np.asarray(w.values, dtype=np.float32)
            scale, zp = weight_qparams(values, axis, ctx.config.weight_type)
            q = quantize(values, scale, zp, axis=axis)
            self._weights[key] = (self._qdq_nodes(w, q, scale, zp, axis, w.name), scale)
        return self._weights[key]

    def _bias_dq(self, node: gs.Node, t: Target, act_scale: np.ndarray, w_scale: np.ndarray) -> str | None:
        b = node.inputs[t.bias]
        values = np.asarray(b.values, dtype=np.float32)
        scale = (np.float64(act_scale) * w_scale.astype(np.float64)).astype(np.float32)
        per_channel = scale.ndim == 1 and scale.size > 1
        axis = t.bias_axis if per_channel else None
        if per_channel and values.shape[axis] != scale.size:
            return f"bias kept in float: {values.shape[axis]} values for {scale.size} output channels"
        if np.any(scale <= 0) or not np.all(np.isfinite(scale)):
            return "bias kept in float: input scale x weight scale is not a positive finite number"
        shape = [1] * values.ndim
        if per_channel:
            shape[axis] = scale.size
        exact = values.astype(np.float64) / scale.reshape(shape if per_channel else ()).astype(np.float64)
        if np.any(np.abs(np.rint(exact)) > INT32_MAX):
            worst = int(np.unravel_index(np.argmax(np.abs(exact)), exact.shape)[axis if per_channel else 0]) \
                if exact.ndim else 0
            return f"bias kept in float: overflows int32 at channel {worst}"
        q = np.rint(exact).astype(np.int32)
        zp = np.zeros(scale.shape, dtype=INT_TYPES["int32"][0])
        node.inputs[t.bias] = self._qdq_nodes(b, q, scale, zp, axis, b.name)
        return None
