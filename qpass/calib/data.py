"""Calibration / validation samples: .npz files, a folder of .npz, the model-zoo .pb layout, or any iterable of feeds.

Every form yields feed dicts (input name -> array) lazily, checked against the model's inputs:
names, dtypes, ranks and fixed dimensions, and finite values. Extra keys (labels, texts) are not
fed to the model; a key named ``label`` is kept aside for accuracy where present.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import CalibrationDataError, UnsupportedModelError

Feed = dict[str, np.ndarray]
LABEL_KEY = "label"


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple  # ints for fixed dims, str/None for dynamic ones

    @property
    def rank(self) -> int:
        return len(self.shape)


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The model's real inputs (graph inputs that are not initializers)."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        kind = vi.type.WhichOneof("value")
        if kind != "tensor_type":
            what = kind[: -len("_type")] if kind else "value of no declared type"
            raise UnsupportedModelError(f"input '{vi.name}' is a {what}, not a tensor", subject="model",
                                        hint="qpass calibrates and validates models whose inputs are all tensors")
        tt = vi.type.tensor_type
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        except (KeyError, TypeError, ValueError):
            raise UnsupportedModelError(f"input '{vi.name}' has element type "
                                        f"{onnx.TensorProto.DataType.Name(tt.elem_type) if tt.elem_type in onnx.TensorProto.DataType.values() else tt.elem_type}, "
                                        "which has no numpy dtype", subject="model") from None
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
        specs.append(InputSpec(vi.name, dtype, dims))
    return specs


class SampleSource:
    """A re-iterable, sized stream of (feed, label-or-None) pairs, checked against the model's inputs."""

    def __init__(self, description: str, count: int, get: Callable[[int], Mapping[str, Any]], specs: list[InputSpec]):
        self.description = description
        self.count = count
        self._get = get
        self.specs = specs
        self.ignored_keys: set[str] = set()

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[tuple[Feed, Any]]:
        for i in range(self.count):
            yield self.feed(i)

    def feed(self, i: int) -> tuple[Feed, Any]:
        raw = self._get(i)
        return check_feed(raw, self.specs, where=f"{self.description} sample {i}", ignored=self.ignored_keys)


class IterableSource:
    """Feeds from any iterable of dicts (the Python API); streamed once, never stored."""

    def __init__(self, feeds: Iterable[Mapping[str, Any]], specs: list[InputSpec]):
        self._feeds = feeds
        self.specs = specs
        self.description = "calibration feeds"
        self.ignored_keys: set[str] = set()
        self.count = len(feeds) if hasattr(feeds, "__len__") else None

    def __len__(self) -> int:
        return self.count or 0

    def __iter__(self) -> Iterator[tuple[Feed, Any]]:
        for i, raw in enumerate(self._feeds):
            if not isinstance(raw, Mapping):
                raise CalibrationDataError(f"sample {i} is a {type(raw).__name__}, not a dict of input name -> array",
                                           subject=self.description)
            yield check_feed(raw, self.specs, where=f"{self.description} sample {i}", ignored=self.ignored_keys)


def check_feed(raw: Mapping[str, Any], specs: list[InputSpec], *, where: str, ignored: set[str] | None = None) -> tuple[Feed, Any]:
    feed: Feed = {}
    names = {s.name for s in specs}
    for s in specs:
        if s.name not in raw:
            have = sorted(k for k in raw if k != LABEL_KEY)
            raise CalibrationDataError(f"no data for model input '{s.name}' (data has {have})", subject=where,
                                       hint=f"keys must be the model's input names: {sorted(names)}")
        arr = np.asarray(raw[s.name])
        if arr.dtype != s.dtype:
            if arr.dtype.kind == s.dtype.kind == "f" or (arr.dtype.kind in "iu" and s.dtype.kind in "iu"):
                raise CalibrationDataError(f"input '{s.name}' has dtype {arr.dtype}, the model wants {s.dtype}",
                                           subject=where, hint=f"convert it with .astype(np.{s.dtype})")
            raise CalibrationDataError(f"input '{s.name}' has dtype {arr.dtype}, the model wants {s.dtype}",
                                       subject=where)
        if arr.ndim != s.rank:
            raise CalibrationDataError(f"input '{s.name}' has rank {arr.ndim} (shape {list(arr.shape)}), "
                                       f"the model wants rank {s.rank} {list(s.shape)}", subject=where)
        for axis, (got, want) in enumerate(zip(arr.shape, s.shape)):
            if isinstance(want, int) and want > 0 and got != want:
                raise CalibrationDataError(f"input '{s.name}' has size {got} on axis {axis}, the model wants {want}",
                                           subject=where)
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise CalibrationDataError(f"input '{s.name}' contains NaN or Inf", subject=where,
                                       hint="calibration data must be finite")
        feed[s.name] = arr
    if ignored is not None:
        ignored.update(k for k in raw if k not in names)
    label = raw.get(LABEL_KEY) if LABEL_KEY not in names else None
    return feed, label


# ---------------------------------------------------------------------------------------------- readers
def open_samples(source: Any, specs: list[InputSpec], *, what: str = "calibration data") -> SampleSource | IterableSource:
    """Open calibration data given as a path (file or folder) or an iterable of feed dicts."""
    if isinstance(source, (str, Path)):
        return _open_path(Path(source), specs, what)
    if isinstance(source, Mapping):
        raise CalibrationDataError("got one dict; pass an iterable of feed dicts (e.g. a list)", subject=what)
    try:
        iter(source)
    except TypeError:
        raise CalibrationDataError(f"expected a path or an iterable of feed dicts, got {type(source).__name__}",
                                   subject=what) from None
    return IterableSource(source, specs)


def _open_path(path: Path, specs: list[InputSpec], what: str) -> SampleSource:
    name = str(path)
    if not path.exists():
        raise CalibrationDataError(f"{what} not found", subject=name)
    if path.is_dir():
        npz = sorted(path.glob("*.npz"))
        if npz:
            return SampleSource(name, len(npz), lambda i: _read_npz(npz[i]), specs)
        sets = sorted((p for p in path.glob("test_data_set_*") if p.is_dir()),
                      key=lambda p: (int(p.name.rsplit("_", 1)[-1]) if p.name.rsplit("_", 1)[-1].isdigit() else 0, p.name))
        if not sets and sorted(path.glob("input_*.pb")):
            sets = [path]
        if sets:
            return SampleSource(name, len(sets), lambda i: _read_pb_set(sets[i], specs), specs)
        raise CalibrationDataError("folder holds no .npz files and no test_data_set_*/input_*.pb", subject=name,
                                   hint="give one .npz per sample, or one .npz of stacked samples")
    if path.suffix == ".npz" or zipfile.is_zipfile(path):
        return _open_stacked_npz(path, specs)
    raise CalibrationDataError("not a .npz file or a folder of samples", subject=name)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """All arrays of an .npz; keys stored as pickled object arrays are skipped (they cannot be model inputs)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            out = {}
            for k in data.files:
                try:
                    out[k] = data[k]
                except ValueError as exc:
                    if "allow_pickle" not in str(exc):
                        raise
            return out
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise CalibrationDataError(f"cannot read .npz ({exc})", subject=str(path)) from None


def _read_pb_set(folder: Path, specs: list[InputSpec]) -> dict[str, np.ndarray]:
    files = sorted(folder.glob("input_*.pb"), key=lambda p: int(p.stem.split("_")[-1]))
    feed = {}
    for i, f in enumerate(files):
        t = onnx.TensorProto()
        try:
            t.ParseFromString(f.read_bytes())
            arr = numpy_helper.to_array(t)
        except Exception as exc:  # noqa: BLE001 - any parse failure is bad data
            raise CalibrationDataError(f"not a TensorProto ({exc})", subject=str(f)) from None
        key = t.name or (specs[i].name if i < len(specs) else f"input_{i}")
        feed[key] = arr
    return feed


class _NpzMember:
    """One array of an .npz read row by row from its zip stream: the header tells shape and dtype, and row ``i``
    is read when asked, so a stacked file of any size costs one row of memory (sequential reads are O(1)
    each; going back reopens the stream)."""

    def __init__(self, zf: zipfile.ZipFile, member: str):
        self.zf, self.member = zf, member
        with zf.open(member) as fh:
            version = np.lib.format.read_magic(fh)
            shape, fortran, dtype = (np.lib.format.read_array_header_1_0(fh) if version == (1, 0)
                                     else np.lib.format.read_array_header_2_0(fh))
        if dtype.hasobject:
            raise ValueError("holds Python objects")
        if fortran and len(shape) > 1:
            raise ValueError("is stored in Fortran order")
        self.shape, self.dtype = tuple(shape), dtype
        self.row_shape = self.shape[1:]
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * dtype.itemsize
        self._fh = None
        self._next = 0

    def _open(self) -> None:
        if self._fh is not None:
            self._fh.close()
        self._fh = self.zf.open(self.member)
        version = np.lib.format.read_magic(self._fh)
        (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(self._fh)
        self._next = 0

    def row(self, i: int) -> np.ndarray:
        if self._fh is None or i < self._next:
            self._open()
        while self._next < i:  # skip forward
            self._fh.read(self.row_bytes)
            self._next += 1
        buf = self._fh.read(self.row_bytes)
        if len(buf) != self.row_bytes:
            raise EOFError(f"row {i} is truncated")
        self._next += 1
        return np.frombuffer(buf, dtype=self.dtype).reshape(self.row_shape).copy()


def _open_stacked_npz(path: Path, specs: list[InputSpec]) -> SampleSource:
    """Samples stacked in one .npz, streamed: the arrays are never loaded whole (only the labels are)."""
    try:
        zf = zipfile.ZipFile(path)
        members = {n[:-4]: n for n in zf.namelist() if n.endswith(".npy")}
    except (OSError, zipfile.BadZipFile) as exc:
        raise CalibrationDataError(f"cannot read .npz ({exc})", subject=str(path)) from None
    by_name = {s.name: s for s in specs}
    arrays: dict[str, _NpzMember] = {}
    for s in specs:
        if s.name not in members:
            raise CalibrationDataError(f"no array for model input '{s.name}' (arrays: {sorted(members)})",
                                       subject=str(path),
                                       hint=f"keys must be the model's input names: {[x.name for x in specs]}")
        try:
            arrays[s.name] = _NpzMember(zf, members[s.name])
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise CalibrationDataError(f"cannot read array '{s.name}' ({exc})", subject=str(path)) from None
    counts: dict[str, int] = {}
    stacked: dict[str, bool] = {}
    for s in specs:
        shape = arrays[s.name].shape
        if len(shape) == s.rank + 1:
            stacked[s.name] = True
        elif len(shape) == s.rank and s.rank > 0:
            stacked[s.name] = False
        else:
            raise CalibrationDataError(
                f"array '{s.name}' has rank {len(shape)} (shape {list(shape)}); the model input has rank {s.rank}: "
                f"give rank {s.rank + 1} (samples stacked on a new first axis) or rank {s.rank} (split on the batch axis)",
                subject=str(path))
        counts[s.name] = shape[0]
    if len(set(counts.values())) > 1:
        raise CalibrationDataError(f"arrays disagree on the number of samples: {counts}", subject=str(path))
    n = next(iter(counts.values())) if counts else 0
    label = None
    if LABEL_KEY in members and LABEL_KEY not in by_name:
        try:
            with zf.open(members[LABEL_KEY]) as fh:
                label = np.lib.format.read_array(fh, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            label = None  # an unreadable label is ignored, like any other extra key
    extra = {k for k in members if k not in by_name}

    def get(i: int) -> dict[str, Any]:
        try:
            feed: dict[str, Any] = {k: (arrays[k].row(i) if stacked[k] else arrays[k].row(i)[None])
                                    for k in stacked}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise CalibrationDataError(f"cannot read sample {i} ({exc})", subject=str(path)) from None
        if label is not None and len(label) == n:
            feed[LABEL_KEY] = label[i]
        return feed

    src = SampleSource(str(path), n, get, specs)
    src.ignored_keys.update(extra)
    return src


def synthetic_samples(specs: list[InputSpec], count: int, seed: int) -> list[Feed]:
    """Random feeds (float: standard normal; integer: zeros; dynamic dims: 1). Only for smoke runs."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        feed = {}
        for s in specs:
            shape = tuple(d if isinstance(d, int) and d > 0 else 1 for d in s.shape)
            if s.dtype.kind == "f":
                feed[s.name] = rng.standard_normal(shape).astype(s.dtype)
            elif s.dtype.kind == "b":
                feed[s.name] = np.ones(shape, dtype=s.dtype)
            else:
                feed[s.name] = np.zeros(shape, dtype=s.dtype)
        out.append(feed)
    return out


def split_holdout(samples: Iterable[tuple[Feed, Any]], fraction: float, limit: int) -> tuple[Iterator[tuple[Feed, Any]], list]:
    """Stream ``samples`` for calibration while every k-th one (k = round(1/fraction)) is held out, up to ``limit``.

    Returns the calibration iterator and the list the held-out samples are appended to as the
    iterator is consumed. Memory is bounded by ``limit`` samples.
    """
    held: list = []
    k = max(2, int(round(1.0 / fraction))) if fraction > 0 else 0

    def gen() -> Iterator[tuple[Feed, Any]]:
        for i, item in enumerate(samples):
            if k and (i % k == k - 1) and len(held) < limit:
                held.append(item)
            else:
                yield item

    return gen(), held
