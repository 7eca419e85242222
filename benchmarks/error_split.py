"""Which quantization costs a model its metric: weights, activations, or both.

    python -m benchmarks.error_split [--models ppocrv6_det_small] [--out split.json]

Quantizes each model with the defaults, then evaluates three graphs on its metric (benchmarks/evaluate.py):
the default output; "activations only", the same graph with every weight, bias and other constant
DequantizeLinear replaced by its dequantized float value; and "weights only", the same graph with every
activation QuantizeLinear -> DequantizeLinear pair bypassed (the DQ's readers read the Q's float input).
Both variants keep the default output's ranges and placement, so the two errors are those of that output.

The graphs run with onnxruntime's default optimizations, as a user's would. Its optimizer treats a float
weight between quantized activations differently from a quantized one: on the orientation CNN (checked
before the rotating subsample start), with
optimizations off, the activations-only graph is as far from fp32 as the default graph (40 samples: max abs
difference 0.2372 both, top-1 agreement 1.0 both); with them on it is not (0.68, 0.975), so there its activations-only number
measures onnxruntime's rewrite, not the quantization.

``--per-channel`` adds an upper bound for any per-channel rebalancing of the activations (equalization, SmoothQuant
on Conv inputs): every activation pair of the default output given one scale and zero point per channel (axis 1,
the same uint8/int8 type), from the per-channel 0.01 / 99.99 percentiles of the weights-only graph's values on the
calibration samples (4,096 values a channel a sample). onnxruntime has no integer kernel for per-channel activations,
so these graphs (and the default output beside them, row ``default_basic``) run at the basic optimization level.

Measured on 2026-11-26 (primary metric: default / activations only / weights only): detector mask IoU
0.9679 / 0.9502 / 0.9923; orientation accuracy 0.9821 / 0.8333 (see above) / 0.9762; Magika top-1
0.9485 / 0.9485 / 0.9499.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

import qpass
from qpass.calib.data import input_specs, open_samples
from qpass.qparams import dequantize
from qpass.runtime import augmented_model, make_session

from .accuracy import MODEL_OPTIONS
from . import evaluate as evaluate_module
from .evaluate import MODELS, SHARED, evaluate

_INT_TYPES = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16,
              onnx.TensorProto.INT32)


def constants_in_float(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every DequantizeLinear of a stored integer constant becomes that constant dequantized (float)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inits = {i.name: i for i in g.initializer}
    keep = []
    for n in g.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].data_type in _INT_TYPES:
            q = numpy_helper.to_array(inits[n.input[0]])
            s = numpy_helper.to_array(inits[n.input[1]])
            z = numpy_helper.to_array(inits[n.input[2]]) if len(n.input) > 2 and n.input[2] else None
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1) if s.ndim == 1 else None
            g.initializer.append(numpy_helper.from_array(dequantize(q, s, z, axis=axis), n.output[0]))
            continue
        keep.append(n)
    del g.node[:]
    g.node.extend(keep)
    return out


def activations_in_float(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every QuantizeLinear of a computed tensor and the DequantizeLinears reading it are bypassed."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inits = {i.name for i in g.initializer}
    qs = {n.output[0]: n for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits}
    readers = {}
    for n in g.node:
        for x in n.input:
            readers.setdefault(x, []).append(n)
    qs = {k: q for k, q in qs.items() if all(r.op_type == "DequantizeLinear" for r in readers.get(k, []))}
    rename, keep = {}, []
    for n in g.node:
        if n.op_type == "QuantizeLinear" and n.output[0] in qs:
            continue
        if n.op_type == "DequantizeLinear" and n.input[0] in qs:
            rename[n.output[0]] = qs[n.input[0]].input[0]
            continue
        keep.append(n)
    for n in keep:
        for i, x in enumerate(n.input):
            if x in rename:
                n.input[i] = rename[x]
    for o in g.output:
        if o.name in rename:
            keep.append(onnx.helper.make_node("Identity", [rename[o.name]], [o.name]))
    del g.node[:]
    g.node.extend(keep)
    return out


def channel_percentiles(model: onnx.ModelProto, tensors: list[str], calib: Path, per_sample: int = 4096,
                        seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per channel (axis 1) 0.01 and 99.99 percentiles of ``tensors`` in ``model`` over the calibration samples (a
    tensor whose axis 1 changes size between samples, e.g. a sequence, is left out)."""
    sess = make_session(augmented_model(model, tensors), ["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    rng = np.random.default_rng(seed)
    kept: dict[str, list[np.ndarray]] = {}
    for feed, _ in open_samples(calib, input_specs(model)):
        for name, value in zip(names, sess.run(names, feed)):
            if name in tensors and value.ndim >= 2:
                rows = np.moveaxis(value, 1, 0).reshape(value.shape[1], -1)
                pick = rng.choice(rows.shape[1], min(rows.shape[1], per_sample), replace=False)
                kept.setdefault(name, []).append(rows[:, pick])
    kept = {k: np.concatenate(v, 1) for k, v in kept.items() if len({a.shape[0] for a in v}) == 1}  # axis 1 fixed
    return {k: (np.quantile(v, 0.0001, axis=1), np.quantile(v, 0.9999, axis=1)) for k, v in kept.items()}


def activations_per_channel(model: onnx.ModelProto, calib: Path) -> tuple[onnx.ModelProto, int]:
    """Every activation QuantizeLinear of ``model`` and its DequantizeLinears with per-channel (axis 1) scales and
    zero points of the same type, from :func:`channel_percentiles` of the weights-only graph; returns the model and
    how many pairs changed."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inits = {i.name: i for i in g.initializer}
    qs = [n for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits]
    ranges = channel_percentiles(activations_in_float(model), sorted({q.input[0] for q in qs}), calib)
    changed = 0
    for q in qs:
        if q.input[0] not in ranges or len(q.input) < 3:
            continue
        lo, hi = (np.minimum(ranges[q.input[0]][0], 0), np.maximum(ranges[q.input[0]][1], 0))
        if numpy_helper.to_array(inits[q.input[2]]).dtype == np.uint8:
            scale = (np.maximum(hi - lo, 1e-8) / 255).astype(np.float32)
            zero = np.clip(np.round(-lo / scale), 0, 255).astype(np.uint8)
        else:
            scale = (np.maximum(np.maximum(-lo, hi), 1e-8) / 127).astype(np.float32)
            zero = np.zeros(scale.shape, np.int8)
        names = (q.output[0] + "_channel_scale", q.output[0] + "_channel_zero")
        g.initializer.extend([numpy_helper.from_array(scale, names[0]), numpy_helper.from_array(zero, names[1])])
        for n in g.node:
            if n is q or (n.op_type == "DequantizeLinear" and n.input[0] == q.output[0]):
                n.input[1], n.input[2] = names
                del n.attribute[:]
                n.attribute.append(onnx.helper.make_attribute("axis", 1))
        changed += 1
    return out, changed


def _basic_session(model_path, providers):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(str(model_path), options, providers=list(providers))


def split(name: str, shared: Path = SHARED, per_channel: bool = False) -> dict:
    spec = MODELS[name]
    with tempfile.TemporaryDirectory(prefix="qpass-split-") as tmp:
        base = Path(tmp) / "default.onnx"
        qpass.quantize(spec.model_path(shared), spec.calib_path(shared), output=base, val_fraction=0.0,
                       **MODEL_OPTIONS.get(name, {}))
        model = onnx.load(str(base))
        row = {"model": name, "default": evaluate(name, base, shared=shared)}
        for key, fn in (("activations_only", constants_in_float), ("weights_only", activations_in_float)):
            path = Path(tmp) / f"{key}.onnx"
            onnx.save(fn(model), str(path))
            row[key] = evaluate(name, path, shared=shared)
        if per_channel:
            changed, row["per_channel_pairs"] = activations_per_channel(model, spec.calib_path(shared))
            path = Path(tmp) / "per_channel.onnx"
            onnx.save(changed, str(path))
            default_session = evaluate_module._session
            evaluate_module._session = _basic_session  # no integer kernel takes per-channel activations
            try:
                row["default_basic"] = evaluate(name, base, shared=shared)
                row["per_channel_activations"] = evaluate(name, path, shared=shared)
            finally:
                evaluate_module._session = default_session
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="ppocrv6_det_small")
    ap.add_argument("--shared", default=str(SHARED))
    ap.add_argument("--per-channel", action="store_true", help="add the per-channel activation bound")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    rows = []
    for name in args.models.split(","):
        rows.append(split(name, Path(args.shared), per_channel=args.per_channel))
        metric = MODELS[name].metrics[0]
        print(json.dumps({k: (v[metric] if isinstance(v, dict) else v) for k, v in rows[-1].items()}), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
