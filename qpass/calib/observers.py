"""Observers accumulate one per-tensor statistic, a batch at a time; :mod:`qpass.qparams` turns ranges into scales.

Every observer follows :class:`Observer`: ``update`` one batch at a time (its memory does not grow with the
number of samples), ``merge`` two observers of disjoint data, ``result`` the statistic (None before any data),
whose kind (``stat``) is its key in a :class:`~qpass.calib.stats.Statistics` table. The collection loop
(:func:`qpass.calib.collect.collect_ranges`) creates them by name through :func:`make_observer`, so a new one
is a class registered with :func:`register_observer` and nothing else changes.

Range observers (kind ``"range"``, a :class:`~qpass.calib.stats.TensorRange`): ``minmax``, and ``percentile``,
``mse`` and ``entropy``, which clip a streaming histogram (:mod:`.histogram`, :mod:`.methods`). Array
statistics: ``gram`` (sum of ``x^T x`` over rows, for GPTQ), ``absmean`` (mean ``|x|`` per channel, for
activation-aware scaling), and ``mean_axis1`` / ``mean_last`` (mean ``x`` per channel of axis 1 / of the last axis,
for empirical bias correction), ``chanrange`` (min and max per channel) and ``rows`` (a uniform sample of rows),
for SmoothQuant.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, ClassVar, Protocol, runtime_checkable

import numpy as np

from .histogram import StreamingHistogram, subsample_stride
from .methods import entropy_range, mse_range, percentile_range
from .stats import RANGE, AbsMean, ChannelMean, ChannelRange, Gram, RowSample, TensorRange


@dataclass(frozen=True)
class RangeOptions:
    """What turns an observer into a range: the method's knobs and the target integer type."""

    percentile: float = 99.99
    bins: int = 2048
    kl_levels: int = 128
    qtype: str = "uint8"
    symmetric: bool = False
    hist_sample: int = 65536  # values per sample and tensor the histogram counts, at most (0: all)
    hist_full_samples: int = 64  # samples of a tensor counted under hist_sample; later ones: a LATE_CAP_DIVISOR-th


#: After ``hist_full_samples`` samples a tensor's histogram already holds up to 64 x hist_sample values (4M by
#: default); each later sample adds an eighth of that cap, so histogram cost stops growing like min-max's.
LATE_CAP_DIVISOR = 8


def kl_levels(opt: RangeOptions, lo: float, hi: float) -> int:
    """Levels the entropy search quantizes |x| in [0, t] into. ``kl_levels`` is the magnitude count of a signed
    8-bit grid (128); a 16-bit grid has 256 times as many (more than the histogram's bins, so the search keeps
    the whole range: at that resolution no threshold loses less). An asymmetric unsigned grid spends all of its
    levels on [min(lo, 0), t], so a tensor that is mostly positive gets up to twice as many on [0, t] (uint8, a
    ReLU output: 255; the same for a tensor with no positive value)."""
    levels = opt.kl_levels * (256 if opt.qtype.endswith("16") else 1)
    span = max(hi, 0.0) - min(lo, 0.0)
    if opt.symmetric or not opt.qtype.startswith("uint") or span <= 0:
        return levels
    share = max(hi, -lo) / span  # of the unsigned grid's span, the part on the side of |x|'s largest value
    return int(min(2 * levels - 1, max(levels, round((2 * levels - 1) * share))))


# ---------------------------------------------------------------------------------------------- protocol
@runtime_checkable
class Observer(Protocol):
    """One statistic of one tensor, accumulated a batch at a time."""

    #: the name it is registered under (a range's ``method``)
    method: str
    #: the kind of statistic ``result`` returns: its key in a Statistics table ("range", "gram", ...)
    stat: str
    #: whether an update costs more than the min/max pass the loop makes anyway (the loop may then time moving
    #: updates to a worker thread beside onnxruntime)
    costly: bool

    def update(self, x: np.ndarray, lo: float | None = None, hi: float | None = None, *, samples: int = 1) -> None:
        """Add a batch of ``samples`` samples concatenated on axis 0 (a batch with no such axis: one sample).
        ``lo``/``hi``: its min and max, where the caller already computed them. An empty batch adds nothing."""

    def merge(self, other: Any) -> Any:
        """A new observer (neither input changes) of both inputs' data."""

    def result(self) -> Any | None:
        """The statistic over every batch so far; None before the first."""


#: observer name -> factory (an observer class, called with the run's :class:`RangeOptions`)
OBSERVERS: dict[str, Callable[[RangeOptions], Observer]] = {}


def register_observer(name: str) -> Callable[[Any], Any]:
    """Class (or factory) decorator: :func:`make_observer` creates it for ``name``."""

    def register(factory):
        if name in OBSERVERS and OBSERVERS[name] is not factory:
            raise ValueError(f"observer {name!r} is already registered")
        OBSERVERS[name] = factory
        return factory

    return register


def make_observer(name: str, options: RangeOptions | None = None) -> Observer:
    """A new observer for ``name`` (a range method, or a statistic such as ``"gram"``)."""
    factory = OBSERVERS.get(name)
    if factory is None:
        raise ValueError(f"unknown calibration observer {name!r} (known: {', '.join(sorted(OBSERVERS))})")
    return factory(options if options is not None else RangeOptions())


def observer_names() -> tuple[str, ...]:
    return tuple(OBSERVERS)


# ---------------------------------------------------------------------------------------------- ranges
@register_observer("minmax")
class MinMaxObserver:
    """Running min and max; memory is O(1) whatever the number or shape of the batches."""

    method = "minmax"
    stat = RANGE
    costly = False

    def __init__(self, options: RangeOptions | None = None) -> None:
        self.min = np.inf
        self.max = -np.inf
        self.count = 0  # batches
        self.samples = 0

    def update(self, x: np.ndarray, lo: float | None = None, hi: float | None = None, *, samples: int = 1) -> None:
        """Add a batch. ``lo``/``hi`` may pass its min/max when the caller already computed them."""
        if x.size == 0:
            return
        self.min = min(self.min, float(np.min(x)) if lo is None else lo)
        self.max = max(self.max, float(np.max(x)) if hi is None else hi)
        self.count += 1
        self.samples += samples

    def merge(self, other: "MinMaxObserver") -> "MinMaxObserver":
        out = MinMaxObserver()
        out.min, out.max, out.count = min(self.min, other.min), max(self.max, other.max), self.count + other.count
        out.samples = self.samples + other.samples
        return out

    @property
    def seen(self) -> bool:
        return self.count > 0

    def range(self) -> tuple[float, float]:
        return self.min, self.max

    def result(self) -> TensorRange | None:
        if not self.seen:
            return None
        return TensorRange(self.min, self.max, self.method, self.samples, self.min, self.max)


class HistogramObserver:
    """Min and max, and a streaming histogram of the values that a subclass's ``clip`` turns into a range."""

    method: ClassVar[str]
    stat = RANGE
    costly = True

    def __init__(self, options: RangeOptions | None = None):
        opt = options if options is not None else RangeOptions()
        self.options = opt
        self.minmax = MinMaxObserver()
        self.hist = StreamingHistogram(opt.bins)
        self.hist_sample = opt.hist_sample
        self.late_cap = max(1, opt.hist_sample // LATE_CAP_DIVISOR) if opt.hist_sample > 0 else 0
        self.full_samples = opt.hist_full_samples
        self.samples = 0  # samples seen so far

    def update(self, x: np.ndarray, lo: float | None = None, hi: float | None = None, *, samples: int = 1) -> None:
        """Add a batch of ``samples`` samples (``lo``/``hi``: its min and max, when the caller has them).

        The histogram counts every ``stride``-th value of each sample's slice (all of them for a tensor of at
        most ``hist_sample`` values); from the tensor's ``full_samples``-th sample on, the cap is
        ``hist_sample / LATE_CAP_DIVISOR``. The walk of sample ``i`` starts at position ``i mod stride``, so
        over the samples every position is counted equally often: a value that sits at one position in every
        sample (a transformer's outlier feature at its first token) is neither always missed nor always
        counted ``stride`` times. Stride and start depend on the sample's shape and index alone, so the
        counts do not depend on how samples were batched."""
        if x.size == 0:
            return
        lo = float(np.min(x)) if lo is None else lo
        hi = float(np.max(x)) if hi is None else hi
        self.minmax.update(x, lo, hi)
        first = self.samples
        self.samples += samples
        if samples == 1 or not x.ndim or x.shape[0] % samples:
            # one sample, or no per-sample axis: the batch is one row, under the cap of its first sample
            cap = self.hist_sample if first < self.full_samples else self.late_cap
            self.hist.update(x, lo, hi, rows=1, stride=subsample_stride(x.shape, cap), offset=first)
            return
        per = x.shape[0] // samples
        row_shape = (per,) + x.shape[1:]
        full = min(samples, max(0, self.full_samples - first))  # rows still under the full cap
        for start, stop, cap in ((0, full, self.hist_sample), (full, samples, self.late_cap)):
            if start == stop:
                continue
            stride = subsample_stride(row_shape, cap)
            if stride == 1:
                self.hist.update(x[start * per: stop * per], lo, hi, rows=stop - start)
                continue
            for i in range(start, stop):  # each sample's walk starts at its own offset
                self.hist.update(x[i * per: (i + 1) * per], lo, hi, rows=1, stride=stride, offset=first + i)

    def merge(self, other: "HistogramObserver") -> "HistogramObserver":
        """Both observers' counts on one grid. The same as one observer of both when neither subsampled: the
        other's subsampling walks started as though its samples were the first."""
        if type(other) is not type(self) or other.options != self.options:
            raise ValueError("cannot merge histogram observers of different methods or options")
        out = type(self)(self.options)
        out.minmax, out.hist = self.minmax.merge(other.minmax), self.hist.merge(other.hist)
        out.samples = self.samples + other.samples
        return out

    def clip(self) -> tuple[float, float]:
        """The range the method keeps, from the histogram (which has counts)."""
        raise NotImplementedError

    def range(self) -> tuple[float, float]:
        if self.hist.count == 0:
            return self.minmax.range()
        return self.clip()

    def result(self) -> TensorRange | None:
        if not self.minmax.seen:
            return None
        lo, hi = self.range()
        return TensorRange(lo, hi, self.method, self.samples, self.minmax.min, self.minmax.max)


@register_observer("percentile")
class PercentileObserver(HistogramObserver):
    """Percentile clipping; its range also carries the MSE range of the same histogram (``alternatives``), so the
    ``auto`` method's choice (:mod:`qpass.search.range_choice`) needs no second calibration."""

    method = "percentile"

    def clip(self) -> tuple[float, float]:
        return percentile_range(self.hist, self.options.percentile, symmetric=self.options.symmetric)

    def result(self) -> TensorRange | None:
        r = super().result()
        if r is None or self.hist.count == 0:
            return r
        lo, hi = mse_range(self.hist, self.options.qtype, symmetric=self.options.symmetric)
        return replace(r, alternatives=(("mse", lo, hi),))


@register_observer("mse")
class MSEObserver(HistogramObserver):
    method = "mse"

    def clip(self) -> tuple[float, float]:
        return mse_range(self.hist, self.options.qtype, symmetric=self.options.symmetric)


@register_observer("entropy")
class EntropyObserver(HistogramObserver):
    method = "entropy"

    def clip(self) -> tuple[float, float]:
        opt = self.options
        return entropy_range(self.hist, kl_levels(opt, self.hist.min, self.hist.max), symmetric=opt.symmetric)


# ---------------------------------------------------------------------------------------------- arrays
def _rows(x: np.ndarray) -> np.ndarray:
    """``x`` as float64 rows of its last axis, ``[rows, K]`` (a 0-d value: one row of one)."""
    x = np.asarray(x)
    return x.reshape(-1, x.shape[-1] if x.ndim else 1).astype(np.float64, copy=False)


@register_observer("gram")
class GramObserver:
    """Sum of ``x^T x`` over the rows of the batches reshaped to ``[rows, K]`` (K: the last axis), in float64,
    and the row count. Memory: one K x K matrix. Sums are float64, so another batching of the same rows gives
    the same matrix up to float64 rounding (exactly, where the sums are exact)."""

    method = stat = "gram"
    costly = True

    def __init__(self, options: RangeOptions | None = None) -> None:
        self.matrix: np.ndarray | None = None
        self.rows = 0

    def update(self, x: np.ndarray, lo: float | None = None, hi: float | None = None, *, samples: int = 1) -> None:
        if np.size(x) == 0:
            return
        r = _rows(x)
        g = r.T @ r
        if self.matrix is None:
            self.matrix = g
        elif self.matrix.shape != g.shape:
            raise ValueError(f"gram: the last axis has {g.shape[0]} values, earlier batches had {self.matrix.shape[0]}")
        else:
            self.matrix += g
        self.rows += r.shape[0]

    def merge(self, other: "GramObserver") -> "GramObserver":
        out = GramObserver()
        for obs in (self, other):
            if obs.matrix is not None:
                if out.matrix is not None and out.matrix.shape != obs.matrix.shape:
                    raise ValueError(f"gram: cannot merge {out.matrix.shape[0]} channels with {obs.matrix.shape[0]}")
                out.matrix = obs.matrix.copy() if out.matrix is None else out.matrix + obs.matrix
            out.rows += obs.rows
        return out

    def result(self) -> Gram | None:
        return None if self.matrix is None else Gram(self.matrix.copy(), self.rows)


class _ChannelMeanObserver:
    """Mean ``values(x)`` (``x`` itself here) per channel of ``axis`` (over every other position of every batch), in
    float64, and the count of values per channel. Memory: one sum per channel."""

    method = "mean"
    stat = "mean"
    costly = False
    axis = -1
    result_type: type = ChannelMean

    @staticmethod
    def values(x: np.ndarray) -> np.ndarray:
        return x

    def __init__(self, options: RangeOptions | None = None) -> None:
        self.sum: np.ndarray | None = None
        self.count = 0

    def update(self, x: np.ndarray, lo: float | None = None, hi: float | None = None, *, samples: int = 1) -> None:
        if np.size(x) == 0:
            return
        x = np.asarray(x)
        if x.ndim < 2:
            x = x.reshape(1, -1)
        c = np.moveaxis(x, self.axis, -1)
        s = self.values(c.reshape(-1, c.shape[-1])).sum(axis=0, dtype=np.float64)
        if self.sum is None:
            self.sum = s
        elif self.sum.shape != s.shape:
            raise ValueError(f"{self.method}: {s.shape[0]} channels on the {'last axis' if self.axis == -1 else f'axis {self.axis}'}, "
                             f"earlier batches had {self.sum.shape[0]}")
        else:
            self.sum += s
        self.count += x.size // s.shape[0]

    def merge(self, other: "_ChannelMeanObserver") -> "_ChannelMeanObserver":
        out = type(self)()
        for obs in (self, other):
            if obs.sum is not None:
                if out.sum is not None and out.sum.shape != obs.sum.shape:
                    raise ValueError(f"{self.method}: cannot merge {out.sum.shape[0]} channels with {obs.sum.shape[0]}")
                out.sum = obs.sum.copy() if out.sum is None else out.sum + obs.sum
            out.count += obs.count
        return out

    def result(self) -> ChannelMean | AbsMean | None:
        return None if self.sum is None else self.result_type(self.sum / self.count, self.count)


@register_observer("absmean")
class AbsMeanObserver(_ChannelMeanObserver):
    """Mean ``|x|`` per channel of the last axis (activation-aware scaling)."""

    method = stat = "absmean"
    result_type = AbsMean
    values = staticmethod(np.abs)


@register_observer("mean_axis1")
class ChannelMeanAxis1Observer(_ChannelMeanObserver):
    """Per-channel mean along axis 1 (a Conv's or Gemm's output channels, N C ... layout)."""

    method = "mean_axis1"
    axis = 1


@register_observer("mean_last")
class ChannelMeanLastObserver(_ChannelMeanObserver):
    """Per-channel mean along the last axis (a MatMul's output features)."""

    method = "mean_last"
    axis = -1


@register_observer("chanrange")
class ChannelRangeObserver:
    """Min and max per channel of the last axis, in float64. Memory: two values per channel."""

    method = stat = "chanrange"
    costly = False

    def __init__(self, options: RangeOptions | None = None) -> None:
        self.min: np.ndarray | None = None
        self.max: np.ndarray | None = None
        self.count = 0

    def update(self, x: np.ndarray, lo: float | None = None, hi: float | None = None, *, samples: int = 1) -> None:
        if np.size(x) == 0:
            return
        x = np.asarray(x)
        r = x.reshape(-1, x.shape[-1] if x.ndim else 1)
        mn, mx = r.min(axis=0).astype(np.float64), r.max(axis=0).astype(np.float64)
        if self.min is None:
            self.min, self.max = mn, mx
        elif self.min.shape != mn.shape:
            raise ValueError(f"chanrange: the last axis has {mn.shape[0]} values, earlier batches had {self.min.shape[0]}")
        else:
            self.min, self.max = np.minimum(self.min, mn), np.maximum(self.max, mx)
        self.count += r.shape[0]

    def merge(self, other: "ChannelRangeObserver") -> "ChannelRangeObserver":
        out = ChannelRangeObserver()
        for obs in (self, other):
            if obs.min is not None:
                if out.min is not None and out.min.shape != obs.min.shape:
                    raise ValueError(f"chanrange: cannot merge {out.min.shape[0]} channels with {obs.min.shape[0]}")
                out.min = obs.min.copy() if out.min is None else np.minimum(out.min, obs.min)
                out.max = obs.max.copy() if out.max is None else np.maximum(out.max, obs.max)
            out.count += obs.count
        return out

    def result(self) -> ChannelRange | None:
        return None if self.min is None else ChannelRange(self.min.copy(), self.max.copy(), self.count)


#: rows a :class:`RowSampleObserver` keeps
ROW_SAMPLE = 512


@register_observer("rows")
class RowSampleObserver:
    """A uniform sample of ``ROW_SAMPLE`` rows of the batches reshaped to ``[rows, K]`` (reservoir sampling with a
    fixed seed, so a run is reproducible; row ``t`` replaces a kept row with probability ``ROW_SAMPLE / (t + 1)``).
    Memory: ``ROW_SAMPLE x K`` float32 values."""

    method = stat = "rows"
    costly = False

    def __init__(self, options: RangeOptions | None = None, cap: int = ROW_SAMPLE) -> None:
        self.cap = cap
        self.rows: np.ndarray | None = None
        self.seen = 0
        self.rng = np.random.default_rng(0)

    def update(self, x: np.ndarray, lo: float | None = None, hi: float | None = None, *, samples: int = 1) -> None:
        if np.size(x) == 0:
            return
        x = np.asarray(x)
        r = x.reshape(-1, x.shape[-1] if x.ndim else 1).astype(np.float32)
        if self.rows is None:
            self.rows = np.empty((0, r.shape[1]), dtype=np.float32)
        elif self.rows.shape[1] != r.shape[1]:
            raise ValueError(f"rows: the last axis has {r.shape[1]} values, earlier batches had {self.rows.shape[1]}")
        fill = min(r.shape[0], self.cap - self.rows.shape[0])
        if fill > 0:
            self.rows = np.concatenate([self.rows, r[:fill]])
        rest = r[fill:]
        if rest.shape[0]:
            index = self.seen + fill + np.arange(rest.shape[0])  # each row's place in the stream (0-based)
            slot = self.rng.integers(0, index + 1)
            for i in np.flatnonzero(slot < self.cap):  # in stream order: a later row wins a slot
                self.rows[slot[i]] = rest[i]
        self.seen += r.shape[0]

    def merge(self, other: "RowSampleObserver") -> "RowSampleObserver":
        """A sample of both: each side's rows in proportion to the rows it saw (the first ones of each)."""
        out = RowSampleObserver(cap=self.cap)
        parts = [o for o in (self, other) if o.rows is not None]
        out.seen = self.seen + other.seen
        if parts:
            share = [round(self.cap * o.seen / out.seen) for o in parts]
            out.rows = np.concatenate([o.rows[:n] for o, n in zip(parts, share)])[:self.cap]
        return out

    def result(self) -> RowSample | None:
        return None if self.rows is None else RowSample(self.rows.copy(), self.seen)
