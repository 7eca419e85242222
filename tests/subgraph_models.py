"""Models whose compute sits inside If branches, built from the shipped digits CNN's real weights."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .builders import DIGITS_MODEL

#: the else branch's input scale: both branches compute, on inputs of different ranges
ELSE_SCALE = 0.5


def _branch(src: onnx.GraphProto, prefix: str, *, scale: float | None, constants: bool) -> onnx.GraphProto:
    """The digits stack as an If branch reading the outer ``input``: tensors renamed under ``prefix``;
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
        new.name = n.name  # the same node names in both branches: their labels (If_0/then//0/Conv) tell them apart
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


def _mm_branch(name: str, w: np.ndarray, x: str = "x", *, inner: onnx.NodeProto | None = None) -> onnx.GraphProto:
    """A branch computing MatMul(x, w) (w a Constant node inside it) -> Relu, or (``inner``) holding a nested If."""
    if inner is not None:
        out = helper.make_tensor_value_info(inner.output[0], TensorProto.FLOAT, ["N", w.shape[1]])
        return helper.make_graph([inner], name, [], [out])
    nodes = [helper.make_node("Constant", [], [f"{name}_w"], name=f"{name}_w_const",
                              value=numpy_helper.from_array(w, "v")),
             helper.make_node("MatMul", [x, f"{name}_w"], [f"{name}_mm"], name="mm"),
             helper.make_node("Relu", [f"{name}_mm"], [f"{name}_y"], name="relu")]
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT,
                                                                             ["N", w.shape[1]])])


def nested_if(seed: int = 0) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x[N,8], a, b (bool scalars) -> If_0(a): then If_1(b) (then MatMul(x, W_tt), else MatMul(x, W_te)), else
    MatMul(x, W_e); each followed by Relu. Returns the model and the weights by branch ("tt", "te", "e")."""
    rng = np.random.default_rng(seed)
    w = {k: rng.normal(0, 0.5, (8, 6)).astype(np.float32) for k in ("tt", "te", "e")}
    inner = helper.make_node("If", ["b"], ["inner_y"], name="If_1", then_branch=_mm_branch("tt", w["tt"]),
                             else_branch=_mm_branch("te", w["te"]))
    outer = helper.make_node("If", ["a"], ["y"], name="If_0", then_branch=_mm_branch("t", w["tt"], inner=inner),
                             else_branch=_mm_branch("e", w["e"]))
    graph = helper.make_graph([outer], "nested_if",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8]),
                               helper.make_tensor_value_info("a", TensorProto.BOOL, []),
                               helper.make_tensor_value_info("b", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model, w


def matmul_in_loop(seed: int = 0) -> onnx.ModelProto:
    """x[N,8] -> Loop(3 iterations) whose body computes v = MatMul(v, W) (W a Constant inside the body) -> y."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.3, (8, 8)).astype(np.float32)
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going"),
         helper.make_node("Constant", [], ["loop_w"], name="loop_w_const", value=numpy_helper.from_array(w, "v")),
         helper.make_node("MatMul", ["v_in", "loop_w"], ["v_out"], name="mm")],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, ["N", 8])])
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "", "x"], ["y"], name="Loop_0", body=body)], "loop",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        initializer=[numpy_helper.from_array(np.array(3, np.int64), "trips")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def matmul_in_scan(seed: int = 0, *, opset: int = 13) -> tuple[onnx.ModelProto, np.ndarray]:
    """x[T,1,8] -> Scan (state h[1,8] from h0, one step per row of x): h = MatMul(x_t, W) + h (W a Constant inside
    the body); outputs the last h and every step's h. Returns the model and W."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.3, (8, 8)).astype(np.float32)
    body = helper.make_graph(
        [helper.make_node("Constant", [], ["scan_w"], name="scan_w_const", value=numpy_helper.from_array(w, "v")),
         helper.make_node("MatMul", ["x_t", "scan_w"], ["xw"], name="mm"),
         helper.make_node("Add", ["xw", "h_in"], ["h_out"], name="add"),
         helper.make_node("Identity", ["h_out"], ["y_t"], name="copy")],
        "body",
        [helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [1, 8]),
         helper.make_tensor_value_info("x_t", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [1, 8]),
         helper.make_tensor_value_info("y_t", TensorProto.FLOAT, [1, 8])])
    graph = helper.make_graph(
        [helper.make_node("Scan", ["h0", "x"], ["h_last", "ys"], name="Scan_0", body=body, num_scan_inputs=1)],
        "scan",
        [helper.make_tensor_value_info("h0", TensorProto.FLOAT, [1, 8]),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", 1, 8])],
        [helper.make_tensor_value_info("h_last", TensorProto.FLOAT, [1, 8]),
         helper.make_tensor_value_info("ys", TensorProto.FLOAT, ["T", 1, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model, w
