"""Structural roles of weight MatMuls in transformer graphs, found from the wiring alone (never from names).

- tied head: a MatMul/Gemm whose weight is an embedding table transposed (bit-exactly equal values, or the table
  itself read by a Gemm with transB=1);
- attention: the second MatMul of attention, ``softmax(Q K^T) @ V`` (both inputs computed, the left one from a
  Softmax through data movement);
- v projection: a weight MatMul whose output reaches that MatMul's right operand through data movement (a KV-cache
  Concat included);
- o projection: a weight MatMul reading that MatMul's output through data movement;
- FFN down: a weight MatMul whose input is ``Mul(act(gate), up)``: one factor a weight MatMul's output (through data
  movement), the other computed from another weight MatMul's output by elementwise operations only;
- layer: the rank of a node among the nodes of its role in dependency order (policy.dependency_stages).
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import node_label
from ..ops import DATA_MOVEMENT

#: ops a value passes through unchanged in content (reshaped, transposed, repeated, concatenated with a cache, cast)
PASS_THROUGH = DATA_MOVEMENT | {"Concat", "Cast"}
#: elementwise ops an activation function is built of (SiLU = x * Sigmoid(x), GELU's Erf/Tanh form, ...)
ELEMENTWISE = frozenset({"Sigmoid", "Tanh", "Relu", "Gelu", "Erf", "Mul", "Add", "Div", "Sub", "Pow", "Softplus",
                         "HardSigmoid", "HardSwish", "LeakyRelu", "Elu", "Selu", "Neg", "Exp", "Cast", "Identity"})


def weight_matmul(node: gs.Node) -> bool:
    """A MatMul/Gemm with a constant 2-D second input."""
    return (node.op in ("MatMul", "Gemm") and len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant)
            and len(node.inputs[1].shape) == 2)


def _producer(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if isinstance(t, gs.Variable) and len(t.inputs) == 1 else None


def _source(t: gs.Tensor, through=PASS_THROUGH, depth: int = 12) -> list[gs.Node]:
    """The nodes whose outputs reach ``t`` through ``through`` ops only (the first non-``through`` producers)."""
    node = _producer(t)
    if node is None:
        return []
    if node.op not in through or depth == 0:
        return [node]
    found = []
    for inp in node.inputs:
        if isinstance(inp, gs.Variable):
            found += _source(inp, through, depth - 1)
    return found


def attention_matmuls(graph: gs.Graph) -> list[gs.Node]:
    """The ``probs @ V`` MatMuls: both inputs computed, the left from a Softmax through data movement."""
    return [n for n in graph.nodes if n.op == "MatMul" and len(n.inputs) == 2
            and all(isinstance(t, gs.Variable) for t in n.inputs)
            and any(s.op == "Softmax" for s in _source(n.inputs[0]))]


def _reads_through(t: gs.Tensor, depth: int = 12) -> list[tuple[gs.Node, int]]:
    """(reader, input slot) of ``t`` and of what data movement makes of it."""
    out = []
    for reader in t.outputs:
        for i, inp in enumerate(reader.inputs):
            if inp is t:
                out.append((reader, i))
        if reader.op in PASS_THROUGH and depth:
            for y in reader.outputs:
                out += _reads_through(y, depth - 1)
    return out


def _elementwise_from(t: gs.Tensor, depth: int = 6) -> set[int]:
    """Ids of the weight MatMuls whose outputs ``t`` is computed from by elementwise/pass-through ops only."""
    node = _producer(t)
    if node is None:
        return set()
    if weight_matmul(node):
        return {id(node)}
    if depth == 0 or node.op not in ELEMENTWISE | PASS_THROUGH:
        return set()
    found: set[int] = set()
    for inp in node.inputs:
        if isinstance(inp, gs.Variable):
            found |= _elementwise_from(inp, depth - 1)
    return found


def find_roles(graph: gs.Graph) -> dict[str, str]:
    """Node label -> role ("v_proj", "o_proj", "ffn_down") of the weight MatMuls whose role the wiring shows."""
    roles: dict[str, str] = {}
    for attn in attention_matmuls(graph):
        for src in _source(attn.inputs[1]):
            if weight_matmul(src):
                roles[node_label(src)] = "v_proj"
        for reader, slot in _reads_through(attn.outputs[0]):
            if slot == 0 and weight_matmul(reader):
                roles[node_label(reader)] = "o_proj"
    for node in graph.nodes:
        if not weight_matmul(node) or node_label(node) in roles:
            continue
        for mul in _source(node.inputs[0]):
            if mul.op != "Mul" or len(mul.inputs) != 2:
                continue
            direct = [{id(s) for s in _source(t) if weight_matmul(s)} for t in mul.inputs]
            derived = [_elementwise_from(t) for t in mul.inputs]
            # one factor is a MatMul output itself (up), the other is computed from a different one (act(gate))
            if any(direct[i] and derived[1 - i] - direct[i] for i in (0, 1)):
                roles[node_label(node)] = "ffn_down"
    return roles


def tied_table(node: gs.Node, tables: list[gs.Constant]) -> gs.Constant | None:
    """The embedding table [V, D] among ``tables`` that this MatMul/Gemm's weight is: bit-exactly the table
    transposed (W [D, V]), or, for a Gemm with transB=1, the table itself (same initializer or equal values)."""
    if not weight_matmul(node):
        return None
    w = node.inputs[1]
    trans_b = node.op == "Gemm" and int(node.attrs.get("transB", 0))
    for table in tables:
        if len(table.shape) != 2:
            continue
        v, d = (int(s) for s in table.shape)
        if trans_b:
            if w is table or (tuple(w.shape) == (v, d) and np.array_equal(np.asarray(w.values), np.asarray(table.values))):
                return table
        elif tuple(w.shape) == (d, v) and np.array_equal(np.asarray(w.values), np.asarray(table.values).T):
            return table
    return None
