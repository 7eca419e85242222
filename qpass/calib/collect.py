"""Streaming collection: run onnxruntime with the wanted tensors as extra outputs, update one observer per tensor, drop the activations.

Memory holds one run's requested tensors at a time, whatever the number of samples. Samples of
equal shape may be concatenated into one run (``batch_size``); the statistics are exact either way,
so the ranges do not depend on it.
"""
from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import onnx

from ..errors import CalibrationDataError, QpassError
from .data import InputSpec
from .histogram import StreamingHistogram, subsample_stride
from .methods import entropy_range, mse_range, percentile_range
from .observers import MinMaxObserver
from .table import CalibrationTable, TensorRange


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


def augmented_model(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph also outputs ``tensors``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    existing = {o.name for o in out.graph.output}
    types = {vi.name: vi for vi in list(out.graph.value_info) + list(out.graph.input)}
    for name in tensors:
        if name in existing:
            continue
        vi = types.get(name)
        if vi is not None:
            out.graph.output.append(vi)
        else:
            out.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return out


def make_session(model: onnx.ModelProto, providers: list[str] | None = None, *, what: str = "model",
                 optimize: bool = True):
    """An onnxruntime session for an in-memory model (through a temporary file when it is over 2 GB)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    providers = providers or ["CPUExecutionProvider"]
    try:
        if model.ByteSize() < 2**31 - 2**26:
            return ort.InferenceSession(model.SerializeToString(), opts, providers=providers)
        with tempfile.TemporaryDirectory(prefix="qpass-session-") as tmp:
            path = Path(tmp) / "model.onnx"
            onnx.save_model(model, str(path), save_as_external_data=True, location="model.data")
            return ort.InferenceSession(str(path), opts, providers=providers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises several unrelated types
        raise QpassError(f"onnxruntime cannot load the {what}: {str(exc).splitlines()[0]}", subject=what) from None


def pick_providers(ep: str) -> tuple[list[str], str | None]:
    """Execution providers for ``ep`` ("cpu" or "cuda"), and a message when CUDA had to fall back."""
    import onnxruntime as ort

    if ep == "cuda":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            return ["CUDAExecutionProvider", "CPUExecutionProvider"], None
        return ["CPUExecutionProvider"], "CUDAExecutionProvider is not available in this onnxruntime; calibrating on the CPU"
    return ["CPUExecutionProvider"], None


def batchable(specs: list[InputSpec]) -> bool:
    """Samples can be concatenated when every input has a dynamic first (batch) axis."""
    return bool(specs) and all(s.rank >= 1 and not isinstance(s.shape[0], int) for s in specs)


def batches(samples: Iterable[tuple[dict, Any]], size: int, can_batch: bool) -> Iterator[tuple[dict, int]]:
    """Consecutive samples of equal shapes concatenated on axis 0, at most ``size`` per batch."""
    if size <= 1 or not can_batch:
        for feed, _ in samples:
            yield feed, 1
        return
    pending: list[dict] = []

    def flush() -> tuple[dict, int]:
        feed = {k: np.concatenate([p[k] for p in pending], axis=0) for k in pending[0]}
        return feed, len(pending)

    for feed, _ in samples:
        if pending and (len(pending) >= size or any(feed[k].shape != pending[0][k].shape for k in feed)):
            yield flush()
            pending = []
        pending.append(feed)
    if pending:
        yield flush()


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


class _Observer:
    """A min-max observer, plus a histogram when the tensor's method needs one."""

    def __init__(self, method: str, bins: int, hist_sample: int = 0, full_samples: int = 64):
        self.method = method
        self.minmax = MinMaxObserver()
        self.hist = StreamingHistogram(bins) if method != "minmax" else None
        self.hist_sample = hist_sample
        self.late_cap = max(1, hist_sample // LATE_CAP_DIVISOR) if hist_sample > 0 else 0
        self.full_samples = full_samples
        self.samples = 0  # samples seen so far

    def update(self, x: np.ndarray, lo: float, hi: float, samples: int = 1) -> None:
        """Add a batch of ``samples`` samples whose min and max the caller already computed (one pass saved).

        The histogram counts every ``stride``-th value of each sample's slice (all of them for a tensor of at
        most ``hist_sample`` values); from the tensor's ``full_samples``-th sample on, the cap is
        ``hist_sample / LATE_CAP_DIVISOR``. The walk of sample ``i`` starts at position ``i mod stride``, so
        over the samples every position is counted equally often: a value that sits at one position in every
        sample (a transformer's outlier feature at its first token) is neither always missed nor always
        counted ``stride`` times. Stride and start depend on the sample's shape and index alone, so the
        counts do not depend on how samples were batched."""
        self.minmax.update(x, lo, hi)
        first = self.samples
        self.samples += samples
        if self.hist is None:
            return
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

    def range(self, opt: RangeOptions) -> tuple[float, float]:
        if self.hist is None or self.hist.count == 0:
            return self.minmax.range()
        if self.method == "percentile":
            return percentile_range(self.hist, opt.percentile, symmetric=opt.symmetric)
        if self.method == "mse":
            return mse_range(self.hist, opt.qtype, symmetric=opt.symmetric)
        if self.method == "entropy":
            return entropy_range(self.hist, kl_levels(opt, self.hist.min, self.hist.max), symmetric=opt.symmetric)
        raise ValueError(f"unknown calibration method {self.method!r}")


def collect_ranges(model: onnx.ModelProto, tensors: list[str], samples: Iterable[tuple[dict, Any]], *,
                   methods: dict[str, str] | str = "minmax", options: RangeOptions = RangeOptions(),
                   providers: list[str] | None = None, batch_size: int = 1, specs: list[InputSpec] | None = None,
                   synthetic: bool = False, on_sample: Callable[[], None] | None = None) -> CalibrationTable:
    """The range of each tensor in ``tensors`` over all ``samples``, by each tensor's method."""
    if not tensors:
        # nothing to observe, but the data is still checked (names, dtypes, shapes, finite values: the source's
        # iterator does it) and counted, as it would be if one tensor needed a range
        n = 0
        for _feed, count in batches(samples, 1, False):
            n += count
            if on_sample:
                on_sample()
        if n == 0:
            raise CalibrationDataError("no calibration samples", subject="calibration data",
                                       hint="give at least one sample (and more than one when validating on a held-out split)")
        return CalibrationTable({}, samples=n, synthetic=synthetic)
    if isinstance(methods, str):
        methods = {t: methods for t in tensors}
    session = make_session(augmented_model(model, tensors), providers, what="calibration model")
    observers = {name: _Observer(methods.get(name, "minmax"), options.bins, options.hist_sample, options.hist_full_samples)
                 for name in tensors}
    n = 0
    for feed, count in batches(samples, batch_size, batchable(specs) if specs is not None else False):
        try:
            values = session.run(tensors, feed)
        except Exception as exc:  # noqa: BLE001
            raise CalibrationDataError(f"onnxruntime failed on calibration sample {n}: {str(exc).splitlines()[0]}",
                                       subject=f"sample {n}") from None
        for name, arr in zip(tensors, values):
            arr = np.asarray(arr)
            if arr.dtype.kind != "f":
                continue
            if arr.size == 0:
                continue
            lo, hi = float(np.min(arr)), float(np.max(arr))  # NaN propagates through min/max
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise CalibrationDataError(f"activation is NaN or Inf on calibration sample {n}",
                                           subject=f"tensor '{name}'", hint="check the calibration data's values")
            observers[name].update(arr, lo, hi, count)
        del values
        n += count
        if on_sample:
            for _ in range(count):
                on_sample()
    if n == 0:
        raise CalibrationDataError("no calibration samples", subject="calibration data",
                                   hint="give at least one sample (and more than one when validating on a held-out split)")
    ranges = {}
    for name, obs in observers.items():
        if not obs.minmax.seen:
            continue
        lo, hi = obs.range(options)
        ranges[name] = TensorRange(lo, hi, obs.method, n, obs.minmax.min, obs.minmax.max)
    return CalibrationTable(ranges, samples=n, synthetic=synthetic)
