"""Everything qpass asks of onnxruntime: sessions, execution providers, models with extra outputs, profiles.

This is the only module of qpass that imports onnxruntime (tests/test_runtime.py and ruff's TID251 rule keep
it so): what a session is built with, and which onnxruntime behaviours qpass relies on, are in one place.
onnxruntime is imported on first use, so that importing qpass (the CLI's --help) does not load it.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx

from .errors import QpassError
from .io import initializer_bytes, write_external

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
#: short names (CLI, config) -> onnxruntime's execution provider names
PROVIDERS = {"cpu": CPU, "cuda": CUDA}
#: graph optimisation levels by name (onnxruntime's GraphOptimizationLevel); ``level=None`` keeps its default (all)
LEVELS = {"none": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}
#: an in-memory model at least this large goes to onnxruntime through a file with external data (make_session):
#: measured on a 651 MB model, the session kept 0.55 GB of RSS made that way against 1.38 GB from one serialised
#: buffer, and was built in 3.5 s against 4.5 s (docs/benchmark-notes.md)
FILE_SESSION_BYTES = 1 << 26


def _ort():
    import onnxruntime

    return onnxruntime


#: CUDA provider options of every qpass session: cuDNN's heuristic convolution algorithm choice. The default
#: (exhaustive) benchmarks every algorithm for each new input shape, and qpass's sessions run samples of many shapes
#: once each: on the GPU machine the recognizer's float16 fidelity check (crops of many widths) had not finished after
#: 120 s, its fp32 evaluation took 69 s with the heuristic choice and did not finish in 270 s without it
CUDA_OPTIONS = {"cudnn_conv_algo_search": "HEURISTIC"}


# ---------------------------------------------------------------------------------------------- providers
def available_providers() -> list[str]:
    """The execution providers this onnxruntime build has."""
    return _ort().get_available_providers()


def pick_providers(ep: str) -> tuple[list[str], str | None]:
    """Execution providers for ``ep`` ("cpu" or "cuda"), and a message when CUDA had to fall back."""
    if ep == "cuda":
        if CUDA in available_providers():
            return [CUDA, CPU], None
        return [CPU], "CUDAExecutionProvider is not available in this onnxruntime; calibrating on the CPU"
    return [CPU], None


def with_cpu_fallback(provider: str) -> list[str]:
    """``provider`` first, then the CPU for the nodes it has no kernel for."""
    return [provider] + ([CPU] if provider != CPU else [])


# ---------------------------------------------------------------------------------------------- models
def augmented_model(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph also outputs ``tensors``.

    An extra output takes its type from the model's value_info (or graph input) entry for the tensor. A tensor
    the model does not describe gets an output without a type, which onnxruntime fills in from the node that
    produces it (as it does for every undescribed tensor). A guessed type would make onnxruntime refuse the
    model whenever the guess is wrong: float was guessed before, and MiniLM's bool ConstantOfShape output
    stopped validate's per-layer analysis ("Type (tensor(float)) of output arg ... does not match expected
    type (tensor(bool))")."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    _add_outputs(out, tensors)
    return out


def _add_outputs(model: onnx.ModelProto, tensors: list[str]) -> int:
    existing = {o.name for o in model.graph.output}
    types = {vi.name: vi for vi in list(model.graph.value_info) + list(model.graph.input) if vi.type.WhichOneof("value")}
    added = 0
    for name in tensors:
        if name in existing:
            continue
        vi = types.get(name)
        model.graph.output.append(vi if vi is not None else onnx.ValueInfoProto(name=name))
        existing.add(name)
        added += 1
    return added


@contextlib.contextmanager
def extra_outputs(model: onnx.ModelProto, tensors: list[str]):
    """``model`` itself with :func:`augmented_model`'s extra outputs for the duration of the block (no copy of the
    weights: make a session inside it); the outputs are removed on exit."""
    n = len(model.graph.output)
    _add_outputs(model, tensors)
    try:
        yield model
    finally:
        del model.graph.output[n:]


# ---------------------------------------------------------------------------------------------- memory
def release_freed_memory() -> None:
    """Hand memory that Python and onnxruntime freed back to the system (glibc keeps freed blocks in its heaps: on
    SmolLM2's static run, 545 MB before the per-layer analysis). A no-op where there is no glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


# ---------------------------------------------------------------------------------------------- model files
@dataclass
class ModelFile:
    """A model written once to a file, its weights as external data beside it, so that Python need not hold it:
    sessions are made from the path (:func:`make_session`), with extra outputs through a copy of the small .onnx
    file only (:meth:`with_outputs`). The caller owns the folder."""

    path: Path

    @classmethod
    def write(cls, model: onnx.ModelProto, folder: str | os.PathLike) -> "ModelFile":
        path = Path(folder) / "model.onnx"
        write_external(model, path, "model.data")
        return cls(path)

    def skeleton(self) -> onnx.ModelProto:
        """The model with its large weights left in the data file (graph, names and shapes only)."""
        return onnx.load(str(self.path), load_external_data=False)

    def load(self) -> onnx.ModelProto:
        """The model as it was written: each stubbed initializer gets its bytes back as ``raw_data``, without the
        ``data_location`` field (onnx.load sets it to DEFAULT explicitly, which changes the serialised bytes)."""
        model = self.skeleton()
        stubs = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        if not stubs:
            return model
        with open(self.path.parent / "model.data", "rb") as fh:
            for t in stubs:
                where = {e.key: e.value for e in t.external_data}
                fh.seek(int(where["offset"]))
                t.raw_data = fh.read(int(where["length"]))
                t.ClearField("external_data")
                t.ClearField("data_location")
        return model

    def with_outputs(self, tensors: list[str]) -> Path:
        """A .onnx file beside this one, reading the same data file, with ``tensors`` as extra outputs."""
        sk = self.skeleton()
        _add_outputs(sk, tensors)
        fd, name = tempfile.mkstemp(prefix="outputs-", suffix=".onnx", dir=self.path.parent)  # unique: processes share it
        with os.fdopen(fd, "wb") as fh:
            fh.write(sk.SerializeToString())
        return Path(name)


# ---------------------------------------------------------------------------------------------- sessions
def make_session(model: onnx.ModelProto | ModelFile, providers: list[str] | None = None, *, what: str | None = "model",
                 level: str | None = "basic", threads: int | None = None, spin: bool = True,
                 profile_prefix: str | None = None, config: dict[str, str] | None = None):
    """An onnxruntime session for an in-memory model (through a temporary file with external data when its weights
    reach FILE_SESSION_BYTES) or a :class:`ModelFile` (from its path), on ``providers`` (default: the CPU).

    ``level``: graph optimisation level, a key of :data:`LEVELS`; None keeps onnxruntime's default. CUDA runs
    with :data:`CUDA_OPTIONS`.
    ``threads``: intra-op threads (default: onnxruntime's, one per core). ``spin=False`` turns off the
    intra-op threads' spin-wait (for timing two sessions in turn). ``profile_prefix``: profile the session into
    files of that prefix (read them with :func:`profile_placement`). ``config``: session configuration entries
    (e.g. ``{"session.qdq_matmulnbits_accuracy_level": "0"}``). ``what`` names the model in the
    :class:`QpassError` raised when onnxruntime cannot load it; None lets onnxruntime's own exception through.
    """
    ort = _ort()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    if level is not None:
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[level])
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    for key, value in (config or {}).items():
        opts.add_session_config_entry(key, str(value))
    providers = [(p, dict(CUDA_OPTIONS)) if p == CUDA else p for p in (providers or [CPU])]
    try:
        if isinstance(model, ModelFile):
            return ort.InferenceSession(str(model.path), opts, providers=providers)
        if initializer_bytes(model) < FILE_SESSION_BYTES:
            return ort.InferenceSession(model.SerializeToString(), opts, providers=providers)
        # a large model goes through a file, its weights written tensor by tensor to external data (the model is
        # neither copied whole nor serialised into one buffer; over 2 GB there is no other way)
        with tempfile.TemporaryDirectory(prefix="qpass-session-") as tmp:
            path = Path(tmp) / "model.onnx"
            write_external(model, path, "model.data")
            return ort.InferenceSession(str(path), opts, providers=providers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises several unrelated types
        if what is None:
            raise
        raise QpassError(f"onnxruntime cannot load the {what}: {str(exc).splitlines()[0]}", subject=what) from None


# ---------------------------------------------------------------------------------------------- profiles
def profile_placement(session) -> dict:
    """End ``session``'s profiling (it was made with ``profile_prefix``) and read from the profile which provider
    ran each node (kernel events carry the provider), and the share of node time per op type."""
    with open(session.end_profiling(), encoding="utf-8") as fh:
        events = json.load(fh)
    nodes: dict[str, tuple[str, str]] = {}
    op_us: dict[str, float] = {}
    for e in events:
        args = e.get("args", {})
        if e.get("cat") == "Node" and "provider" in args and e.get("name", "").endswith("_kernel_time"):
            op = args.get("op_name", "?")
            nodes[e["name"][: -len("_kernel_time")]] = (op, args["provider"])
            op_us[op] = op_us.get(op, 0.0) + float(e.get("dur", 0))
    by_provider: dict[str, int] = {}
    ops_by_provider: dict[str, dict[str, int]] = {}
    for op, prov in nodes.values():
        by_provider[prov] = by_provider.get(prov, 0) + 1
        ops = ops_by_provider.setdefault(prov, {})
        ops[op] = ops.get(op, 0) + 1
    total = sum(op_us.values())
    share = {op: round(us / total, 4) for op, us in sorted(op_us.items(), key=lambda kv: -kv[1])} if total else {}
    return {"nodes_by_provider": by_provider, "ops_by_provider": ops_by_provider, "op_time_share": share,
            "memcpy_nodes": sum(1 for op, _ in nodes.values() if op.startswith("Memcpy")),
            "nodes": [{"node": n, "op_type": op, "provider": p} for n, (op, p) in sorted(nodes.items())]}
