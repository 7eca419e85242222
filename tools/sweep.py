"""Sweep qpass over the ONNX backend test models and classify every outcome.

    python -m tools.sweep [--limit N] [--subset ci] [--out docs/sweep.json] [--time-limit S]

Cases:

* ``node/<name>``: every operator test case of ``onnx.backend.test.case.node.collect_testcases``
  (a ModelProto plus one data set of inputs/outputs each), built in memory;
* ``node/<name>+constw``: the same case with the weight (and bias) inputs of its top-level
  Conv / ConvTranspose / MatMul / Gemm nodes turned into initializers, using the data set's values.
  The operator tests feed weights as graph inputs, which qpass (rightly) treats as dynamic and leaves
  in float; frozen, they exercise the actual quantization of every Conv/Gemm/MatMul variant;
* ``simple/``, ``pytorch-converted/``, ``pytorch-operator/``: the model folders under
  ``onnx/backend/test/data`` (model.onnx + test_data_set_*/input_*.pb);
* ``light/``: the ``light_*.onnx`` models (no inputs are shipped: a fixed-seed standard normal feed).

Each case runs ``qpass.quantize(model, calib=<the case's feeds>, allow_empty=True, val_fraction=0.0)``
(written to a temporary file) and gets exactly one outcome, see :data:`OUTCOMES`. A case refused
with :class:`qpass.errors.OpsetError` is run a second time with ``target_opset=13`` (the fix qpass's
hint names); that rerun is recorded under ``retry`` and tallied separately.

The full sweep runs every case in a worker process with a per-case time limit (a hang or a native
crash is recorded, the worker restarted); :func:`classify` is the in-process classification that
the CI subset test (tests/robustness/test_sweep_subset.py) calls directly.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import glob
import io
import json
import math
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
import traceback
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
from onnx import numpy_helper

REPO = Path(__file__).resolve().parents[1]
QPASS_DIR = str(REPO / "qpass")

OUTCOMES = ("quantized", "quantized_inaccurate", "unchanged", "refused", "crashed", "skipped_original")

#: accuracy criterion for a quantized model, per float output (see docs/sweep.md)
SQNR_MIN_DB = 25.0
#: ... or the largest error is at most this many steps of an 8-bit grid over the output's own range
MAX_STEPS = 4.0
#: an `unchanged` model must reproduce the original this closely (float rounding of folded constants)
UNCHANGED_RTOL, UNCHANGED_ATOL = 1e-3, 1e-5
#: the opset the retry of an OpsetError refusal upgrades to (the fix qpass's hint names)
RETRY_OPSET = 13
#: weight / bias slots of the compute ops, frozen into initializers for the +constw variants
FREEZE_SLOTS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "MatMul": (1,)}
DATA_SOURCES = ("simple", "pytorch-converted", "pytorch-operator", "light")

# A fixed, representative subset for CI (tests/robustness/test_sweep_subset.py), by case name.
CI_SUBSET = (
    # Conv / ConvTranspose / MatMul / Gemm, as shipped (dynamic weights) and with frozen weights
    "node/test_basic_conv_with_padding",
    "node/test_basic_conv_with_padding+constw",
    "node/test_conv_with_strides_and_asymmetric_padding+constw",
    "node/test_conv_with_autopad_same+constw",
    "node/test_convtranspose+constw",
    "node/test_convtranspose_1d+constw",
    "node/test_convtranspose_3d+constw",
    "node/test_convtranspose_group_2+constw",
    "node/test_convtranspose_output_shape+constw",
    "node/test_matmul_2d",
    "node/test_matmul_2d+constw",
    "node/test_matmul_3d+constw",
    "node/test_matmul_4d+constw",
    "node/test_matmul_bcast+constw",
    "node/test_matmul_1d_1d+constw",
    "node/test_matmul_4d_1d+constw",
    "node/test_gemm_default_no_bias+constw",
    "node/test_gemm_default_scalar_bias+constw",
    "node/test_gemm_default_matrix_bias+constw",
    "node/test_gemm_transposeA+constw",
    "node/test_gemm_transposeB+constw",
    "node/test_gemm_all_attributes+constw",
    "node/test_gemm_alpha+constw",
    "node/test_gemm_beta+constw",
    # multiple inputs, integer inputs, no inputs
    "node/test_add_bcast",
    "node/test_where_example",
    "node/test_gather_0",
    "node/test_onehot_with_axis",
    "node/test_argmax_default_axis_example",
    "node/test_constant",
    "node/test_range_float_type_positive_delta",
    "node/test_cast_FLOAT_to_DOUBLE",
    "node/test_bitwise_and_ui8_bcast_4v3d",
    # control flow and sequences
    "node/test_if",
    "node/test_if_seq",
    "node/test_loop11",
    "node/test_loop13_seq",
    "node/test_scan_sum",
    "node/test_scan9_sum",
    "node/test_sequence_insert_at_back",
    "node/test_split_to_sequence_1",
    "node/test_identity_sequence",
    "node/test_optional_get_element_tensor",
    "node/test_identity_opt",
    "node/test_if_opt",
    "node/test_ai_onnx_ml_binarizer",
    "simple/test_sequence_model1",
    # already quantized
    "node/test_quantizelinear",
    "node/test_dequantizelinear",
    "node/test_dynamicquantizelinear",
    "node/test_qlinearconv",
    "node/test_qlinearmatmul_2D_uint8_float32",
    "node/test_convinteger_with_padding",
    "node/test_matmulinteger",
    # opset < 10 / < 13 (refused; the retry upgrades to 13)
    "node/test_scan9_multi_state",
    "node/test_upsample_nearest",
    "pytorch-converted/test_Conv2d",
    "pytorch-converted/test_Conv2d_groups",
    "pytorch-converted/test_ConvTranspose2d",
    "pytorch-converted/test_Linear",
    "pytorch-operator/test_operator_mm",
    "pytorch-operator/test_operator_conv",
    "simple/test_single_relu_model",
    "light/light_squeezenet",
    # other ops around the data-movement and BatchNorm rewrites
    "node/test_batchnorm_example",
    "node/test_layer_normalization_2d_axis0_expanded",
    "node/test_reshape_reordered_all_dims",
    "node/test_einsum_batch_matmul",
)

#: CI cases run under another configuration too: (case name, QuantConfig overrides)
CI_VARIANTS = (
    ("node/test_gemm_default_scalar_bias+constw", {"per_channel": False}),
    ("node/test_gemm_transposeB+constw", {"per_channel": False, "activation_type": "int8"}),
    ("node/test_basic_conv_with_padding+constw", {"format": "qop"}),
    ("node/test_matmul_3d+constw", {"format": "qop"}),
    ("node/test_gemm_all_attributes+constw", {"format": "qop", "activation_type": "int8"}),
    ("node/test_convtranspose_group_2+constw", {"per_channel": False}),
    ("pytorch-converted/test_Conv2d_groups", {"per_channel": False, "format": "qop"}),
    ("node/test_conv_with_strides_padding+constw", {"method": "entropy"}),
    ("node/test_matmul_2d+constw", {"method": "percentile", "output_consumers": "quantized"}),
)


# ---------------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    name: str
    source: str
    load: Callable[[], tuple[onnx.ModelProto, list[dict[str, Any]]]]


def _onnx_data_dir() -> Path:
    return Path(onnx.__file__).parent / "backend" / "test" / "data"


def _real_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in inits]


def _to_value(v: Any) -> Any:
    """A data-set value as onnxruntime takes it: arrays, lists (sequences), dicts (maps), None (empty optional)."""
    if isinstance(v, onnx.TensorProto):
        return numpy_helper.to_array(v)
    if isinstance(v, onnx.SequenceProto):
        return [_to_value(x) for x in numpy_helper.to_list(v)]
    if isinstance(v, onnx.OptionalProto):
        return _to_value(numpy_helper.to_optional(v))
    if isinstance(v, onnx.MapProto):
        return numpy_helper.to_dict(v)
    if isinstance(v, (list, tuple)):
        return [_to_value(x) for x in v]
    if v is None or isinstance(v, dict):
        return v
    return np.asarray(v)


_NODE_CASES: list | None = None


def _node_testcases() -> list:
    global _NODE_CASES
    if _NODE_CASES is None:
        import warnings

        from onnx.backend.test.case.node import collect_testcases

        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            _NODE_CASES = list(collect_testcases(""))
    return _NODE_CASES


def _node_feeds(tc) -> list[dict[str, Any]]:
    names = [vi.name for vi in _real_inputs(tc.model)]
    return [{n: _to_value(v) for n, v in zip(names, inputs)} for inputs, _ in tc.data_sets]


def _freeze_slots(model: onnx.ModelProto) -> list[str]:
    """Graph inputs (float tensors) read as the weight/bias of a top-level compute op."""
    inputs = {vi.name: vi for vi in _real_inputs(model)}
    names: dict[str, None] = {}
    for node in model.graph.node:
        for i in FREEZE_SLOTS.get(node.op_type, ()):
            if i < len(node.input) and node.input[i] in inputs:
                vi = inputs[node.input[i]]
                if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
                    names[node.input[i]] = None
    return list(names)


def freeze_weights(model: onnx.ModelProto, feeds: list[dict[str, Any]], names: list[str]) -> tuple[onnx.ModelProto, list[dict]]:
    """``model`` with the graph inputs ``names`` turned into initializers (values from the first feed)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    keep = [vi for vi in out.graph.input if vi.name not in names]
    del out.graph.input[:]
    out.graph.input.extend(keep)
    for n in names:
        out.graph.initializer.append(numpy_helper.from_array(np.asarray(feeds[0][n]), n))
    if out.ir_version < 4:  # initializers that are not graph inputs need IR 4
        out.ir_version = 4
    return out, [{k: v for k, v in f.items() if k not in names} for f in feeds]


def _node_case(tc) -> Case:
    return Case(f"node/{tc.name}", "node", lambda: (tc.model, _node_feeds(tc)))


def _constw_case(tc, names: list[str]) -> Case:
    def load():
        return freeze_weights(tc.model, _node_feeds(tc), names)

    return Case(f"node/{tc.name}+constw", "node+constw", load)


def _read_pb(path: Path, type_proto: onnx.TypeProto | None) -> Any:
    data = path.read_bytes()
    kind = type_proto.WhichOneof("value") if type_proto is not None else "tensor_type"
    proto = {"sequence_type": onnx.SequenceProto, "optional_type": onnx.OptionalProto,
             "map_type": onnx.MapProto}.get(kind, onnx.TensorProto)()
    proto.ParseFromString(data)
    return _to_value(proto)


def _dir_case(source: str, folder: Path) -> Case:
    def load():
        model = onnx.load(str(folder / "model.onnx"))
        ins = _real_inputs(model)
        feeds = []
        for ds in sorted(folder.glob("test_data_set_*"), key=lambda p: int(p.name.rsplit("_", 1)[-1])):
            files = sorted(ds.glob("input_*.pb"), key=lambda p: int(p.stem.split("_")[-1]))
            feeds.append({vi.name: _read_pb(f, vi.type) for vi, f in zip(ins, files)})
        return model, feeds

    return Case(f"{source}/{folder.name}", source, load)


def random_feed(model: onnx.ModelProto, seed: int) -> dict[str, Any]:
    """A standard-normal (float) / zero (integer) feed for the model's tensor inputs; dynamic dims are 1."""
    rng = np.random.default_rng(seed)
    feed = {}
    for vi in _real_inputs(model):
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in tt.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        feed[vi.name] = (rng.standard_normal(shape).astype(dtype) if np.dtype(dtype).kind == "f"
                         else np.zeros(shape, dtype))
    return feed


def _light_case(path: Path) -> Case:
    def load():
        model = onnx.load(str(path))
        return model, [random_feed(model, zlib.crc32(path.name.encode()))]

    return Case(f"light/{path.stem}", "light", load)


def all_cases() -> list[Case]:
    """Every case, in a fixed order: node cases (each followed by its +constw variant), then the data folders."""
    cases: list[Case] = []
    for tc in _node_testcases():
        cases.append(_node_case(tc))
        names = _freeze_slots(tc.model)
        if names:
            cases.append(_constw_case(tc, names))
    data = _onnx_data_dir()
    for source in DATA_SOURCES:
        if source == "light":
            cases += [_light_case(Path(p)) for p in sorted(glob.glob(str(data / source / "*.onnx")))]
        else:
            cases += [_dir_case(source, Path(p).parent) for p in sorted(glob.glob(str(data / source / "*" / "model.onnx")))]
    return cases


def select(cases: list[Case], names: tuple[str, ...] | list[str]) -> list[Case]:
    by_name = {c.name: c for c in cases}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise KeyError(f"no such sweep case(s): {missing}")
    return [by_name[n] for n in names]


# ---------------------------------------------------------------------------------------------- running models
def _session(model: onnx.ModelProto | str):
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    src = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def _run_all(sess, feeds: list[dict]) -> list[dict[str, Any]]:
    names = [o.name for o in sess.get_outputs()]
    return [dict(zip(names, sess.run(names, feed))) for feed in feeds]


def _leaves(name: str, v: Any):
    if isinstance(v, (list, tuple)):
        for i, x in enumerate(v):
            yield from _leaves(f"{name}[{i}]", x)
    elif isinstance(v, dict):
        for k in sorted(v, key=str):
            yield from _leaves(f"{name}[{k!r}]", v[k])
    else:
        yield name, (None if v is None else np.asarray(v))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:500]


def largest_activation_scale(model: onnx.ModelProto) -> float | None:
    """The largest scale of a QuantizeLinear (an activation, quantized at run time) in the top-level graph."""
    inits = {t.name: t for t in model.graph.initializer}
    best = None
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear" and len(n.input) > 1 and n.input[1] in inits:
            s = float(np.max(numpy_helper.to_array(inits[n.input[1]])))
            best = s if best is None else max(best, s)
    return best


def compare(ref_runs: list[dict], q_runs: list[dict], *, quantized: bool) -> tuple[bool, list[dict], str | None]:
    """Compare per output over all data sets; returns (ok, per-output metrics, first failure reason).

    Quantized models: a float output passes when its SQNR >= SQNR_MIN_DB, or its largest error is at
    most MAX_STEPS steps of an 8-bit grid over the output's own range, (max - min) / 255; other dtypes
    must match exactly. Unchanged models: allclose(rtol=UNCHANGED_RTOL, atol=UNCHANGED_ATOL).
    Non-finite values must sit at the same places with the same values in both.
    """
    pairs: dict[str, list[tuple[Any, Any]]] = {}
    for ref, q in zip(ref_runs, q_runs):
        if set(ref) != set(q):
            return False, [], f"output names differ: {sorted(ref)} vs {sorted(q)}"
        for name in ref:
            rl, ql = list(_leaves(name, ref[name])), list(_leaves(name, q[name]))
            if [n for n, _ in rl] != [n for n, _ in ql]:
                return False, [], f"output '{name}' has a different structure ({len(rl)} vs {len(ql)} elements)"
            for (leaf, r), (_, x) in zip(rl, ql):
                pairs.setdefault(leaf, []).append((r, x))
    metrics, failure = [], None
    for leaf, items in pairs.items():
        m: dict[str, Any] = {"output": leaf}
        reason = None
        sig = noise = 0.0
        max_abs, lo, hi, count, differ = 0.0, math.inf, -math.inf, 0, 0
        is_float = True
        for r, x in items:
            if r is None or x is None:
                if (r is None) != (x is None):
                    reason = "one side is an empty optional"
                continue
            if r.shape != x.shape:
                reason = f"shape {list(x.shape)} differs from the original's {list(r.shape)}"
                break
            if r.dtype != x.dtype:
                reason = f"dtype {x.dtype} differs from the original's {r.dtype}"
                break
            if r.dtype.kind not in "fc":
                is_float = False
                if r.dtype.kind in "OUS":
                    differ += int(np.sum(r.astype(str) != x.astype(str)))
                else:
                    differ += int(np.sum(r != x))
                count += r.size
                continue
            r64, x64 = r.astype(np.float64), x.astype(np.float64)
            fin = np.isfinite(r64)
            if not np.array_equal(fin, np.isfinite(x64)) or not np.array_equal(r64[~fin], x64[~fin], equal_nan=True):
                reason = "non-finite values differ (NaN/Inf where the original has none, or vice versa)"
                break
            err = x64[fin] - r64[fin]
            rf = r64[fin]
            sig += float(np.sum(rf * rf))
            noise += float(np.sum(err * err))
            if err.size:
                max_abs = max(max_abs, float(np.max(np.abs(err))))
                lo, hi = min(lo, float(rf.min())), max(hi, float(rf.max()))
                if not quantized:
                    differ += int(np.sum(~np.isclose(x64[fin], rf, rtol=UNCHANGED_RTOL, atol=UNCHANGED_ATOL)))
            count += int(fin.sum())
        if reason is None and is_float:
            sqnr = math.inf if noise == 0 else (10 * math.log10(sig / noise) if sig > 0 else -math.inf)
            step = (hi - lo) / 255.0 if hi > lo else 0.0
            m.update(sqnr_db=_finite(sqnr), max_abs_error=max_abs, step=step,
                     max_error_steps=_finite(max_abs / step) if step > 0 else (0.0 if max_abs == 0 else "inf"))
            if quantized:
                if not (noise == 0 or sqnr >= SQNR_MIN_DB or (step > 0 and max_abs <= MAX_STEPS * step)):
                    reason = (f"SQNR {sqnr:.1f} dB < {SQNR_MIN_DB} dB and max |error| {max_abs:.4g} = "
                              f"{max_abs / step if step else math.inf:.1f} steps > {MAX_STEPS} (step {step:.4g})")
            elif differ:
                reason = f"{differ} of {count} values differ beyond rtol {UNCHANGED_RTOL}, atol {UNCHANGED_ATOL} (max |error| {max_abs:.4g})"
        elif reason is None and differ:
            m["differing"] = differ
            reason = f"{differ} of {count} non-float values differ"
        if reason:
            m["failure"] = reason
            failure = failure or f"output '{leaf}': {reason}"
        metrics.append(m)
    return failure is None, metrics, failure


def _finite(x: float) -> float | str:
    return round(x, 3) if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def qpass_frame(exc: BaseException) -> str | None:
    """The innermost traceback frame inside the qpass package (following __cause__ / __context__)."""
    seen = set()
    best = None
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        for fr in traceback.extract_tb(e.__traceback__):
            if fr.filename.startswith(QPASS_DIR + os.sep):
                best = f"{os.path.relpath(fr.filename, REPO)}:{fr.lineno} in {fr.name}: {(fr.line or '').strip()}"
        e = e.__cause__ or e.__context__
    return best


def _suspect(exc: BaseException) -> str | None:
    """Why a QpassError refusal looks like a qpass bug rather than bad input (None when it does not)."""
    from qpass import errors

    cause = exc.__cause__
    if isinstance(exc, errors.PassError):
        if isinstance(cause, errors.PreconditionError):
            return None
        what = _one_line(cause) if cause is not None else "no cause"
        return f"a pass failed on a model the ONNX checker and onnxruntime accept ({what})"
    msg = str(exc)
    if "cannot load the calibration model" in msg or "cannot load the quantized model" in msg:
        return "onnxruntime cannot load a model qpass built from one it loads"
    if "onnxruntime failed on calibration sample" in msg:
        return "the calibration model fails on a feed the original model runs on"
    return None


# ---------------------------------------------------------------------------------------------- classification
def _opset(model: onnx.ModelProto) -> int | None:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def classify(case: Case, *, stage: Callable[[str], None] = lambda s: None, retry: bool = True,
             on_partial: Callable[[dict], None] = lambda r: None, overrides: dict | None = None) -> dict:
    """Classify one case; see :data:`OUTCOMES`. Never raises for anything a case does.

    ``overrides`` are QuantConfig fields passed to ``qpass.quantize`` (``python -m tools.sweep --set``).
    """
    overrides = dict(overrides or {})
    t0 = time.perf_counter()
    rec: dict[str, Any] = {"name": case.name, "source": case.source}
    stage("load")
    try:
        model, feeds = case.load()
    except Exception as exc:  # noqa: BLE001 - a case we cannot even build
        rec.update(outcome="skipped_original", reason=f"cannot build the case: {_one_line(exc)}")
        return _done(rec, t0)
    rec["opset"] = _opset(model)
    rec["inputs"] = len(_real_inputs(model))
    rec["data_sets"] = len(feeds)

    # 1. the original must be valid and run, or nothing can be concluded
    stage("original")
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # noqa: BLE001
        rec.update(outcome="skipped_original", reason=f"ONNX checker rejects the original: {_one_line(exc)}")
        return _done(rec, t0)
    try:
        ref_runs = _run_all(_session(model), feeds)
    except Exception as exc:  # noqa: BLE001
        rec.update(outcome="skipped_original", reason=f"onnxruntime cannot run the original: {_one_line(exc)}")
        return _done(rec, t0)

    rec.update(_quantize_and_check(model, feeds, ref_runs, overrides, stage))
    on_partial(_done(dict(rec), t0))
    if retry and rec["outcome"] == "refused" and rec.get("error_type") == "OpsetError" and (rec["opset"] or 0) < RETRY_OPSET:
        r = {"config": {"target_opset": RETRY_OPSET}}
        r.update(_quantize_and_check(model, feeds, ref_runs, {**overrides, "target_opset": RETRY_OPSET},
                                     lambda s: stage(f"retry:{s}")))
        rec["retry"] = r
    return _done(rec, t0)


def _done(rec: dict, t0: float) -> dict:
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    return rec


def _quantize_and_check(model: onnx.ModelProto, feeds: list[dict], ref_runs: list[dict], overrides: dict,
                        stage: Callable[[str], None]) -> dict:
    import qpass
    from qpass.errors import QpassError

    rec: dict[str, Any] = {"invalid_written": False}
    before = model.SerializeToString(deterministic=True)
    with tempfile.TemporaryDirectory(prefix="qpass-sweep-") as tmp:
        out_path = Path(tmp) / "model.qpass.onnx"
        stage("quantize")
        t = time.perf_counter()
        try:
            result = qpass.quantize(model, calib=feeds, allow_empty=True, val_fraction=0.0, output=out_path, **overrides)
        except QpassError as exc:
            rec.update(outcome="refused", error_type=type(exc).__name__, message=str(exc)[:1000])
            why = _suspect(exc)
            if why:
                rec.update(suspect_bug=why, frame=qpass_frame(exc))
            return _finish(rec, model, before, t)
        except Exception as exc:  # noqa: BLE001 - anything else is a qpass bug
            rec.update(outcome="crashed", error_type=type(exc).__name__, message=str(exc)[:1000], frame=qpass_frame(exc),
                       traceback="".join(traceback.format_exception(exc)[-6:])[-3000:])
            return _finish(rec, model, before, t)
        rec["quantize_seconds"] = round(time.perf_counter() - t, 3)
        quantized = dict(result.report.quantized_nodes)
        rec["quantized_nodes"] = quantized
        rec["skipped"] = len(result.report.skipped)

        # 2. what qpass returned and wrote must be valid and load
        stage("check_written")
        problems = []
        try:
            onnx.checker.check_model(result.model, full_check=True)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"returned model fails the ONNX checker: {_one_line(exc)}")
        try:
            onnx.checker.check_model(str(out_path), full_check=True)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"written model fails the ONNX checker: {_one_line(exc)}")
        sess = None
        try:
            sess = _session(str(out_path))
        except Exception as exc:  # noqa: BLE001
            problems.append(f"onnxruntime cannot load the written model: {_one_line(exc)}")
        if problems:
            rec.update(outcome="crashed", invalid_written=True, error_type="InvalidModelWritten",
                       message="; ".join(problems)[:1000])
            return _finish(rec, model, before, t)

        # 3. it must run and agree with the original
        stage("run_written")
        try:
            q_runs = _run_all(sess, feeds)
        except Exception as exc:  # noqa: BLE001
            rec.update(outcome="crashed", error_type="WrittenModelRunError",
                       message=f"onnxruntime cannot run the written model: {_one_line(exc)}")
            return _finish(rec, model, before, t)
        ok, metrics, failure = compare(ref_runs, q_runs, quantized=bool(quantized))
        rec["outputs"] = metrics
        if quantized:
            scale = largest_activation_scale(result.model)
            rec["largest_activation_scale"] = scale
            rec["outcome"] = "quantized" if ok else "quantized_inaccurate"
        else:
            rec["outcome"] = "unchanged"
            if not ok:
                rec["unchanged_mismatch"] = True
        if failure:
            rec["reason"] = failure
    return _finish(rec, model, before, t)


def _finish(rec: dict, model: onnx.ModelProto, before: bytes, t: float) -> dict:
    rec.setdefault("quantize_seconds", round(time.perf_counter() - t, 3))
    if model.SerializeToString(deterministic=True) != before:
        rec["input_mutated"] = True
    return rec


# ---------------------------------------------------------------------------------------------- isolation
def _worker(conn, cases: list[Case], retry: bool, overrides: dict) -> None:
    import warnings

    warnings.simplefilter("ignore")
    while True:
        i = conn.recv()
        if i is None:
            return
        rec = classify(cases[i], stage=lambda s: conn.send(("stage", s)), retry=retry,
                       on_partial=lambda r: conn.send(("partial", r)), overrides=overrides)
        conn.send(("result", rec))


class IsolatedRunner:
    """Runs :func:`classify` in a forked worker; a case over the time limit, or one that kills the worker, is recorded and the worker replaced."""

    def __init__(self, cases: list[Case], time_limit: float, retry: bool = True, overrides: dict | None = None):
        self.cases, self.time_limit, self.retry, self.overrides = cases, time_limit, retry, dict(overrides or {})
        self.ctx = mp.get_context("fork")
        self.proc = None
        self.conn = None

    def _start(self) -> None:
        parent, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_worker, args=(child, self.cases, self.retry, self.overrides), daemon=True)
        self.proc.start()
        child.close()
        self.conn = parent

    def _kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.join(5)
        self.proc = self.conn = None

    def run(self, i: int) -> dict:
        if self.proc is None or not self.proc.is_alive():
            self._start()
        case = self.cases[i]
        t0 = time.perf_counter()
        self.conn.send(i)
        stage, partial = "start", None
        while True:
            remaining = self.time_limit - (time.perf_counter() - t0)
            if remaining <= 0:
                self._kill()
                return _lost(case, partial, stage, f"over the {self.time_limit:g} s time limit", t0, timeout=True)
            try:
                ready = self.conn.poll(min(remaining, 1.0))
            except (EOFError, OSError):
                ready = True
            if not ready:
                if not self.proc.is_alive():
                    self.proc.join(2)
                    code = self.proc.exitcode
                    self._kill()
                    return _lost(case, partial, stage, f"worker process died (exit code {code})", t0)
                continue
            try:
                kind, payload = self.conn.recv()
            except (EOFError, OSError):
                self.proc.join(2)
                code = self.proc.exitcode
                self._kill()
                return _lost(case, partial, stage, f"worker process died (exit code {code})", t0)
            if kind == "stage":
                stage = payload
            elif kind == "partial":
                partial = payload
            else:
                return payload

    def close(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            with contextlib.suppress(Exception):
                self.conn.send(None)
            self.proc.join(5)
        self._kill()


def _lost(case: Case, partial: dict | None, stage: str, why: str, t0: float, timeout: bool = False) -> dict:
    """The record of a case whose worker hung or died: blame follows the stage it was in."""
    if partial is not None and stage.startswith("retry:"):
        rec = partial
        rec["retry"] = {"config": {"target_opset": RETRY_OPSET}, "outcome": "crashed", "invalid_written": False,
                        "error_type": "Timeout" if timeout else "WorkerDied", "message": f"{why} in stage {stage}"}
    elif stage in ("start", "load", "original"):
        rec = {"name": case.name, "source": case.source, "outcome": "skipped_original",
               "reason": f"the original model: {why} (stage {stage})"}
    else:
        rec = {"name": case.name, "source": case.source, "outcome": "crashed", "invalid_written": False,
               "error_type": "Timeout" if timeout else "WorkerDied", "message": f"{why} in stage {stage}"}
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    return rec


# ---------------------------------------------------------------------------------------------- report
def tally(records: list[dict]) -> dict:
    def count(recs):
        t = {k: 0 for k in OUTCOMES}
        for r in recs:
            t[r["outcome"]] += 1
        return t

    retries = [r["retry"] for r in records if "retry" in r]
    return {
        "cases": len(records),
        "outcomes": count(records),
        "invalid_written": sum(bool(r.get("invalid_written")) for r in records),
        "unchanged_mismatch": sum(bool(r.get("unchanged_mismatch")) for r in records),
        "input_mutated": sum(bool(r.get("input_mutated")) for r in records),
        "refused_suspect_bug": sum(bool(r.get("suspect_bug")) for r in records),
        "retry": {"cases": len(retries), "outcomes": count(retries),
                  "invalid_written": sum(bool(r.get("invalid_written")) for r in retries),
                  "unchanged_mismatch": sum(bool(r.get("unchanged_mismatch")) for r in retries),
                  "refused_suspect_bug": sum(bool(r.get("suspect_bug")) for r in retries)},
    }


def git_state() -> str | None:
    """``<commit>`` of the repository, with ``+uncommitted changes in qpass/`` when its qpass/ differs."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "qpass"], cwd=REPO, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + (" + uncommitted changes in qpass/" if dirty else "")) if head else None


def versions() -> dict:
    import onnxruntime

    import qpass

    try:
        import onnx_graphsurgeon as gs
        gs_version = gs.__version__
    except Exception:  # noqa: BLE001
        gs_version = None
    return {"qpass": qpass.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "onnx_graphsurgeon": gs_version, "numpy": np.__version__, "python": platform.python_version()}


def write_markdown(path: Path, doc: dict) -> None:
    t, meta = doc["tally"], doc["meta"]
    recs = doc["cases"]
    lines = [
        "# qpass sweep over the ONNX backend test models",
        "",
        f"Generated by `{meta['command']}` on {meta['date']} ({meta['seconds']:.0f} s wall, "
        f"{meta['time_limit_s']:g} s per-case limit, one worker process). Per-case results: "
        f"`{Path(meta['json']).name}`.",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
        + (f"; qpass at commit {meta['git']}" if meta.get("git") else "") + ".",
        "",
        "Each case: `qpass.quantize(model, calib=<the case's input feeds>, allow_empty=True, val_fraction=0.0, "
        f"output=<tmp>{''.join(f', {k}={v!r}' for k, v in meta.get('config_overrides', {}).items())})`. A case refused with `OpsetError` is rerun with `target_opset=13` (the fix qpass's hint names) "
        "and tallied under *retry*. Case sources: the operator tests of `collect_testcases` (`node/`), the same "
        "with the weight/bias inputs of top-level Conv/ConvTranspose/MatMul/Gemm frozen to initializers "
        "(`+constw`, since the operator tests feed weights as graph inputs, which qpass leaves in float), and the "
        "model folders `simple/`, `pytorch-converted/`, `pytorch-operator/`, `light/` (random input) of the onnx package.",
        "",
        "| outcome | cases | retry (target_opset 13) |",
        "| --- | ---: | ---: |",
    ]
    for k in OUTCOMES:
        lines.append(f"| {k} | {t['outcomes'][k]} | {t['retry']['outcomes'][k]} |")
    lines += [f"| **total** | **{t['cases']}** | **{t['retry']['cases']}** |", "",
              f"- `invalid_written` (a returned/written model fails the checker or does not load): "
              f"**{t['invalid_written']}** (retry: {t['retry']['invalid_written']})",
              f"- `unchanged_mismatch` (nothing quantized, yet the output differs from the original): "
              f"**{t['unchanged_mismatch']}** (retry: {t['retry']['unchanged_mismatch']})",
              f"- input ModelProto mutated by qpass: **{t['input_mutated']}**",
              f"- refusals that look like qpass bugs (a pass failed on a valid model, onnxruntime cannot load "
              f"qpass's calibration model, ...): **{t['refused_suspect_bug']}** (retry: {t['retry']['refused_suspect_bug']})",
              "",
              "## Outcomes", "",
              "- `quantized`: `report.quantized_nodes` is non-empty, and the written model passes "
              "`onnx.checker.check_model(full_check=True)`, loads and runs in onnxruntime (CPU) on the case's inputs, "
              "and agrees with the original (also run in onnxruntime) within the accuracy criterion below.",
              "- `quantized_inaccurate`: as `quantized`, but some output misses the criterion (a finding, not a crash).",
              "- `unchanged`: nothing quantized (`allow_empty`); the written model must pass the checker and load; its "
              f"outputs are compared with `allclose(rtol={UNCHANGED_RTOL}, atol={UNCHANGED_ATOL})` (flag `unchanged_mismatch`).",
              "- `refused`: a `qpass.QpassError` subclass (class and message recorded). Refusals whose cause is internal "
              "(a `PassError` not caused by a `PreconditionError`, onnxruntime rejecting the calibration model qpass "
              "built, the calibration model failing where the original runs) carry `suspect_bug`.",
              "- `crashed`: any other exception (type, message, innermost qpass frame), and also: a written model "
              "that fails the checker or does not load (`InvalidModelWritten`, with `invalid_written`), one that "
              "loads but does not run (`WrittenModelRunError`), a hang past the time limit (`Timeout`) or a dead "
              "worker (`WorkerDied`) while qpass or the written model runs.",
              "- `skipped_original`: the original fails the checker or does not load/run in onnxruntime (also: hangs).",
              "",
              "## Accuracy criterion", "",
              f"Per float output of a quantized model, over all data sets (finite values; NaN/Inf must sit at the "
              f"same places): **pass if SQNR >= {SQNR_MIN_DB:g} dB, or max |error| <= {MAX_STEPS:g} steps**, where a "
              "step is `(max - min) / 255` of the original output's values, i.e. the step of an 8-bit grid over the "
              "output's own range. 8-bit min-max quantization of one tensor gives about 40 dB on Gaussian data; "
              f"{SQNR_MIN_DB:g} dB (RMS error 5.6 % of the RMS signal) leaves room for a few stacked quantized layers. "
              "The step clause keeps outputs whose energy is small next to their range (sparse or near-zero signals) "
              "from failing on SQNR alone. Integer/bool outputs must match exactly. Each record also has the largest "
              "activation scale of the quantized model, cosine-free SQNR and max error in steps.",
              ""]
    sections = [
        ("Crashes", lambda r: r.get("outcome") == "crashed",
         lambda r: f": **{r.get('error_type')}**: {_md(r.get('message', ''))}" + (f" — at `{r['frame']}`" if r.get("frame") else "")),
        ("Inaccurate", lambda r: r.get("outcome") == "quantized_inaccurate",
         lambda r: f" ({_nodes(r)}): {_md(r.get('reason', ''))}"),
        ("Unchanged but different", lambda r: r.get("unchanged_mismatch"), lambda r: f": {_md(r.get('reason', ''))}"),
        ("Refusals that look like bugs", lambda r: r.get("suspect_bug"),
         lambda r: f": {r['error_type']}: {_md(r['message'][:300])}" + (f" — at `{r['frame']}`" if r.get("frame") else "")),
    ]
    for i, (title, pick, describe) in enumerate(sections):
        found = [(r["name"], r) for r in recs if pick(r)] + \
                [(r["name"] + " (retry)", r["retry"]) for r in recs if r.get("retry") and pick(r["retry"])]
        lines += ([] if i == 0 else [""]) + [f"## {title}", ""]
        if not found:
            lines.append("None.")
        lines += [f"- `{name}`{describe(r)}" for name, r in found]
    refusals: dict[str, int] = {}
    for r in recs:
        for x in (r, r.get("retry")):
            if x and x.get("outcome") == "refused":
                key = f"{x['error_type']}: {_reason_key(x['message'])}"
                refusals[key] = refusals.get(key, 0) + 1
    lines += ["", "## Refusals by kind (case + retry)", "", "| count | refusal |", "| ---: | --- |"]
    for k, v in sorted(refusals.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {v} | {_md(k)} |")
    skipped: dict[str, int] = {}
    for r in recs:
        if r["outcome"] == "skipped_original":
            key = _reason_key(r.get("reason", ""))
            skipped[key] = skipped.get(key, 0) + 1
    lines += ["", "## Originals skipped, by reason (the 12 most common)", "", "| count | reason |", "| ---: | --- |"]
    for k, v in sorted(skipped.items(), key=lambda kv: -kv[1])[:12]:
        lines.append(f"| {v} | {_md(k)} |")
    q = [r for r in recs if r["outcome"] in ("quantized", "quantized_inaccurate")] + \
        [r["retry"] | {"name": r["name"] + " (retry)"} for r in recs if r.get("retry", {}).get("outcome") in ("quantized", "quantized_inaccurate")]
    rows = []
    for r in q:
        outs = [o for o in r.get("outputs", []) if "sqnr_db" in o]
        worst = min((o["sqnr_db"] if isinstance(o["sqnr_db"], (int, float)) else (math.inf if o["sqnr_db"] == "inf" else -math.inf)
                     for o in outs), default=math.inf)
        steps = max((o["max_error_steps"] if isinstance(o["max_error_steps"], (int, float)) else math.inf for o in outs), default=0)
        rows.append((worst, f"| `{r['name']}` | {_nodes(r)} | {worst:.1f} | {steps:.2f} | {r['outcome']} |"))
    rows.sort(key=lambda x: x[0])
    lines += ["", f"## Quantized cases: the {min(15, len(rows))} of {len(rows)} with the lowest SQNR", "",
              "| case | nodes | worst SQNR dB | worst max error (steps) | outcome |", "| --- | --- | ---: | ---: | --- |"]
    lines += [row for _, row in rows[:15]]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def dump_json(doc: dict) -> str:
    """The document with one line per case (compact, and diffs line up with cases)."""
    head = {k: v for k, v in doc.items() if k != "cases"}
    text = json.dumps(head, indent=1, default=str)[:-2]
    cases = ",\n".join("  " + json.dumps(r, default=str, separators=(",", ":")) for r in doc["cases"])
    return f'{text},\n "cases": [\n{cases}\n ]\n}}\n'


def _nodes(r: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in (r.get("quantized_nodes") or {}).items())


def _md(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def _reason_key(msg: str) -> str:
    """A message with names and numbers blurred, to group refusals and skips."""
    import re

    s = msg.split(" (hint:")[0]
    s = re.sub(r"^<ModelProto>: ", "", s)
    s = re.sub(r"'[^']*'", "'…'", s)
    s = re.sub(r"\b\d+(\.\d+)?\b", "N", s)
    return s[:160]


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.sweep", description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="only the first N cases (after --subset)")
    ap.add_argument("--subset", choices=["ci"], default=None, help="only the fixed CI subset")
    ap.add_argument("--match", default=None, help="only cases whose name contains this string")
    ap.add_argument("--out", default="docs/sweep.json", help="JSON output; the Markdown summary goes beside it (.md)")
    ap.add_argument("--time-limit", type=float, default=120.0, help="seconds per case (default 120)")
    ap.add_argument("--no-retry", action="store_true", help="do not rerun OpsetError refusals with target_opset=13")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a QuantConfig field for every case, e.g. --set format=qop --set per_channel=false (JSON values)")
    args = ap.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value

    t0 = time.perf_counter()
    cases = all_cases()
    if args.subset == "ci":
        cases = select(cases, CI_SUBSET)
    if args.match:
        cases = [c for c in cases if args.match in c.name]
    if args.limit is not None:
        cases = cases[: args.limit]
    command = "python -m tools.sweep " + " ".join(argv if argv is not None else sys.argv[1:])
    runner = IsolatedRunner(cases, args.time_limit, retry=not args.no_retry, overrides=overrides)
    records = []
    try:
        for i, case in enumerate(cases):
            rec = runner.run(i)
            records.append(rec)
            extra = f" retry={rec['retry']['outcome']}" if "retry" in rec else ""
            print(f"[{i + 1}/{len(cases)}] {rec['outcome']:<21} {rec.get('seconds', 0):7.2f}s {case.name}{extra}", flush=True)
    finally:
        runner.close()
    seconds = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"meta": {"command": command.strip(), "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                    "seconds": round(seconds, 1), "time_limit_s": args.time_limit, "versions": versions(),
                    "git": git_state(),
                    "json": str(out), "config_overrides": overrides, "sqnr_min_db": SQNR_MIN_DB, "max_steps": MAX_STEPS,
                    "unchanged_rtol": UNCHANGED_RTOL, "unchanged_atol": UNCHANGED_ATOL, "retry_opset": RETRY_OPSET,
                    "platform": platform.platform()},
           "tally": tally(records), "cases": records}
    out.write_text(dump_json(doc), encoding="utf-8")
    write_markdown(out.with_suffix(".md"), doc)
    t = doc["tally"]
    print(json.dumps({k: t[k] for k in ("cases", "outcomes", "invalid_written", "unchanged_mismatch", "input_mutated",
                                        "refused_suspect_bug")}, indent=1))
    print("retry:", json.dumps(t["retry"]))
    print(f"{seconds:.0f} s; wrote {out} and {out.with_suffix('.md')}")
    return 1 if t["outcomes"]["crashed"] or t["invalid_written"] else 0


if __name__ == "__main__":
    sys.exit(main())
