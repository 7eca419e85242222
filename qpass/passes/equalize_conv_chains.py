"""Conv1(W1, b1) -> [positively homogeneous ops] -> Conv2(W2) => Conv1(W1 / s, b1 / s) -> ... -> Conv2(W2 * s along its input channels), s = sqrt(r1 / r2).

Cross-layer equalization (Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias Correction",
2019): a positive per-channel factor moves between two Convs without changing the float function, because every op
between them (Relu, LeakyRelu, PRelu, Identity, MaxPool, AveragePool, a Clip with bounds 0 or infinite) satisfies
f(x / s) = f(x) / s for s > 0, channel by channel. With r1_c = max |W1[c]| (output channel c of Conv1) and r2_c =
max |W2[:, c]| (input channel c of Conv2, per group), s_c = sqrt(r1_c / r2_c) makes both ranges sqrt(r1_c r2_c).
Chains that share a Conv (Conv -> depthwise Conv -> Conv) are equalized pair by pair, iterated until the factors
stop changing. Data-free: weights only, no node is added or removed.

A pair is left alone, with a reason, when an op between the Convs is not positively homogeneous (HardSwish,
HardSigmoid, Sigmoid, Tanh, a Clip with a non-zero finite bound such as Relu6, ...), when a tensor of the chain is
read by another node or is a graph output, or when a weight or Conv1's bias is not a float32 constant.
"""
from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import NameAllocator, constant_values, is_float32, is_onnx_op, node_label
from ..pass_manager import Pass, PassContext, PassResult, Skip

#: ops with f(x / s) = f(x) / s for a positive per-channel s, that keep the channel axis (axis 1) in place
HOMOGENEOUS = frozenset({"Identity", "Relu", "LeakyRelu", "PRelu", "MaxPool", "AveragePool", "GlobalAveragePool",
                         "GlobalMaxPool", "Dropout"})
#: element-wise ops a chain may pass in shape but not in function (the pair is skipped, with this as the reason)
NOT_HOMOGENEOUS = frozenset({"Clip", "HardSwish", "HardSigmoid", "Sigmoid", "Tanh", "Elu", "Selu", "Celu", "Gelu",
                             "Erf", "Softplus", "Softsign", "Mish", "Swish", "Exp", "Log", "Sqrt", "Abs", "Neg",
                             "ThresholdedRelu", "Sin", "Cos", "Round", "Floor", "Ceil", "Sign"})
#: ops walked at most between two Convs
MAX_PATH = 6


def _clip_is_homogeneous(node: gs.Node) -> bool:
    """A Clip whose bounds are each absent, 0 or infinite (Clip(0, inf) is a Relu); a Relu6's 6 is not."""
    bounds = []
    if "min" in node.attrs or "max" in node.attrs:  # opset < 11
        bounds = [node.attrs.get("min"), node.attrs.get("max")]
    for t in node.inputs[1:3]:
        if not t.name:
            bounds.append(None)
        elif isinstance(t, gs.Constant):
            bounds.append(float(np.asarray(t.values).reshape(-1)[0]) if np.asarray(t.values).size == 1 else 1.0)
        else:
            return False
    return all(b is None or b == 0.0 or math.isinf(b) for b in bounds)


def _passes_scale(node: gs.Node) -> bool:
    if not is_onnx_op(node) or len([o for o in node.outputs if o.name]) != 1:
        return False
    if node.op == "Clip":
        return _clip_is_homogeneous(node)
    if node.op == "Dropout":  # inference: identity (a training_mode input other than absent/false is refused)
        return len(node.inputs) < 3 or not node.inputs[2].name or (
            isinstance(node.inputs[2], gs.Constant) and not bool(np.asarray(node.inputs[2].values).any()))
    if node.op == "PRelu":  # prelu(x / s) = prelu(x) / s for s > 0, whatever the slope: the slope stays as it is
        return True
    return node.op in HOMOGENEOUS


def _reads_as_input(node: gs.Node, t: gs.Tensor) -> bool:
    return node.op == "Conv" and is_onnx_op(node) and bool(node.inputs) and node.inputs[0] is t


def _conv_reached(node: gs.Node, t: gs.Tensor) -> gs.Node | None:
    """The Conv that ``node`` (a reader of ``t``) is, or leads to through single-reader chain ops."""
    for _ in range(MAX_PATH + 1):
        if _reads_as_input(node, t):
            return node
        if node.op not in HOMOGENEOUS | NOT_HOMOGENEOUS or not node.outputs or len(node.outputs[0].outputs) != 1:
            return None
        t = node.outputs[0]
        node = t.outputs[0]
    return None


def _float_weight(node: gs.Node) -> np.ndarray | None:
    w = node.inputs[1] if len(node.inputs) > 1 else None
    if not isinstance(w, gs.Constant) or not is_float32(w) or len(w.shape) < 3:
        return None
    return np.asarray(constant_values(w), dtype=np.float64)


def out_channel_range(w: np.ndarray) -> np.ndarray:
    """max |W[c]| over everything but the output channel axis."""
    return np.abs(w).reshape(w.shape[0], -1).max(axis=1)


def in_channel_range(w: np.ndarray, group: int) -> np.ndarray:
    """max |W| per input channel c of a Conv with ``group`` groups (c = g * W.shape[1] + j reads W[rows of g, j])."""
    per = np.abs(w).reshape(group, w.shape[0] // group, w.shape[1], -1).max(axis=(1, 3))
    return per.reshape(-1)


def scale_in_channels(w: np.ndarray, group: int, s: np.ndarray) -> np.ndarray:
    """W with input channel c multiplied by s[c]."""
    k = w.reshape(group, w.shape[0] // group, w.shape[1], -1) * s.reshape(group, 1, w.shape[1], 1)
    return k.reshape(w.shape)


def equalization_scales(r1: np.ndarray, r2: np.ndarray) -> np.ndarray:
    """Nagel et al.'s s_c = sqrt(r1_c / r2_c); 1 where either range is 0 (a dead channel has nothing to balance)."""
    ok = (r1 > 0) & (r2 > 0)
    s = np.ones_like(r1)
    s[ok] = np.sqrt(r1[ok] / r2[ok])
    return s


class EqualizeConvChains(Pass):
    """Cross-layer equalization of Conv -> [homogeneous ops] -> Conv pairs, weights only."""

    def __init__(self, iterations: int = 20, tolerance: float = 1e-6, min_change: float = 1e-3,
                 activation_ranges: dict[str, np.ndarray] | None = None):
        #: per-channel max |x| of the tensors the second Convs read (from a calibration run), by tensor name: a pair
        #: with an entry balances that activation against W2's input channels instead of W1's output channels
        #: (s_c = sqrt(a_c / r2_c), SmoothQuant's alpha 0.5): with per-channel weights W1's quantization does not
        #: depend on s, the per-tensor activation and W2's rows do
        self.activation_ranges = activation_ranges or {}
        #: passes over all pairs at most; stop when no factor of a pass differs from 1 by more than ``tolerance``
        self.iterations = iterations
        self.tolerance = tolerance
        #: a Conv whose accumulated factors all lie within this of 1 is left as it is (a second run changes nothing)
        self.min_change = min_change

    def _pairs(self, graph: gs.Graph) -> tuple[list[tuple[gs.Node, gs.Node, list[gs.Node]]], list[Skip]]:
        outputs = {t.name for t in graph.outputs}
        pairs, skipped = [], []
        for conv in graph.nodes:
            if conv.op != "Conv" or not is_onnx_op(conv) or not conv.outputs:
                continue
            t, path = conv.outputs[0], []
            while True:
                readers = list(t.outputs)
                if t.name in outputs or len(readers) != 1:
                    reached = [c for c in (_conv_reached(r, t) for r in readers) if c is not None]
                    if reached:
                        where = "a graph output" if t.name in outputs else f"read by {len(readers)} nodes"
                        skipped.append(Skip(node_label(conv), conv.op, f"not equalized with {node_label(reached[0])}: "
                                            f"'{t.name}' is {where}"))
                    break
                r = readers[0]
                if _reads_as_input(r, t):
                    pairs.append((conv, r, path))
                    break
                if len(path) >= MAX_PATH or r.op not in HOMOGENEOUS | NOT_HOMOGENEOUS or not r.outputs:
                    break
                path.append(r)
                t = r.outputs[0]
            if pairs and pairs[-1][0] is conv:
                bad = [n for n in pairs[-1][2] if not _passes_scale(n)]
                if bad:
                    conv2 = pairs.pop()[1]
                    skipped.append(Skip(node_label(conv), conv.op, f"not equalized with {node_label(conv2)}: "
                                        f"{node_label(bad[0])} ({bad[0].op}) is not positively homogeneous"))
        return pairs, skipped

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        candidates, skipped = self._pairs(graph)
        weights: dict[int, np.ndarray] = {}
        biases: dict[int, np.ndarray | None] = {}
        nodes: dict[int, gs.Node] = {}
        pairs = []
        for conv1, conv2, path in candidates:
            why = None
            w1, w2 = _float_weight(conv1), _float_weight(conv2)
            group = int(conv2.attrs.get("group", 1))
            if w1 is None or w2 is None:
                why = "a weight is not a float32 constant"
            elif len(conv1.inputs) > 2 and conv1.inputs[2].name and not (
                    isinstance(conv1.inputs[2], gs.Constant) and is_float32(conv1.inputs[2])):
                why = "its bias is not a float32 constant"
            elif w2.shape[1] * group != w1.shape[0] or w2.shape[0] % group:
                why = f"{w1.shape[0]} output channels feed {w2.shape[1] * group} input channels"
            if why:
                skipped.append(Skip(node_label(conv1), conv1.op, f"not equalized with {node_label(conv2)}: {why}"))
                continue
            for n, w in ((conv1, w1), (conv2, w2)):
                if id(n) not in weights:
                    weights[id(n)], nodes[id(n)] = w, n
                    b = n.inputs[2] if len(n.inputs) > 2 and isinstance(n.inputs[2], gs.Constant) else None
                    biases[id(n)] = np.asarray(constant_values(b), dtype=np.float64) if b is not None else None
            read = (path[-1].outputs[0] if path else conv1.outputs[0]).name
            act = self.activation_ranges.get(read)
            act = None if act is None or np.shape(act) != (w1.shape[0],) else np.asarray(act, dtype=np.float64).copy()
            pairs.append((id(conv1), id(conv2), group, act))
        if not pairs:
            return PassResult(modified=False, skipped=tuple(skipped))
        original = {k: w.copy() for k, w in weights.items()}
        for iteration in range(1, self.iterations + 1):
            worst = 0.0
            for a, b, group, act in pairs:
                r1 = out_channel_range(weights[a]) if act is None else act
                s = equalization_scales(r1, in_channel_range(weights[b], group))
                if act is not None:
                    act /= s
                worst = max(worst, float(np.max(np.abs(s - 1.0))))
                weights[a] = weights[a] / s.reshape((-1,) + (1,) * (weights[a].ndim - 1))
                if biases[a] is not None:
                    biases[a] = biases[a] / s
                weights[b] = scale_in_channels(weights[b], group, s)
            if worst <= self.tolerance:
                break
        new_name = NameAllocator(graph)
        changed = []
        for k, n in nodes.items():
            if np.allclose(weights[k], original[k], rtol=self.min_change, atol=0.0):
                continue
            changed.append(k)
            w = n.inputs[1]
            n.inputs[1] = gs.Constant(new_name(f"{w.name}_cle"), weights[k].astype(np.float32))
            if biases[k] is not None:
                old = n.inputs[2]
                n.inputs[2] = gs.Constant(new_name(f"{old.name}_cle"), biases[k].astype(np.float32))
        if not changed:
            return PassResult(modified=False, skipped=tuple(skipped))
        graph.cleanup(remove_unused_graph_inputs=False)
        done = set(changed)
        equalized = [f"{node_label(nodes[a])} -> {node_label(nodes[b])}" for a, b, _, _ in pairs if a in done or b in done]
        return PassResult(modified=True, skipped=tuple(skipped),
                          stats={"pairs": len(equalized), "Conv": len(changed), "iterations": iteration,
                                 "equalized": equalized})
