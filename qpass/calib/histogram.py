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

import functools
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
    def update(self, x: np.ndarray, lo: float | None = None, hi: float | None = None, *, rows: int = 1,
               stride: int = 1, offset: int = 0) -> None:
        """Add a batch (any shape). ``lo``/``hi`` may pass its known min/max to save a pass over it.

        With ``stride`` > 1 the batch is split into ``rows`` equal rows (one per sample) and only every
        ``stride``-th value of each row, from position ``offset`` on, is counted, with weight ``stride`` (see
        :func:`subsample_stride`); ``lo``/``hi``, and so the grid and the reported min/max, still cover every
        value."""
        x = np.asarray(x)
        if x.size == 0:
            return
        if x.dtype != np.float32:
            x = x.astype(np.float64, copy=False)
        if x.size % rows:
            rows = 1
        x = x.reshape(rows, -1)
        lo = float(x.min()) if lo is None else lo
        hi = float(x.max()) if hi is None else hi
        if self.exp is None or lo < self.min or hi > self.max:  # the grid only changes when the range grows
            self._grow(min(self.min, lo), max(self.max, hi))
        # each counted value stands for the ``stride`` values of its row it represents, so a sample weighs by
        # its size whatever its stride (rows of other shapes, or later samples under a smaller cap)
        offset = offset % stride if stride > 1 else 0
        counts = bin_counts(x, stride, self.exp, self.k0, self.bins, nonnegative=lo >= 0, offset=offset)
        self.counts += counts if stride == 1 else counts * stride
        self.count += rows * stride * -(-(x.shape[1] - offset) // stride)

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


def bin_counts(rows: np.ndarray, stride: int, exp: int, k0: int, bins: int, *, nonnegative: bool = False,
               offset: int = 0) -> np.ndarray:
    """Counts of ``floor(x / 2**exp) - k0`` in ``[0, bins)`` over ``rows[:, offset::stride]`` (float32 or float64, 2-D).

    Every value must fall in the window (the caller grew the grid to the batch's range); one outside it is a
    bug, raised rather than counted in a wrong bin. ``nonnegative`` (no value below 0, so k0 is 0) lets the
    cast's truncation stand for the floor."""
    x = rows[:, offset::stride] if stride > 1 else rows
    if x.dtype == np.float32 and -126 <= exp <= 126:
        # x * 2**-exp is exact in float32 (a power of two, no overflow, 2**-exp a normal float32), and each ufunc
        # below reads the strided view or writes the int32 index in the same pass, so the subsample is never
        # copied on its own. The index is written as intp, the type bincount counts in, so it is not converted again.
        k = np.empty(x.shape, np.intp)
        scale = np.float32(math.ldexp(1.0, -exp))
        if nonnegative and k0 == 0:
            np.multiply(x, scale, out=k, casting="unsafe")  # truncation == floor for x >= 0
        else:
            scaled = np.multiply(x, scale)
            np.floor(scaled, out=scaled)  # integers below 2**24 in magnitude: subtracting k0 is exact
            np.subtract(scaled, np.float32(k0), out=k, casting="unsafe")
            if exp > 0:  # a negative x that underflowed to -0.0 belongs to bin -1 - k0
                k[(scaled == np.float32(0.0)) & (x < 0)] -= 1
        k = k.ravel()
    else:
        # float64 (or a float32 grid outside float32's normal exponents): ldexp is exact in float64
        v = x.ravel()
        scaled = np.ldexp(v, -exp)
        np.floor(scaled, out=scaled)
        scaled -= k0
        k = scaled.astype(np.intp)
        if exp > 0:
            k[(scaled == -k0) & (v < 0)] -= 1
    out = np.bincount(k, minlength=bins)  # a negative index raises here
    if len(out) > bins:
        raise AssertionError(f"{int(out[bins:].sum())} values fell above the histogram window (exp={exp}, k0={k0})")
    return out.astype(np.int64, copy=False)


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, math.isqrt(n) + 1))


@functools.lru_cache(maxsize=4096)
def subsample_stride(row_shape: tuple[int, ...], cap: int) -> int:
    """The stride that keeps at most about ``cap`` values of a row of this shape (0 or a small row: 1, all).

    The stride is a prime that divides none of the row's dimensions, so walking the flattened row by it
    visits every residue of every axis (every channel, column and position class of an image, every hidden
    unit of a sequence) instead of aliasing onto one of them. It depends only on the shape, never on the
    batch, so a sample's subsample is the same whatever it is batched with."""
    n = math.prod(row_shape)
    if cap <= 0 or n <= cap:
        return 1
    p = max(2, -(-n // cap))
    while not _is_prime(p) or any(d > 1 and d % p == 0 for d in row_shape):
        p += 1
    return p
