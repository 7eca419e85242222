"""MatMul(X, DequantizeLinear(W_q [K, N] int4|uint4|int8, scale[ceil(K/B), N], zp, axis=0, block_size=B)) -> com.microsoft.MatMulNBits(X, codes[N, ceil(K/B), B*bits/8], scale[N*ceil(K/B)], zp).

onnxruntime's contrib form of the weight-only MatMul (only with ``--allow-contrib-ops``: the result runs on onnxruntime
alone). Codes are the unsigned values ``q + 2^(bits-1)`` for the symmetric types (whose zero point is then
onnxruntime's default and not written) or the uint4 values with their zero points packed two a byte; codes are
packed along K low half first, the last block padded with the zero point's code.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from ..graph import NameAllocator, is_onnx_op, node_label
from ..pass_manager import Pass, PassContext, PassResult, Skip

BITS = {"int4": 4, "uint4": 4, "int8": 8}
#: element type (TensorProto) -> dtype name
_ELEM = {22: "int4", 21: "uint4", 3: "int8"}


def _ints(c: gs.Constant) -> tuple[np.ndarray, str] | None:
    """The integer values of a constant int4/uint4/int8 initializer and its type name."""
    values = c._values
    tensor = getattr(values, "tensor", None)
    if tensor is not None:
        name = _ELEM.get(tensor.data_type)
        return (np.asarray(numpy_helper.to_array(tensor)).astype(np.int32), name) if name else None
    array = np.asarray(values)
    return (array.astype(np.int32), "int8") if array.dtype == np.int8 else None


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [..., L] -> bytes [..., L * bits / 8], two 4-bit codes a byte, the first in the low half."""
    codes = codes.astype(np.uint8)
    if bits == 8:
        return codes
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros(codes.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def matmul_nbits_inputs(q: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, qtype: str,
                        block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Packed codes [N, nb, B*bits/8], scales [N*nb] and packed zero points (None: the default) of a weight
    ``q`` [K, N] blocked along K."""
    bits = BITS[qtype]
    k, n = q.shape
    nb = -(-k // block)
    offset = 0 if qtype == "uint4" else 1 << (bits - 1)
    zero_code = np.zeros((nb, n), np.int32) + offset if zp is None or qtype != "uint4" else zp.astype(np.int32)
    pad = np.repeat(zero_code, block, axis=0)[: nb * block]  # the zero point's code, row by row of K
    codes = pad.copy()
    codes[:k] = q + offset
    packed = _pack(codes.T.reshape(n, nb, block), bits)
    scales = np.ascontiguousarray(np.asarray(scale, np.float32).T).reshape(-1)
    zeros = None
    if qtype == "uint4" and zp is not None and np.any(zp != 8):
        zeros = _pack(zero_code.T, bits).reshape(-1)
    return np.ascontiguousarray(packed), scales, zeros


class ContribMatMulNBits(Pass):
    role = "lower"

    def __init__(self, accuracy_level: int = 4):
        #: MatMulNBits' accuracy_level: 4 computes with int8 activations, as onnxruntime's fusion of the standard
        #: form does by default; 0 keeps float activations
        self.accuracy_level = accuracy_level

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        names = NameAllocator(graph)
        skipped, done = [], 0
        for mm in list(graph.nodes):
            if mm.op != "MatMul" or not is_onnx_op(mm) or len(mm.inputs) != 2:
                continue
            w = mm.inputs[1]
            dq = w.inputs[0] if isinstance(w, gs.Variable) and len(w.inputs) == 1 else None
            if dq is None or dq.op != "DequantizeLinear" or not is_onnx_op(dq):
                continue
            reason = self._why_not(dq, w, graph)
            if reason:
                skipped.append(Skip(node_label(mm), mm.op, f"kept as DequantizeLinear -> MatMul: {reason}"))
                continue
            (q, qtype), block = _ints(dq.inputs[0]), int(dq.attrs["block_size"])
            zp = _ints(dq.inputs[2])[0] if len(dq.inputs) > 2 and dq.inputs[2] is not None else None
            packed, scales, zeros = matmul_nbits_inputs(q, np.asarray(dq.inputs[1].values), zp, qtype, block)
            base = dq.inputs[0].name
            inputs = [mm.inputs[0], gs.Constant(names(f"{base}_nbits"), packed),
                      gs.Constant(names(f"{base}_nbits_scale"), scales)]
            if zeros is not None:
                inputs.append(gs.Constant(names(f"{base}_nbits_zero_point"), zeros))
            k, n = q.shape
            attrs = {"K": int(k), "N": int(n), "bits": BITS[qtype], "block_size": block,
                     "accuracy_level": self.accuracy_level}
            graph.nodes.append(gs.Node("MatMulNBits", names(f"{mm.name or mm.outputs[0].name}_MatMulNBits"), attrs=attrs,
                                       inputs=inputs, outputs=list(mm.outputs), domain="com.microsoft"))
            mm.outputs.clear()
            mm.inputs.clear()
            done += 1
        if done:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(modified=bool(done), skipped=tuple(skipped), stats={"MatMulNBits": done} if done else {})

    @staticmethod
    def _why_not(dq: gs.Node, w: gs.Variable, graph: gs.Graph) -> str | None:
        if w in graph.outputs or len(w.outputs) != 1:
            return "the dequantized weight has other readers"
        if not isinstance(dq.inputs[0], gs.Constant) or not isinstance(dq.inputs[1], gs.Constant):
            return "weight or scale is not a constant"
        got = _ints(dq.inputs[0])
        if got is None or len(dq.inputs[0].shape) != 2:
            return "not a 2-D int4/uint4/int8 weight"
        if len(dq.inputs) > 2 and dq.inputs[2] is not None and not isinstance(dq.inputs[2], gs.Constant):
            return "zero point is not a constant"
        block = dq.attrs.get("block_size")
        if int(dq.attrs.get("axis", 1)) != 0 or not block:
            return "not blocked along the input features (axis 0)"
        if block < 16 or block & (block - 1):
            return f"block size {block} is not a power of two >= 16"
        zp = _ints(dq.inputs[2])[0] if len(dq.inputs) > 2 and dq.inputs[2] is not None else None
        if got[1] != "uint4" and zp is not None and np.any(zp != 0):
            return "a signed weight with a nonzero zero point"
        return None
