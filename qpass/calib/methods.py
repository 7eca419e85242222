"""Clipping ranges from a streaming histogram: percentile, MSE and entropy (KL), all vectorised in numpy.

Each function returns ``(lo, hi)`` inside the observed ``[min, max]``; :mod:`qpass.qparams` then widens
it to include 0 and turns it into scale and zero point. ``symmetric`` methods work on the exact
histogram of ``|x|`` (0 is a bin edge) and clip both sides at one threshold.
"""
from __future__ import annotations

import numpy as np

from ..qparams import qrange
from .histogram import StreamingHistogram

METHODS = ("minmax", "percentile", "mse", "entropy")


def _clamp(h: StreamingHistogram, lo: float, hi: float) -> tuple[float, float]:
    lo, hi = max(float(lo), h.min), min(float(hi), h.max)
    return (lo, hi) if lo <= hi else (h.min, h.max)


def _quantile(counts: np.ndarray, edges: np.ndarray, q: float) -> float:
    """Value below which a fraction ``q`` of the counts lies, interpolating linearly inside a bin."""
    cum = np.cumsum(counts, dtype=np.float64)
    total = cum[-1]
    target = q * total
    k = int(np.searchsorted(cum, target, side="left"))
    k = min(k, len(counts) - 1)
    before = cum[k - 1] if k > 0 else 0.0
    frac = 0.0 if counts[k] == 0 else (target - before) / counts[k]
    return float(edges[k] + np.clip(frac, 0.0, 1.0) * (edges[k + 1] - edges[k]))


def percentile_range(h: StreamingHistogram, percentile: float = 99.99, *, symmetric: bool = False) -> tuple[float, float]:
    """Two-tailed: the (100-p)th and p-th percentiles. Symmetric: the p-th percentile t of |x|, range [-t, t]."""
    q = percentile / 100.0
    if symmetric:
        folded, w = h.folded()
        t = _quantile(folded, np.arange(len(folded) + 1) * w, q)
        return _clamp(h, -t, t)
    edges = h.edges()
    return _clamp(h, _quantile(h.counts, edges, 1.0 - q), _quantile(h.counts, edges, q))


def _subsample(idx: np.ndarray, n: int) -> np.ndarray:
    if len(idx) <= n:
        return idx
    return np.unique(np.concatenate([idx[np.linspace(0, len(idx) - 1, n).astype(int)], idx[-1:]]))


def mse_range(h: StreamingHistogram, qtype: str = "uint8", *, symmetric: bool = False, candidates: int = 256) -> tuple[float, float]:
    """The clipping range minimising expected squared error: clipped mass (x - edge)^2 plus step^2/12 inside.

    Bin contents sit at bin centres. Every candidate is O(1) through prefix sums of count, count*x and
    count*x^2, so the search over up to ``candidates`` x ``candidates`` (lo, hi) pairs is one numpy expression.
    """
    qmin, qmax = qrange(qtype, symmetric=symmetric)
    steps = float(qmax - qmin)
    if symmetric:
        f, w = h.folded()
        centres = (np.arange(len(f)) + 0.5) * w
        c = f.astype(np.float64)
        # suffix sums from bin j upwards
        s0, s1, s2 = (np.cumsum((c * centres**p)[::-1])[::-1] for p in (0, 1, 2))
        s0, s1, s2 = (np.append(s, 0.0) for s in (s0, s1, s2))
        j = _subsample(np.arange(1, len(f) + 1), candidates * 4)
        t = j * w
        clip = s2[j] - 2 * t * s1[j] + t * t * s0[j]
        inside = c.sum() - s0[j]
        err = clip + inside * (2 * t / steps) ** 2 / 12.0  # step = 2t / (qmax - qmin)
        best = t[int(np.argmin(err))]
        return _clamp(h, -best, best)
    edges = h.edges()
    c = h.counts.astype(np.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    p0, p1, p2 = (np.concatenate([[0.0], np.cumsum(c * centres**p)]) for p in (0, 1, 2))  # prefix over bins < k
    n = len(c)
    zero = int(np.clip(np.searchsorted(edges, 0.0), 0, n))
    lo_idx = _subsample(np.arange(0, zero + 1), candidates)  # edge indices at or below 0
    hi_idx = _subsample(np.arange(zero, n + 1), candidates)  # edge indices at or above 0
    lo_e, hi_e = np.minimum(edges[lo_idx], 0.0), np.maximum(edges[hi_idx], 0.0)
    below = p2[lo_idx] - 2 * lo_e * p1[lo_idx] + lo_e**2 * p0[lo_idx]
    t0, t1, t2 = p0[-1] - p0[hi_idx], p1[-1] - p1[hi_idx], p2[-1] - p2[hi_idx]
    above = t2 - 2 * hi_e * t1 + hi_e**2 * t0
    inside = p0[-1] - p0[lo_idx][:, None] - t0[None, :]
    step = (hi_e[None, :] - lo_e[:, None]) / steps
    err = below[:, None] + above[None, :] + np.maximum(inside, 0.0) * step**2 / 12.0
    a, b = np.unravel_index(int(np.argmin(err)), err.shape)
    return _clamp(h, lo_e[a], hi_e[b])


def entropy_threshold(folded: np.ndarray, levels: int = 128, max_candidates: int = 512) -> int:
    """TensorRT's KL threshold search on a histogram of |x|: the bin count i minimising KL(P_i || Q_i).

    P_i is the first i bins with the mass beyond folded into bin i-1; Q_i quantizes the first i bins
    (without that mass) into ``levels`` groups (bin j in group ``floor(j*levels/i)``) and
    spreads each group's mass evenly over the group's bins where P_i is non-zero. KL is evaluated per group
    through prefix sums, so each candidate costs O(levels), not O(bins), and all candidates (every k-th i
    from ``levels`` to the end) are computed at once.
    """
    f = folded.astype(np.float64)
    n = len(f)
    if n <= levels:
        return n
    stride = max(1, (n - levels) // max_candidates)
    cand = np.unique(np.append(np.arange(levels, n + 1, stride), n))  # (m,)
    cum = np.concatenate([[0.0], np.cumsum(f)])
    nzc = np.concatenate([[0], np.cumsum(f > 0)])
    with np.errstate(divide="ignore", invalid="ignore"):
        flogf = np.where(f > 0, f * np.log(f), 0.0)
    cum_flogf = np.concatenate([[0.0], np.cumsum(flogf)])
    total = cum[-1]
    tail = total - cum[cand]  # mass at or beyond bin i
    g = np.arange(levels + 1)
    bounds = (g[None, :] * cand[:, None] + levels - 1) // levels  # ceil(g*i/levels): bin j is in group floor(j*levels/i)
    gsum = np.diff(cum[bounds], axis=1)  # Q mass per group (without the tail); exactly 0 for a group of empty bins
    gnz = np.diff(nzc[bounds], axis=1).astype(np.float64)  # bins with f > 0 per group
    last = cand - 1
    lastf = f[last]
    # P differs from f only in bin i-1 (the last group's last bin): it gains the tail mass
    p_last = lastf + tail
    gnz[:, -1] += ((lastf == 0) & (p_last > 0)).astype(np.float64)
    psum = gsum.copy()
    psum[:, -1] += tail
    eps = 1e-12
    with np.errstate(divide="ignore", invalid="ignore"):
        # Q value of each non-zero bin of the group (0 where the group has none: its gsum is 0). Only the last
        # group can have non-zero P bins and no Q mass (the tail bin), which gets eps.
        q = gsum / np.maximum(gnz, 1.0)
        q[:, -1] = np.where((gnz[:, -1] > 0) & (q[:, -1] <= 0), eps, q[:, -1])
        logq = np.log(np.where(gnz > 0, q, 1.0))
        # sum of P log P over the first i bins
        plogp = cum_flogf[last] + np.where(p_last > 0, p_last * np.log(np.where(p_last > 0, p_last, 1.0)), 0.0)
        # sum over non-zero P bins of P log Q, group by group
        plogq = np.einsum("ij,ij->i", psum, logq)
        sp = total  # P's mass is all of the histogram
        sq = np.einsum("ij,ij->i", q, gnz)
        kl = (plogp - plogq) / sp - np.log(sp) + np.log(np.maximum(sq, eps))
    return int(cand[int(np.argmin(kl))])


def entropy_range(h: StreamingHistogram, levels: int = 128, *, symmetric: bool = False) -> tuple[float, float]:
    """Threshold t from the KL search on |x|; range [-t, t] intersected with the observed range.

    The first bin (|x| below one bin width) is searched with its neighbour's count. It holds the exact zeros, and
    the quantizer represents 0 exactly, but the search's Q spreads a group's mass evenly over its bins: a spike
    of zeros (60 % of a ReLU output) then costs more KL at every threshold wide enough to share its group, and
    the search picks the narrowest candidate, ``levels`` bins (measured: the VAD's first ReLU clipped at 1.0
    of 14.8, 9.5 % of its values; ROC-AUC 0.98 -> 0.74). NVIDIA's pytorch-quantization entropy calibrator
    replaces that bin the same way."""
    folded, w = h.folded()
    if len(folded) > 1:
        folded = folded.copy()
        folded[0] = folded[1]
    t = entropy_threshold(folded, levels) * w
    return _clamp(h, -t, t)
