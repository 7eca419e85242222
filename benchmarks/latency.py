"""CPU latency of fp32, onnxruntime's quantize_static output and qpass's outputs, alternated in one process.

    python -m benchmarks.latency [--models m1,m2] [--repeats 30] [--threads 2] [--out latency.json]

For each model: one batch-1 input from its calibration data; every variant gets a session (default
options, ``intra_op_num_threads`` fixed, spin-wait off so one session's idle threads do not slow the next),
5 warm-up runs, then ``repeats`` rounds in which each variant runs once, in turn; the median per variant
is reported with its ratio to fp32 and to ORT.
Variants: fp32; ORT QDQ U8S8 and S8S8 (``quantize_static``, per-channel, MinMax, op types Conv/MatMul/Gemm,
opset-11 models upgraded to 13 first); qpass qdq/qop with uint8 (U8S8) and int8 (S8S8) activations.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import qpass

from .accuracy import MODEL_OPTIONS
from .evaluate import MODELS, SHARED


def first_sample(name: str, shared: Path = SHARED) -> dict[str, np.ndarray]:
    spec = MODELS[name]
    path = spec.calib_path(shared)
    specs = {i.name: i for i in ort.InferenceSession(str(spec.model_path(shared)), providers=["CPUExecutionProvider"]).get_inputs()}
    if path.is_dir():
        with np.load(sorted(path.glob("*.npz"))[0]) as z:
            return {k: z[k] for k in specs}
    with np.load(path) as z:
        return {k: np.asarray(z[k][0]) for k in specs}


class _Reader:
    """onnxruntime.quantization CalibrationDataReader over the stored calibration samples."""

    def __init__(self, name: str, shared: Path, limit: int | None = None):
        from qpass.calib.data import input_specs, open_samples

        self.it = iter(open_samples(MODELS[name].calib_path(shared), input_specs(onnx.load(str(MODELS[name].model_path(shared)), load_external_data=False))))
        self.left = limit

    def get_next(self):
        if self.left is not None:
            if self.left <= 0:
                return None
            self.left -= 1
        item = next(self.it, None)
        return None if item is None else item[0]


def ort_quantize(name: str, out: Path, shared: Path, activation: str = "uint8", limit: int | None = 32) -> Path:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    src = MODELS[name].model_path(shared)
    model = onnx.load(str(src))
    if MODEL_OPTIONS.get(name, {}).get("target_opset"):
        model = onnx.version_converter.convert_version(model, 13)
    tmp_in = out.with_suffix(".in.onnx")
    onnx.save_model(model, str(tmp_in))
    quantize_static(str(tmp_in), str(out), _Reader(name, shared, limit), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8,
                    activation_type=QuantType.QUInt8 if activation == "uint8" else QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=["Conv", "MatMul", "Gemm"],
                    extra_options={"QDQDisableWeightAdjustForInt32Bias": True})
    return out


def session(path: Path, threads: int) -> ort.InferenceSession:
    """Sessions are timed in turn, so their intra-op threads must not spin-wait after a run: a spinning pool
    keeps the cores busy into the next session's run (measured on Magika: every variant 2-4x slower alternated
    than alone, and ratios between variants that moved with the order)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def measure(paths: dict[str, Path], feed: dict, repeats: int, threads: int) -> dict[str, float]:
    sessions = {k: session(p, threads) for k, p in paths.items()}
    for s in sessions.values():
        for _ in range(5):
            s.run(None, feed)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(repeats):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feed)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1000 for k, v in times.items()}


VARIANTS = {
    "qpass qdq U8S8": {"format": "qdq", "activation_type": "uint8"},
    "qpass qdq S8S8": {"format": "qdq", "activation_type": "int8"},
    "qpass qop U8S8": {"format": "qop", "activation_type": "uint8"},
    "qpass qop S8S8": {"format": "qop", "activation_type": "int8"},
}
#: variants measured on request (--variants): the placement options, against the default
EXTRA_VARIANTS = {
    "qpass qdq U8S8 no joins": {"format": "qdq", "activation_type": "uint8", "neighbour_ops": ()},
    "qpass qop U8S8 no joins": {"format": "qop", "activation_type": "uint8", "neighbour_ops": ()},
    "qpass qdq U8S8 act matmuls": {"format": "qdq", "activation_type": "uint8", "activation_matmuls": True},
    "qpass qdq U8S8 multi-reader DQ": {"format": "qdq", "activation_type": "uint8", "single_reader_dq": False},
    "qpass qop U8S8 multi-reader DQ": {"format": "qop", "activation_type": "uint8", "single_reader_dq": False},
    "qpass qdq U8S8 exclude-before HardSwish": {"format": "qdq", "activation_type": "uint8",
                                                "exclude_before": ("HardSwish",)},
    "qpass qdq U16S8": {"format": "qdq", "activation_type": "uint16", "target_opset": 21},
    "qpass qdq U8S8 float hard-swish": {"format": "qdq", "activation_type": "uint8", "integer_hard_swish": "off"},
    # the latency objective needs validation samples (one feed to time on): 20 % of the 32 held out
    "qpass qdq U8S8 latency objective": {"format": "qdq", "activation_type": "uint8", "objective": "latency",
                                         "val_fraction": 0.2},
}


def run(models: list[str], repeats: int, threads: int, shared: Path = SHARED, variants=VARIANTS, log=print) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="qpass-lat-") as tmp:
        for name in models:
            paths: dict[str, Path] = {"fp32": MODELS[name].model_path(shared)}
            for act in ("uint8", "int8"):
                tag = "ORT qdq U8S8" if act == "uint8" else "ORT qdq S8S8"
                try:
                    paths[tag] = ort_quantize(name, Path(tmp) / f"{name}.ort.{act}.onnx", shared, act)
                except Exception as exc:  # noqa: BLE001 - report the peer's failure, do not hide it
                    log(f"{name}: {tag} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            for tag, overrides in variants.items():
                out = Path(tmp) / f"{name}.{tag.replace(' ', '_')}.onnx"
                result = qpass.quantize(MODELS[name].model_path(shared), MODELS[name].calib_path(shared), output=out,
                                        **{"val_fraction": 0.0, "max_calib_samples": 32, **MODEL_OPTIONS.get(name, {}),
                                           **overrides})
                lat = (result.report.search or {}).get("latency")
                if lat:
                    log(f"{name:22s} {tag}: latency search x{lat['start']['ratio']} -> x{lat['end']['ratio']} "
                        f"({lat['trials']} trials, {len(lat['floated'])} float, met {lat['met']})")
                paths[tag] = out
            ms = measure(paths, first_sample(name, shared), repeats, threads)
            base, ort_base = ms["fp32"], ms.get("ORT qdq U8S8")
            for tag, v in ms.items():
                row = {"model": name, "variant": tag, "ms": round(v, 3), "vs_fp32": round(v / base, 3),
                       "vs_ort_u8s8": round(v / ort_base, 3) if ort_base else None}
                rows.append(row)
                log(f"{name:22s} {tag:16s} {v:9.2f} ms  x{v / base:5.2f} fp32" + (f"  x{v / ort_base:5.2f} ORT" if ort_base else ""))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shared", default=str(SHARED))
    ap.add_argument("--out")
    ap.add_argument("--variants", help="comma-separated qpass variants (default: the four of VARIANTS); "
                                       f"also {', '.join(EXTRA_VARIANTS)}")
    args = ap.parse_args(argv)
    every = {**VARIANTS, **EXTRA_VARIANTS}
    variants = {k: every[k] for k in args.variants.split(",")} if args.variants else VARIANTS
    rows = run(args.models.split(","), args.repeats, args.threads, Path(args.shared), variants=variants,
               log=lambda s: print(s, flush=True))
    if args.out:
        Path(args.out).write_text(json.dumps({"onnxruntime": ort.__version__, "qpass": qpass.__version__,
                                              "threads": args.threads, "repeats": args.repeats, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
