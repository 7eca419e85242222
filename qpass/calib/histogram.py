"""A streaming histogram on an exact power-of-two grid anchored at 0, so merging and regrowing never approximate.

Bins are ``[k*w, (k+1)*w)`` for integer ``k`` and a bin width ``w`` that is a power of two. When a batch
falls outside the window of ``bins`` bins, ``w`` doubles (pairs of bins merge exactly, because every
edge of the coarser grid is an edge of the finer one) until the whole observed range fits, and the
window is re-anchored at ``floor(min(min, 0) / w)``. The grid always spans 0: quantization ranges
always include 0, so finer resolution away from it would buy nothing, and the histogram of ``|x|``
stays at most ``2 * bins`` long. The state after a set of batches is therefore the same
whatever their order or size: the width is the smallest power of two at which the global range fits,
and each bin holds the exact count of its interval. Memory is O(bins) per tensor. At least half of
the bins span the observed range.
"""
from __future__ import annotations

import math

import numpy as np


class StreamingHistogram:
    def __init__(self, bins: int = 2048):
        if bins < 16:
            raise ValueError("bins must be >= 16")
        self.bins = int(bins)
        self.counts = np.zeros(self.bins, dtype=np.int64)
        self.exp: int | None = None  # bin width is 2**exp
        self.k0 = 0  # absolute index of the first bin
        self.min = math.inf
        self.max = -math.inf
        self.count = 0

    # ------------------------------------------------------------------ grid
    @property
    def width(self) -> float:
        return math.ldexp(1.0, self.exp) if self.exp is not None else 0.0

    def edges(self) -> np.ndarray:
        return (np.arange(self.bins + 1, dtype=np.float64) + self.k0) * self.width

    def _fits(self, exp: int, lo: float, hi: float) -> bool:
        w = math.ldexp(1.0, exp)
        return math.floor(hi / w) - math.floor(lo / w) < self.bins

    def _required_exp(self, lo: float, hi: float) -> int:
        """The canonical width for a range that includes 0: the smallest power of two at which [lo, hi] fits in
        ``bins`` bins. It only grows when the range grows, so it is the same for any order of batches."""
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        span = hi - lo
        if span <= 0:
            return -1074  # all zeros so far: the finest width; the first non-zero batch regrids
        exp = math.frexp(span / self.bins)[1]  # 2**exp > span / bins
        while not self._fits(exp, lo, hi):
            exp += 1
        while exp > -1074 and self._fits(exp - 1, lo, hi):
            exp -= 1
        return exp

    def _regrid(self, new_exp: int, lo: float) -> None:
        """Coarsen to width 2**new_exp (>= current) and re-anchor the window at floor(lo / w)."""
        w = math.ldexp(1.0, new_exp)
        new_k0 = math.floor(lo / w)
        if self.exp is not None and self.counts.any():
            shift = new_exp - self.exp
            old_k = np.arange(self.bins, dtype=np.int64) + self.k0
            # floor division by 2**shift, exact on integers (|old_k| < 2**62, so a shift past 62 gives 0 or -1)
            coarse = (old_k >> shift) if shift <= 62 else np.where(old_k >= 0, 0, -1).astype(np.int64)
            idx = coarse - new_k0
            nz = self.counts != 0
            self.counts = np.bincount(idx[nz], weights=self.counts[nz], minlength=self.bins)[: self.bins].astype(np.int64)
        else:
            self.counts = np.zeros(self.bins, dtype=np.int64)
        self.exp, self.k0 = new_exp, new_k0

    # ------------------------------------------------------------------ accumulate
    def update(self, x: np.ndarray, lo: float | None = None, hi: float | None = None) -> None:
        """Add a batch (any shape). ``lo``/``hi`` may pass its known min/max to save a pass over it."""
        x = np.asarray(x)
        if x.size == 0:
            return
        if x.dtype != np.float32:
            x = x.astype(np.float64, copy=False)
        x = x.ravel()
        lo = float(x.min()) if lo is None else lo
        hi = float(x.max()) if hi is None else hi
        self._grow(min(self.min, lo), max(self.max, hi))
        # w is a power of two, so x * (1/w) is exact (no overflow: the range fits in the window), and so is the
        # shift by k0 (the results are small integers). A negative x can underflow to -0.0 only when w > 1
        # (|x| * 2**-exp below float32's smallest subnormal needs exp > 0); it still belongs below 0.
        scaled = np.ldexp(x, -self.exp)
        np.floor(scaled, out=scaled)
        scaled -= self.k0
        k = scaled.astype(np.intp)
        if lo < 0 and self.exp > 0:
            k[(scaled == -self.k0) & (x < 0)] -= 1
        self.counts += np.bincount(k, minlength=self.bins)[: self.bins]
        self.count += x.size

    def _grow(self, new_min: float, new_max: float) -> None:
        exp = self._required_exp(new_min, new_max)
        anchor = min(new_min, 0.0)
        if self.exp is None or exp != self.exp or math.floor(anchor / math.ldexp(1.0, exp)) != self.k0:
            self._regrid(exp, anchor)
        self.min, self.max = new_min, new_max

    def merge(self, other: "StreamingHistogram") -> "StreamingHistogram":
        """A new histogram equal to observing both inputs' data."""
        if other.bins != self.bins:
            raise ValueError("cannot merge histograms with different bin counts")
        out = StreamingHistogram(self.bins)
        for h in (self, other):
            if h.exp is None:
                continue
            if out.exp is None:
                out.exp, out.k0, out.counts = h.exp, h.k0, h.counts.copy()
                out.min, out.max, out.count = h.min, h.max, h.count
                continue
            lo, hi = min(out.min, h.min), max(out.max, h.max)
            exp = out._required_exp(lo, hi)
            out._regrid(exp, min(lo, 0.0))
            other_h = StreamingHistogram(self.bins)
            other_h.exp, other_h.k0, other_h.counts = h.exp, h.k0, h.counts.copy()
            other_h._regrid(exp, min(lo, 0.0))
            out.counts += other_h.counts
            out.min, out.max, out.count = lo, hi, out.count + h.count
        return out

    # ------------------------------------------------------------------ views
    def folded(self) -> tuple[np.ndarray, float]:
        """Histogram of |x| on the same grid: counts for [j*w, (j+1)*w), j = 0.., and w. Exact, because 0 is an edge."""
        k = np.arange(self.bins, dtype=np.int64) + self.k0
        j = np.where(k >= 0, k, -k - 1)
        n = int(j.max()) + 1 if self.counts.any() else 1
        return np.bincount(j, weights=self.counts, minlength=n).astype(np.int64), self.width
