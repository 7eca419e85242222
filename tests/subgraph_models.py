"""Models whose compute sits inside If branches, built from the shipped digits CNN's real weights."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .builders import DIGITS_MODEL

#: the else branch's input scale: both branches compute, on inputs of different ranges
ELSE_SCALE = 0.5


def _branch(src: onnx.GraphProto, prefix: str, *, scale: float | None, constants: bool) -> onnx.GraphProto:
    """The digits stack as an If branch reading the outer ``input``: tensors and nodes renamed under ``prefix``;
    ``constants``: its weights as Constant nodes inside the branch (else it reads the outer initializers)."""
    rename = {o: f"{prefix}{o}" for n in src.node for o in n.output}
    nodes = []
    x = "input"
    if scale is not None:
        nodes.append(helper.make_node("Constant", [], [f"{prefix}scale"], name=f"{prefix}scale_const",
                                      value=numpy_helper.from_array(np.array(scale, np.float32), "v")))
        nodes.append(helper.make_node("Mul", ["input", f"{prefix}scale"], [f"{prefix}scaled"], name=f"{prefix}Mul"))
        x = f"{prefix}scaled"
    if constants:
        for t in src.initializer:
            nodes.append(helper.make_node("Constant", [], [f"{prefix}{t.name}"], name=f"{prefix}{t.name}_const",
                                          value=t))
            rename[t.name] = f"{prefix}{t.name}"
    rename["input"] = x
    for n in src.node:
        new = onnx.NodeProto()
        new.CopyFrom(n)
        new.name = f"{prefix}{n.name}"
        new.input[:] = [rename.get(i, i) for i in n.input]
        new.output[:] = [rename[o] for o in n.output]
        nodes.append(new)
    out = helper.make_tensor_value_info(rename["logits"], TensorProto.FLOAT, ["N", 10])
    return helper.make_graph(nodes, prefix.strip("/"), [], [out])


def digits_in_if() -> onnx.ModelProto:
    """input[N,1,8,8], flag (bool scalar) -> If(flag): then the digits CNN on input (its weights: the main graph's
    initializers, read from the outer scope), else the same CNN on input * 0.5 (its weights: Constant nodes inside
    the branch) -> logits[N,10]."""
    src = onnx.load(str(DIGITS_MODEL)).graph
    then = _branch(src, "then/", scale=None, constants=False)
    other = _branch(src, "else/", scale=ELSE_SCALE, constants=True)
    node = helper.make_node("If", ["flag"], ["logits"], name="If_0", then_branch=then, else_branch=other)
    graph = helper.make_graph([node], "digits_in_if",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8]),
                               helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
                              initializer=list(src.initializer))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def feeds(images: np.ndarray, flags) -> list[dict[str, np.ndarray]]:
    """One feed per image (batch 1), with the flag of each."""
    return [{"input": images[i:i + 1], "flag": np.array(bool(f))} for i, f in zip(range(len(images)), flags)]
