"""Which DequantizeLinear forms onnxruntime's CUDA provider runs, and which it fuses into MatMulNBits.

    python benchmarks/cuda_dq_forms.py [--out forms.json]

Builds one tiny model per form (a constant weight dequantized, then MatMul or Gather) with plain onnx, runs it on
the CUDA provider (CPU as fallback) and on the CPU provider alone, and reports per form: ran or the error, max
difference CUDA vs CPU, the optimized graph's op types, and the nodes placed on the CPU. Needs only numpy, onnx and
onnxruntime-gpu (the GPU machine has no qpass dependencies beyond those).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import Counter

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

K, N, V, B = 256, 512, 1000, 128


def _q(name, arr, dtype):
    return helper.make_tensor(name, dtype, list(arr.shape), arr.flatten().tolist())


def forms() -> dict[str, onnx.ModelProto]:
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", K])
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["b"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    q4 = rng.integers(-8, 8, (K, N))
    q8 = rng.integers(-127, 128, (K, N))
    out = {}

    def mm(name, q, qtype, scale, attrs, extra=()):
        inits = [_q("wq", q, qtype), numpy_helper.from_array(scale.astype(np.float32), "s"),
                 _q("zp", np.zeros(scale.shape, np.int64), qtype)]
        nodes = [helper.make_node("DequantizeLinear", ["wq", "s", "zp"], ["w"], **attrs), *extra,
                 helper.make_node("MatMul", ["x", "wt" if extra else "w"], ["y"])]
        out[name] = helper.make_model(helper.make_graph(nodes, name, [x], [y], inits),
                                      opset_imports=[helper.make_opsetid("", 21)], ir_version=10)

    mm("int4_block128_axis0_matmul", q4, TensorProto.INT4, rng.random((K // B, N)) * 0.01 + 1e-3, {"axis": 0, "block_size": B})
    mm("int8_block128_axis0_matmul", q8, TensorProto.INT8, rng.random((K // B, N)) * 0.01 + 1e-3, {"axis": 0, "block_size": B})
    mm("int8_per_axis1_matmul", q8, TensorProto.INT8, rng.random(N) * 0.01 + 1e-3, {"axis": 1})
    qt = rng.integers(-127, 128, (N, K))  # [N, K] per row, Transpose -> [K, N]
    mm("int8_block_axis1_transpose_matmul", qt, TensorProto.INT8, rng.random((N, 1)) * 0.01 + 1e-3,
       {"axis": 1, "block_size": K}, [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0])])
    mm("int8_per_axis0_transpose_matmul", qt, TensorProto.INT8, rng.random(N) * 0.01 + 1e-3, {"axis": 0},
       [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0])])
    table = rng.integers(-127, 128, (V, K))
    rows = rng.random((V, 1)).astype(np.float32) * 0.01 + 1e-3
    for name, tail in (("gather_rows_dq_block", "dq"), ("gather_rows_cast_mul", "mul")):
        inits = [_q("eq", table, TensorProto.INT8), numpy_helper.from_array(rows, "rs")]
        nodes = [helper.make_node("Gather", ["eq", "ids"], ["r"], axis=0),
                 helper.make_node("Gather", ["rs", "ids"], ["rsg"], axis=0)]
        if tail == "dq":
            nodes.append(helper.make_node("DequantizeLinear", ["r", "rsg"], ["y"], axis=-1, block_size=K))
        else:
            nodes += [helper.make_node("Cast", ["r"], ["rf"], to=TensorProto.FLOAT),
                      helper.make_node("Mul", ["rf", "rsg"], ["y"])]
        out[name] = helper.make_model(helper.make_graph(nodes, name, [ids], [y], inits),
                                      opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    args = ap.parse_args()
    import onnxruntime as ort

    tmp = tempfile.mkdtemp()
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((4, K)).astype(np.float32), "ids": rng.integers(0, V, (4,)).astype(np.int64)}
    result = {"onnxruntime": ort.__version__, "providers": ort.get_available_providers(), "forms": {}}
    for name, model in forms().items():
        path = os.path.join(tmp, name + ".onnx")
        onnx.save(model, path)
        feed = {i.name: feeds[i.name] for i in model.graph.input}
        row = {}
        try:
            ref = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feed)[0]
            so = ort.SessionOptions()
            so.optimized_model_filepath = os.path.join(tmp, name + ".opt.onnx")
            s = ort.InferenceSession(path, so, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
            row["optimized_ops"] = dict(Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node))
            got = s.run(None, feed)[0]
            row["ran"] = True
            row["max_diff_vs_cpu"] = float(np.abs(got - ref).max())
        except Exception as exc:  # noqa: BLE001 - the point is to record what fails
            row["ran"] = False
            row["error"] = str(exc).splitlines()[0][:300]
        result["forms"][name] = row
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
