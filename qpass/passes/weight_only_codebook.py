"""MatMul(X, W) -> MatMul(X, W') for the weight grids beyond affine int4/int8: NF4 codes (uint4 -> Cast -> Gather of a
16-level codebook, x the block absmax gathered per input feature), ternary int2 DequantizeLinear (absmean scale),
and block scales stored as uint8 with a float32 scale per output channel (Mul(Cast(codes), s2) or a
DequantizeLinear, feeding the weight's scale).

The affine types (int4, uint4, int8, and the int8 head) go through :class:`WeightOnlyQuantize`; this pass changes only
the grid and the scales' storage. NF4 and ternary values are nearest-level rounding (no GPTQ or scale search).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from ..errors import PreconditionError
from ..graph import NameAllocator
from ..ops import INT2_MIN_OPSET
from ..pass_manager import PassContext, PassResult
from ..qparams import dequantize, make_initializer, quantize
from ..weights.double_quant import quantize_scales
from ..weights.nf4 import NF4_CODEBOOK, block_absmax, nf4_quantize
from ..weights.rtn import QuantizedWeight
from ..weights.ternary import block_absmean, ternary
from .weight_only import WeightOnlyQuantize

#: weight dtypes this pass rounds to the nearest level itself, whatever the algorithm
NEAREST_ONLY = ("nf4", "int2")


class WeightOnlyCodebook(WeightOnlyQuantize):
    """Weight-only quantization with NF4 / ternary grids and optionally double-quantized (uint8) block scales."""

    def __init__(self, algorithm: str = "rtn", *, damp: float = 0.01, act_order: bool = True, tied: str = "once",
                 double_quant: bool = False, scale_form: str = "cast-mul"):
        super().__init__(algorithm, damp=damp, act_order=act_order, tied=tied)
        #: store every block-wise scale as uint8 x a float32 scale per output channel
        self.double_quant = double_quant
        #: how the scales are computed from their codes: "cast-mul" (Mul(Cast(codes), s2)) or "dequantize"
        #: (DequantizeLinear(codes, s2, axis))
        self.scale_form = scale_form
        self._scales: dict[int, tuple] = {}
        self._codebook_const: gs.Constant | None = None
        self._block_index: dict[tuple[int, int], gs.Constant] = {}

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        self._scales, self._codebook_const, self._block_index = {}, None, {}
        return super().run(graph, ctx)

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        super().requires(graph, ctx)
        ternary_nodes = [n.node for n in ctx.plan.nodes if n.weight is not None and n.weight.spec.dtype == "int2"]
        if ternary_nodes and graph.opset < INT2_MIN_OPSET:
            raise PreconditionError(f"ternary weights are int2 DequantizeLinear, which needs opset >= {INT2_MIN_OPSET}; "
                                    f"graph has {graph.opset}", subject=ternary_nodes[0],
                                    hint=f"use --target-opset {INT2_MIN_OPSET}")

    def quantize(self, w: np.ndarray, spec, hessian: np.ndarray | None) -> QuantizedWeight:
        """NF4 / ternary: nearest level with the block absmax / absmean scale; affine types: the algorithm. With
        double quantization the scales are rounded to their uint8 grid first and the values rounded to them."""
        block = spec.block_size if spec.granularity == "block" else None
        if spec.dtype in NEAREST_ONLY:
            if block is None or w.ndim != 2:
                raise ValueError(f"{spec.dtype} is written block-wise on 2-D weights only")
            wk = w if spec.axis == 0 else w.T  # [K, N]: blocks along K
            scale = (block_absmax if spec.dtype == "nf4" else block_absmean)(wk, block)
            if self.double_quant:
                scale = self._keep_scales(scale)
            if spec.dtype == "nf4":
                q, scale = nf4_quantize(wk, block, scale)
                zp = None
            else:
                q, scale, zp = ternary(wk, block, scale)[:3]
            if spec.axis != 0:
                q, scale, zp = q.T, scale.T, None if zp is None else zp.T
            return self._remember(QuantizedWeight(np.ascontiguousarray(q), np.ascontiguousarray(scale),
                                                  None if zp is None else np.ascontiguousarray(zp), spec.axis, block))
        qw = super().quantize(w, spec, hessian)
        if not (self.double_quant and qw.block_size):
            return qw
        # the algorithm's scales on their uint8 grid, then the values rounded again to them: from the float weight
        # (round to nearest, search), or from the algorithm's dequantized weight (GPTQ's error compensation kept)
        source = w if self.algorithm != "gptq" else dequantize(qw.q, qw.scale, qw.zero_point, axis=qw.axis,
                                                                block_size=qw.block_size)
        scale = self._keep_scales(qw.scale if qw.axis == 0 else qw.scale.T)
        scale = scale if qw.axis == 0 else np.ascontiguousarray(scale.T)
        q = quantize(source, scale, qw.zero_point, axis=qw.axis, block_size=qw.block_size, qtype=spec.dtype)
        return self._remember(QuantizedWeight(q, scale, qw.zero_point, qw.axis, qw.block_size))

    def _keep_scales(self, scale_kn: np.ndarray) -> np.ndarray:
        """Scales [blocks, N] on their uint8 grid (per output channel N); the codes are kept for :meth:`_dq`."""
        q, s2, deq = quantize_scales(scale_kn, channel_axis=1)
        self._pending = (q, s2)
        return deq

    def _remember(self, qw: QuantizedWeight) -> QuantizedWeight:
        if self.double_quant:
            self._scales[id(qw.scale)] = (qw.scale, *self._pending)
        return qw

    def _dq(self, graph: gs.Graph, names: NameAllocator, w: gs.Constant, qw: QuantizedWeight, qtype: str) -> gs.Variable:
        if qtype == "nf4":
            return self._codebook(graph, names, w, qw)
        out = super()._dq(graph, names, w, qw, qtype)
        if self.double_quant and id(qw.scale) in self._scales:
            node = graph.nodes[-1]  # the weight's DequantizeLinear just written
            node.inputs[1] = self._scale_dq(graph, names, w.name, qw, list(qw.scale.shape))
        return out

    def _scale_dq(self, graph: gs.Graph, names: NameAllocator, base: str, qw: QuantizedWeight,
                  shape: list[int]) -> gs.Variable:
        """The block scales, ``shape``, from their uint8 codes and s2 [N] (on the output channel's axis):
        DequantizeLinear(codes, s2, axis), or Mul(Cast(codes, float), s2), which onnxruntime folds into a constant."""
        _, q, s2 = self._scales[id(qw.scale)]
        q = q if qw.axis == 0 else q.T  # codes were taken on [blocks, N]
        q = np.ascontiguousarray(q.reshape(shape), dtype=np.uint8)
        channel_axis = len(shape) - 1 if qw.axis == 0 else 0
        codes = gs.Constant(names(f"{base}_scale_quantized"), q)
        out = gs.Variable(names(f"{base}_scale_dequantized"), dtype=np.float32, shape=shape)
        if self.scale_form == "dequantize":
            graph.nodes.append(gs.Node(
                "DequantizeLinear", names(f"{base}_scale_DequantizeLinear"), attrs={"axis": channel_axis},
                inputs=[codes, gs.Constant(names(f"{base}_scale_scale"), np.asarray(s2, np.float32))], outputs=[out]))
            return out
        broadcast = [1] * len(shape)
        broadcast[channel_axis] = -1
        widened = gs.Variable(names(f"{base}_scale_widened"), dtype=np.float32, shape=shape)
        graph.nodes.append(gs.Node("Cast", names(f"{base}_scale_Cast"), attrs={"to": int(onnx.TensorProto.FLOAT)},
                                   inputs=[codes], outputs=[widened]))
        graph.nodes.append(gs.Node(
            "Mul", names(f"{base}_scale_Mul"), outputs=[out],
            inputs=[widened, gs.Constant(names(f"{base}_scale_scale"), np.asarray(s2, np.float32).reshape(broadcast))]))
        return out

    def _codebook(self, graph: gs.Graph, names: NameAllocator, w: gs.Constant, qw: QuantizedWeight) -> gs.Variable:
        """Mul(Gather(codebook, Cast(codes uint4, int32)), Gather(scale, block of each input feature, axis)): the
        levels of the codes times their block's scale, expanded along the block axis by a constant index [K]."""
        base, axis, block = w.name, qw.axis, qw.block_size
        shape = [int(d) for d in w.shape]
        k = shape[axis]

        def var(suffix, dtype=np.float32):
            return gs.Variable(names(f"{base}_{suffix}"), dtype=dtype, shape=shape)

        def node(op, suffix, inputs, output, **attrs):
            graph.nodes.append(gs.Node(op, names(f"{base}_{suffix}"), attrs=attrs, inputs=inputs, outputs=[output]))
            return output

        code_name = names(f"{base}_nf4_codes")
        q = gs.Constant(code_name, LazyValues(make_initializer(code_name, qw.q, "uint4")))
        if self.double_quant and id(qw.scale) in self._scales:
            scale = self._scale_dq(graph, names, base, qw, list(qw.scale.shape))
        else:
            scale = gs.Constant(names(f"{base}_nf4_scale"), np.ascontiguousarray(qw.scale, dtype=np.float32))
        if self._codebook_const is None:
            self._codebook_const = gs.Constant(names("nf4_codebook"), NF4_CODEBOOK.copy())
        if (k, block) not in self._block_index:
            self._block_index[(k, block)] = gs.Constant(names(f"nf4_block_of_row_{k}_{block}"),
                                                        (np.arange(k) // block).astype(np.int32))
        idx = node("Cast", "nf4_Cast", [q], var("nf4_index", np.int32), to=int(onnx.TensorProto.INT32))
        levels = node("Gather", "nf4_Gather", [self._codebook_const, idx], var("nf4_levels"), axis=0)
        full = node("Gather", "nf4_scale_Gather", [scale, self._block_index[(k, block)]], var("nf4_scale_rows"),
                    axis=axis)
        return node("Mul", "nf4_Mul", [levels, full], var("dequantized"))
