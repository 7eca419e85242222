"""What half precision would do to a tensor: its largest |x|, and how many of its non-zero values (and how much of
their sum of |x|) float16 flushes to 0.

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
    |x| < 2**-25 (zero in float16); ``nonfinite``: inf/NaN values seen; ``total``: values seen; ``abs_sum`` and
    ``tiny_sum``: the sum of |x| over the finite values and over the tiny ones (None in tables saved before they
    were measured)."""

    absmax: float
    nonzero: int
    tiny: int
    nonfinite: int
    total: int
    abs_sum: float | None = None
    tiny_sum: float | None = None

    kind: ClassVar[str] = "halfrange"

    @property
    def tiny_share(self) -> float:
        return self.tiny / self.nonzero if self.nonzero else 0.0

    @property
    def tiny_mass_share(self) -> float | None:
        """The share of the sum of |x| that float16 flushes to zero (None when not measured)."""
        if self.abs_sum is None or self.tiny_sum is None:
            return None
        return self.tiny_sum / self.abs_sum if self.abs_sum > 0 else 0.0

    def to_dict(self) -> dict:
        return {"absmax": self.absmax, "nonzero": self.nonzero, "tiny": self.tiny, "nonfinite": self.nonfinite,
                "total": self.total, "abs_sum": self.abs_sum, "tiny_sum": self.tiny_sum}

    @classmethod
    def from_dict(cls, d: Mapping) -> "HalfRange":
        opt = {k: None if d.get(k) is None else float(d[k]) for k in ("abs_sum", "tiny_sum")}
        return cls(float(d["absmax"]), int(d["nonzero"]), int(d["tiny"]), int(d["nonfinite"]), int(d["total"]), **opt)


@register_observer("halfrange")
class HalfRangeObserver:
    """Accumulates a :class:`HalfRange` over batches."""

    method = "halfrange"
    stat = HalfRange.kind
    costly = False

    def __init__(self, options: RangeOptions | None = None) -> None:
        self.absmax, self.nonzero, self.tiny, self.nonfinite, self.total = 0.0, 0, 0, 0, 0
        self.abs_sum, self.tiny_sum = 0.0, 0.0

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
            tiny = (a > 0) & (a < FP16_TINY)
            n_tiny = int(np.count_nonzero(tiny))
            self.tiny += n_tiny
            self.abs_sum += float(a.sum(dtype=np.float64))
            if n_tiny:
                self.tiny_sum += float(a[tiny].sum(dtype=np.float64))

    def merge(self, other: "HalfRangeObserver") -> "HalfRangeObserver":
        out = HalfRangeObserver()
        out.absmax = max(self.absmax, other.absmax)
        for f in ("nonzero", "tiny", "nonfinite", "total", "abs_sum", "tiny_sum"):
            setattr(out, f, getattr(self, f) + getattr(other, f))
        return out

    def result(self) -> Any:
        if not self.total:
            return None
        return HalfRange(self.absmax, self.nonzero, self.tiny, self.nonfinite, self.total, self.abs_sum, self.tiny_sum)
