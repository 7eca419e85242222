"""Quantize each model of a folder with qpass (qdq and qop) and validate both on onnxruntime CPU and CUDA.

    python -m benchmarks.validate_suite --models DIR --calib DIR --val DIR --out DIR [--providers cpu,cuda]

Layout: ``models/<name>.onnx``, ``calib/<name>`` and ``val/<name>`` (an .npz or a folder of .npz, as
``qpass run --calib`` takes them). Writes ``<out>/<name>.<format>.validate.json`` (+ .html) and a
``summary.json`` with, per model and format: outputs' metrics per provider, nodes per provider, the nodes
that fell back from CUDA to the CPU, Memcpy count, latency ratios, and load/run failures.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import onnxruntime as ort

import qpass

from .accuracy import MODEL_OPTIONS


def summarize(report: dict) -> dict:
    v = report["validation"]
    rows = {}
    for p in v["providers"]:
        row = {"available": p["available"]}
        for key in ("error", "note"):
            if key in p:
                row[key] = p[key]
        if p.get("outputs"):
            row["outputs"] = {o["output"]: {k: o.get(k) for k in ("sqnr_db", "cosine_mean", "top1_agreement",
                                                                   "accuracy_fp32", "accuracy_quantized")} for o in p["outputs"]}
        if p.get("latency"):
            row["latency"] = p["latency"]
        if p.get("placement"):
            pl = p["placement"]
            row["ops_by_provider"] = pl["ops_by_provider"]
            row["memcpy_nodes"] = pl["memcpy_nodes"]
            if "fallback_nodes" in pl:
                fb = {}
                for n in pl["fallback_nodes"]:
                    fb[n["op_type"]] = fb.get(n["op_type"], 0) + 1
                row["fallback_ops"] = fb
        rows[p["provider"]] = row
    return {"providers": rows, "findings": v["findings"],
            "worst_layer": v["per_layer"][0] if v.get("per_layer") else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--val", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--providers", default="cpu,cuda")
    ap.add_argument("--only", help="comma-separated model names")
    ap.add_argument("--formats", default="qdq,qop")
    ap.add_argument("--bias", default="int32", help="comma-separated bias forms to try with qdq: int32,float")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"onnxruntime": ort.__version__, "available_providers": ort.get_available_providers(),
               "python": platform.python_version(), "qpass": qpass.__version__, "models": {}}
    names = args.only.split(",") if args.only else sorted(p.stem for p in Path(args.models).glob("*.onnx"))
    for name in names:
        model = Path(args.models) / f"{name}.onnx"
        calib = next(p for p in (Path(args.calib) / name, Path(args.calib) / f"{name}.npz") if p.exists())
        val = next(p for p in (Path(args.val) / name, Path(args.val) / f"{name}.npz") if p.exists())
        variants = [(fmt, "int32") for fmt in args.formats.split(",")]
        variants += [("qdq", b) for b in args.bias.split(",") if b != "int32"]
        for fmt, bias in variants:
            key = f"{name}.{fmt}" + (f".bias-{bias}" if bias != "int32" else "")
            t = time.perf_counter()
            try:
                q = qpass.quantize(model, calib, format=fmt, bias=bias, val_fraction=0.0, **MODEL_OPTIONS.get(name, {}))
                report = qpass.validate_models(model, q.model, val, providers=tuple(args.providers.split(",")),
                                               output=out / f"{key}.validate.json")
                entry = summarize(report.to_dict())
                entry["quantized_nodes"] = q.report.quantized_nodes
            except qpass.QpassError as exc:
                entry = {"error": exc.one_line()}
            entry["seconds"] = round(time.perf_counter() - t, 1)
            summary["models"][key] = entry
            print(key, json.dumps(entry)[:400], flush=True)
            (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
