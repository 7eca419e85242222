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


@dataclass
class LayerNormParts:
    """A decomposed LayerNorm in the division form: its ``input`` i, its ``statistics`` (``mean = ReduceMean(i)``,
    ``x = Sub(i, mean)`` and the chain of ``x`` from x^2 to the normalized x) and its ``affine`` outputs (the Mul by
    a constant, gamma, and the Add of a constant, beta, after it, where each is its predecessor's only reader)."""

    input: str
    statistics: list[str]
    affine: list[str]


def layer_norms(model: onnx.ModelProto) -> list[LayerNormParts]:
    """The decomposed LayerNorms of every graph of ``model`` whose mean reads the centered input.

    The bfloat16 mode keeps their ``statistics`` float32 (:func:`layer_norm_tensors`), so one Cast of the input feeds
    both the mean and the centering, and their ``affine`` part in the input's type: onnxruntime's CUDA provider has
    no bfloat16 ReduceMean before opset 18, and onnxruntime's LayerNorm fusion takes such a Cast and the one after
    the division into its LayerNormalization. Measured on an H200 (docs/gpu-validation.md, fourth run): a LayerNorm
    whose centering runs in bfloat16 while its mean is float32, or whose gamma and beta are float32 while its input
    is a bfloat16 tensor cast for it, becomes a node of mixed types that no CUDA kernel runs, and the session does
    not load; mean to division float32 with gamma and beta bfloat16 loads. A float32 input with bfloat16 gamma and
    beta is the same mix the other way round (not measured): :func:`mixed_layer_norms` finds it."""
    consts = constant_tensors(model)
    out: list[LayerNormParts] = []
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
            affine, last = [], c.div
            for op in ("Mul", "Add"):
                r = readers.get(last.output[0], [])
                if len(r) != 1 or r[0].op_type != op or not any(i in consts for i in r[0].input if i != last.output[0]):
                    break
                last = r[0]
                affine.append(last.output[0])
            out.append(LayerNormParts(sub.input[0], [mean.output[0], c.x] + c.tensors(), affine))
    return out


def layer_norm_tensors(model: onnx.ModelProto) -> set[str]:
    """The statistics of every decomposed LayerNorm (:func:`layer_norms`): kept float32 in the bfloat16 mode."""
    return {t for ln in layer_norms(model) for t in ln.statistics}


def layer_norm_boundary(model: onnx.ModelProto) -> set[str]:
    """The input and the affine outputs of every decomposed LayerNorm (:func:`layer_norms`): the bfloat16 mode's
    fidelity check does not move them to float32 itself (gamma and beta alone would give a float32 scale to a
    bfloat16 input; the input alone can leave a Cast onnxruntime takes into the fused node)."""
    return {t for ln in layer_norms(model) for t in [ln.input] + ln.affine}


def mixed_layer_norms(original: onnx.ModelProto, converted: onnx.ModelProto) -> set[str]:
    """The affine outputs of ``original``'s decomposed LayerNorms that are half in ``converted`` while the
    LayerNorm's input is float32 there (a float32 graph input, the output of an op kept float32): the tensors to
    keep float32 too, so the whole LayerNorm is float32 (:func:`layer_norms`)."""
    from .convert_float16 import value_types

    types = value_types(converted)
    return {a for ln in layer_norms(original) if types.get(ln.input) == onnx.TensorProto.FLOAT
            for a in ln.affine if types.get(a) not in (None, onnx.TensorProto.FLOAT)}


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
