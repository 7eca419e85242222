"""Original vs quantized on onnxruntime: per output SQNR, cosine, max abs error, top-1 agreement (and accuracy with labels)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import onnx

from .calib.collect import make_session


@dataclass
class OutputStats:
    name: str
    signal: float = 0.0
    noise: float = 0.0
    max_abs: float = 0.0
    cosines: list = field(default_factory=list)
    top1_same: int = 0
    top1_total: int = 0
    correct_ref: int = 0
    correct_q: int = 0
    labelled: int = 0

    def add(self, ref: np.ndarray, out: np.ndarray, label: Any) -> None:
        ref = np.asarray(ref, dtype=np.float64)
        out = np.asarray(out, dtype=np.float64)
        if ref.shape != out.shape:
            raise ValueError(f"output '{self.name}' shape {out.shape} differs from the original's {ref.shape}")
        err = out - ref
        self.signal += float(np.sum(ref * ref))
        self.noise += float(np.sum(err * err))
        if err.size:
            self.max_abs = max(self.max_abs, float(np.max(np.abs(err))))
        nr, nq = np.linalg.norm(ref), np.linalg.norm(out)
        self.cosines.append(1.0 if nr == 0 and nq == 0 else float(np.dot(ref.ravel(), out.ravel()) / max(nr * nq, 1e-30)))
        if ref.ndim >= 2 and ref.shape[-1] > 1:
            r, q = ref.argmax(-1).ravel(), out.argmax(-1).ravel()
            self.top1_same += int(np.sum(r == q))
            self.top1_total += r.size
            if label is not None:
                lab = np.asarray(label).ravel()
                if lab.size == r.size and lab.dtype.kind in "iu":
                    self.correct_ref += int(np.sum(r == lab))
                    self.correct_q += int(np.sum(q == lab))
                    self.labelled += r.size

    def to_dict(self) -> dict:
        sqnr = math.inf if self.noise == 0 else (10 * math.log10(self.signal / self.noise) if self.signal > 0 else -math.inf)
        d = {"output": self.name, "sqnr_db": _finite(sqnr), "cosine_mean": float(np.mean(self.cosines)) if self.cosines else None,
             "cosine_min": float(np.min(self.cosines)) if self.cosines else None, "max_abs_error": self.max_abs}
        if self.top1_total:
            d["top1_agreement"] = self.top1_same / self.top1_total
        if self.labelled:
            d["accuracy_fp32"] = self.correct_ref / self.labelled
            d["accuracy_quantized"] = self.correct_q / self.labelled
            d["labelled_samples"] = self.labelled
        return d


def _finite(x: float) -> float | str:
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def validate(original: onnx.ModelProto, quantized: onnx.ModelProto, samples: Iterable[tuple[dict, Any]],
             providers: list[str] | None = None) -> dict:
    """Run both models on each sample; return per-output metrics and the sample count."""
    providers = providers or ["CPUExecutionProvider"]
    ref_sess = make_session(original, providers, what="original model")
    q_sess = make_session(quantized, providers, what="quantized model")
    names = [o.name for o in ref_sess.get_outputs()]
    stats = {n: OutputStats(n) for n in names}
    count = 0
    for feed, label in samples:
        refs = ref_sess.run(names, feed)
        outs = q_sess.run(names, feed)
        for n, r, q in zip(names, refs, outs):
            if np.asarray(r).dtype.kind == "f":
                stats[n].add(r, q, label)
        count += 1
    return {"provider": providers[0], "samples": count,
            "outputs": [s.to_dict() for s in stats.values() if s.cosines]}
