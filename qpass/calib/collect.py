"""Streaming collection: run onnxruntime once per sample with the wanted tensors as extra outputs, update observers, drop the activations.

Memory holds one sample's requested tensors at a time, whatever the number of samples.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import onnx

from ..errors import CalibrationDataError, QpassError
from .observers import MinMaxObserver
from .table import CalibrationTable, TensorRange


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


def make_session(model: onnx.ModelProto, providers: list[str] | None = None, *, what: str = "model"):
    """An onnxruntime session for an in-memory model (through a temporary file when it is over 2 GB)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
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


def collect_ranges(model: onnx.ModelProto, tensors: list[str], samples: Iterable[tuple[dict, Any]], *,
                   providers: list[str] | None = None, synthetic: bool = False,
                   on_sample: Callable[[], None] | None = None) -> CalibrationTable:
    """Min-max range of each tensor in ``tensors`` over all ``samples`` (one onnxruntime run each)."""
    if not tensors:
        return CalibrationTable({}, samples=0, synthetic=synthetic)
    session = make_session(augmented_model(model, tensors), providers, what="calibration model")
    observers = {name: MinMaxObserver() for name in tensors}
    n = 0
    for feed, _label in samples:
        try:
            values = session.run(tensors, feed)
        except Exception as exc:  # noqa: BLE001
            raise CalibrationDataError(f"onnxruntime failed on calibration sample {n}: {str(exc).splitlines()[0]}",
                                       subject=f"sample {n}") from None
        for name, arr in zip(tensors, values):
            arr = np.asarray(arr)
            if arr.dtype.kind != "f":
                continue
            if not np.all(np.isfinite(arr)):
                raise CalibrationDataError(f"activation is NaN or Inf on calibration sample {n}",
                                           subject=f"tensor '{name}'", hint="check the calibration data's values")
            observers[name].update(arr)
        n += 1
        if on_sample:
            on_sample()
    if n == 0:
        raise CalibrationDataError("no calibration samples", subject="calibration data",
                                   hint="give at least one sample (and more than one when validating on a held-out split)")
    ranges = {name: TensorRange(obs.min, obs.max, obs.method, obs.count) for name, obs in observers.items() if obs.seen}
    return CalibrationTable(ranges, samples=n, synthetic=synthetic)
