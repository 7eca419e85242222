"""Where the precision search's trials run: in this process, in a local process pool, or as Ray tasks.

An executor maps ``fn(*common, item)`` over ``items`` and returns the results in order. ``common`` holds the stage
artifacts every trial of a search reads (prepared model, configuration, calibration table, reference, samples):
the process pool pickles them with each task; the Ray executor puts each of them in the object store once (the
first time it sees the object) and hands the tasks references, so a later step ships only the new moves.
"""
from __future__ import annotations

import importlib.util
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Protocol, Sequence

from ..errors import DependencyError


class TrialExecutor(Protocol):
    """What the search needs of an executor."""

    workers: int
    kind: str

    def map(self, fn: Callable, common: tuple, items: Sequence) -> list: ...

    def close(self) -> None: ...


class InProcess:
    """Trials one after another in this process."""

    kind = "in-process"
    workers = 1

    def map(self, fn: Callable, common: tuple, items: Sequence) -> list:
        return [fn(*common, item) for item in items]

    def close(self) -> None:
        pass


class ProcessPool:
    """Trials in a spawn ``ProcessPoolExecutor`` of ``workers`` processes, started at the first map of more than
    one item (a single trial runs in this process)."""

    kind = "process-pool"

    def __init__(self, workers: int):
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None

    def map(self, fn: Callable, common: tuple, items: Sequence) -> list:
        if len(items) < 2 or self.workers < 2:
            return [fn(*common, item) for item in items]
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        return list(self._pool.map(_call, [fn] * len(items), [common] * len(items), items))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


def _call(fn: Callable, common: tuple, item: Any):
    return fn(*common, item)


def ray_available() -> bool:
    return importlib.util.find_spec("ray") is not None


def require_ray(what: str = "--ray") -> None:
    """Raise :class:`DependencyError` (exit 2) when Ray is not installed."""
    if not ray_available():
        raise DependencyError("Ray is not installed", subject=what,
                              hint="pip install 'qpass[ray]' (or pip install ray), or run without --ray")


class RayTrials:
    """Trials as Ray tasks (one CPU each). ``address``: a Ray cluster to connect to ("auto": the one this machine
    belongs to; "ray://host:port": a Ray client), or "local" / None to start a local runtime (``num_cpus`` CPUs).
    When Ray is already initialised in this process (a caller's cluster), it is used as it is. A runtime this
    executor started is shut down by :meth:`close`."""

    kind = "ray"

    def __init__(self, address: str | None = "local", *, num_cpus: int | None = None):
        require_ray("ray executor" if address in (None, "local") else f"--ray {address}")
        import ray

        self._ray = ray
        self.address = address
        self._started = False
        if not ray.is_initialized():
            kw: dict[str, Any] = {"ignore_reinit_error": True, "include_dashboard": False, "log_to_driver": False}
            if address in (None, "local"):
                kw["num_cpus"] = num_cpus
            else:
                kw["address"] = address
            try:
                ray.init(**kw)
            except Exception as exc:  # noqa: BLE001 - ray raises ConnectionError, RuntimeError, ...
                raise DependencyError(f"cannot start or reach Ray: {str(exc).splitlines()[0] if str(exc) else exc!r}",
                                      subject=f"--ray {address}", hint="check the address (ray status on the head "
                                      "node), or use local to start a runtime on this machine") from None
            self._started = True
        self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._remote = ray.remote(num_cpus=1)(_call_with)
        self._refs: dict[int, tuple[Any, Any]] = {}  # id(object) -> (object, ObjectRef): each put once

    def _ref(self, obj: Any):
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        key = id(obj)
        if key not in self._refs:  # the object is held with its reference, so its id is not reused
            self._refs[key] = (obj, self._ray.put(obj))
        return self._refs[key][1]

    @property
    def puts(self) -> int:
        """Objects put in the object store so far (each common artifact once)."""
        return len(self._refs)

    def map(self, fn: Callable, common: tuple, items: Sequence) -> list:
        refs = [self._ref(c) for c in common]
        return self._ray.get([self._remote.remote(fn, len(refs), *refs, item) for item in items])

    def close(self) -> None:
        self._refs.clear()
        if self._started:
            self._ray.shutdown()
            self._started = False


def _call_with(fn: Callable, n: int, *args):
    """A Ray task: Ray resolves the object references among ``args`` (the ``n`` common artifacts, then the item)."""
    return fn(*args[:n], args[n])


def for_config(config, given: TrialExecutor | None = None) -> tuple[TrialExecutor, bool]:
    """The executor a search uses, and whether the search owns it (closes it at the end): ``given`` (the caller
    closes it), else Ray at ``config.ray_address``, else a process pool of ``config.search_workers`` (1: in
    process)."""
    if given is not None:
        return given, False
    if getattr(config, "ray_address", None):
        return RayTrials(config.ray_address), True
    if config.search_workers > 1:
        return ProcessPool(config.search_workers), True
    return InProcess(), True
