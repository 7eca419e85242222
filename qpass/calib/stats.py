"""Per-tensor statistics: tensor name -> {statistic kind -> value}, JSON-serialisable with arrays (exact round trip).

A range (:class:`TensorRange`, kind ``"range"``) is one kind; :class:`Gram` (``"gram"``), :class:`AbsMean`
(``"absmean"``), :class:`ChannelMean` (``"mean"``), :class:`BiasShift` (``"bias_shift"``), :class:`ChannelRange`
(``"chanrange"``) and :class:`RowSample` (``"rows"``) hold arrays. A new kind is a class with ``kind``, ``to_dict`` and ``from_dict``, registered with
:func:`register_statistic`; the table, its JSON and the collection loop need no change for it.

JSON (``schema_version`` 1, as before any other kind existed)::

    {"schema_version": 1, "samples": N, "synthetic": false,
     "ranges": {tensor: {"min": .., "max": .., "method": .., "samples": .., ["observed_min": .., "observed_max": ..],
                         ["alternatives": {method: [min, max]}]}},
     "statistics": {tensor: {kind: {field: value, ...}}}}

``"statistics"`` holds every kind but ranges and is written only when there is one, so a table of ranges alone
is the same file byte for byte as before, and older readers, which read ``"ranges"`` only, still load a table
with more. A field holding an array is ``{"ndarray": dtype, "shape": [...], "base64": data}``: the array's
bytes in C order, little-endian (``dtype`` in numpy's ``"<f8"`` form), so values come back bit for bit. A kind
this code does not know loads as its fields (arrays decoded) and is written back unchanged.
"""
from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator, Mapping

import numpy as np

from ..errors import CalibrationDataError

SCHEMA_VERSION = 1
RANGE = "range"


@dataclass(frozen=True)
class TensorRange:
    min: float
    max: float
    method: str = "minmax"
    samples: int = 0
    observed_min: float | None = None
    observed_max: float | None = None
    #: ranges other methods would have given from the same histogram: ((method, min, max), ...)
    alternatives: tuple[tuple[str, float, float], ...] = ()

    kind: ClassVar[str] = RANGE

    def alternative(self, method: str) -> tuple[float, float] | None:
        """The range ``method`` gives for this tensor's data: its own, min-max from the observed range, or one
        computed beside it (``alternatives``); None when unknown."""
        if method == self.method:
            return self.min, self.max
        if method == "minmax":
            return None if self.observed_min is None else (self.observed_min, self.observed_max)
        return next(((lo, hi) for m, lo, hi in self.alternatives if m == method), None)

    def to_dict(self) -> dict:
        d = {"min": self.min, "max": self.max, "method": self.method, "samples": self.samples}
        if self.observed_min is not None:
            d["observed_min"], d["observed_max"] = self.observed_min, self.observed_max
        if self.alternatives:
            d["alternatives"] = {m: [lo, hi] for m, lo, hi in self.alternatives}
        return d

    @classmethod
    def from_dict(cls, v: Mapping) -> "TensorRange":
        alt = tuple((str(m), float(lo), float(hi)) for m, (lo, hi) in dict(v.get("alternatives") or {}).items())
        return cls(float(v["min"]), float(v["max"]), str(v.get("method", "minmax")), int(v.get("samples", 0)),
                   _opt(v.get("observed_min")), _opt(v.get("observed_max")), alt)


def _opt(x) -> float | None:
    return None if x is None else float(x)


# ---------------------------------------------------------------------------------------------- arrays
def encode_array(a: np.ndarray) -> dict:
    """``{"ndarray": dtype, "shape": [...], "base64": ...}``: C-order little-endian bytes, exact."""
    a = np.asarray(a)
    if a.dtype.kind not in "biuf":
        raise TypeError(f"cannot serialise an array of dtype {a.dtype}")
    a = a.astype(a.dtype.newbyteorder("<"), copy=False)  # tobytes() writes C order whatever the layout
    return {"ndarray": a.dtype.str, "shape": list(a.shape), "base64": base64.b64encode(a.tobytes()).decode("ascii")}


def decode_array(d: Mapping) -> np.ndarray:
    """The array :func:`encode_array` wrote (native byte order, writeable)."""
    dtype = np.dtype(str(d["ndarray"]))
    if dtype.kind not in "biuf":
        raise ValueError(f"unsupported array dtype {dtype}")
    shape = tuple(int(s) for s in d["shape"])
    if any(s < 0 for s in shape):
        raise ValueError(f"negative array shape {shape}")
    data = base64.b64decode(str(d["base64"]).encode("ascii"), validate=True)
    a = np.frombuffer(data, dtype=dtype)
    if a.size != math.prod(shape):
        raise ValueError(f"array data holds {a.size} values, shape {list(shape)} needs {math.prod(shape)}")
    return a.reshape(shape).astype(dtype.newbyteorder("="))


def _encode(v: Any) -> Any:
    """A statistic's field as JSON: arrays as :func:`encode_array`, containers recursively, numpy scalars as Python's."""
    if isinstance(v, np.ndarray):
        return encode_array(v)
    if isinstance(v, Mapping):
        return {str(k): _encode(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_encode(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


def _decode(v: Any) -> Any:
    if isinstance(v, dict):
        return decode_array(v) if "ndarray" in v else {k: _decode(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_decode(x) for x in v]
    return v


# ---------------------------------------------------------------------------------------------- statistic kinds
#: statistic kind -> its class (``kind``, ``to_dict``, ``from_dict``); ranges are kind ``"range"``
STATISTICS: dict[str, type] = {RANGE: TensorRange}


def register_statistic(cls: type) -> type:
    """Class decorator: make ``cls.kind`` a statistic the table can hold, write and read."""
    kind = cls.kind
    if STATISTICS.get(kind, cls) is not cls:
        raise ValueError(f"statistic kind {kind!r} is already registered ({STATISTICS[kind].__name__})")
    STATISTICS[kind] = cls
    return cls


def _arrays_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool(np.array_equal(a, b))


@register_statistic
@dataclass(frozen=True, eq=False)
class Gram:
    """Sum over rows of ``x^T x`` for a tensor reshaped to ``[rows, K]`` (K: its last axis), in float64, and
    the row count: the input statistic of a MatMul that GPTQ-style weight rounding needs (its Hessian is
    ``2 * matrix / rows``)."""

    matrix: np.ndarray  # (K, K) float64, symmetric
    rows: int

    kind: ClassVar[str] = "gram"

    def __post_init__(self) -> None:
        m = np.asarray(self.matrix)
        if m.ndim != 2 or m.shape[0] != m.shape[1]:
            raise ValueError(f"a Gram matrix is square, not of shape {list(m.shape)}")
        if int(self.rows) < 0:
            raise ValueError(f"negative row count {self.rows}")
        object.__setattr__(self, "matrix", m)
        object.__setattr__(self, "rows", int(self.rows))

    def mean(self) -> np.ndarray:
        """``matrix / rows`` (the second moment of a row)."""
        return self.matrix / max(self.rows, 1)

    def to_dict(self) -> dict:
        return {"rows": self.rows, "matrix": self.matrix}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Gram":
        return cls(_as_array(d["matrix"]), int(d["rows"]))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Gram) and self.rows == other.rows and _arrays_equal(self.matrix, other.matrix)

    __hash__ = None  # type: ignore[assignment]


@register_statistic
@dataclass(frozen=True, eq=False)
class ChannelMean:
    """Mean of ``x`` per output channel (axis 1 of an NC... tensor, or the last axis; the observer says which), in
    float64, over ``count`` values per channel: what empirical bias correction compares between the float and the
    quantized model (``"mean"``), and the per-channel shift it adds to a bias (``"bias_shift"``, same fields)."""

    mean: np.ndarray  # (C,) float64
    count: int

    kind: ClassVar[str] = "mean"

    def __post_init__(self) -> None:
        m = np.asarray(self.mean)
        if m.ndim != 1:
            raise ValueError(f"a {self.kind} is one value per channel, not of shape {list(m.shape)}")
        if int(self.count) < 0:
            raise ValueError(f"negative count {self.count}")
        object.__setattr__(self, "mean", m)
        object.__setattr__(self, "count", int(self.count))

    def to_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean}

    @classmethod
    def from_dict(cls, d: Mapping) -> "ChannelMean":  # the subclass's own type (AbsMean, BiasShift)
        return cls(_as_array(d["mean"]), int(d["count"]))

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self.count == other.count and _arrays_equal(self.mean, other.mean)

    __hash__ = None  # type: ignore[assignment]


@register_statistic
@dataclass(frozen=True, eq=False)
class AbsMean(ChannelMean):
    """Mean of ``|x|`` per channel of the last axis, in float64, over ``count`` values per channel (every
    position of the other axes, over all samples): what activation-aware weight scaling (AWQ) ranks input
    channels by."""

    kind: ClassVar[str] = "absmean"


@register_statistic
@dataclass(frozen=True, eq=False)
class BiasShift(ChannelMean):
    """The per-channel amount to add to a node's bias (``mean``: the float model's output mean minus the quantized
    model's, over ``count`` values per channel)."""

    kind: ClassVar[str] = "bias_shift"


@register_statistic
@dataclass(frozen=True, eq=False)
class ChannelRange:
    """Min and max per channel of the last axis (float64), over ``count`` values per channel: SmoothQuant's
    ``max|x_j|``, and the exact min-max range of the tensor divided by any positive per-channel scale."""

    min: np.ndarray  # (C,) float64
    max: np.ndarray  # (C,) float64
    count: int

    kind: ClassVar[str] = "chanrange"

    def __post_init__(self) -> None:
        lo, hi = np.asarray(self.min), np.asarray(self.max)
        if lo.ndim != 1 or lo.shape != hi.shape:
            raise ValueError(f"a channel range is one min and one max per channel, not shapes {list(lo.shape)}, "
                             f"{list(hi.shape)}")
        if int(self.count) < 0:
            raise ValueError(f"negative count {self.count}")
        object.__setattr__(self, "min", lo)
        object.__setattr__(self, "max", hi)
        object.__setattr__(self, "count", int(self.count))

    def absmax(self) -> np.ndarray:
        """``max |x_j|`` per channel."""
        return np.maximum(np.abs(self.min), np.abs(self.max))

    def to_dict(self) -> dict:
        return {"count": self.count, "min": self.min, "max": self.max}

    @classmethod
    def from_dict(cls, d: Mapping) -> "ChannelRange":
        return cls(_as_array(d["min"]), _as_array(d["max"]), int(d["count"]))

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, ChannelRange) and self.count == other.count and _arrays_equal(self.min, other.min)
                and _arrays_equal(self.max, other.max))

    __hash__ = None  # type: ignore[assignment]


@register_statistic
@dataclass(frozen=True, eq=False)
class RowSample:
    """A uniform sample (reservoir) of the rows of a tensor reshaped to ``[rows, K]`` (K: its last axis), float32,
    out of ``seen`` rows: what a search scores fake-quantized outputs on."""

    rows: np.ndarray  # (R, K) float32
    seen: int

    kind: ClassVar[str] = "rows"

    def __post_init__(self) -> None:
        r = np.asarray(self.rows)
        if r.ndim != 2:
            raise ValueError(f"a row sample is [rows, K], not of shape {list(r.shape)}")
        if int(self.seen) < r.shape[0]:
            raise ValueError(f"a sample of {r.shape[0]} rows out of {self.seen}")
        object.__setattr__(self, "rows", r)
        object.__setattr__(self, "seen", int(self.seen))

    def to_dict(self) -> dict:
        return {"seen": self.seen, "rows": self.rows}

    @classmethod
    def from_dict(cls, d: Mapping) -> "RowSample":
        return cls(_as_array(d["rows"]), int(d["seen"]))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RowSample) and self.seen == other.seen and _arrays_equal(self.rows, other.rows)

    __hash__ = None  # type: ignore[assignment]


def _as_array(v: Any) -> np.ndarray:
    if not isinstance(v, np.ndarray):
        raise TypeError(f"expected an array, got {type(v).__name__}")
    return v


# ---------------------------------------------------------------------------------------------- the table
class Statistics:
    """Tensor name -> {statistic kind -> value}, with the run's sample count and whether its data was synthetic.

    Values of a registered kind must be instances of its class (a range: :class:`TensorRange`); a kind nobody
    registered may hold any JSON-like value with arrays (a dict of fields, as one read from a newer table)."""

    def __init__(self, values: Mapping[str, Mapping[str, Any]] | None = None, *, samples: int = 0,
                 synthetic: bool = False):
        self._values: dict[str, dict[str, Any]] = {}
        self.samples = samples
        self.synthetic = synthetic
        for name, kinds in (values or {}).items():
            for kind, value in kinds.items():
                self.set(name, kind, value)

    # ------------------------------------------------------------------ access
    def get(self, name: str, kind: str) -> Any | None:
        """The statistic ``kind`` of tensor ``name``, or None."""
        return self._values.get(name, {}).get(kind)

    def set(self, name: str, kind: str, value: Any) -> None:
        cls = STATISTICS.get(kind)
        if cls is not None and not isinstance(value, cls):
            raise TypeError(f"statistic {kind!r} of tensor {name!r} must be a {cls.__name__}, not {type(value).__name__}")
        self._values.setdefault(name, {})[kind] = value

    def kinds(self, name: str) -> tuple[str, ...]:
        """The statistics tensor ``name`` has, in the order they were set."""
        return tuple(self._values.get(name, {}))

    def of_kind(self, kind: str) -> dict[str, Any]:
        """Tensor name -> its statistic ``kind``, for the tensors that have one."""
        return {name: kinds[kind] for name, kinds in self._values.items() if kind in kinds}

    def __contains__(self, name: object) -> bool:
        return name in self._values

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Statistics) and (self.samples, self.synthetic) == (other.samples, other.synthetic)
                and self._values.keys() == other._values.keys()
                and all(_same(self._values[n], other._values[n]) for n in self._values))

    __hash__ = None  # type: ignore[assignment]

    # ------------------------------------------------------------------ JSON
    def to_json(self) -> str:
        data: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "samples": self.samples, "synthetic": self.synthetic,
                                "ranges": {k: v.to_dict() for k, v in self.of_kind(RANGE).items()}}
        other = {name: {kind: _encode(v.to_dict() if kind in STATISTICS else v)
                        for kind, v in kinds.items() if kind != RANGE}
                 for name, kinds in self._values.items()}
        other = {name: kinds for name, kinds in other.items() if kinds}
        if other:
            data["statistics"] = other
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str, *, source: str = "calibration table") -> "Statistics":
        try:
            data = json.loads(text)
            ranges = {k: TensorRange.from_dict(v) for k, v in data["ranges"].items()}
            other = {name: {kind: _decode(v) for kind, v in kinds.items()}
                     for name, kinds in data.get("statistics", {}).items()}
            samples = int(data.get("samples", 0))
            synthetic = bool(data.get("synthetic", False))
            out = cls(samples=samples, synthetic=synthetic)
            for name, r in ranges.items():
                out.set(name, RANGE, r)
            for name, kinds in other.items():
                for kind, v in kinds.items():
                    if kind == RANGE:
                        raise ValueError(f"tensor '{name}': ranges belong under \"ranges\"")
                    out.set(name, kind, STATISTICS[kind].from_dict(v) if kind in STATISTICS else v)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CalibrationDataError(f"not a qpass calibration table ({exc})", subject=source) from None
        for name, r in ranges.items():
            if not (math.isfinite(r.min) and math.isfinite(r.max) and r.min <= r.max):
                raise CalibrationDataError(f"tensor '{name}' has an invalid range [{r.min}, {r.max}]", subject=source,
                                           hint="ranges must be finite with min <= max")
        return out

    def save(self, path: str | Path) -> None:
        from ..io import write_text_atomic

        write_text_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "Statistics":
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CalibrationDataError(f"cannot read ({exc})", subject=str(path)) from None
        return cls.from_json(text, source=str(path))


def _same(x: Any, y: Any) -> bool:
    """Equality that compares arrays (in statistics of unknown kinds, too) by dtype, shape and values."""
    if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
        return isinstance(x, np.ndarray) and isinstance(y, np.ndarray) and _arrays_equal(x, y)
    if isinstance(x, Mapping) and isinstance(y, Mapping):
        return x.keys() == y.keys() and all(_same(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
        return len(x) == len(y) and all(_same(a, b) for a, b in zip(x, y))
    return bool(x == y)
