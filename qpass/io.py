"""Model load and save: external data, >2 GB, atomic writes, and the metadata a graphsurgeon trip drops.

Raw protobuf lives here and at the pass-manager edge only. The input path is never written.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .errors import ModelLoadError, ModelSaveError

#: protobuf's hard limit for one serialized message
PROTOBUF_LIMIT = 2**31 - 1
#: leave headroom: write external data well before the hard limit
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26


@dataclass
class ModelMeta:
    """The model-level fields that onnx-graphsurgeon's import/export does not carry."""

    ir_version: int = 0
    producer_name: str = ""
    producer_version: str = ""
    domain: str = ""
    model_version: int = 0
    doc_string: str = ""
    metadata_props: list[tuple[str, str]] = field(default_factory=list)
    opset_imports: dict[str, int] = field(default_factory=dict)
    functions: list = field(default_factory=list)

    @classmethod
    def of(cls, model: onnx.ModelProto) -> "ModelMeta":
        return cls(
            ir_version=model.ir_version,
            producer_name=model.producer_name,
            producer_version=model.producer_version,
            domain=model.domain,
            model_version=model.model_version,
            doc_string=model.doc_string,
            metadata_props=[(p.key, p.value) for p in model.metadata_props],
            opset_imports={op.domain: op.version for op in model.opset_import},
            functions=[f for f in model.functions],
        )

    def restore(self, model: onnx.ModelProto, *, opset: int | None = None) -> onnx.ModelProto:
        """Write these fields back into ``model`` (in place) and return it.

        The default-domain opset is ``opset`` when given (after an explicit upgrade), and every
        other domain the original imported is kept even when no node uses it.
        """
        model.producer_name = self.producer_name
        model.producer_version = self.producer_version
        model.domain = self.domain
        model.model_version = self.model_version
        model.doc_string = self.doc_string
        del model.metadata_props[:]
        for key, value in self.metadata_props:
            model.metadata_props.add(key=key, value=value)
        wanted = dict(self.opset_imports)
        for op in model.opset_import:  # keep domains the rewrite added
            wanted.setdefault(op.domain, op.version)
        if opset is not None:
            wanted[""] = opset
        del model.opset_import[:]
        for domain, version in sorted(wanted.items()):
            model.opset_import.add(domain=domain, version=version)
        if self.functions and not model.functions:
            model.functions.extend(self.functions)
        model.ir_version = max(model.ir_version, self.ir_version, min_ir_version(model))
        return model


def min_ir_version(model: onnx.ModelProto) -> int:
    """The lowest IR version valid for ``model``'s opset imports, and never below 4.

    IR 3 requires every initializer to be a graph input; onnx-graphsurgeon's export (and
    onnx.version_converter's new initializers) do not list them, so an IR 3 model that went
    through either is only valid once its IR version is raised.
    """
    try:
        ir = onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    except Exception:  # noqa: BLE001 - an opset newer than this onnx knows
        ir = 0
    return max(ir, 4)


def default_opset(model: onnx.ModelProto) -> int:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return op.version
    return 0


def load_model(source: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """Load and fully check a model from a path (external data beside it included) or a ModelProto.

    Returns a ModelProto the caller may modify (a ModelProto argument is copied, never mutated).
    Raises :class:`ModelLoadError` naming the file for anything that is not a valid ONNX model.
    """
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
        _check(model, "<ModelProto>")
        return model
    if not isinstance(source, (str, os.PathLike)):
        raise ModelLoadError(f"expected a path or an onnx.ModelProto, got {type(source).__name__}",
                             subject="model")
    path = Path(source)
    name = str(path)
    if not path.exists():
        raise ModelLoadError("file not found", subject=name)
    if path.is_dir():
        raise ModelLoadError("is a directory, not an .onnx file", subject=name)
    try:
        model = onnx.load(name, load_external_data=True)
    except DecodeError as exc:
        raise ModelLoadError(f"not an ONNX model (protobuf decode failed: {exc})", subject=name,
                             hint="is the file truncated or not a .onnx file?") from None
    except FileNotFoundError as exc:
        raise ModelLoadError(f"external data file missing: {exc.filename or exc}", subject=name,
                             hint="keep the model's .data files beside it") from None
    except (OSError, ValueError, RuntimeError, onnx.checker.ValidationError) as exc:
        raise ModelLoadError(f"cannot load: {exc}", subject=name) from None
    _check(model, name, path=path)
    return model


def _check(model: onnx.ModelProto, name: str, path: Path | None = None) -> None:
    if model.ir_version <= 0 or not model.HasField("graph") or not model.graph.node:
        raise ModelLoadError("not an ONNX model (no IR version or empty graph)", subject=name,
                             hint="is the file truncated or not a .onnx file?")
    check_proto(model, ModelLoadError, name=name, path=path)
    bad = non_utf8_string(model)
    if bad is not None:
        raise ModelLoadError(f"string field {bad} is not valid UTF-8", subject=name,
                             hint="is the file corrupted? (the ONNX checker does not look at string encodings)")


def non_utf8_string(msg, path: str = "model") -> str | None:
    """The first string field of ``msg`` (recursively) that is not valid UTF-8, or None.

    The upb protobuf runtime hands such a proto2 ``string`` field back as ``bytes`` instead of failing
    to parse, and the checker accepts it; the first rewrite that copies the name then raises
    UnicodeDecodeError. Only string and message fields are visited (never raw_data or other bytes).
    """
    for fd in msg.DESCRIPTOR.fields:
        repeated = fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED
        if fd.type == fd.TYPE_STRING:
            values = getattr(msg, fd.name) if repeated else (
                [getattr(msg, fd.name)] if msg.HasField(fd.name) else [])
            for v in values:
                if isinstance(v, bytes):
                    return f"{path}.{fd.name}"
        elif fd.type == fd.TYPE_MESSAGE:
            subs = getattr(msg, fd.name) if repeated else (
                [getattr(msg, fd.name)] if msg.HasField(fd.name) else [])
            for i, sub in enumerate(subs):
                where = f"{path}.{fd.name}[{i}]" if repeated else f"{path}.{fd.name}"
                bad = non_utf8_string(sub, where)
                if bad is not None:
                    return bad
    return None


def check_proto(model: onnx.ModelProto, error: type = ModelLoadError, *, name: str = "model",
                path: Path | None = None) -> None:
    """Run the full ONNX checker (with strict shape inference); raise ``error`` with its first line.

    The checker runs on :func:`skeleton` of the model (large weights stubbed as external data, with an empty data
    file beside it), written to a temporary folder: what the checker looks at (structure, types, shapes, the small
    constants shape inference reads) is all there, and the weights are neither serialised nor copied, whatever the
    model's size. ``path`` is accepted for compatibility; the model in memory is what is checked."""
    del path
    try:
        with tempfile.TemporaryDirectory(prefix="qpass-check-") as tmp:
            tmp_path = Path(tmp) / "model.onnx"
            sk = skeleton(model, SKELETON_DATA)
            (Path(tmp) / SKELETON_DATA).touch()
            tmp_path.write_bytes(sk.SerializeToString())
            onnx.checker.check_model(str(tmp_path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, DecodeError, ValueError) as exc:
        # the checker also raises ValueError ("Invalid tensor data type 33.") and UnicodeDecodeError (a
        # ValueError: a string field that is not UTF-8) on corrupted files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise error(f"invalid ONNX model: {first}", subject=name,
                    hint="the ONNX checker rejects it") from None


#: weights of at least this many bytes are stubbed in :func:`skeleton` (shape inference reads smaller constants)
SKELETON_BYTES = 1 << 16
#: the (empty) external data file a skeleton's stubs name
SKELETON_DATA = "qpass-skeleton.data"


def tensor_bytes(t: onnx.TensorProto) -> int:
    """Bytes of ``t``'s data, from its shape when the data is raw (ByteSize serialises the tensor to count them)."""
    if t.HasField("raw_data") and t.data_type != onnx.TensorProto.STRING:
        n = 1
        for d in t.dims:
            n *= d
        try:
            return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        except (KeyError, TypeError, ValueError):
            pass
    return t.ByteSize()


def _stubbable(t: onnx.TensorProto, min_bytes: int) -> bool:
    return (t.data_location != onnx.TensorProto.EXTERNAL and t.data_type != onnx.TensorProto.STRING
            and t.HasField("raw_data") and tensor_bytes(t) >= min_bytes)


def _shell(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` without its main graph's initializers (everything else is copied)."""
    out = onnx.ModelProto()
    for fd, value in model.ListFields():
        if fd.name != "graph":
            _set_field(out, fd.name, value)
    for fd, value in model.graph.ListFields():
        if fd.name != "initializer":
            _set_field(out.graph, fd.name, value)
    out.graph.SetInParent()
    return out


def _repeated(fd) -> bool:
    return fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED


def _stub(t: onnx.TensorProto, location: str, offset: int = 0, length: int | None = None) -> onnx.TensorProto:
    """``t`` with its raw bytes replaced by a reference to ``location`` (offset, length)."""
    out = onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims, data_location=onnx.TensorProto.EXTERNAL)
    if t.HasField("doc_string"):  # (an empty one set is serialised: ModelFile.load gives the tensor back as it was)
        out.doc_string = t.doc_string
    if t.HasField("segment"):
        out.segment.CopyFrom(t.segment)
    out.metadata_props.extend(t.metadata_props)
    out.external_data.add(key="location", value=location)
    if length is not None:
        out.external_data.add(key="offset", value=str(offset))
        out.external_data.add(key="length", value=str(length))
    return out


def skeleton(model: onnx.ModelProto, location: str = SKELETON_DATA,
             min_bytes: int = SKELETON_BYTES) -> onnx.ModelProto:
    """A copy of ``model`` whose main-graph initializers of ``min_bytes`` or more are stubs naming external data in
    ``location`` (their bytes are not copied). For the checker and shape inference, which read the values of small
    constants only (a Reshape's shape); never for running."""
    out = _shell(model)
    for t in model.graph.initializer:
        if _stubbable(t, min_bytes):
            out.graph.initializer.append(_stub(t, location))
        else:
            out.graph.initializer.append(t)
    return out


def keep_value_info_of(model: onnx.ModelProto, original: "onnx.ModelProto | frozenset[str] | set[str]") -> onnx.ModelProto:
    """Drop (in place) the main graph's value_info entries for tensors the original did not describe.

    qpass infers every shape for its own analysis; writing them all into the output is not neutral: given a
    fully annotated MiniLM, onnxruntime 1.32 fuses Add + LayerNormalization into SkipLayerNormalization,
    which ran at 2.05 ms against 0.50 + ~0.3 ms unfused on this CPU (docs/benchmark-notes.md). The output
    describes what the input described, and the runtime infers the rest as it does for the fp32 model. The
    float16 mode's outputs, meant for GPUs, get every inferred shape instead (:func:`annotate_shapes`)."""
    described = set(original) if isinstance(original, (set, frozenset)) else {vi.name for vi in original.graph.value_info}
    kept = [vi for vi in model.graph.value_info if vi.name in described]
    if len(kept) != len(model.graph.value_info):
        del model.graph.value_info[:]
        model.graph.value_info.extend(kept)
    return model


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape-inferred copy of ``model`` for analysis (value_info filled in; the input is untouched).

    Inference runs on :func:`skeleton` of the model (the weights are not serialised, at any size); the copy then
    gets the real initializers back."""
    inferred = infer_shapes_skeleton(model)
    if len(inferred.graph.initializer) != len(model.graph.initializer):  # never seen: inference keeps initializers
        out = onnx.ModelProto()
        out.CopyFrom(model)
        return out
    for i, t in enumerate(model.graph.initializer):
        if inferred.graph.initializer[i].data_location == onnx.TensorProto.EXTERNAL and \
                t.data_location != onnx.TensorProto.EXTERNAL:
            inferred.graph.initializer[i].CopyFrom(t)
    return inferred


@contextlib.contextmanager
def inferred_view(model: onnx.ModelProto):
    """``model`` with the value_info (and graph outputs) of its shape inference, for the duration of the block.

    Gives what :func:`infer_shapes` gives without copying the weights: for importing a working graph whose
    constants are read from ``model``'s own initializers. The graph's other fields are put back on exit."""
    inferred = infer_shapes_skeleton(model)
    saved = _shell(model)
    changed = [fd.name for fd in onnx.GraphProto.DESCRIPTOR.fields if fd.name != "initializer"
               and getattr(inferred.graph, fd.name) != getattr(saved.graph, fd.name)]
    try:
        for f in changed:
            _set_field(model.graph, f, getattr(inferred.graph, f))
        yield model
    finally:
        for f in changed:
            _set_field(model.graph, f, getattr(saved.graph, f))


def _set_field(msg, name: str, value) -> None:
    fd = msg.DESCRIPTOR.fields_by_name[name]
    if _repeated(fd):
        del getattr(msg, name)[:]
        getattr(msg, name).extend(value)
    elif fd.type == fd.TYPE_MESSAGE:
        getattr(msg, name).CopyFrom(value)
    else:
        setattr(msg, name, value)


def infer_shapes_skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape inference of :func:`skeleton` of ``model`` (its large initializers are stubs)."""
    sk = skeleton(model)
    try:
        return onnx.shape_inference.infer_shapes(sk, check_type=False, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - inference is a best-effort analysis aid
        return sk


def annotate_shapes(model: onnx.ModelProto) -> int:
    """Write the main graph's inferred value types and shapes (:func:`infer_shapes_skeleton`) into ``model``'s
    value_info, in place; returns how many entries were written. onnxruntime's graph fusions read shapes from
    there: MiniLM's Add + LayerNormalization pairs become SkipLayerNormalization only when the Add's input
    shapes are known (fp32 MiniLM on the CPU: 0 fusions without value_info, 12 with). On CUDA that made qpass's float16 MiniLM faster; on
    the CPU the fused kernel is slower (:func:`keep_value_info_of`), so only the float16 mode calls this."""
    inferred = infer_shapes_skeleton(model).graph
    known = {o.name for o in list(model.graph.input) + list(model.graph.output)} | \
        {t.name for t in model.graph.initializer}
    entries = [vi for vi in inferred.value_info
               if vi.name not in known and vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type
               and vi.type.tensor_type.HasField("shape")]
    names = {vi.name for vi in entries}
    kept = [vi for vi in model.graph.value_info if vi.name not in names]  # what inference could not say stays
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept + entries)
    return len(entries)


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the main graph's initializers' data (from their shapes: nothing is serialised or copied)."""
    return sum(tensor_bytes(t) for t in model.graph.initializer)


def model_bytes(model: onnx.ModelProto) -> int:
    """The serialised size of ``model``; over 2 GB of weights (where upb's ByteSize, which serialises the whole
    message, fails) its skeleton's size plus the stubbed weights' bytes. From ``SIZE_UNSERIALISED_BYTES`` of
    weights on, the exact serialised size is counted without serialising the weights (:func:`_serialised_size`)."""
    weights = initializer_bytes(model)
    if weights < SIZE_UNSERIALISED_BYTES:
        return model.ByteSize()
    if weights < EXTERNAL_DATA_THRESHOLD:
        return _serialised_size(model)
    return skeleton(model).ByteSize() + sum(tensor_bytes(t) for t in model.graph.initializer
                                            if _stubbable(t, SKELETON_BYTES))


#: weights from which :func:`model_bytes` counts the size without serialising them: upb's ByteSize serialises the
#: whole message to count it, which on a 651 MB model took 1.2 GB more memory for an instant (and 1.5-2.8 s)
SIZE_UNSERIALISED_BYTES = 1 << 26
#: bits per element of the tensor types whose raw data packs several elements to a byte
_PACKED_BITS = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4, onnx.TensorProto.FLOAT4E2M1: 4,
                onnx.TensorProto.INT2: 2, onnx.TensorProto.UINT2: 2}
#: types whose raw length is not counted from the shape (their tensors are serialised one at a time to count them)
_UNCOUNTED = {onnx.TensorProto.UNDEFINED, onnx.TensorProto.STRING, onnx.TensorProto.FLOAT6E2M3,
              onnx.TensorProto.FLOAT6E3M2}


def _varint_bytes(n: int) -> int:
    size = 1
    while n >= 0x80:
        n >>= 7
        size += 1
    return size


def _field_bytes(size: int) -> int:
    """A length-delimited field of ``size`` bytes whose tag takes one byte (field numbers under 16: ModelProto's
    graph is 7, GraphProto's initializer 5, TensorProto's raw_data 9)."""
    return 1 + _varint_bytes(size) + size


def _raw_length(t: onnx.TensorProto) -> int | None:
    """Bytes of ``t``'s raw data from its type and shape (reading ``raw_data`` would copy it); None when unknown."""
    if t.data_type in _UNCOUNTED:
        return None
    n = 1
    for d in t.dims:
        n *= d
    bits = _PACKED_BITS.get(t.data_type)
    if bits is not None:
        return (n * bits + 7) // 8
    try:
        return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        return None


def _tensor_size(t: onnx.TensorProto) -> int:
    """``t.ByteSize()``, its raw data counted from its shape: its other fields are copied and sized."""
    length = _raw_length(t) if t.HasField("raw_data") else None
    if length is None:
        return t.ByteSize()
    meta = onnx.TensorProto()
    for fd in t.DESCRIPTOR.fields:
        if fd.name == "raw_data":
            continue
        if _repeated(fd):
            if len(getattr(t, fd.name)):
                getattr(meta, fd.name).extend(getattr(t, fd.name))
        elif t.HasField(fd.name):
            _set_field(meta, fd.name, getattr(t, fd.name))
    return meta.ByteSize() + _field_bytes(length)


def _serialised_size(model: onnx.ModelProto) -> int:
    """``model.ByteSize()`` without serialising the main graph's initializers: the model without them (a copy
    of everything else), then each initializer's field, its raw data counted from its shape."""
    shell = _shell(model)
    graph = shell.graph.ByteSize() + sum(_field_bytes(_tensor_size(t)) for t in model.graph.initializer)
    return shell.ByteSize() - _field_bytes(shell.graph.ByteSize()) + _field_bytes(graph)


def _too_big(model: onnx.ModelProto) -> bool:
    size = initializer_bytes(model)
    return size >= EXTERNAL_DATA_THRESHOLD or (size > 2**30 and model_bytes(model) >= EXTERNAL_DATA_THRESHOLD)


#: external data: a tensor of at least this many bytes is written to the data file (onnx's own default is 1024)
EXTERNAL_MIN_BYTES = 1024
#: and one of at least ALIGN_FROM bytes starts at a multiple of ALIGN (onnxruntime can then map it from the file)
ALIGN, ALIGN_FROM = 1 << 16, 1 << 20


def write_external(model: onnx.ModelProto, path: Path, data_name: str) -> bool:
    """Write ``model`` to ``path`` with its main graph's initializers of ``EXTERNAL_MIN_BYTES`` or more in
    ``data_name`` beside it, one tensor at a time: the model is not mutated and never copied whole (onnx's
    save_as_external_data converts its argument in place). Returns whether a data file was written."""
    shell = _shell(model)
    offset = 0
    data_path = Path(path).parent / data_name
    fh = None
    try:
        for t in model.graph.initializer:
            if not _stubbable(t, EXTERNAL_MIN_BYTES):
                shell.graph.initializer.append(t)
                continue
            raw = t.raw_data
            if fh is None:
                fh = open(data_path, "wb")  # noqa: SIM115 - closed below
            if len(raw) >= ALIGN_FROM and offset % ALIGN:
                pad = ALIGN - offset % ALIGN
                fh.write(b"\0" * pad)
                offset += pad
            fh.write(raw)
            shell.graph.initializer.append(_stub(t, data_name, offset, len(raw)))
            offset += len(raw)
            del raw
    finally:
        if fh is not None:
            fh.close()
    Path(path).write_bytes(shell.SerializeToString())
    return fh is not None


def _write_model(model: onnx.ModelProto, path: Path, *, external_data: bool, data_name: str | None = None) -> None:
    if external_data:
        write_external(model, path, data_name or (path.name + ".data"))
    else:
        onnx.save_model(model, str(path))


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    pa, pb = Path(a), Path(b)
    if pa.exists() and pb.exists():
        return os.path.samefile(pa, pb)
    return pa.resolve() == pb.resolve()


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, input_path: str | os.PathLike | None = None,
               external_data: bool = False) -> Path:
    """Write ``model`` to ``path`` atomically: a temporary file in the same directory, then a rename.

    Weights go to ``<name>.data`` beside it when ``external_data`` is set or the model is too large
    for one protobuf. Refuses to write over ``input_path``. Returns the written path.
    """
    out = Path(path)
    if input_path is not None and same_file(out, input_path):
        raise ModelSaveError("output path is the input model", subject=str(out),
                             hint="qpass never writes its input; choose another -o path")
    out_dir = out.parent if str(out.parent) else Path(".")
    if not out_dir.is_dir():
        raise ModelSaveError("output directory does not exist", subject=str(out_dir))
    if out.is_dir():
        raise ModelSaveError("output path is a directory", subject=str(out))
    if not os.access(out_dir, os.W_OK):
        raise ModelSaveError("output directory is not writable", subject=str(out_dir))
    use_external = external_data or _too_big(model)
    data_name = out.name + ".data"
    out_data = out_dir / data_name
    try:
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out_dir))
    except OSError as exc:
        raise ModelSaveError(f"cannot write in output directory ({exc.strerror})", subject=str(out_dir)) from None
    try:
        tmp_model = tmp_dir / out.name
        _write_model(model, tmp_model, external_data=use_external, data_name=data_name)
        # onnx writes no .data file when no tensor reaches size_threshold
        new_data = tmp_dir / data_name if use_external and (tmp_dir / data_name).exists() else None
        backup = None
        if new_data is not None and out_data.exists():
            backup = tmp_dir / (data_name + ".old")
            os.link(out_data, backup)  # keep the old weights until the new model is in place
        try:
            if new_data is not None:
                os.replace(new_data, out_data)
            os.replace(tmp_model, out)
        except OSError:
            if new_data is not None:  # put the old pair back (or remove the new, unpaired .data)
                with contextlib.suppress(OSError):
                    if backup is not None:
                        os.replace(backup, out_data)
                    elif not new_data.exists():
                        os.unlink(out_data)
            raise
    except OSError as exc:
        raise ModelSaveError(f"cannot write output ({exc})", subject=str(out)) from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write a text file (reports) atomically beside its final name."""
    out = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent if str(out.parent) else ".")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give reports the mode open() would
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return out
