"""x @ W -> DynamicQuantizeLinear(x) -> MatMulInteger(x_q, W_q int8, x_zp) -> Cast(float) -> Mul(x_scale * w_scale), for each planned node whose input has a dynamic spec.

Standard ONNX only (DynamicQuantizeLinear, MatMulInteger, Cast, Mul; opset >= 11); onnxruntime fuses the chain into
its dynamic kernels (MatMulIntegerToFloat, then DynamicQuantizeMatMul). One DynamicQuantizeLinear per activation,
shared by the nodes that read it. A Gemm's transB is folded into the stored weight, its alpha into the weight scale,
and beta * C becomes an Add. Nodes whose input has a static spec are InsertQDQ's; the two mix through the plan.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import PreconditionError
from ..graph import NameAllocator
from ..pass_manager import Pass, PassContext, PassResult, Skip
from ..plan.bind import bind
from ..plan.dynamic import dynamic_part
from .weight_only import WeightOnlyQuantize
from ..plan.targets import Target
from ..qparams import quantize, weight_qparams

#: DynamicQuantizeLinear's first opset
DYNAMIC_MIN_OPSET = 11


class InsertDynamicQuantization(Pass):
    #: its stats count the compute nodes it quantized (what the report's quantized_nodes sums)
    role = "quantize"

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        if ctx.plan is None:
            raise PreconditionError("needs a plan", subject=self.name)
        dynamic = [t.name for t in ctx.plan.with_overrides().tensors.values() if t.spec.dynamic]
        if dynamic and graph.opset < DYNAMIC_MIN_OPSET:
            raise PreconditionError(f"DynamicQuantizeLinear needs opset >= {DYNAMIC_MIN_OPSET}, graph has {graph.opset}",
                                    subject=dynamic[0], hint="use --target-opset 13")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        part = dynamic_part(ctx.plan, graph)[0]
        if not part.nodes and not part.tensors:
            return PassResult(modified=False)
        tables = replace(part, nodes=tuple(n for n in part.nodes if n.op_type == "Gather"), tensors={})
        plan = bind(replace(part, nodes=tuple(n for n in part.nodes if n.op_type != "Gather")), graph)
        dynamic = {q.name: q for q in plan.tensors}
        self._names = NameAllocator(graph)
        self._graph = graph
        top = {id(n) for n in graph.nodes}
        skipped: list[Skip] = list(plan.skips)
        quantized: dict[str, tuple[gs.Variable, gs.Variable, gs.Variable]] = {}
        done: Counter = Counter()
        for t in plan.targets:
            inputs = [t.node.inputs[i] for i in t.activations]
            if not inputs or not any(x.name in dynamic for x in inputs):
                continue  # a static node: InsertQDQ's
            x = inputs[0]
            spec = dynamic[x.name].spec if x.name in dynamic else None
            why = self._unsupported(t, spec, top)
            if why:
                skipped.append(Skip(t.label, t.node.op, why + "; node left in float"))
                continue
            if x.name not in quantized:
                quantized[x.name] = self._dynamic_quantize(x)
            try:
                self._rewrite(t, *quantized[x.name])
            except ValueError as exc:
                skipped.append(Skip(t.label, t.node.op, f"weight not quantizable ({exc}); node left in float"))
                continue
            done[t.node.op] += 1
        if tables.nodes:  # embedding tables: int8 rows, dequantized after the lookup (the weight-only mode's form)
            rows = WeightOnlyQuantize("rtn", tied="separate").run(graph, PassContext(plan=tables))
            skipped += [s for s in rows.skipped if s not in plan.skips]
            done.update(rows.stats)
        if done or quantized:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(modified=bool(done), skipped=tuple(skipped), stats=dict(done))

    @staticmethod
    def _unsupported(t: Target, spec, top: set[int]) -> str | None:
        node = t.node
        if id(node) not in top:
            return "inside a control-flow body: dynamic quantization rewrites the top-level graph only"
        if spec is None or spec.dtype != "uint8" or spec.symmetric or spec.granularity != "tensor":
            return "a dynamic activation must be uint8 asymmetric per tensor (what DynamicQuantizeLinear computes)"
        if node.op not in ("MatMul", "Gemm") or t.activations != [0] or t.weight != 1:
            return f"{node.op} with these inputs has no dynamic form here (MatMul/Gemm: activation 0, weight 1)"
        w = node.inputs[1]
        if not isinstance(w, gs.Constant) or len(w.shape) != 2:
            return "the weight is not a constant 2-D tensor"
        ws = t.weight_spec
        if ws is None or ws.dtype != "int8" or not ws.symmetric or ws.granularity == "block":
            return "a dynamic node's weight must be int8 symmetric, per tensor or per channel"
        if node.op == "Gemm" and int(node.attrs.get("transA", 0)):
            return "Gemm with transA"
        return None

    def _dynamic_quantize(self, x: gs.Variable) -> tuple[gs.Variable, gs.Variable, gs.Variable]:
        q = gs.Variable(self._names(f"{x.name}_dynamic_quantized"), dtype=np.uint8, shape=x.shape)
        scale = gs.Variable(self._names(f"{x.name}_dynamic_scale"), dtype=np.float32, shape=[])
        zp = gs.Variable(self._names(f"{x.name}_dynamic_zero_point"), dtype=np.uint8, shape=[])
        self._graph.nodes.append(gs.Node("DynamicQuantizeLinear", self._names(f"{x.name}_DynamicQuantizeLinear"),
                                         inputs=[x], outputs=[q, scale, zp]))
        return q, scale, zp

    def _rewrite(self, t: Target, xq: gs.Variable, x_scale: gs.Variable, x_zp: gs.Variable) -> None:
        node, w = t.node, t.node.inputs[1]
        base = node.name or node.outputs[0].name
        values = np.asarray(w.values, dtype=np.float32)
        trans_b = node.op == "Gemm" and int(node.attrs.get("transB", 0))
        axis = t.weight_axis
        scale, zp = weight_qparams(values, axis, "int8")
        wq = np.asarray(quantize(values, scale, zp, axis=axis))
        if trans_b:
            wq = np.ascontiguousarray(wq.T)  # [N, K] -> [K, N]; the scale stays one per output column
        alpha = float(node.attrs.get("alpha", 1.0)) if node.op == "Gemm" else 1.0
        w_scale = np.asarray(np.asarray(scale, dtype=np.float64) * alpha, dtype=np.float32)
        w_const = gs.Constant(self._names(f"{w.name}_quantized"), wq)
        zero = gs.Constant(self._names(f"{w.name}_zero_point"), np.zeros((), dtype=np.int8))
        w_scale_c = gs.Constant(self._names(f"{w.name}_scale"), w_scale)
        y = node.outputs[0]
        acc = gs.Variable(self._names(f"{base}_int32"), dtype=np.int32)
        as_float = gs.Variable(self._names(f"{base}_int32_float"), dtype=np.float32)
        both = gs.Variable(self._names(f"{base}_scale"), dtype=np.float32)
        has_c = node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name
        scaled = gs.Variable(self._names(f"{base}_scaled"), dtype=np.float32) if has_c else y
        new = [
            gs.Node("MatMulInteger", self._names(f"{base}_MatMulInteger"), inputs=[xq, w_const, x_zp, zero],
                    outputs=[acc]),
            gs.Node("Cast", self._names(f"{base}_Cast"), attrs={"to": onnx.TensorProto.FLOAT}, inputs=[acc],
                    outputs=[as_float]),
            gs.Node("Mul", self._names(f"{base}_scale_Mul"), inputs=[x_scale, w_scale_c], outputs=[both]),
            gs.Node("Mul", self._names(f"{base}_Mul"), inputs=[as_float, both], outputs=[scaled]),
        ]
        if has_c:
            c = node.inputs[2]
            beta = float(node.attrs.get("beta", 1.0))
            if beta != 1.0:
                if not isinstance(c, gs.Constant):
                    raise ValueError("Gemm with beta != 1 and a run-time C")
                c = gs.Constant(self._names(f"{c.name}_beta"), (np.asarray(c.values, np.float64) * beta).astype(np.float32))
            new.append(gs.Node("Add", self._names(f"{base}_bias_Add"), inputs=[scaled, c], outputs=[y]))
        node.outputs.clear()
        node.inputs.clear()
        self._graph.nodes.extend(new)
