"""Tiny models built in code for the tests (real models live in models/ and ../shared/models)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
SHARED_MODELS = REPO.parent / "shared" / "models"
DIGITS_MODEL = REPO / "models" / "digits_cnn.onnx"
DIGITS_CALIB = REPO / "models" / "digits" / "calib.npz"
DIGITS_TEST = REPO / "models" / "digits" / "test.npz"


def _model(nodes, inputs, outputs, inits, opset=13, **kw) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], **kw)
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def conv_model(opset: int = 13, *, bias: bool = True, seed: int = 0, weight_as_constant_node: bool = False) -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv(4, 3x3, pad 1, bias) -> Relu -> y."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32)
    b = rng.normal(0, 0.1, (4,)).astype(np.float32)
    inits = [] if weight_as_constant_node else [numpy_helper.from_array(w, "W")]
    nodes = []
    if weight_as_constant_node:
        nodes.append(helper.make_node("Constant", [], ["W"], name="W_const", value=numpy_helper.from_array(w, "Wv")))
    conv_in = ["x", "W"]
    if bias:
        inits.append(numpy_helper.from_array(b, "B"))
        conv_in.append("B")
    nodes += [helper.make_node("Conv", conv_in, ["c"], name="conv", pads=[1, 1, 1, 1]),
              helper.make_node("Relu", ["c"], ["y"], name="relu")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])], inits, opset)


def matmul_model(seed: int = 0, *, act_x_act: bool = False) -> onnx.ModelProto:
    """x[N,16] -> MatMul(W[16,8]) -> Add(B) -> y; optionally a second activation x activation MatMul."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.3, (16, 8)).astype(np.float32)
    b = rng.normal(0, 0.1, (8,)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="matmul"),
             helper.make_node("Add", ["m", "B"], ["y"], name="add")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])]
    if act_x_act:
        nodes.append(helper.make_node("Transpose", ["y"], ["yt"], name="transpose"))
        nodes.append(helper.make_node("MatMul", ["y", "yt"], ["z"], name="matmul_act"))
        outputs = [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", "N"])]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])], outputs,
                  [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")])


def gemm_model(seed: int = 0, *, trans_b: int = 1, bias_shape=(8,)) -> onnx.ModelProto:
    """x[N,16] -> Gemm(W, C, transB) -> y[N,8]."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.3, (8, 16) if trans_b else (16, 8)).astype(np.float32)
    c = rng.normal(0, 0.1, bias_shape).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "W", "C"], ["y"], name="gemm", transB=trans_b)]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
                  [numpy_helper.from_array(w, "W"), numpy_helper.from_array(c, "C")])


def conv_transpose_model(seed: int = 0) -> onnx.ModelProto:
    """x[N,4,5,5] -> ConvTranspose(W[4,6,2,2], stride 2, bias) -> y[N,6,10,10]."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.3, (4, 6, 2, 2)).astype(np.float32)
    b = rng.normal(0, 0.1, (6,)).astype(np.float32)
    nodes = [helper.make_node("ConvTranspose", ["x", "W", "B"], ["y"], name="deconv", strides=[2, 2])]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 5, 5])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 10, 10])],
                  [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")])


def feeds(model: onnx.ModelProto, n: int = 8, seed: int = 1, batch: int = 2) -> list[dict[str, np.ndarray]]:
    """Random float feeds for the model's inputs (dynamic dims -> ``batch``)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        feed = {}
        for vi in model.graph.input:
            dims = [d.dim_value if d.HasField("dim_value") else batch for d in vi.type.tensor_type.shape.dim]
            feed[vi.name] = rng.normal(0, 1, dims).astype(np.float32)
        out.append(feed)
    return out


def residual_model(seed: int = 0) -> onnx.ModelProto:
    """A residual block with the joins qpass can run in int8, and a float join it must leave alone.

    x -> conv1 -> relu1 (r1) -> conv2 (c2); add(c2, r1) -> relu2 (a); concat(a, r1) -> conv3 -> y;
    a -> GlobalAveragePool (g) -> Flatten (f) -> gemm -> z; add_float(z, e): e is a graph input, never quantized.
    """
    rng = np.random.default_rng(seed)

    def init(name, *shape):
        return numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32), name)

    inits = [init("W1", 4, 4, 3, 3), init("B1", 4), init("W2", 4, 4, 3, 3), init("B2", 4), init("W3", 4, 8, 1, 1),
             init("B3", 4), init("W4", 5, 4), init("B4", 5)]
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "W2", "B2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c2", "r1"], ["s"], name="add"),
             helper.make_node("Relu", ["s"], ["a"], name="relu2"),
             helper.make_node("Concat", ["a", "r1"], ["cc"], name="concat", axis=1),
             helper.make_node("Conv", ["cc", "W3", "B3"], ["y"], name="conv3"),
             helper.make_node("GlobalAveragePool", ["a"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "W4", "B4"], ["z"], name="gemm", transB=1),
             helper.make_node("Add", ["z", "e"], ["out"], name="add_float")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8]),
                          helper.make_tensor_value_info("e", TensorProto.FLOAT, ["N", 5])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8]),
                   helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 5])], inits)


def log_spectrogram_model(*, relu_before_log: bool = False, bins: int = 16, frame: int = 64) -> onnx.ModelProto:
    """audio[N,1,2048] -> two Convs (cosine and sine kernels, a short-time Fourier transform) -> re^2 + im^2 + 1e-6
    -> Log -> Conv 1x1 (bins -> 4) -> Relu -> GlobalAveragePool -> y[N,4,1]: a log spectrogram computed in the graph.
    ``relu_before_log``: a Relu on each transform's output (the Log's walk stops there)."""
    n = np.arange(frame)
    freqs = np.geomspace(2, frame / 2 - 1, bins)
    window = np.hanning(frame)
    cos = (np.cos(2 * np.pi * freqs[:, None] * n / frame) * window).astype(np.float32)[:, None, :]
    sin = (np.sin(2 * np.pi * freqs[:, None] * n / frame) * window).astype(np.float32)[:, None, :]
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(cos, "Wre"), numpy_helper.from_array(sin, "Wim"),
             numpy_helper.from_array(rng.normal(0, 0.3, (4, bins, 1)).astype(np.float32), "Wc"),
             numpy_helper.from_array(np.float32(1e-6), "eps")]
    nodes = [helper.make_node("Conv", ["audio", "Wre"], ["re0"], name="stft_re", strides=[frame // 2]),
             helper.make_node("Conv", ["audio", "Wim"], ["im0"], name="stft_im", strides=[frame // 2])]
    if relu_before_log:
        nodes += [helper.make_node("Relu", ["re0"], ["re"], name="relu_re"),
                  helper.make_node("Relu", ["im0"], ["im"], name="relu_im")]
    else:
        nodes += [helper.make_node("Identity", ["re0"], ["re"], name="id_re"),
                  helper.make_node("Identity", ["im0"], ["im"], name="id_im")]
    nodes += [helper.make_node("Mul", ["re", "re"], ["re2"], name="re2"),
              helper.make_node("Mul", ["im", "im"], ["im2"], name="im2"),
              helper.make_node("Add", ["re2", "im2"], ["power"], name="power"),
              helper.make_node("Add", ["power", "eps"], ["power_eps"], name="power_eps"),
              helper.make_node("Log", ["power_eps"], ["logspec"], name="log"),
              helper.make_node("Conv", ["logspec", "Wc"], ["c"], name="classifier"),
              helper.make_node("Relu", ["c"], ["r"], name="relu"),
              helper.make_node("GlobalAveragePool", ["r"], ["y"], name="pool")]
    return _model(nodes, [helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["N", 1, 2048])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 1])], inits)


def tone_feeds(n: int = 24, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Audio windows for log_spectrogram_model: a few sine tones each, loudness from -40 to 0 dB, a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(2048)
    out = []
    for _ in range(n):
        x = sum(rng.uniform(0.05, 1) * np.sin(2 * np.pi * rng.uniform(0.01, 0.45) * t + rng.uniform(0, 6.3))
                for _ in range(rng.integers(1, 4)))
        x = x / np.abs(x).max() * 10 ** rng.uniform(-2, 0) + rng.normal(0, 1e-4, t.shape)
        out.append({"audio": x.astype(np.float32)[None, None, :]})
    return out
