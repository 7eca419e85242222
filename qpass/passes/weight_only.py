"""MatMul(X, W) -> MatMul(X, DequantizeLinear(W_q int4|uint4|int8, scale[ceil(K/B), N], zero_point, axis=0, block_size=B)).

The weight-only rewrite: each planned MatMul/Gemm weight (plan spec: dtype, symmetric, block axis and size) is
quantized by the pass's algorithm (:mod:`qpass.weights`) and stored as integers, 4-bit ones packed two a byte;
activations stay float. onnxruntime fuses this form into its MatMulNBits kernel (CPU, CUDA) when the block size is
a power of two >= 16 and the weight is 2-D. A weight read by several planned nodes with the same spec is written
once. GPTQ takes each node's Hessian from the Gram matrix of its input in the calibration table.

A head tied to an embedding table (tied="once"; planned int8 per output channel, values bit-exactly the table
transposed, or the table read through Transpose) reads the table's int8 rows:
``MatMul(X, Transpose(DequantizeLinear(E_q, row_scale[V], axis=0)))``, which onnxruntime's CPU
provider still fuses into MatMulNBits (it moves the Transpose onto the initializers).
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from ..errors import PreconditionError
from ..graph import NameAllocator, constant_values, node_label
from ..ops import BLOCKED_MIN_OPSET
from ..pass_manager import Pass, PassContext, PassResult, Skip
from ..plan.bind import bind
from ..plan.policy import NEEDS_GRAM
from ..plan.targets import Target
from ..qparams import make_initializer, quantize
from ..weights.awq import search_clip
from ..weights.gptq import gptq
from ..weights.rtn import QuantizedWeight, rtn
from ..weights.search import search_block_qparams


class WeightOnlyQuantize(Pass):
    role = "quantize"

    def __init__(self, algorithm: str = "rtn", *, damp: float = 0.01, act_order: bool = True, tied: str = "once"):
        #: "rtn", "search" (per-block scale search; input-weighted when the table has the input's Gram matrix)
        #: "gptq" (needs the input's Gram matrix), "awq" (a clipping search weighted by the input's Gram matrix, after
        #: the activation-scale pass) or "awq-gptq" (GPTQ after the activation-scale pass)
        self.algorithm = algorithm
        self.damp = damp
        self.act_order = act_order
        #: "once": a head equal to an embedding table transposed reads the table's int8 rows; "separate": its own copy
        self.tied = tied

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        if ctx.plan is None:
            raise PreconditionError("needs a plan", subject=self.name)
        blocked = [n.node for n in ctx.plan.nodes if n.weight is not None and (
            n.weight.spec.granularity == "block" or n.weight.spec.dtype in ("int4", "uint4"))]
        if blocked and graph.opset < BLOCKED_MIN_OPSET:
            raise PreconditionError(f"block-wise and 4-bit DequantizeLinear need opset >= {BLOCKED_MIN_OPSET}, graph has "
                                    f"{graph.opset}", subject=blocked[0],
                                    hint=f"use --target-opset {BLOCKED_MIN_OPSET}")
        if self.algorithm in ("gptq", "awq", "awq-gptq") and ctx.calib is None:
            raise PreconditionError(f"{self.algorithm} needs calibration statistics (the inputs' Gram matrices)", subject=self.name,
                                    hint="give --calib DATA")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        bound = bind(ctx.plan, graph)
        names = NameAllocator(graph)
        written: dict[tuple, gs.Variable] = {}
        skipped = list(bound.skips)
        self._notes: list[Skip] = []
        # (float table, rows int8, scale [V, 1]) of the tables quantized so far, kept across runs on the same graph
        # (sequential GPTQ rewrites the embedding and the head in different runs)
        tensors = graph.tensors()
        self._tables = [e for e in getattr(self, "_tables", []) if tensors.get(e[1].name) is e[1]]
        done: Counter = Counter()
        for t in sorted(bound.targets, key=lambda t: t.node.op != "Gather"):  # tables first: a tied head reads them
            reason = self._rewrite(t, graph, ctx, names, written)
            if reason:
                skipped.append(Skip(node_label(t.node), t.node.op, reason))
            else:
                done[t.node.op] += 1
        if done:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(modified=bool(done), skipped=tuple(skipped + self._notes), stats=dict(done))

    def _rewrite(self, t: Target, graph: gs.Graph, ctx: PassContext, names: NameAllocator,
                 written: dict[tuple, gs.Variable]) -> str | None:
        node, spec = t.node, t.weight_spec
        if spec is None or not spec.quantized:
            return "no weight spec; kept in float"
        if node.op == "Gather":
            return self._embedding(t, graph, names, written)
        w = node.inputs[t.weight]
        if not isinstance(w, gs.Constant):
            return f"weight '{w.name}' is no longer a constant; kept in float"
        key = (w.name, spec)
        note = None
        shared = self._tied(node, w, spec)
        if shared is not None:
            node.inputs[t.weight] = self._tied_weight(graph, names, written, *shared,
                                                      transposed=node.op == "MatMul" or spec.axis == 1)
            return None
        if key not in written:
            values = np.asarray(constant_values(w), dtype=np.float32)
            hessian = self._hessian(node, ctx)
            if self.algorithm in NEEDS_GRAM and hessian is None and spec.granularity == "block":
                note = "no Gram matrix of its input (transposed Gemm input, or a table without one): round to nearest"
            try:
                qw = self.quantize(values, spec, hessian)
            except ValueError as exc:
                return f"weight '{w.name}' not quantizable ({exc}); kept in float"
            written[key] = self._dq(graph, names, w, qw, spec.dtype)
        node.inputs[t.weight] = written[key]
        if note:
            self._notes.append(Skip(node_label(node), node.op, note))
        return None

    def _embedding(self, t: Target, graph: gs.Graph, names: NameAllocator, written: dict) -> str | None:
        """Gather(E, ids) -> Mul(Cast(Gather(E_q, ids), float), Gather(scale[V, 1], ids)): the table is stored int8
        with one scale per row, and only the gathered rows are dequantized. (Not a DequantizeLinear with block_size:
        onnxruntime's CUDA provider fails on a block-wise DequantizeLinear it has not fused into a MatMul.)"""
        node, spec = t.node, t.weight_spec
        table, y = node.inputs[0], node.outputs[0]
        if not isinstance(table, gs.Constant) or spec.dtype != "int8" or spec.granularity != "channel":
            return f"embedding '{table.name}' spec {spec.dtype} {spec.granularity} is not written (int8 per row only)"
        if y in graph.outputs:
            return f"embedding output '{y.name}' is a graph output; kept in float"
        key = ("rows", table.name)
        if key not in written:
            qw = rtn(np.asarray(constant_values(table), dtype=np.float32), "int8", symmetric=True, axis=0)
            written[key] = (gs.Constant(names(f"{table.name}_quantized"), np.asarray(qw.q, dtype=np.int8)),
                            gs.Constant(names(f"{table.name}_row_scale"), np.asarray(qw.scale, np.float32).reshape(-1, 1)))
            self._tables.append((table, *written[key]))
            if self.tied == "once":
                self._share_transposed(graph, names, written, table, *written[key])
        q, scale = written[key]
        rows = gs.Variable(names(f"{y.name}_quantized"), dtype=np.int8)
        row_scale = gs.Variable(names(f"{y.name}_scale"), dtype=np.float32)
        widened = gs.Variable(names(f"{y.name}_widened"), dtype=np.float32)
        dequantized = gs.Variable(names(f"{y.name}_dequantized"), dtype=np.float32, shape=y.shape)
        graph.nodes.append(gs.Node("Gather", names(f"{node.name or y.name}_scale"), attrs={"axis": 0},
                                   inputs=[scale, node.inputs[1]], outputs=[row_scale]))
        graph.nodes.append(gs.Node("Cast", names(f"{y.name}_Cast"), attrs={"to": int(onnx.TensorProto.FLOAT)},
                                   inputs=[rows], outputs=[widened]))
        graph.nodes.append(gs.Node("Mul", names(f"{y.name}_dequantize"), inputs=[widened, row_scale],
                                   outputs=[dequantized]))
        for reader in list(y.outputs):
            for i, inp in enumerate(reader.inputs):
                if inp is y:
                    reader.inputs[i] = dequantized
        node.inputs[0] = q
        node.outputs[0] = rows
        return None

    def _tied(self, node: gs.Node, w: gs.Constant, spec) -> tuple | None:
        """(table, rows, scale) of a quantized embedding table this weight is (transposed), when it is planned as the
        table's own quantization (int8, symmetric, one scale per table row) and ``tied`` is "once"."""
        if self.tied != "once" or spec.dtype != "int8" or not spec.symmetric or spec.granularity != "channel":
            return None
        transposed = node.op == "MatMul" or spec.axis == 1  # the weight is [D, V]: the table's rows are its columns
        values = None
        for table, q, scale in self._tables:
            shape = tuple(table.shape)[::-1] if transposed else tuple(table.shape)
            if tuple(w.shape) != shape:
                continue
            if w is table:
                return table, q, scale
            values = np.asarray(w.values) if values is None else values
            if np.array_equal(values, np.asarray(table.values).T if transposed else np.asarray(table.values)):
                return table, q, scale
        return None

    @staticmethod
    def _tied_weight(graph: gs.Graph, names: NameAllocator, written: dict, table: gs.Constant, q: gs.Constant,
                     scale: gs.Constant, *, transposed: bool) -> gs.Variable:
        """DequantizeLinear(rows, scale[V], axis=0) [V, D], transposed to [D, V] when asked; once per
        table and form."""
        key = ("tied", table.name, transposed)
        if key in written:
            return written[key]
        # the row scales again as a 1-D per-axis scale (the checker wants constant scales; V floats beside V * D bytes)
        flat = gs.Constant(names(f"{scale.name}_flat"), np.ascontiguousarray(np.asarray(scale.values).reshape(-1)))
        v, d = (int(x) for x in table.shape)
        out = gs.Variable(names(f"{table.name}_tied_dequantized"), dtype=np.float32, shape=[v, d])
        graph.nodes.append(gs.Node("DequantizeLinear", names(f"{table.name}_tied_DequantizeLinear"), attrs={"axis": 0},
                                   inputs=[q, flat], outputs=[out]))
        if transposed:
            t = gs.Variable(names(f"{table.name}_tied_transposed"), dtype=np.float32, shape=[d, v])
            graph.nodes.append(gs.Node("Transpose", names(f"{table.name}_tied_Transpose"), attrs={"perm": [1, 0]},
                                       inputs=[out], outputs=[t]))
            out = t
        written[key] = out
        return out

    def _share_transposed(self, graph: gs.Graph, names: NameAllocator, written: dict, table: gs.Constant,
                          q: gs.Constant, scale: gs.Constant) -> None:
        """A MatMul/Gemm weight that is Transpose(table) (a head tied through Transpose) reads the table's int8 rows."""
        for tr in list(table.outputs):
            if tr.op != "Transpose" or list(tr.attrs.get("perm", [1, 0])) != [1, 0]:
                continue
            y = tr.outputs[0]
            readers = [(r, i) for r in y.outputs for i, inp in enumerate(r.inputs) if inp is y]
            if not readers or any(r.op not in ("MatMul", "Gemm") or i != 1 for r, i in readers) or y in graph.outputs:
                continue
            tr.inputs[0] = self._tied_weight(graph, names, written, table, q, scale, transposed=False)
            for r, _ in readers:
                self._notes.append(Skip(node_label(r), r.op, f"reads embedding table '{table.name}' through Transpose: "
                                                             "its int8 rows (stored once)"))

    def _hessian(self, node: gs.Node, ctx: PassContext) -> np.ndarray | None:
        """The input's Gram matrix divided by its row count (mean x^T x), when calibration collected it."""
        if ctx.calib is None or not node.inputs or (node.op == "Gemm" and int(node.attrs.get("transA", 0))):
            return None
        stats = getattr(ctx.calib, "statistics", None)
        gram = stats.get(node.inputs[0].name, "gram") if stats is not None else None
        if gram is None or not gram.rows:
            return None
        return np.asarray(gram.matrix, dtype=np.float64) / gram.rows

    def quantize(self, w: np.ndarray, spec, hessian: np.ndarray | None) -> QuantizedWeight:
        """The algorithm on one weight; blocks along ``spec.axis`` (a weight blocked on axis 1 is transposed)."""
        axis = spec.axis if spec.granularity != "tensor" else None
        block = spec.block_size if spec.granularity == "block" else None
        if self.algorithm == "rtn" or block is None or w.ndim != 2:
            return rtn(w, spec.dtype, symmetric=spec.symmetric, axis=axis, block_size=block, full_range=bool(block))
        wk = w if axis == 0 else w.T  # [K, N]: blocks along K
        if hessian is None and self.algorithm in NEEDS_GRAM:  # a transposed Gemm input, or a table without Gram
            # matrices: reported by _rewrite
            return rtn(w, spec.dtype, symmetric=spec.symmetric, axis=axis, block_size=block, full_range=True)
        if self.algorithm == "awq":
            scale, zp = search_clip(wk, hessian, block, spec.dtype, symmetric=spec.symmetric)
            q = quantize(wk, scale, zp, axis=0, block_size=block, qtype=spec.dtype)
        elif self.algorithm in ("gptq", "awq-gptq"):
            q, scale, zp = gptq(wk, hessian, block, spec.dtype, symmetric=spec.symmetric, damp=self.damp,
                                act_order=self.act_order, full_range=True)
        else:
            importance = None if hessian is None else np.diag(hessian)
            scale, zp = search_block_qparams(wk, block, spec.dtype, symmetric=spec.symmetric, importance=importance)
            q = quantize(wk, scale, zp, axis=0, block_size=block, qtype=spec.dtype)
        if axis != 0:
            q, scale, zp = q.T, scale.T, zp.T
        return QuantizedWeight(np.ascontiguousarray(q), np.ascontiguousarray(scale, dtype=np.float32),
                               np.ascontiguousarray(zp), axis, block)

    @staticmethod
    def _dq(graph: gs.Graph, names: NameAllocator, w: gs.Constant, qw: QuantizedWeight, qtype: str) -> gs.Variable:
        base = w.name
        q_name, zp_name = names(f"{base}_quantized"), names(f"{base}_zero_point")
        q = gs.Constant(q_name, LazyValues(make_initializer(q_name, qw.q, qtype)))
        scale = gs.Constant(names(f"{base}_scale"), np.asarray(qw.scale, dtype=np.float32))
        zp = gs.Constant(zp_name, LazyValues(make_initializer(zp_name, np.asarray(qw.zero_point), qtype)))
        attrs = {}
        if qw.axis is not None:
            attrs["axis"] = int(qw.axis)
        if qw.block_size:
            attrs["block_size"] = int(qw.block_size)
        out = gs.Variable(names(f"{base}_dequantized"), dtype=np.float32, shape=list(w.shape))
        graph.nodes.append(gs.Node("DequantizeLinear", names(f"{base}_DequantizeLinear"), attrs=attrs,
                                   inputs=[q, scale, zp], outputs=[out]))
        return out
