"""Softmax mask fills clamp to float16's range: `Where(m, 0, -3.4e38) -> Add -> Softmax` becomes `Where(m, 0, -16384) -> Add -> Softmax`.

A model-level pass, run by the float16 mode before it measures ranges. An additive attention mask is a float
constant far beyond float16's range (float32's lowest, -3.4e38, or -1e9) that only ever reaches a Softmax input;
there its only job is ``exp(fill + score) == 0``. Every such constant value beyond ``MASK_FILL`` in magnitude is
written as ``±MASK_FILL`` (float16's max / 4): ``exp(-16384)`` is 0 in float32 as in float16, so every Softmax row
with an unmasked entry is unchanged, and the masked scores (``-16384 + score``) keep their measured range well
inside float16's (with the mode's headroom of 2), so they and the Softmax input convert instead of staying float32
behind Casts. A row masked entirely stays finite (no ``-inf - -inf`` NaN in float16), but its weights change: float32
gives uniform ones (``-3.4e38 + score`` loses the score), the clamped fill the softmax of the raw scores; such rows
(padding queries) carry no meaning either way.

A constant qualifies only when every path from it reaches a Softmax's input through ops that carry a mask
(``MASK_PATH``: Where's value inputs, Add, Sub, Neg, Cast, data movement, and Mul by a 0/1 tensor: a Cast of a
bool or integer tensor, or one minus it, as in ``(1 - mask) * -3.4e38``); any other reader (a graph output, a
reduction, LogSoftmax, where the fill's value shows, a Mul by anything else, such as a temperature, or a read from
inside an If/Loop/Scan body) leaves it as it is. Main-graph constants only.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from ..graph import read_in_bodies
from ..pass_manager import PassResult

#: a mask fill is written as ±this: float16's max / 4, so fill + score stays within float16's range / 2
MASK_FILL = 16384.0
#: values beyond this magnitude are what float16 cannot hold
FP16_MAX = 65504.0
#: ops that move values without changing them
MOVES = frozenset({"Expand", "Reshape", "Unsqueeze", "Squeeze", "Transpose", "Slice", "Identity", "Tile", "Flatten"})
#: ops a mask passes through on its way to a Softmax (Where only through its two value inputs; Mul only by a 0/1
#: tensor, see ``zero_one``)
MASK_PATH = frozenset({"Where", "Add", "Sub", "Mul", "Neg", "Cast", "Concat", "Trilu"}) | MOVES
_BOOL_OR_INT = frozenset({TensorProto.BOOL, TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16,
                          TensorProto.UINT16, TensorProto.INT32, TensorProto.UINT32, TensorProto.INT64,
                          TensorProto.UINT64})


class SaturateMaskFills:
    """Clamp float constants beyond float16's range that only feed Softmax inputs (additive masks) to ±MASK_FILL."""

    role = "rewrite"
    name = "saturate_mask_fills"

    def apply(self, model: onnx.ModelProto, names: list[str] | None = None) -> tuple[onnx.ModelProto, PassResult]:
        """Clamp ``names`` (default: :meth:`find`'s) in place."""
        names = set(self.find(model) if names is None else names)
        for t in model.graph.initializer:
            if t.name in names:
                t.CopyFrom(self._clamp(t))
        for n in model.graph.node:
            if n.op_type in ("Constant", "ConstantOfShape") and n.output and n.output[0] in names:
                for a in n.attribute:
                    if a.name == "value":
                        a.t.CopyFrom(self._clamp(a.t))
        return model, PassResult(bool(names), (), {"clamped": len(names), "constants": sorted(names)})

    def find(self, model: onnx.ModelProto) -> list[str]:
        """The initializers and Constant/ConstantOfShape outputs that are Softmax mask fills beyond float16's range."""
        g = model.graph
        readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for n in g.node:
            for i, x in enumerate(n.input):
                if x:
                    readers.setdefault(x, []).append((n, i))
        outputs = {o.name for o in g.output} | read_in_bodies(g)  # read in a body: not followed there, not a mask
        producer = {o: n for n in g.node for o in n.output if o}
        ones = {t.name for t in g.initializer if t.data_type == TensorProto.FLOAT and t.dims in ([], [1])
                and np.all(numpy_helper.to_array(t) == 1)}
        ones |= {n.output[0] for n in g.node if n.op_type == "Constant" and n.output and any(
            a.name == "value" and a.t.data_type == TensorProto.FLOAT and np.all(numpy_helper.to_array(a.t) == 1)
            and numpy_helper.to_array(a.t).size == 1 for a in n.attribute)}
        types: dict[str, int] = {}

        def zero_one(name: str, depth: int = 0) -> bool:
            """``name`` holds 0s and 1s by construction: a Cast of a bool or integer tensor, one minus such a
            tensor, or either moved."""
            p = producer.get(name)
            if p is None or depth > 16:
                return False
            if p.op_type in MOVES:
                return zero_one(p.input[0], depth + 1)
            if p.op_type == "Sub" and len(p.input) == 2:
                return p.input[0] in ones and zero_one(p.input[1], depth + 1)
            if p.op_type == "Cast":
                if not types:
                    from .convert_float16 import value_types

                    types.update(value_types(model))
                return types.get(p.input[0]) in _BOOL_OR_INT
            return False

        memo: dict[str, bool] = {}

        def only_softmax(name: str, depth: int = 0) -> bool:
            if name in memo:
                return memo[name]
            memo[name] = False  # a cycle or a deep chain is not a mask
            ok = name not in outputs and bool(readers.get(name)) and depth < 64
            for node, slot in readers.get(name, []) if ok else []:
                if node.domain not in ("", "ai.onnx"):
                    ok = False
                elif node.op_type == "Softmax":
                    ok = slot == 0
                elif node.op_type == "Mul" and not (len(node.input) == 2 and zero_one(node.input[1 - slot])):
                    ok = False
                elif node.op_type in MASK_PATH and not (node.op_type == "Where" and slot == 0):
                    ok = all(only_softmax(o, depth + 1) for o in node.output if o)
                else:
                    ok = False
                if not ok:
                    break
            memo[name] = ok
            return ok

        found = [t.name for t in g.initializer if t.data_type == TensorProto.FLOAT
                 and only_softmax(t.name) and self._beyond(numpy_helper.to_array(t))]
        for n in g.node:
            if n.op_type in ("Constant", "ConstantOfShape") and n.domain in ("", "ai.onnx") and n.output:
                for a in n.attribute:
                    if (a.name == "value" and a.t.data_type == TensorProto.FLOAT
                            and only_softmax(n.output[0]) and self._beyond(numpy_helper.to_array(a.t))):
                        found.append(n.output[0])
        return found

    @staticmethod
    def _beyond(values: np.ndarray) -> bool:
        with np.errstate(invalid="ignore"):
            return bool(np.any(np.abs(values) > FP16_MAX))  # inf included, NaN not

    @staticmethod
    def _clamp(t: TensorProto) -> TensorProto:
        a = np.clip(numpy_helper.to_array(t).astype(np.float32), -MASK_FILL, MASK_FILL)  # NaN stays NaN
        return numpy_helper.from_array(a, t.name)
