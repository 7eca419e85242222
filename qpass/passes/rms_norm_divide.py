"""RMS normalizations written as a division: `Mul(x, Reciprocal(Sqrt(v))) -> Div(x, Sqrt(v))`, v = Add(ReduceMean(Pow(x, 2)), eps).

A model-level pass of the float16/bfloat16 mode, run before :mod:`qpass.passes.convert_float16`. Exporters write
an RMS normalization (Llama-style language models) as ``x * rsqrt(mean(x^2) + eps)``, and ONNX has no Rsqrt before
opset 23: PyTorch's exporter emits ``Reciprocal(Sqrt(.))`` and a Mul. The division computes the same value with one
rounding fewer, and it is the form onnxruntime fuses into one SimplifiedLayerNormalization kernel, float16 input and
output with float32 statistics included, when the statistics are float32 between two Casts. That is what the
conversion then does: :func:`rms_statistics` names the chain's tensors (Pow to Div), which it keeps in float32
(``x^2`` of a language model's residual stream is past float16's range anyway). A decomposed LayerNorm's second
half (x = Sub(input, mean)) is the same chain and is kept float32 too. Only chains whose Reciprocal and
intermediate values have no other reader (in the graph or in a body reading it) are rewritten; every graph of the
model, bodies included.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from ..graph import constant_tensors, proto_graphs, read_in_bodies
from ..pass_manager import PassResult


@dataclass
class RmsChain:
    """One RMS normalization's nodes: Pow(x, 2) -> ReduceMean -> Add(eps) -> Sqrt, then ``div`` = Div(x, Sqrt), or
    ``reciprocal`` -> ``mul`` = Mul(x, Reciprocal(Sqrt)) before the rewrite."""

    x: str
    pow: onnx.NodeProto
    mean: onnx.NodeProto
    add: onnx.NodeProto
    sqrt: onnx.NodeProto
    div: onnx.NodeProto | None = None
    reciprocal: onnx.NodeProto | None = None
    mul: onnx.NodeProto | None = None

    def tensors(self) -> list[str]:
        """The chain's outputs from x^2 to the normalized x."""
        last = self.div if self.div is not None else self.mul
        return [self.pow.output[0], self.mean.output[0], self.add.output[0], self.sqrt.output[0]] + \
            ([self.reciprocal.output[0]] if self.reciprocal is not None else []) + [last.output[0]]


def _scalar(consts: dict[str, onnx.TensorProto], name: str) -> float | None:
    """The value of constant ``name`` when it holds one element, else None."""
    t = consts.get(name)
    if t is None or int(np.prod(t.dims)) != 1:
        return None
    return float(numpy_helper.to_array(t).reshape(-1)[0])


def _chains(g: onnx.GraphProto, consts: dict[str, onnx.TensorProto]) -> list[RmsChain]:
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for x in n.input:
            if x:
                readers.setdefault(x, []).append(n)
    # graph outputs, and values a body reads (an If branch reading the reciprocal): not the chain's alone
    escaping = {o.name for o in g.output} | read_in_bodies(g)

    def only_reader(name: str, op: str) -> onnx.NodeProto | None:
        r = readers.get(name, [])
        if len(r) == 1 and r[0].op_type == op and r[0].domain in ("", "ai.onnx") and name not in escaping:
            return r[0]
        return None

    found = []
    for p in g.node:
        if p.op_type != "Pow" or p.domain not in ("", "ai.onnx") or len(p.input) < 2:
            continue
        if _scalar(consts, p.input[1]) != 2.0:
            continue
        x = p.input[0]
        mean = only_reader(p.output[0], "ReduceMean")
        add = mean and only_reader(mean.output[0], "Add")
        if add is None or not any(_scalar(consts, i) is not None for i in add.input if i != mean.output[0]):
            continue
        sqrt = only_reader(add.output[0], "Sqrt")
        if sqrt is None:
            continue
        tail = readers.get(sqrt.output[0], [])
        if len(tail) != 1 or sqrt.output[0] in escaping:
            continue
        t = tail[0]
        if t.op_type == "Div" and list(t.input) == [x, sqrt.output[0]]:
            found.append(RmsChain(x, p, mean, add, sqrt, div=t))
        elif t.op_type == "Reciprocal":
            mul = only_reader(t.output[0], "Mul")
            if mul is not None and sorted(mul.input) == sorted([x, t.output[0]]):
                found.append(RmsChain(x, p, mean, add, sqrt, reciprocal=t, mul=mul))
    return found


def rms_chains(model: onnx.ModelProto) -> list[RmsChain]:
    """The RMS normalizations of every graph of ``model``, in either form."""
    consts = constant_tensors(model)
    return [c for g, _ in proto_graphs(model.graph) for c in _chains(g, consts)]


def rms_statistics(model: onnx.ModelProto) -> set[str]:
    """The tensors of every RMS normalization in the division form, from x^2 to the normalized x: kept float32."""
    return {t for c in rms_chains(model) if c.div is not None for t in c.tensors()}


def layer_norm_tensors(model: onnx.ModelProto) -> set[str]:
    """The tensors of each decomposed LayerNorm in the division form from its mean to the normalized x:
    ``mean = ReduceMean(i)``, ``x = Sub(i, mean)`` and the statistics chain of ``x`` (:func:`rms_statistics`); the
    affine Mul (gamma) and Add (beta) after it are not included. The bfloat16 mode keeps them float32, so one Cast
    of ``i`` feeds both the mean and the centering: onnxruntime's CUDA provider has no bfloat16 ReduceMean before
    opset 18, and onnxruntime fuses a LayerNorm whose centering runs in bfloat16 while its mean is float32, or whose
    gamma and beta are float32 while its input is bfloat16, into a LayerNormalization of mixed types that no CUDA
    kernel runs (the session does not load). This form fuses into one bfloat16 LayerNormalization."""
    consts = constant_tensors(model)
    out: set[str] = set()
    for g, _ in proto_graphs(model.graph):
        made = {o: n for n in g.node for o in n.output if o}
        for c in _chains(g, consts):
            sub = made.get(c.x)
            if c.div is None or sub is None or sub.op_type != "Sub" or len(sub.input) != 2:
                continue
            mean = made.get(sub.input[1])
            if mean is None or mean.op_type != "ReduceMean" or mean.input[0] != sub.input[0]:
                continue
            out.update([mean.output[0], c.x] + c.tensors())
    return out


def layer_norm_boundary(model: onnx.ModelProto) -> set[str]:
    """The input of each decomposed LayerNorm of :func:`layer_norm_tensors` and the outputs of its affine Mul (by a
    constant, gamma) and Add (of a constant, beta), where each is its predecessor's only reader. The bfloat16 mode's
    fidelity check does not move these to float32: onnxruntime fuses a LayerNorm whose input is float32 (or cast to
    float32 for it) and whose gamma and beta are of another type than that input into a LayerNormalization that its
    CUDA provider does not run."""
    consts = constant_tensors(model)
    out: set[str] = set()
    for g, _ in proto_graphs(model.graph):
        made = {o: n for n in g.node for o in n.output if o}
        readers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for x in n.input:
                if x:
                    readers.setdefault(x, []).append(n)
        for c in _chains(g, consts):
            sub = made.get(c.x)
            mean = made.get(sub.input[1]) if sub is not None and sub.op_type == "Sub" and len(sub.input) == 2 else None
            if c.div is None or mean is None or mean.op_type != "ReduceMean" or mean.input[0] != sub.input[0]:
                continue
            out.add(sub.input[0])
            last = c.div
            for op in ("Mul", "Add"):
                r = readers.get(last.output[0], [])
                if len(r) != 1 or r[0].op_type != op or not any(i in consts for i in r[0].input if i != last.output[0]):
                    break
                last = r[0]
                out.add(last.output[0])
    return out


class RmsNormDivide:
    """Rewrite ``Mul(x, Reciprocal(Sqrt(v)))`` of an RMS normalization as ``Div(x, Sqrt(v))``."""

    role = "rewrite"
    name = "rms_norm_divide"

    def apply(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, PassResult]:
        rewritten = 0
        consts = constant_tensors(model)
        for g, _ in proto_graphs(model.graph):
            dropped = set()  # the Reciprocals' outputs
            for c in _chains(g, consts):
                if c.reciprocal is None:
                    continue
                c.mul.op_type = "Div"
                del c.mul.input[:]
                c.mul.input.extend([c.x, c.sqrt.output[0]])
                dropped.add(c.reciprocal.output[0])
            if not dropped:
                continue
            rewritten += len(dropped)
            nodes = [n for n in g.node if not (n.op_type == "Reciprocal" and n.output[0] in dropped)]
            infos = [vi for vi in g.value_info if vi.name not in dropped]
            del g.node[:], g.value_info[:]
            g.node.extend(nodes)
            g.value_info.extend(infos)
        return model, PassResult(bool(rewritten), (), {"rewritten": rewritten})
