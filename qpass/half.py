"""The float16 / bfloat16 mode: measure, convert, check against fp32, move the worst tensors back, save.

    load -> [calibrate: |x| max and flushed-to-zero counts per float tensor] -> convert (recipes.float_passes)
         -> fidelity check on the validation split -> [fallback: qpass.search.float_fallback] -> evaluate -> save

The input may be a float model or the output of another mode (int8 QDQ, weight-only): its float remainder is
converted. Without calibration data the conversion is data-free: the op block list, the schemas' type
constraints and the weights' own values decide; the report says so.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import onnx
import onnx.numpy_helper

from . import stages
from .calib.collect import collect_ranges
from .calib.data import input_specs
from .calib.half_range import HalfRange
from .calib.sources import calibration_data, validation_data
from .calib.table import CalibrationTable
from .config import QuantConfig
from .graph import constant_tensors
from .io import annotate_shapes, save_model
from .opset import apply_opset_policy
from .pass_manager import PassRecord, run_model_passes
from .passes.convert_float16 import FP16_MAX, WEIGHT_FLUSH_SHARE, value_types
from .recipes import float_passes
from .report import Report
from .runtime import pick_providers
from .verify import verify_model

#: a measured tensor stays float32 when its |x| max exceeds float16's max divided by this (headroom for inputs
#: beyond the calibration data's)
OVERFLOW_HEADROOM = 2.0
#: ... or when the values float16 flushes to zero hold more than this share of its sum of |x| (what the flush loses;
#: the weights' rule, convert_float16.WEIGHT_FLUSH_SHARE)
UNDERFLOW_MASS_SHARE = WEIGHT_FLUSH_SHARE
#: ... or, for a tensor whose zeros change a result's kind (it reaches a Log, a Reciprocal or a divisor), when more
#: than this share of its non-zero values flush to zero
UNDERFLOW_SHARE = 0.01
#: where a flushed zero changes a result's kind: op type -> the input positions that must not become 0
ZERO_SENSITIVE_INPUTS = {"Log": (0,), "Reciprocal": (0,), "Div": (1,), "Pow": (0,),
                         # scale-invariant normalizations: a channel of tiny values comes out O(1), flushed 0
                         "InstanceNormalization": (0,), "LayerNormalization": (0,), "GroupNormalization": (0,),
                         "MeanVarianceNormalization": (0,), "LpNormalization": (0,)}
#: ops whose output is 0 where (some of) their input is: a zero-sensitive input is followed back through them
ZERO_PRESERVING = frozenset({"Sqrt", "Abs", "Relu", "Cast", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten",
                             "Identity", "Mul", "Div", "Pow", "Expand", "Slice", "Gather", "Concat", "Split", "ReduceSum",
                             "ReduceMean", "ReduceMax", "ReduceL2", "ReduceSumSquare", "Tile", "Pad", "MaxPool",
                             "AveragePool", "GlobalAveragePool", "Resize", "Neg"})


def clamp_mask_fills(model: onnx.ModelProto, cfg: QuantConfig, *, in_place: bool = False
                     ) -> tuple[onnx.ModelProto, list[str]]:
    """For float16: ``model`` with its Softmax mask fills clamped (passes/saturate_mask_fills.py), a copy unless
    ``in_place``, and the constants clamped; the model itself otherwise (bfloat16 holds float32's range)."""
    if cfg.float_type != "float16":
        return model, []
    from .passes.saturate_mask_fills import SaturateMaskFills

    names = SaturateMaskFills().find(model)
    if not names:
        return model, []
    work = model
    if not in_place:
        work = onnx.ModelProto()
        work.CopyFrom(model)
    work, result = SaturateMaskFills().apply(work, names)
    return work, list(result.stats["constants"])


def float_tensors(model: onnx.ModelProto) -> list[str]:
    """The float32 node outputs of the main graph (what calibration measures; bodies' values are not fetched)."""
    types = value_types(model)
    outs = []
    for n in model.graph.node:
        for o in n.output:
            if o and types.get(o) == onnx.TensorProto.FLOAT and n.op_type != "Constant":
                outs.append(o)
    return outs


def zero_sensitive(model: onnx.ModelProto) -> set[str]:
    """Main-graph tensors whose exact zeros would reach a Log, a Reciprocal, a divisor or the base of a Pow whose
    exponent is not a non-negative constant (followed back through ops that keep a zero a zero): there a value
    flushed to 0 turns a finite result into inf or NaN."""
    producer = {o: n for n in model.graph.node for o in n.output if o}
    consts = constant_tensors(model)

    def non_negative_constant(name: str) -> bool:
        t = consts.get(name)
        return t is not None and bool(np.all(onnx.numpy_helper.to_array(t) >= 0))

    seen: set[str] = set()
    todo = [n.input[i] for n in model.graph.node for i in ZERO_SENSITIVE_INPUTS.get(n.op_type, ())
            if i < len(n.input) and n.input[i]
            and not (n.op_type == "Pow" and len(n.input) > 1 and non_negative_constant(n.input[1]))]
    while todo:
        t = todo.pop()
        if t in seen:
            continue
        seen.add(t)
        p = producer.get(t)
        if p is not None and p.op_type in ZERO_PRESERVING:
            todo.extend(x for x in p.input if x)
    return seen


def measured_keep(stats, tensors: list[str], dtype: str, sensitive: set[str] | frozenset[str] = frozenset()
                  ) -> dict[str, str]:
    """Tensors that stay float32 by their measured statistics, with the reason. Underflow: a tensor in
    ``sensitive`` (see :func:`zero_sensitive`), or one measured without sums, by the share of its non-zero values
    flushed; any other by the share of its sum of |x| that the flush loses."""
    keep = {}
    for t in tensors:
        hr = stats.get(t, HalfRange.kind) if stats is not None else None
        if hr is None:
            continue
        mass = hr.tiny_mass_share
        if hr.nonfinite:
            keep[t] = f"{hr.nonfinite} inf/NaN value(s) in float32 already"
        elif dtype != "float16":
            continue
        elif hr.absmax * OVERFLOW_HEADROOM > FP16_MAX:
            keep[t] = f"|x| up to {hr.absmax:.4g} measured (> {FP16_MAX:g} / {OVERFLOW_HEADROOM:g})"
        elif (t in sensitive or mass is None) and hr.tiny_share > UNDERFLOW_SHARE:
            keep[t] = (f"{hr.tiny_share:.1%} of its non-zero values measured below float16's smallest subnormal"
                       + (" (it reaches a Log, Reciprocal, divisor or Pow base)" if t in sensitive else ""))
        elif mass is not None and mass > UNDERFLOW_MASS_SHARE:
            keep[t] = f"{mass:.2%} of its sum of |x| measured below float16's smallest subnormal"
    return keep


def convert(model: onnx.ModelProto, config: QuantConfig, keep_tensors: dict[str, str] | set[str] = (),
            keep_nodes: tuple[str, ...] = ()) -> tuple[onnx.ModelProto, list[PassRecord]]:
    """A converted copy of ``model`` (the recipe's float passes, each verified), and the pass records. bfloat16: a
    decomposed LayerNorm whose input came out float32 is converted again with its gamma and beta float32 too
    (:func:`qpass.passes.rms_norm_divide.mixed_layer_norms`)."""
    from .passes.rms_norm_divide import mixed_layer_norms

    keep, nodes = frozenset(keep_tensors), _node_names(model, config, keep_nodes)
    for _ in range(3):  # bfloat16: a LayerNorm left with a float32 input gets float32 gamma and beta (one more pass)
        out = onnx.ModelProto()
        out.CopyFrom(model)
        converted, records = run_model_passes(out, float_passes(config, keep_tensors=keep, keep_nodes=nodes),
                                              verify=verify_model)
        mixed = mixed_layer_norms(model, converted) if config.float_type == "bfloat16" else set()
        if not mixed:
            break
        keep = keep | mixed
    return converted, records


def _node_names(model: onnx.ModelProto, config: QuantConfig, extra: tuple[str, ...]) -> tuple[str, ...]:
    """Names of the nodes (all scopes) that ``float_keep_nodes`` (names or full-match patterns) names, and ``extra``."""
    import re

    from .graph import proto_graphs

    patterns = [re.compile(p) for p in config.float_keep_nodes]
    names = set(extra)
    if patterns:
        for g, _ in proto_graphs(model.graph):
            names.update(n.name for n in g.node if n.name and any(p.fullmatch(n.name) for p in patterns))
    return tuple(sorted(names))


def run(model: Any, calib: Any, *, config: QuantConfig, notes: list[str], output=None, val=None, load_calib=None,
        save_calib=None, progress=None, check_writes=None):
    """The float16/bfloat16 mode of :func:`qpass.api.quantize` (``float_type`` set, no ``weight_only``)."""
    from .api import QuantizeResult, report_path_for

    cfg = config
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    name = "<ModelProto>" if isinstance(model, onnx.ModelProto) else str(model)
    original = stages.load(model)
    times["load"] = time.perf_counter() - t0
    if check_writes is not None and not isinstance(model, onnx.ModelProto):
        check_writes(model, output=output, report=output and report_path_for(output), save_calib=save_calib)
    report = Report(model=name, config=cfg.to_dict(), warnings=list(notes))
    opset = next((o.version for o in original.opset_import if o.domain in ("", "ai.onnx")), None)
    report.opset = {"input": opset, "output": opset}
    if cfg.target_opset is not None:  # upgraded only when asked (bfloat16 needs opset 13 for most ops)
        original, report.opset, upgraded = apply_opset_policy(original, cfg, name)
        report.warnings += upgraded
    specs = input_specs(original)
    working, clamped = clamp_mask_fills(original, cfg)
    tensors = float_tensors(working)
    held: list = []
    stats = None
    t = time.perf_counter()
    info: dict[str, Any] = {"source": None, "samples": 0, "tensors": 0}
    if load_calib is not None:
        table = CalibrationTable.load(load_calib)
        stats = table.statistics
        info = {"source": str(load_calib), "samples": table.samples, "tensors": len(tensors)}
    elif calib is not None or cfg.synthetic_calib:
        data = calibration_data(calib, specs, cfg, val_given=val is not None, subject=name)
        report.warnings += data.warnings
        held = data.held
        providers, note = pick_providers(cfg.calib_ep)
        table = collect_ranges(working, [], data.stream, providers=providers, specs=specs, synthetic=data.synthetic,
                               extra={x: ("halfrange",) for x in tensors},
                               on_sample=progress("measuring float16 ranges", data.total) if progress else None)
        stats = table.statistics
        info = {"source": data.description, "samples": table.samples, "tensors": len(tensors),
                "synthetic": data.synthetic, "provider": providers[0]}
        if note:
            report.warnings.append(note)
        if save_calib is not None:
            table.save(save_calib)
    else:
        report.warnings.append(f"{cfg.float_type} without calibration data: a data-free conversion (op block list, "
                               "type constraints and the weights' values decide); give --calib to keep the "
                               "activations that overflow or underflow in float32")
    times["calibrate"] = time.perf_counter() - t
    keep = measured_keep(stats, tensors, cfg.float_type, zero_sensitive(working))
    t = time.perf_counter()
    converted, records = convert(working, cfg, keep)
    times["convert"] = time.perf_counter() - t
    converted_record = _record(records, "convert_float16")
    if not converted_record.stats.get("half_nodes"):
        report.warnings.append(f"nothing converted to {cfg.float_type}: no node's type constraints at opset "
                               f"{report.opset.get('output')} allow it where the measurements do"
                               + (" (bfloat16 needs opset 13 for most ops: --target-opset 13)"
                                  if cfg.float_type == "bfloat16" and (report.opset.get("output") or 0) < 13 else ""))
    if cfg.float_type == "bfloat16":
        report.warnings += _kernel_opset_hint(converted_record.skipped, report.opset.get("output"))
    half_info: dict[str, Any] = {"type": cfg.float_type, "half_io": cfg.half_io,
                                 "measured_float32": dict(sorted(keep.items())),
                                 "mask_fills_clamped": clamped,
                                 "data_free": stats is None}
    samples, desc = (None, None)
    if cfg.validate:
        samples, desc = validation_data(val, specs, cfg, calib=calib, held=held, loaded_table=load_calib is not None,
                                        calibrated=stats is not None)
    if samples is not None:
        samples = list(samples)[:cfg.max_val_samples]
    random_fails = _fails_on(original, samples[0][0]) if samples and desc == "synthetic" else None
    if random_fails:
        report.warnings.append(f"not validated: the original model fails on random feeds ({random_fails}); give "
                               "--val PATH (or --calib) with real inputs to check the conversion")
        samples = None
    t = time.perf_counter()
    if samples and cfg.float_min_cosine > -1.0:
        from .search.float_fallback import fallback

        found = fallback(working, converted, cfg, samples, keep, convert)  # working: masks clamped, else fp32
        half_info["fidelity"] = found.report
        if found.model is not None:
            converted, records = found.model, found.records
        if found.report.get("runnable") is False:
            report.warnings.append(f"{cfg.float_type}: fidelity check not run: {found.report['note']}")
        elif not found.report["met"]:
            report.warnings.append(f"{cfg.float_type}: fidelity check not met ({found.report['note']})")
    times["fallback"] = time.perf_counter() - t
    half_info["shapes_annotated"] = annotate_shapes(converted)
    report.passes = records
    report.quantized_nodes = _half_ops(records)
    report.calibration = {**info, "half": half_info}
    report.sizes = {"input_bytes": stages.model_size(model, original), "output_bytes": _bytes(converted)}
    t = time.perf_counter()
    if not cfg.validate:
        report.warnings.append("not validated (validate = false / --no-validate)")
    elif not samples:
        if not random_fails:  # (that warning is above)
            report.warnings.append("not validated: no held-out samples (give --val PATH or more calibration samples)")
    else:
        report.validation = stages.evaluate(original, converted, samples, desc, cfg)
        report.warnings.extend(report.validation["findings"])
    times["validate"] = time.perf_counter() - t
    result = QuantizeResult(converted, report)
    if output is not None:
        report.output = str(output)
        t = time.perf_counter()
        result.output_path = save_model(converted, output, input_path=None if isinstance(model, onnx.ModelProto)
                                        else model, external_data=cfg.external_data)
        times["save"] = time.perf_counter() - t
        report.seconds = times
        result.report_path = report.save(report_path_for(output))
    report.seconds = times
    return result


def _fails_on(model: onnx.ModelProto, feed: dict) -> str | None:
    """onnxruntime's first error line when ``model`` cannot run ``feed`` on the CPU, else None (random feeds of a
    dynamic shape can be too short for a model: silero VAD's reflect Pad needs 2 samples or more)."""
    from .runtime import make_session

    try:
        session = make_session(model, what=None)
    except Exception:  # noqa: BLE001 - not loadable on the CPU (a CUDA-only op): the check itself will say
        return None
    try:
        session.run(None, feed)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises several unrelated types
        return (str(exc).splitlines() or [type(exc).__name__])[0][:300]
    return None


def _kernel_opset_hint(skipped, opset) -> list[str]:
    """A warning naming the nodes left float32 whose op onnxruntime's CUDA provider runs in bfloat16 only from a
    newer opset than the model's (``qpass.ops.CUDA_BFLOAT16_FROM``)."""
    from .ops import CUDA_BFLOAT16_FROM

    if opset is None:
        return []
    later: dict[str, int] = {}
    for s in skipped:
        if CUDA_BFLOAT16_FROM.get(s.op_type, 0) > opset:
            later[s.op_type] = later.get(s.op_type, 0) + 1
    if not later:
        return []
    need = max(CUDA_BFLOAT16_FROM[op] for op in later)
    ops = ", ".join(f"{op} {n}" for op, n in sorted(later.items(), key=lambda kv: -kv[1]))
    return [f"{sum(later.values())} node(s) stay float32 because onnxruntime's CUDA provider runs them in bfloat16 only "
            f"from a newer opset than the model's {opset} ({ops}): --target-opset {need} converts them"]


def _record(records: list[PassRecord], name: str) -> PassRecord | None:
    return next((r for r in records if r.name == name), None)


def _half_ops(records: list[PassRecord]) -> dict[str, int]:
    rec = _record(records, "convert_float16")
    return dict(rec.stats.get("half_ops", {})) if rec is not None else {}


def _bytes(model: onnx.ModelProto) -> int:
    from .io import model_bytes

    return model_bytes(model)
