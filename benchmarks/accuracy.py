"""Accuracy of qpass variants on the ../shared/models suite, with each model's own metric.

    python -m benchmarks.accuracy [--models m1,m2] [--variants default,entropy,...] [--out results.json]

Each variant is a set of QuantConfig overrides; every model is quantized with its stored calibration data
and evaluated with :mod:`benchmarks.evaluate`. Used to choose qpass's defaults by measurement.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import qpass

from .evaluate import MODELS, SHARED, evaluate

#: per-model options every variant needs (the opset-11 OCR models need an explicit upgrade)
MODEL_OPTIONS = {"ppocrv6_rec_small": {"target_opset": 13}, "ppocrv6_det_small": {"target_opset": 13}}

VARIANTS: dict[str, dict] = {
    "default": {},
    "minmax": {"method": "minmax"},
    "percentile": {"method": "percentile"},
    "mse": {"method": "mse"},
    "entropy": {"method": "entropy"},
    "no_outputs": {"quantize_outputs": ()},
    "float_hard_swish": {"integer_hard_swish": "off"},  # hard-swish left in float between Q/DQ
    "minmax_no_outputs": {"method": "minmax", "quantize_outputs": ()},
    "int8_act": {"activation_type": "int8"},
    "out_quantized": {"output_consumers": "quantized"},
    "act_matmuls": {"activation_matmuls": True},
    "conv_percentile": {"op_methods": {"Conv": "percentile", "ConvTranspose": "percentile"}},
    "out_conv": {"quantize_outputs": ("Conv",)},
    "exact_hist": {"hist_sample": 0},
    "no_joins": {"neighbour_ops": ()},
    "det_head1_float": {"exclude_nodes": ("ConvTranspose\\.2",)},
    "u16": {"activation_type": "uint16", "target_opset": 21},  # auto: min-max everywhere at 16 bits
    "u16_conv_percentile": {"activation_type": "uint16", "target_opset": 21,  # what auto did at 16 bits before
                            "op_methods": {"Conv": "percentile", "ConvTranspose": "percentile"}},
    "det_head3_float": {"exclude_nodes": ("Conv\\.82", "ConvTranspose\\.0", "ConvTranspose\\.2")},
    "hist_64k": {"hist_sample": 65536},
    "hist_128k": {"hist_sample": 131072},
    "cle": {"equalize": True},  # cross-layer equalization of Conv chains (weights only)
    "no_cle": {"equalize": False},
    "per_tensor": {"per_channel": False, "equalize": False},  # without CLE (which per-tensor weights turn on)
    "cle_per_tensor": {"equalize": True, "per_channel": False},
    "per_tensor_default": {"per_channel": False},  # per-tensor weights with the default equalize (on)
    "biascorr": {"bias_correction": "empirical"},
    "biascorr_s4": {"bias_correction": "empirical", "bias_correction_stages": 4, "bias_correction_samples": 16},
    "biascorr_mse": {"method": "mse", "bias_correction": "empirical"},
    "biascorr_minmax": {"method": "minmax", "bias_correction": "empirical"},
    "smooth": {"smooth_quant": "on"},  # SmoothQuant, strength searched per layer
    "smooth_05": {"smooth_quant": "on", "smooth_alpha": 0.5},  # SmoothQuant's usual fixed strength
    "act_matmuls_smooth": {"activation_matmuls": True, "smooth_quant": "on"},
    # precision search (opt-in): it needs a validation split, so these hold out 20 % of the calibration data;
    # "val20" is the default on that same calibration split, the baseline to compare them with
    "val20": {"val_fraction": 0.2},
    "val20_no_range_choice": {"val_fraction": 0.2, "range_choice": False},
    # a small calibration set (16 samples, 4 of them held out): what a percentile of 12 samples clips
    "calib16": {"val_fraction": 0.2, "max_calib_samples": 16},
    "calib16_no_range_choice": {"val_fraction": 0.2, "max_calib_samples": 16, "range_choice": False},
    "val20_minmax": {"val_fraction": 0.2, "method": "minmax"},
    "val20_mse": {"val_fraction": 0.2, "method": "mse"},
    "search_cos": {"val_fraction": 0.2, "target_cosine": 0.999},
    "search_cos_w2": {"val_fraction": 0.2, "target_cosine": 0.999, "search_workers": 2},
    # the same search with float moves only (before 16-bit moves existed, search_cos was this)
    "search_cos_float": {"val_fraction": 0.2, "target_cosine": 0.999, "search_16bit": False},
    "search_cos_ray": {"val_fraction": 0.2, "target_cosine": 0.999, "ray_address": "local"},  # needs qpass[ray]
    # the latency objective (compute nodes whose integer form measured slower than float kept float)
    "latency_obj": {"val_fraction": 0.2, "objective": "latency"},
    # float16 mode (no int8): measured fp32 fallback from the calibration data; with a validation split, the
    # fidelity check (worst per-sample cosine >= float_min_cosine) and its fallback run too
    "float16": {"float_type": "float16"},
    "float16_val20": {"float_type": "float16", "val_fraction": 0.2},
}


def run(models: list[str], variants: list[str], shared: Path = SHARED, log=print) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="qpass-acc-") as tmp:
        for name in models:
            spec = MODELS[name]
            for variant in variants:
                overrides = {**MODEL_OPTIONS.get(name, {}), **VARIANTS[variant]}
                out = Path(tmp) / f"{name}.{variant}.onnx"
                t = time.perf_counter()
                try:
                    result = qpass.quantize(spec.model_path(shared), spec.calib_path(shared), output=out,
                                            **{"val_fraction": 0.0, **overrides})
                except qpass.QpassError as exc:
                    rows.append({"model": name, "variant": variant, "error": exc.one_line()})
                    log(f"{name:22s} {variant:12s} ERROR {exc.one_line()}")
                    continue
                qtime = time.perf_counter() - t
                metrics = evaluate(name, out, shared=shared, cache_dir=Path(tmp))
                row = {"model": name, "variant": variant, "overrides": {k: list(v) if isinstance(v, tuple) else v
                                                                        for k, v in overrides.items()},
                       "quantize_seconds": round(qtime, 2), **{k: metrics[k] for k in spec.metrics}}
                lat = next((e.get("latency") for e in (result.report.validation or {}).get("providers", [])
                            if e.get("latency")), None)
                if lat:  # validation's quantized / fp32 latency ratio (alternated medians)
                    row["latency_ratio"] = lat.get("ratio")
                row["size_bytes"] = result.report.sizes.get("output_bytes")
                if result.report.calibration.get("range_choice"):
                    row["range_choice"] = result.report.calibration["range_choice"]
                    log(f"  range choice: {json.dumps(row['range_choice'])}")
                outs = (result.report.validation or {}).get("outputs") or []
                if outs:  # qpass's own check on its held-out split: the worst output
                    row["validation_sqnr_db"] = min(float(o["sqnr_db"]) for o in outs)
                    row["validation_cosine"] = min(o["cosine_mean"] for o in outs)
                lat_found = (result.report.search or {}).get("latency")
                if lat_found:  # the latency objective: its start and end against fp32, and what it kept float
                    row["latency_search"] = {k: lat_found.get(k) for k in ("met", "trials", "seconds", "start", "end",
                                                                           "floated", "note")}
                    log(f"  latency search: {json.dumps(row['latency_search'])}")
                if result.report.search and "met" in result.report.search:  # the precision search's moves and time
                    found = result.report.search
                    row["search"] = {"met": found["met"], "trials": found["trials"], "seconds": found.get("seconds"),
                                     "moves": [m["node"] for m in found["moves"]],
                                     "group_sizes": [len(m.get("group", [m])) for m in found["moves"]],
                                     "widened": len(found.get("widened", [])), "floated": len(found.get("floated", [])),
                                     "latency_ratio": found.get("latency_ratio"), "start": found.get("start"),
                                     "end": found.get("end"), "bytes": [m["bytes_after"] for m in found["moves"]]}
                    log(f"  search: {json.dumps(row['search'])}")
                rows.append(row)
                log(f"{name:22s} {variant:12s} {spec.primary}={metrics[spec.primary]:.4f}  "
                    + (f"val_sqnr={row['validation_sqnr_db']:.2f}  " if "validation_sqnr_db" in row else "")
                    + "  ".join(f"{k}={metrics[k]:.4f}" for k in spec.metrics[1:3]))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--variants", default="default")
    ap.add_argument("--shared", default=str(SHARED))
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    rows = run(args.models.split(","), args.variants.split(","), Path(args.shared), log=lambda s: print(s, flush=True))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
