"""CalibrationTable: tensor name -> observed range, JSON-serialisable so runs can be reproduced.

It is the range view of a :class:`~qpass.calib.stats.Statistics` table (``.statistics``), which may also hold
other per-tensor statistics (a Gram matrix, a mean |x| per channel); ``get``, ``len``, ``in`` and ``ranges``
see ranges only, ``save``/``load`` write and read everything (the format is described in :mod:`.stats`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Mapping

from .stats import RANGE, SCHEMA_VERSION, Statistics, TensorRange

__all__ = ["SCHEMA_VERSION", "CalibrationTable", "TensorRange"]


class _Ranges(Mapping[str, TensorRange]):
    """Read-only view: tensor name -> range, of the tensors of a statistics table that have one."""

    def __init__(self, stats: Statistics):
        self._stats = stats

    def __getitem__(self, name: str) -> TensorRange:
        r = self._stats.get(name, RANGE)
        if r is None:
            raise KeyError(name)
        return r

    def __iter__(self) -> Iterator[str]:
        return (name for name in self._stats if self._stats.get(name, RANGE) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict(self)!r})"


class CalibrationTable:
    """Ranges by tensor name, over a :class:`Statistics` table that may hold more (``statistics``).

    ``samples`` and ``synthetic`` are the statistics table's: the calibration samples, and whether they were
    random."""

    def __init__(self, ranges: Mapping[str, TensorRange] | None = None, *, samples: int = 0, synthetic: bool = False,
                 statistics: Statistics | None = None):
        self.statistics = statistics if statistics is not None else Statistics()
        if statistics is None:
            self.statistics.samples, self.statistics.synthetic = samples, synthetic
        for name, r in (ranges or {}).items():
            self.statistics.set(name, RANGE, r)

    @property
    def samples(self) -> int:
        return self.statistics.samples

    @samples.setter
    def samples(self, n: int) -> None:
        self.statistics.samples = n

    @property
    def synthetic(self) -> bool:
        return self.statistics.synthetic

    @synthetic.setter
    def synthetic(self, value: bool) -> None:
        self.statistics.synthetic = value

    @property
    def ranges(self) -> Mapping[str, TensorRange]:
        """Tensor name -> range (a read-only view)."""
        return _Ranges(self.statistics)

    def get(self, name: str) -> TensorRange | None:
        return self.statistics.get(name, RANGE)

    def with_ranges(self, ranges: Mapping[str, TensorRange]) -> "CalibrationTable":
        """A new table: this one's statistics, with ``ranges`` in place of those tensors' ranges (this one unchanged)."""
        if not ranges:
            return self
        stats = Statistics(samples=self.statistics.samples, synthetic=self.statistics.synthetic)
        for name in self.statistics:
            for kind in self.statistics.kinds(name):
                stats.set(name, kind, ranges[name] if kind == RANGE and name in ranges else self.statistics.get(name, kind))
        return CalibrationTable(statistics=stats)

    def __len__(self) -> int:
        return len(self.ranges)

    def __contains__(self, name: str) -> bool:
        return self.statistics.get(name, RANGE) is not None

    def to_json(self) -> str:
        return self.statistics.to_json()

    @classmethod
    def from_json(cls, text: str, *, source: str = "calibration table") -> "CalibrationTable":
        return cls(statistics=Statistics.from_json(text, source=source))

    def save(self, path: str | Path) -> None:
        self.statistics.save(path)

    @classmethod
    def load(cls, path: str | Path) -> "CalibrationTable":
        return cls(statistics=Statistics.load(path))
