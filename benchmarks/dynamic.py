"""Dynamic quantization, side by side in one run: qpass --dynamic against onnxruntime's quantize_dynamic (and, for
MiniLM, onnxruntime's transformer optimizer followed by quantize_dynamic), with the fp32 model and qpass's static
default beside them.

    python -m benchmarks.dynamic [--models minilm_l6_v2,ppocrv6_rec_small] [--repeats 30] [--threads 2] [--out f.json]

Per model and variant: the model's task metrics (benchmarks.evaluate), the file size, the standard-ONNX check (ops
outside the default domain) and the CPU latency, medians of ``repeats`` rounds in which every variant runs once in
turn (benchmarks.latency.measure). No variant reads calibration data except qpass's static default.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

import onnx

import qpass

from .accuracy import MODEL_OPTIONS
from .evaluate import MODELS, SHARED, evaluate
from .latency import first_sample, measure

#: onnxruntime transformer optimizer settings per model (model type, heads, hidden size)
TRANSFORMER_OPTIMIZER = {"minilm_l6_v2": ("bert", 12, 384)}


def _ort_dynamic(src: Path, out: Path, *, per_channel: bool = False) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8, per_channel=per_channel)
    return out


def _ort_optimized(name: str, src: Path, out: Path) -> Path:
    """The transformer optimizer's own fusions (Attention, SkipLayerNormalization, ...: contrib ops); opt_level 0,
    since its onnxruntime pre-optimization step imports torch; then onnxruntime's symbolic shape inference."""
    from onnxruntime.transformers.optimizer import optimize_model

    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    kind, heads, hidden = TRANSFORMER_OPTIMIZER[name]
    optimized = optimize_model(str(src), model_type=kind, num_heads=heads, hidden_size=hidden, opt_level=0,
                               use_gpu=False).model
    # quantize_dynamic needs the fused contrib ops' output types, which only onnxruntime's symbolic shape inference gives
    onnx.save_model(SymbolicShapeInference.infer_shapes(optimized, auto_merge=True), str(out))
    return out


def _upgraded(name: str, src: Path, tmp: Path) -> Path:
    """The opset-11 OCR models upgraded to 13, as every variant of the benchmarks gets them."""
    opset = MODEL_OPTIONS.get(name, {}).get("target_opset")
    if not opset:
        return src
    out = tmp / f"{name}.op{opset}.onnx"
    onnx.save_model(onnx.version_converter.convert_version(onnx.load(str(src)), opset), str(out))
    return out


def _nonstandard(path: Path) -> dict[str, int]:
    model = onnx.load(str(path), load_external_data=False)
    return dict(Counter(f"{n.domain}.{n.op_type}" for n in model.graph.node if n.domain not in ("", "ai.onnx")))


def run(models: list[str], repeats: int, threads: int, shared: Path = SHARED, log=print) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="qpass-dyn-") as tmp_name:
        tmp = Path(tmp_name)
        for name in models:
            spec = MODELS[name]
            src = _upgraded(name, spec.model_path(shared), tmp)
            paths: dict[str, Path] = {"fp32": spec.model_path(shared)}
            peers = {"ORT quantize_dynamic": lambda o: _ort_dynamic(src, o),
                     "ORT quantize_dynamic per-channel": lambda o: _ort_dynamic(src, o, per_channel=True)}
            if name in TRANSFORMER_OPTIMIZER:
                peers["ORT optimizer + quantize_dynamic"] = lambda o: _ort_dynamic(
                    _ort_optimized(name, src, tmp / f"{name}.opt.onnx"), o)
            for tag, make in peers.items():
                try:
                    paths[tag] = make(tmp / f"{name}.{tag.replace(' ', '_')}.onnx")
                except Exception as exc:  # noqa: BLE001 - report the peer's failure, do not hide it
                    log(f"{name}: {tag} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            out = tmp / f"{name}.qpass_dynamic.onnx"
            qpass.quantize(src, output=out, dynamic=True, validate=False)
            paths["qpass --dynamic"] = out
            out = tmp / f"{name}.qpass_static.onnx"
            qpass.quantize(spec.model_path(shared), spec.calib_path(shared), output=out, val_fraction=0.0,
                           validate=False, **MODEL_OPTIONS.get(name, {}))
            paths["qpass static default"] = out
            ms = measure(paths, first_sample(name, shared), repeats, threads)
            for tag, path in paths.items():
                metrics = evaluate(name, path, shared=shared, cache_dir=tmp)
                row = {"model": name, "variant": tag, "ms": round(ms[tag], 3), "vs_fp32": round(ms[tag] / ms["fp32"], 3),
                       "bytes": path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob(path.name + ".data")),
                       "nonstandard_ops": _nonstandard(path), **{k: metrics[k] for k in spec.metrics}}
                rows.append(row)
                log(f"{name:20s} {tag:34s} {spec.primary}={metrics[spec.primary]:.4f}  {ms[tag]:8.2f} ms "
                    f"x{ms[tag] / ms['fp32']:.2f}  {row['bytes'] / 1e6:6.1f} MB  {row['nonstandard_ops'] or ''}")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="minilm_l6_v2,ppocrv6_rec_small")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shared", default=str(SHARED))
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    rows = run(args.models.split(","), args.repeats, args.threads, Path(args.shared),
               log=lambda s: print(s, flush=True))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
