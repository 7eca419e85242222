"""c * hard_swish(x) [+ b] between uint8 Q/DQ => DQ(x * alpha) -> Add(beta) -> Q/DQ [0, 1] -> Mul(x) [-> Q/DQ -> Add(b)].

A hard-swish (``HardSwish(x)``, ``x * HardSigmoid(x)``, or ``x * Clip(x + 3, 0, 6) / 6`` written out) between a
DequantizeLinear and a QuantizeLinear has no integer kernel on onnxruntime's CPU provider, so it runs as float ops
with the Q/DQ around them, while the fp32 model fuses it into its Conv. Written as
``h = Q(DQ(x_q; alpha * s_x, z_x) + beta)`` on the grid [0, 1] (scale 1/255, zero point 0), whose saturation is the
clip, then ``y = Q(DQ(x_q) * DQ(h))`` with the output's own QuantizeLinear, the float function is the same and
onnxruntime runs QLinearAdd and QLinearMul. Rounding the gate to 1/255 is the only new error: at most |x| / 510
where the gate is neither 0 nor 1 (|x| < 3 for a hard-swish).

A constant factor c > 0 after it (a learnable affine block's scale) goes into the output QuantizeLinear's scale
(s_y / c, read back with s_y: exact). An offset b after that (the block's bias) needs one more rounding, so that
form is rewritten only with ``offsets`` (``--integer-hard-swish offsets``): the product is quantized on the exact
range of x * gate(x) over x's grid, dequantized with its scale times c, and Add(b) runs as QLinearAdd into the
output's QuantizeLinear.

Only where every piece is certain: x and the output uint8 with scalar scales (onnxruntime fuses neither op with
int8), alpha > 0 and beta > 0 scalar constants, a written-out clip with bounds 0 and u (u going into c), each
intermediate read once and not a graph output, and the gate reading the same tensor it multiplies: a hard-sigmoid
gate on another tensor (``f * HardSigmoid(g)``, squeeze-and-excitation) stays float, since its rounding error grows
with |f|. Identity nodes (the runtime removes them) are looked through. Measurements: docs/benchmark-notes.md.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import NameAllocator, is_onnx_op, qdq_constants, scalar_behind
from ..pass_manager import Pass, PassContext, PassResult

#: the gate's grid: [0, 1] in 255 uint8 steps, saturating at both ends
GATE_STEPS = 255


class _Gate:
    """``clip(alpha * g + beta, 0, 1)`` with ``g`` a DequantizeLinear's output."""

    def __init__(self, g: gs.Variable, alpha: float, beta: float):
        self.g, self.alpha, self.beta = g, alpha, beta


def _dq(t: gs.Tensor) -> gs.Node | None:
    """The DequantizeLinear that produces ``t``, through Identity nodes (which the runtime removes)."""
    while isinstance(t, gs.Variable) and len(t.inputs) == 1 and is_onnx_op(t.inputs[0]):
        n = t.inputs[0]
        if n.op == "DequantizeLinear":
            return n
        if n.op != "Identity" or not n.inputs:
            return None
        t = n.inputs[0]
    return None


def _scalar(t: gs.Tensor) -> float | None:
    found = scalar_behind(t)
    return None if found is None else found[0]


def _rank(t: gs.Tensor) -> int:
    found = scalar_behind(t)
    return 0 if found is None else found[1]


class _Island:
    """The float nodes between the DequantizeLinears and the QuantizeLinear, read as a product of factors."""

    def __init__(self, outputs: set[str]):
        self.outputs = outputs
        self.nodes: list[gs.Node] = []
        self.inputs: list[gs.Variable] = []  # DequantizeLinear outputs used as plain factors
        self.gates: list[_Gate] = []
        self.constant = 1.0
        self.rank = 0  # the highest rank of the constants taken in (a size-1 constant still broadcasts its rank)

    def inner(self, t: gs.Tensor) -> gs.Node | None:
        """The producer of an intermediate: a default-domain op, its one output read once, not a graph output."""
        if not isinstance(t, gs.Variable) or len(t.inputs) != 1 or len(t.outputs) != 1 or t.name in self.outputs:
            return None
        n = t.inputs[0]
        return n if is_onnx_op(n) and len(n.outputs) == 1 else None

    def factor(self, t: gs.Tensor) -> bool:
        """Add ``t``'s factors; False when ``t`` is not a product of the known pieces."""
        k = _scalar(t)
        if k is not None:
            self.constant *= k
            self.rank = max(self.rank, _rank(t))
            return True
        if _dq(t) is not None:
            self.inputs.append(t)
            return True
        n = self.inner(t)
        if n is None:
            return False
        self.nodes.append(n)
        if n.op == "Identity" and n.inputs:
            return self.factor(n.inputs[0])
        if n.op == "Mul" and len(n.inputs) == 2:
            return self.factor(n.inputs[0]) and self.factor(n.inputs[1])
        if n.op == "Div" and len(n.inputs) == 2:
            d = _scalar(n.inputs[1])
            if not d:
                return False
            self.constant /= d
            self.rank = max(self.rank, _rank(n.inputs[1]))
            return self.factor(n.inputs[0])
        if n.op == "HardSwish" and _dq(n.inputs[0]) is not None:  # x * clip(x / 6 + 1 / 2, 0, 1)
            self.inputs.append(n.inputs[0])
            self.gates.append(_Gate(n.inputs[0], 1 / 6, 0.5))
            return True
        if n.op == "HardSigmoid" and _dq(n.inputs[0]) is not None:
            self.gates.append(_Gate(n.inputs[0], float(n.attrs.get("alpha", 0.2)), float(n.attrs.get("beta", 0.5))))
            return True
        if n.op == "Clip":
            return self._clip(n)
        return False

    def _clip(self, clip: gs.Node) -> bool:
        """Clip(g + b, 0, u) = u * clip(g / u + b / u, 0, 1), the ``u`` going to the constant factor."""
        if "min" in clip.attrs or "max" in clip.attrs:  # opset < 11
            lo, hi = clip.attrs.get("min"), clip.attrs.get("max")
        else:
            lo = _scalar(clip.inputs[1]) if len(clip.inputs) > 1 and clip.inputs[1].name else None
            hi = _scalar(clip.inputs[2]) if len(clip.inputs) > 2 and clip.inputs[2].name else None
        if lo != 0 or hi is None or hi <= 0:
            return False
        add = self.inner(clip.inputs[0])
        if add is None or add.op != "Add" or len(add.inputs) != 2:
            return False
        for g, b in ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])):
            beta = _scalar(b)
            if beta is not None and _dq(g) is not None:
                self.rank = max(self.rank, _rank(b))
                self.nodes.append(add)
                self.gates.append(_Gate(g, 1 / hi, beta / hi))
                self.constant *= hi
                return True
        return False


def _grid(node: gs.Node) -> tuple[float, np.ndarray] | None:
    """(scale, zero point) of a per-tensor uint8 QuantizeLinear/DequantizeLinear with its zero point written out (an
    omitted one may mean another type: int8 from the input, or an opset-21 ``output_dtype``), else None."""
    if len(node.inputs) < 3 or not node.inputs[2].name:
        return None
    params = qdq_constants(node)
    if params is None or params[0].size != 1 or params[1].size != 1 or params[1].dtype != np.uint8:
        return None
    return float(params[0].reshape(())), params[1].reshape(())


def _offset(island: _Island, y: gs.Variable) -> tuple[float | None, gs.Tensor]:
    """(b, p) when ``y = Add(p, b)`` with ``b`` a scalar constant (a learnable affine block's bias after the
    activation), the Add going to the island; else (None, y)."""
    add = island.inner(y)
    if add is None or add.op != "Add" or len(add.inputs) != 2:
        return None, y
    for p, b in ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])):
        value = _scalar(b)
        if value is not None and _scalar(p) is None:
            island.rank = max(island.rank, _rank(b))
            island.nodes.append(add)
            return value, p
    return None, y


def _product_grid(x_grid: tuple[float, np.ndarray], gate: _Gate) -> tuple[float, np.ndarray] | None:
    """A uint8 grid for ``x * gate(x)`` over every value of x's grid (its exact range, 0 included)."""
    x = x_grid[0] * (np.arange(256, dtype=np.float64) - float(x_grid[1]))
    h = x * np.clip(gate.alpha * x + gate.beta, 0.0, 1.0)
    lo, hi = min(0.0, float(h.min())), max(0.0, float(h.max()))
    if hi - lo <= 0:
        return None
    scale = (hi - lo) / GATE_STEPS
    return scale, np.array(np.clip(np.round(-lo / scale), 0, 255), np.uint8)


class IntegerHardSwish(Pass):
    def __init__(self, offsets: bool = False):
        #: also the form with a constant offset after the product, which costs one more rounding
        self.offsets = offsets

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        new_name = NameAllocator(graph)
        outputs = {t.name for t in graph.outputs}
        done = 0
        for q in [n for n in graph.nodes if n.op == "QuantizeLinear" and is_onnx_op(n)]:
            y, out_grid = q.inputs[0], _grid(q)
            if out_grid is None or _dq(y) is not None:
                continue
            island = _Island(outputs)  # y itself is read by q alone, so its producer is the island's last node
            offset, product = _offset(island, y)
            offset = offset or None  # an offset of 0 is none
            if not island.factor(product) or len(island.inputs) != 1 or len(island.gates) != 1:
                continue
            gate, f, factor = island.gates[0], island.inputs[0], island.constant
            if gate.alpha <= 0 or gate.beta <= 0 or factor <= 0:
                continue
            if _dq(f).inputs[0] is not _dq(gate.g).inputs[0]:  # a gate on another tensor: see the docstring
                continue
            x_grid = _grid(_dq(f))
            g_grid = _grid(_dq(gate.g))
            if x_grid is None or g_grid is None or g_grid[0] != x_grid[0] or int(g_grid[1]) != int(x_grid[1]):
                continue  # two dequantizations of one tensor on other grids: not one value
            if island.rank > 1 and (f.shape is None or island.rank > len(f.shape)):
                continue  # a constant of higher rank would broadcast the output to more dimensions
            if offset is None:
                if abs(factor - 1.0) > 1e-6:  # y = c * x * gate: the output's QuantizeLinear divides by c
                    q.inputs[1] = gs.Constant(new_name(f"{y.name}_scale_over_factor"),
                                              np.array(out_grid[0] / factor, np.float32))
                _rewrite(graph, island, gate, f, y, x_grid, new_name)
            elif self.offsets:
                h_grid = _product_grid(x_grid, gate)
                if h_grid is None:
                    continue
                product_out = gs.Variable(new_name(f"{y.name}_product"), dtype=np.float32)
                _rewrite(graph, island, gate, f, product_out, x_grid, new_name)
                _add_offset(graph, product_out, y, factor, offset, h_grid, new_name)
            else:
                continue
            done += 1
        if done:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(modified=bool(done), stats={"hard-swish": done} if done else {})


def _add_offset(graph: gs.Graph, product: gs.Variable, y: gs.Variable, factor: float, offset: float,
                h_grid: tuple[float, np.ndarray], new_name: NameAllocator) -> None:
    """y = factor * product + offset as Q(product) on ``h_grid`` -> DQ with the scale times ``factor`` -> Add(DQ(offset)),
    which onnxruntime runs as QLinearAdd into y's own QuantizeLinear."""
    base = y.name
    h_q = gs.Variable(new_name(f"{base}_product_quantized"), dtype=np.uint8)
    scaled = gs.Variable(new_name(f"{base}_product_scaled"), dtype=np.float32)
    b = gs.Variable(new_name(f"{base}_offset"), dtype=np.float32)
    zero = gs.Constant(new_name(f"{base}_product_zero_point"), h_grid[1])
    # the offset as one uint8 code: 255 steps of |b| / 255 from zero point 0 (b > 0) or 255 (b < 0)
    b_code = np.array(GATE_STEPS if offset > 0 else 0, np.uint8)
    b_zero = np.array(0 if offset > 0 else GATE_STEPS, np.uint8)
    graph.nodes.extend([
        gs.Node("QuantizeLinear", new_name(f"{base}_product_QuantizeLinear"),
                inputs=[product, gs.Constant(new_name(f"{base}_product_scale"), np.array(h_grid[0], np.float32)), zero],
                outputs=[h_q]),
        gs.Node("DequantizeLinear", new_name(f"{base}_product_DequantizeLinear"),
                inputs=[h_q, gs.Constant(new_name(f"{base}_product_scale_times_factor"),
                                         np.array(h_grid[0] * factor, np.float32)), zero],
                outputs=[scaled]),
        gs.Node("DequantizeLinear", new_name(f"{base}_offset_DequantizeLinear"),
                inputs=[gs.Constant(new_name(f"{base}_offset_quantized"), b_code),
                        gs.Constant(new_name(f"{base}_offset_scale"), np.array(abs(offset) / GATE_STEPS, np.float32)),
                        gs.Constant(new_name(f"{base}_offset_zero_point"), b_zero)],
                outputs=[b]),
        gs.Node("Add", new_name(f"{base}_offset_Add"), inputs=[scaled, b], outputs=[y]),
    ])


def _rewrite(graph: gs.Graph, island: _Island, gate: _Gate, f: gs.Variable, y: gs.Variable,
             x_grid: tuple[float, np.ndarray], new_name: NameAllocator) -> None:
    """The island's nodes replaced by the gate (a slope-scaled DQ of x's codes, Add(beta), Q/DQ on [0, 1]) and
    ``y = Mul(f, gate)``; ``x_grid`` is the grid of f and of the gate's input (the same codes)."""
    base = y.name
    top = np.array(GATE_STEPS, np.uint8)  # the code of 1.0 on the gate's grid, and of beta on beta's grid
    zero = gs.Constant(new_name(f"{base}_gate_zero_point"), np.array(0, np.uint8))
    step = gs.Constant(new_name(f"{base}_gate_scale"), np.array(1.0 / GATE_STEPS, np.float32))
    scaled = gs.Variable(new_name(f"{base}_gate_scaled"), dtype=np.float32)
    beta = gs.Variable(new_name(f"{base}_gate_offset"), dtype=np.float32)
    pre = gs.Variable(new_name(f"{base}_gate_linear"), dtype=np.float32)
    h_q = gs.Variable(new_name(f"{base}_gate_quantized"), dtype=np.uint8)
    h = gs.Variable(new_name(f"{base}_gate"), dtype=np.float32)
    for n in island.nodes:
        n.inputs.clear()
        n.outputs.clear()
    graph.nodes.extend([
        gs.Node("DequantizeLinear", new_name(f"{base}_gate_scaled_DequantizeLinear"),
                inputs=[_dq(gate.g).inputs[0],
                        gs.Constant(new_name(f"{base}_gate_input_scale"), np.array(gate.alpha * x_grid[0], np.float32)),
                        gs.Constant(new_name(f"{base}_gate_input_zero_point"), x_grid[1])],
                outputs=[scaled]),
        gs.Node("DequantizeLinear", new_name(f"{base}_gate_offset_DequantizeLinear"),
                inputs=[gs.Constant(new_name(f"{base}_gate_offset_quantized"), top),
                        gs.Constant(new_name(f"{base}_gate_offset_scale"), np.array(gate.beta / GATE_STEPS, np.float32)),
                        zero],
                outputs=[beta]),
        gs.Node("Add", new_name(f"{base}_gate_Add"), inputs=[scaled, beta], outputs=[pre]),
        gs.Node("QuantizeLinear", new_name(f"{base}_gate_QuantizeLinear"), inputs=[pre, step, zero], outputs=[h_q]),
        gs.Node("DequantizeLinear", new_name(f"{base}_gate_DequantizeLinear"), inputs=[h_q, step, zero], outputs=[h]),
        gs.Node("Mul", new_name(f"{base}_Mul"), inputs=[f, h], outputs=[y]),
    ])
