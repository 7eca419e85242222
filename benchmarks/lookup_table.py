"""Micro-benchmark: an elementwise function between Q/DQ as a 256-entry table lookup, against the float form.

    python -m benchmarks.lookup_table [--repeats 200]

For a uint8 tensor q, DequantizeLinear -> HardSwish -> QuantizeLinear is a function of q's 256 codes alone, so
Cast(int32) -> Gather(table) (standard ONNX) computes the same codes. This times both forms (and the hard-swish written
out as Add/Clip/Div/Mul) on onnxruntime's CPU provider, 2 threads, medians of alternated runs, and checks that the
table gives the same codes. Measured on 2026-12-04 (docs/benchmark-notes.md): the lookup is about ten times slower,
so qpass writes no lookup tables.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

SHAPES = ([1, 16, 112, 112], [1, 64, 56, 56], [1, 256, 14, 14], [1, 512, 7, 7])
IN_SCALE, IN_ZERO, OUT_SCALE, OUT_ZERO = 0.05, 128, 0.03, 10


def _graph(kind: str, shape: list[int]) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.UINT8, shape)
    y = helper.make_tensor_value_info("y", TensorProto.UINT8, shape)
    inits = [numpy_helper.from_array(np.array(IN_SCALE, np.float32), "s"),
             numpy_helper.from_array(np.array(IN_ZERO, np.uint8), "z"),
             numpy_helper.from_array(np.array(OUT_SCALE, np.float32), "s2"),
             numpy_helper.from_array(np.array(OUT_ZERO, np.uint8), "z2")]
    if kind == "float":
        nodes = [helper.make_node("DequantizeLinear", ["x", "s", "z"], ["d"]),
                 helper.make_node("HardSwish", ["d"], ["f"]),
                 helper.make_node("QuantizeLinear", ["f", "s2", "z2"], ["y"])]
    elif kind == "float, written out":
        inits += [numpy_helper.from_array(np.array(v, np.float32), k) for k, v in (("three", 3), ("six", 6), ("zero", 0))]
        nodes = [helper.make_node("DequantizeLinear", ["x", "s", "z"], ["d"]),
                 helper.make_node("Add", ["d", "three"], ["a"]), helper.make_node("Clip", ["a", "zero", "six"], ["c"]),
                 helper.make_node("Div", ["c", "six"], ["h"]), helper.make_node("Mul", ["d", "h"], ["f"]),
                 helper.make_node("QuantizeLinear", ["f", "s2", "z2"], ["y"])]
    else:
        d = (np.arange(256) - IN_ZERO) * np.float32(IN_SCALE)
        table = np.clip(np.round(d * np.clip(d + 3, 0, 6) / 6 / OUT_SCALE) + OUT_ZERO, 0, 255).astype(np.uint8)
        inits.append(numpy_helper.from_array(table, "table"))
        nodes = [helper.make_node("Cast", ["x"], ["i"], to=TensorProto.INT32),
                 helper.make_node("Gather", ["table", "i"], ["y"], axis=0)]
    return helper.make_model(helper.make_graph(nodes, kind, [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    for shape in SHAPES:
        x = rng.integers(0, 256, shape, dtype=np.uint8)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        options.log_severity_level = 3
        sessions = {k: ort.InferenceSession(_graph(k, shape).SerializeToString(), options,
                                            providers=["CPUExecutionProvider"])
                    for k in ("float", "float, written out", "table")}
        outs = {k: s.run(None, {"x": x})[0].astype(int) for k, s in sessions.items()}
        times: dict[str, list[float]] = {k: [] for k in sessions}
        for _ in range(args.repeats):
            for k, s in sessions.items():
                t = time.perf_counter()
                s.run(None, {"x": x})
                times[k].append(time.perf_counter() - t)
        print(shape, "max code difference table vs float:", int(np.abs(outs["table"] - outs["float"]).max()),
              {k: f"{np.median(v) * 1e6:.1f} us" for k, v in times.items()}, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
