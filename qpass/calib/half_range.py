"""What half precision would do to a tensor: its largest |x| and how many of its non-zero values float16 flushes to 0.

Observer ``"halfrange"`` (statistic kind ``"halfrange"``), streaming: counts only, memory O(1) per tensor. Read
by the float16 mode (qpass.half) to keep a tensor float32 when it overflows float16 or underflows in bulk.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import numpy as np

from .observers import RangeOptions, register_observer
from .stats import register_statistic

#: below half of float16's smallest subnormal (2**-24) a value rounds to zero
FP16_TINY = 2.0 ** -25


@register_statistic
@dataclass(frozen=True)
class HalfRange:
    """``absmax``: the largest finite |x| seen; ``nonzero``: values with x != 0; ``tiny``: non-zero values with
    |x| < 2**-25 (zero in float16); ``nonfinite``: inf/NaN values seen; ``total``: values seen."""

    absmax: float
    nonzero: int
    tiny: int
    nonfinite: int
    total: int

    kind: ClassVar[str] = "halfrange"

    @property
    def tiny_share(self) -> float:
        return self.tiny / self.nonzero if self.nonzero else 0.0

    def to_dict(self) -> dict:
        return {"absmax": self.absmax, "nonzero": self.nonzero, "tiny": self.tiny, "nonfinite": self.nonfinite,
                "total": self.total}

    @classmethod
    def from_dict(cls, d: Mapping) -> "HalfRange":
        return cls(float(d["absmax"]), int(d["nonzero"]), int(d["tiny"]), int(d["nonfinite"]), int(d["total"]))


@register_observer("halfrange")
class HalfRangeObserver:
    """Accumulates a :class:`HalfRange` over batches."""

    method = "halfrange"
    stat = HalfRange.kind
    costly = False

    def __init__(self, options: RangeOptions | None = None) -> None:
        self.absmax, self.nonzero, self.tiny, self.nonfinite, self.total = 0.0, 0, 0, 0, 0

    def update(self, x: np.ndarray, lo: float | None = None, hi: float | None = None, *, samples: int = 1) -> None:
        if x.size == 0 or x.dtype.kind != "f":
            return
        a = np.abs(x.astype(np.float32, copy=False)).ravel()
        finite = np.isfinite(a)
        nf = int(a.size - np.count_nonzero(finite))
        if nf:
            a = a[finite]
        self.nonfinite += nf
        self.total += int(x.size)
        if a.size:
            self.absmax = max(self.absmax, float(a.max()))
            self.nonzero += int(np.count_nonzero(a))
            self.tiny += int(np.count_nonzero((a > 0) & (a < FP16_TINY)))

    def merge(self, other: "HalfRangeObserver") -> "HalfRangeObserver":
        out = HalfRangeObserver()
        out.absmax = max(self.absmax, other.absmax)
        for f in ("nonzero", "tiny", "nonfinite", "total"):
            setattr(out, f, getattr(self, f) + getattr(other, f))
        return out

    def result(self) -> Any:
        if not self.total:
            return None
        return HalfRange(self.absmax, self.nonzero, self.tiny, self.nonfinite, self.total)
