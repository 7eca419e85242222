"""What a new input shape costs on onnxruntime's CUDA provider: fp32 against a float16 conversion, per cuDNN
algorithm search, on the recognizer's evaluation crops (each crop width is a new shape).

    python -m benchmarks.cuda_new_shapes --fp16 rec.fp16.onnx [--shapes 12] [--out f.json]

For each model and search setting: one session, then each of the first ``--shapes`` distinct crop widths run twice;
the first run of a width pays its setup (algorithm choice, workspace, kernels), the second is the steady state.
Reported: median ms of first and second runs. Imports numpy and onnxruntime(-gpu) only.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from . import evaluate as ev

SEARCHES = ("HEURISTIC", "EXHAUSTIVE", "DEFAULT")


def crops(shared: Path, n: int) -> list[np.ndarray]:
    """The first ``n`` evaluation crops of distinct widths."""
    out, widths = [], set()
    for f in sorted((shared / "data" / "ppocrv6_rec_small" / "eval").glob("*.npz")):
        with np.load(f) as z:
            x = np.asarray(z["x"])
        if x.shape[-1] not in widths:
            widths.add(x.shape[-1])
            out.append(x)
        if len(out) == n:
            break
    return out


def measure(path: Path, search: str, xs: list[np.ndarray]) -> dict:
    s = ort.InferenceSession(str(path), providers=[("CUDAExecutionProvider", {"cudnn_conv_algo_search": search}),
                                                   "CPUExecutionProvider"])
    inp = s.get_inputs()[0]
    dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
    first, second = [], []
    for x in xs:
        for times in (first, second):
            t = time.perf_counter()
            s.run(None, {inp.name: x.astype(dtype)})
            times.append((time.perf_counter() - t) * 1e3)
    return {"first_ms": round(statistics.median(first), 2), "second_ms": round(statistics.median(second), 3),
            "first_max_ms": round(max(first), 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fp16", required=True, help="the recognizer converted to float16")
    ap.add_argument("--shared", default=str(ev.SHARED))
    ap.add_argument("--shapes", type=int, default=12)
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    shared = Path(a.shared)
    xs = crops(shared, a.shapes)
    rows = []
    for search in SEARCHES:
        for label, path in (("fp32", ev.MODELS["ppocrv6_rec_small"].model_path(shared)), ("fp16", Path(a.fp16))):
            row = {"model": label, "search": search, "widths": [int(x.shape[-1]) for x in xs], **measure(path, search, xs)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
