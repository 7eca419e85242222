"""Streaming collection: run onnxruntime with the wanted tensors as extra outputs, update each tensor's observers, drop the activations.

Memory holds one run's requested tensors at a time (two while histogram updates overlap the next run, below),
whatever the number of samples. Samples of equal shape may be concatenated into one run (``batch_size``); the
range statistics are exact either way, so the ranges do not depend on it (float64 sums, such as a Gram matrix,
only to rounding).

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
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx

from ..errors import CalibrationDataError
from ..io import model_bytes
from ..runtime import extra_outputs, make_session
from .data import InputSpec
from .observers import Observer, RangeOptions, make_observer
from .subgraphs import BranchValues, has_bodies
from .stats import RANGE, Statistics
from .table import CalibrationTable


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


def _observe(observers: dict[str, list[Observer]], tensors: list[str], values: list, n: int, count: int) -> None:
    """Check run ``n``'s outputs (``count`` samples) and add them to their observers."""
    for name, arr, lo, hi in _checked_outputs(tensors, values, n):
        for obs in observers[name]:
            obs.update(arr, lo, hi, samples=count)


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
                   overlap: bool | None = None, stats: dict | None = None,
                   extra: Mapping[str, Sequence[str]] | None = None,
                   tensor_options: Mapping[str, RangeOptions] | None = None) -> CalibrationTable:
    """The range of each tensor in ``tensors`` over all ``samples``, by each tensor's method.

    Each statistic is an :class:`~qpass.calib.observers.Observer` that :func:`make_observer` creates by name: a
    tensor's method (``methods``; default min-max), and whatever ``extra`` names for it: tensor name -> observer
    names such as ``("gram", "absmean")``, for tensors in ``tensors`` or not (those get no range). Their results
    go to the returned table's ``statistics`` under their kinds (``table.statistics.get("x", "gram")``).

    ``overlap`` (see :class:`_Schedule`): None times both schedules where they may differ (CPU provider, two or
    more CPUs, some observer whose updates are ``costly`` (a histogram, a Gram matrix), model and a run's
    activations under ``OVERLAP_MAX_BYTES``); True overlaps after the first timed runs whatever the timing
    (tests); False keeps updates in turn. ``stats``, if given, gets ``observer_thread``: whether the updates
    ended the run on the worker thread. ``tensor_options`` replaces ``options`` for the tensors it names (a
    tensor quantized to another integer type than the rest: its clipping search works on its own grid)."""
    known = set(tensors)
    run = list(tensors) + [name for name in (extra or {}) if name not in known]  # the outputs each run fetches
    if not run:
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
    # tensors inside If branches and Loop/Scan bodies: the main run fetches what their models need (calib.subgraphs)
    branches = BranchValues(model, run, lambda m, where: make_session(
        m, providers, what=f"calibration model of If branch '{where}'")) if has_bodies(model) else None
    if branches is not None and not branches.needed:
        branches = None
    fetch = run if branches is None else branches.fetch
    # the extra outputs are added to the model itself for the run (no copy of its weights) and removed after
    with extra_outputs(model, fetch) as augmented:
        observers = _make_observers(tensors, methods, extra or {}, options, tensor_options or {})
        cpus = cpu_count()
        size = model_bytes(augmented)  # from tensor shapes: serialising fails over 2 GB
        enabled = (overlap is not False and cpus >= 2 and list(providers or ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
                   and any(o.costly for obs in observers.values() for o in obs) and size < OVERLAP_MAX_BYTES)
        schedule = _Schedule(lambda threads: make_session(augmented, providers, what="calibration model", threads=threads),
                             cpus, enabled, forced=overlap is True, model_bytes=size)
        n = 0
        try:
            for feed, count in batches(samples, batch_size, batchable(specs) if specs is not None else False):
                t0 = time.perf_counter()
                try:
                    values = schedule.session.run(fetch, feed)
                except Exception as exc:  # noqa: BLE001
                    raise CalibrationDataError(f"onnxruntime failed on calibration sample {n}: {str(exc).splitlines()[0]}",
                                               subject=f"sample {n}") from None
                names = run
                if branches is not None:  # the main run's values, then each body run's (one per Loop/Scan iteration)
                    got = {**feed, **dict(zip(fetch, values))}
                    inner = branches.expand(got)
                    pairs = [(name, got[name]) for name in run if name in got]
                    pairs += [(name, v) for name in run for v in inner.get(name, ())]
                    names, values = [p[0] for p in pairs], [p[1] for p in pairs]
                t1 = time.perf_counter()
                nbytes = sum(np.asarray(v).nbytes for v in values) if schedule.stage != "fixed" else 0
                schedule.handle(observers, names, values, n, count, t0, t1, nbytes)
                del values
                n += count
                if on_sample:
                    for _ in range(count):
                        on_sample()
            if stats is not None:
                stats["observer_thread"] = schedule.worker is not None
                if branches is not None:
                    stats["branches_not_taken"] = branches.not_taken()
                    stats["unreachable"] = branches.unreachable()
            schedule.finish()  # waits for the last updates, and raises their error
        finally:
            schedule.close()  # an error of the loop itself is the one reported
    if n == 0:
        raise CalibrationDataError("no calibration samples", subject="calibration data",
                                   hint="give at least one sample (and more than one when validating on a held-out split)")
    table = Statistics(samples=n, synthetic=synthetic)
    for name, obs_list in observers.items():
        for obs in obs_list:
            value = obs.result()
            if value is None:  # never a float, non-empty value
                continue
            if obs.stat == RANGE:  # the run's sample count, as tables always said (also where some were empty)
                value = replace(value, samples=n)
            table.set(name, obs.stat, value)
    return CalibrationTable(statistics=table)


def _make_observers(tensors: list[str], methods: Mapping[str, str], extra: Mapping[str, Sequence[str]],
                    options: RangeOptions, tensor_options: Mapping[str, RangeOptions]) -> dict[str, list[Observer]]:
    """Tensor name -> its observers: its range method's (tensors in ``tensors``), then ``extra``'s."""
    observers: dict[str, list[Observer]] = {
        name: [make_observer(methods.get(name, "minmax"), tensor_options.get(name, options))] for name in tensors}
    for name, names in extra.items():
        obs = observers.setdefault(name, [])
        for what in ((names,) if isinstance(names, str) else names):
            new = make_observer(what, options)
            if any(o.stat == new.stat for o in obs):
                raise ValueError(f"tensor {name!r}: two observers of statistic {new.stat!r} ({what!r})")
            obs.append(new)
    return observers
