"""x * hard_sigmoid(x) between uint8 Q/DQ => DQ(x, alpha-scaled) -> Add(beta) -> saturating Q/DQ on [0, 1] -> Mul(x).

A hard-swish (``HardSwish(x)``, ``x * HardSigmoid(x)``, or ``x * Clip(x + 3, 0, 6) / 6`` written out) between a
DequantizeLinear and a QuantizeLinear has no integer kernel on onnxruntime's CPU provider, so it runs as float ops
with the Q/DQ around them, while the fp32 model fuses it into its Conv. Written as
``h = Q(DQ(x_q; alpha * s_x, z_x) + beta)`` on the grid [0, 1] (scale 1/255, zero point 0), whose saturation is the
clip, then ``y = Q(DQ(x_q) * DQ(h))`` with the output's own QuantizeLinear, the float function is the same and
onnxruntime runs QLinearAdd and QLinearMul. Rounding the gate to 1/255 is the only new error: at most |x| / 510
where the gate is neither 0 nor 1 (|x| < 3 for a hard-swish).

Only where every piece is certain: x and the output uint8 with scalar scales (onnxruntime fuses neither op with
int8), alpha > 0 and beta > 0 scalar constants, a written-out clip with bounds 0 and u whose 1/u factor is there
(the constant factors times u make 1), each intermediate read once and not a graph output, and the gate reading the
same tensor it multiplies: a hard-sigmoid gate on another tensor (``f * HardSigmoid(g)``, squeeze-and-excitation)
stays float, since its rounding error grows with |f|. Identity nodes (the runtime removes them) are looked through.
Measurements: docs/benchmark-notes.md.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import NameAllocator, constant_behind, is_onnx_op, qdq_constants
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
    c = constant_behind(t)
    if c is None:
        return None
    v = np.asarray(c.values)
    return float(v.reshape(())) if v.size == 1 and v.dtype.kind == "f" else None


class _Island:
    """The float nodes between the DequantizeLinears and the QuantizeLinear, read as a product of factors."""

    def __init__(self, outputs: set[str]):
        self.outputs = outputs
        self.nodes: list[gs.Node] = []
        self.inputs: list[gs.Variable] = []  # DequantizeLinear outputs used as plain factors
        self.gates: list[_Gate] = []
        self.constant = 1.0

    def _inner(self, t: gs.Tensor) -> gs.Node | None:
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
            return True
        if _dq(t) is not None:
            self.inputs.append(t)
            return True
        n = self._inner(t)
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
        add = self._inner(clip.inputs[0])
        if add is None or add.op != "Add" or len(add.inputs) != 2:
            return False
        for g, b in ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])):
            beta = _scalar(b)
            if beta is not None and _dq(g) is not None:
                self.nodes.append(add)
                self.gates.append(_Gate(g, 1 / hi, beta / hi))
                self.constant *= hi
                return True
        return False


def _grid(node: gs.Node) -> tuple[float, np.ndarray] | None:
    """(scale, zero point) of a per-tensor uint8 QuantizeLinear/DequantizeLinear, else None."""
    params = qdq_constants(node)
    if params is None or params[0].size != 1 or params[1].size != 1 or params[1].dtype != np.uint8:
        return None
    return float(params[0].reshape(())), params[1].reshape(())


class IntegerHardSwish(Pass):
    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        new_name = NameAllocator(graph)
        outputs = {t.name for t in graph.outputs}
        done = 0
        for q in [n for n in graph.nodes if n.op == "QuantizeLinear" and is_onnx_op(n)]:
            y, out_grid = q.inputs[0], _grid(q)
            if out_grid is None or _dq(y) is not None:
                continue
            island = _Island(outputs)  # y itself is read by q alone, so its producer is the island's last node
            if not island.factor(y) or len(island.inputs) != 1 or len(island.gates) != 1:
                continue
            gate, f = island.gates[0], island.inputs[0]
            if abs(island.constant - 1.0) > 1e-5 or gate.alpha <= 0 or gate.beta <= 0:
                continue
            if _dq(f).inputs[0] is not _dq(gate.g).inputs[0]:  # a gate on another tensor: see the docstring
                continue
            f_grid, g_grid = _grid(_dq(f)), _grid(_dq(gate.g))
            if f_grid is None or g_grid is None:
                continue
            _rewrite(graph, island, gate, f, y, g_grid, new_name)
            done += 1
        if done:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(modified=bool(done), stats={"hard-sigmoid gates": done} if done else {})


def _rewrite(graph: gs.Graph, island: _Island, gate: _Gate, f: gs.Variable, y: gs.Variable,
             g_grid: tuple[float, np.ndarray], new_name: NameAllocator) -> None:
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
                        gs.Constant(new_name(f"{base}_gate_input_scale"), np.array(gate.alpha * g_grid[0], np.float32)),
                        gs.Constant(new_name(f"{base}_gate_input_zero_point"), g_grid[1])],
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
