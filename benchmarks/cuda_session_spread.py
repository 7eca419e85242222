"""Is a latency gap between two float16 files larger than the spread between sessions of one file?

    python -m benchmarks.cuda_session_spread [--models ppocrv6_det_small,ppocrv6_rec_small] [--sessions 3]
                                             [--repeats 200] [--out f.json]

Per shared model: fp32, qpass's float16 (its check on the CPU provider, so the file does not depend on the GPU) and
onnxruntime's converter's (``keep_io_types=True``). Each file is opened in ``--sessions`` independent CUDA sessions;
every session runs once per round, in an order rotated by one each round, on the first calibration sample, after
five warm-up runs each. This is repeated for each of two cuDNN convolution algorithm searches (EXHAUSTIVE,
onnxruntime's default, and HEURISTIC, qpass's), since cuDNN picks an algorithm per session and shape. The JSON gives each session's
median, and per file the median of its sessions' medians and their range (max / min): two files whose ranges
overlap are not told apart by this measurement.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import onnxruntime as ort

from . import evaluate as ev
from .float16_gpu import _first_feed, convert, environment, rotated_medians

SEARCHES = ("EXHAUSTIVE", "HEURISTIC")


def timed_sessions(paths: dict[str, Path], sessions: int, feed: dict, search: str, repeats: int) -> dict:
    """Median ms of each session (``label#k``) over ``repeats`` rotated rounds."""
    providers = [("CUDAExecutionProvider", {"cudnn_conv_algo_search": search}), "CPUExecutionProvider"]
    made = {f"{label}#{k}": ort.InferenceSession(str(p), providers=providers)
            for label, p in paths.items() for k in range(sessions)}
    per_session = rotated_medians(made, feed, repeats)
    per_file = {}
    for label in paths:
        ms = [v for k, v in per_session.items() if k.split("#")[0] == label]
        per_file[label] = {"median_ms": round(statistics.median(ms), 4), "min_ms": min(ms), "max_ms": max(ms),
                           "range": round(max(ms) / min(ms), 4)}
    return {"search": search, "sessions": per_session, "files": per_file}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="ppocrv6_det_small,ppocrv6_rec_small")
    ap.add_argument("--sessions", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--shared", default=str(ev.SHARED))
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        print("CUDAExecutionProvider is not available in this onnxruntime", file=sys.stderr)
        return 2
    shared = Path(args.shared)
    out = {"environment": environment(["CUDAExecutionProvider"]), "sessions": args.sessions,
           "repeats": args.repeats, "models": {}}
    with tempfile.TemporaryDirectory(prefix="qpass-spread-") as tmp:
        for name in [m for m in args.models.split(",") if m]:
            src = ev.MODELS[name].model_path(shared)
            paths = {"fp32": src}
            for kind in ("qpass", "ort_fp16"):
                dst = Path(tmp) / f"{name}.{kind}.onnx"
                convert(kind, name, str(src), str(dst), shared, ("CPUExecutionProvider",))
                paths[kind] = dst
            feed = _first_feed(name, shared)
            rows = [timed_sessions(paths, args.sessions, feed, s, args.repeats) for s in SEARCHES]
            out["models"][name] = rows
            for row in rows:
                print(json.dumps({"model": name, "search": row["search"], "files": row["files"]}), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
