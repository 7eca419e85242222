"""Streaming collection: run onnxruntime with the wanted tensors as extra outputs, update one observer per tensor, drop the activations.

Memory holds one run's requested tensors at a time (two while histogram updates overlap the next run, below),
whatever the number of samples. Samples of equal shape may be concatenated into one run (``batch_size``); the
statistics are exact either way, so the ranges do not depend on it.

On the CPU, once the timed first runs show that the observers' updates may take longer than onnxruntime would
lose with one thread fewer (:func:`overlap_may_pay`), the updates of run i move to a worker thread while
onnxruntime computes run i+1 in a session with one intra-op thread fewer, and that schedule is kept if a timed
trial shows it faster (:class:`_Schedule`). Updates still happen one run at a time, in sample order, so the
ranges are the same either way. A NaN found on the worker still names its tensor and sample; by then at most
one later sample has been read.
"""
from __future__ import annotations

import math
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import onnx

from ..errors import CalibrationDataError
from ..runtime import augmented_model, make_session
from ..runtime import pick_providers  # noqa: F401 - re-exported: pipeline.py imports it from here
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


#: runs timed in each schedule before choosing between them
OVERLAP_PROBE_RUNS = 3
#: runs of the session with one thread fewer before its timing starts: on the orientation CNN its runs took
#: 19-24 ms for the first three or four (the new session warming up, beside the worker), then 10.5-12 ms
OVERLAP_WARMUP_RUNS = 4
#: no overlap above this many bytes of model plus requested activations a run: overlapped, two runs'
#: activations are alive at once (the session with every thread is freed before the other is built)
OVERLAP_MAX_BYTES = 256 * 2**20
#: a run (onnxruntime plus updates, in turn) shorter than this is not worth trying the overlap for
OVERLAP_MIN_RUN_S = 0.002
#: the overlap is kept only if it takes at most this share of the time in turn, per byte of activations
OVERLAP_KEEP_BELOW = 0.9


def cpu_count() -> int:
    """Physical cores this process may run on (hyper-threads of one core count once), as onnxruntime counts them
    for its default thread pool; logical CPUs where the topology cannot be read."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1
    cores = set()
    for cpu in allowed:
        try:
            cores.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip())
        except OSError:
            return len(allowed)
    return max(1, len(cores))


def overlap_may_pay(run_s: float, update_s: float, cpus: int) -> bool:
    """Whether moving observer updates of ``update_s`` a run to a worker thread is worth a trial, against running
    them in turn with onnxruntime runs of ``run_s`` on ``cpus`` threads, when onnxruntime then gets ``cpus - 1``.
    Overlapped, a run costs about max(s * run_s, update_s), where s is onnxruntime's slowdown with one thread
    fewer; in turn, run_s + update_s. With linear scaling (s = cpus / (cpus - 1), the worst case) that is a gain
    exactly when update_s > run_s / (cpus - 1). Measured on the 2-core machine: the orientation CNN (updates
    1.4x its runs) gained 20 %; the OCR recognizer (0.8x) did not, since its runs take twice as long on one
    thread. Runs under ``OVERLAP_MIN_RUN_S`` are not worth a second session either (creating it costs tens of
    milliseconds)."""
    return cpus >= 2 and run_s + update_s >= OVERLAP_MIN_RUN_S and update_s > run_s / (cpus - 1)


def _checked_outputs(tensors: list[str], values: list, n: int) -> list[tuple[str, np.ndarray, float, float]]:
    """(name, array, min, max) of each float, non-empty output; NaN or Inf stops the run, naming tensor and sample."""
    out = []
    for name, arr in zip(tensors, values):
        arr = np.asarray(arr)
        if arr.dtype.kind != "f" or arr.size == 0:
            continue
        lo, hi = float(np.min(arr)), float(np.max(arr))  # NaN propagates through min/max
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise CalibrationDataError(f"activation is NaN or Inf on calibration sample {n}",
                                       subject=f"tensor '{name}'", hint="check the calibration data's values")
        out.append((name, arr, lo, hi))
    return out


def _observe(observers: dict[str, "_Observer"], tensors: list[str], values: list, n: int, count: int) -> None:
    """Check run ``n``'s outputs and add them to their observers."""
    for name, arr, lo, hi in _checked_outputs(tensors, values, n):
        observers[name].update(arr, lo, hi, count)


class _Schedule:
    """Where observer updates run: in turn with onnxruntime, or on a worker thread while onnxruntime (one intra-op
    thread fewer) computes the next run. Both are timed for ``OVERLAP_PROBE_RUNS`` runs, in turn after the first
    run and overlapped after ``OVERLAP_WARMUP_RUNS`` more, as time per byte of requested activations (samples
    may differ in size); the overlap is kept when it is below ``OVERLAP_KEEP_BELOW`` of the time in turn.
    Updates run one at a time in sample order either way, so the ranges are the same. ``forced``: overlap after
    the timing in turn, whatever it says, and keep it (tests)."""

    def __init__(self, make: Callable[[int | None], Any], cpus: int, enabled: bool, forced: bool, model_bytes: int):
        self.make, self.cpus, self.forced, self.model_bytes = make, cpus, forced, model_bytes
        self.session = make(None)
        self.stage = "turns" if enabled else "fixed"  # turns -> trial -> fixed
        self.worker: ThreadPoolExecutor | None = None
        self.pending: Future | None = None  # the previous run's updates, on the worker
        self.runs = 0
        self.run_s = self.update_s = 0.0  # in turn: onnxruntime and updates, over the timed runs
        self.turns = [0.0, 0]  # in turn: seconds, bytes
        self.trial = [0.0, 0]  # overlapped: seconds, bytes

    def handle(self, observers, tensors: list[str], values: list, n: int, count: int, t0: float, t1: float,
               nbytes: int) -> None:
        """Observe run ``n`` (``values``, ``nbytes`` bytes, computed from ``t0`` to ``t1``) and move the schedule on."""
        self.runs += 1
        if self.stage == "turns" and nbytes + self.model_bytes > OVERLAP_MAX_BYTES:
            self.stage = "fixed"  # two runs' activations at once would cost too much memory
        if self.worker is None:
            t2 = time.perf_counter()
            _observe(observers, tensors, values, n, count)
            if self.stage == "turns" and self.runs > 1:  # the first run warms onnxruntime up
                t3 = time.perf_counter()
                self.run_s += t1 - t0
                self.update_s += t3 - t2
                self.turns[0] += t3 - t0
                self.turns[1] += nbytes
                if self.runs == 1 + OVERLAP_PROBE_RUNS:
                    self._start_trial()
            return
        if self.pending is not None:
            self.pending.result()  # at most two runs' activations alive; raises the worker's error here
        self.pending = self.worker.submit(_observe, observers, tensors, values, n, count)
        if self.stage == "trial" and self.runs > 1 + OVERLAP_PROBE_RUNS + OVERLAP_WARMUP_RUNS:
            self.trial[0] += time.perf_counter() - t0
            self.trial[1] += nbytes
            if self.runs == 1 + 2 * OVERLAP_PROBE_RUNS + OVERLAP_WARMUP_RUNS:
                turns_rate = self.turns[0] / max(self.turns[1], 1)
                trial_rate = self.trial[0] / max(self.trial[1], 1)
                if not self.forced and trial_rate > OVERLAP_KEEP_BELOW * turns_rate:
                    self.finish()
                    self.session = self.make(None)
                self.stage = "fixed"

    def _start_trial(self) -> None:
        if self.forced or overlap_may_pay(self.run_s / OVERLAP_PROBE_RUNS, self.update_s / OVERLAP_PROBE_RUNS, self.cpus):
            self.session = None  # freed before the next is built: two sessions would add to peak memory
            self.session = self.make(self.cpus - 1)
            self.worker = ThreadPoolExecutor(1, thread_name_prefix="qpass-observers")
            self.stage = "trial"
        else:
            self.stage = "fixed"

    def finish(self) -> None:
        """Wait for the worker's last updates (raising their error) and stop it."""
        if self.worker is not None:
            try:
                if self.pending is not None:
                    self.pending.result()
            finally:
                self.close()

    def close(self) -> None:
        """Stop the worker after its current update, without raising (the run already failed, or finished)."""
        if self.worker is not None:
            self.pending = None
            self.worker.shutdown(wait=True)
            self.worker = None


def collect_ranges(model: onnx.ModelProto, tensors: list[str], samples: Iterable[tuple[dict, Any]], *,
                   methods: dict[str, str] | str = "minmax", options: RangeOptions = RangeOptions(),
                   providers: list[str] | None = None, batch_size: int = 1, specs: list[InputSpec] | None = None,
                   synthetic: bool = False, on_sample: Callable[[], None] | None = None,
                   overlap: bool | None = None, stats: dict | None = None) -> CalibrationTable:
    """The range of each tensor in ``tensors`` over all ``samples``, by each tensor's method.

    ``overlap`` (see :class:`_Schedule`): None times both schedules where they may differ (CPU provider, two or
    more CPUs, some tensor with a histogram, model and a run's activations under ``OVERLAP_MAX_BYTES``); True
    overlaps after the first timed runs whatever the timing (tests); False keeps updates in turn. ``stats``, if
    given, gets ``observer_thread``: whether the updates ended the run on the worker thread."""
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
    augmented = augmented_model(model, tensors)
    observers = {name: _Observer(methods.get(name, "minmax"), options.bins, options.hist_sample, options.hist_full_samples)
                 for name in tensors}
    cpus = cpu_count()
    model_bytes = augmented.ByteSize()
    enabled = (overlap is not False and cpus >= 2 and list(providers or ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
               and any(o.hist is not None for o in observers.values()) and model_bytes < OVERLAP_MAX_BYTES)
    schedule = _Schedule(lambda threads: make_session(augmented, providers, what="calibration model", threads=threads),
                         cpus, enabled, forced=overlap is True, model_bytes=model_bytes)
    n = 0
    try:
        for feed, count in batches(samples, batch_size, batchable(specs) if specs is not None else False):
            t0 = time.perf_counter()
            try:
                values = schedule.session.run(tensors, feed)
            except Exception as exc:  # noqa: BLE001
                raise CalibrationDataError(f"onnxruntime failed on calibration sample {n}: {str(exc).splitlines()[0]}",
                                           subject=f"sample {n}") from None
            t1 = time.perf_counter()
            nbytes = sum(np.asarray(v).nbytes for v in values) if schedule.stage != "fixed" else 0
            schedule.handle(observers, tensors, values, n, count, t0, t1, nbytes)
            del values
            n += count
            if on_sample:
                for _ in range(count):
                    on_sample()
        if stats is not None:
            stats["observer_thread"] = schedule.worker is not None
        schedule.finish()  # waits for the last updates, and raises their error
    finally:
        schedule.close()  # an error of the loop itself is the one reported
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
