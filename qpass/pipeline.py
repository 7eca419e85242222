"""quantize(): load -> opset check -> prepare passes -> streaming calibration -> quantize passes -> validate -> save.

The pipelines are the literal lists below; there is no registry.
"""
from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import onnx

from .calib.collect import RangeOptions, collect_ranges, pick_providers
from .calib.data import input_specs, open_samples, split_holdout, synthetic_samples
from .calib.table import CalibrationTable
from .config import INT16_MIN_OPSET, PER_CHANNEL_MIN_OPSET, QDQ_MIN_OPSET, SIXTEEN_BIT_TYPES, QuantConfig
from .errors import (CalibrationDataError, ModelSaveError, NothingQuantizedError, OpsetError, UnsupportedModelError,
                     VerificationError)
from .graph import WorkingGraph, op_types, used_quant_ops
from .io import default_opset, infer_shapes, keep_value_info_of, load_model, min_ir_version, same_file, save_model
from .pass_manager import PassContext, PassManager
from .passes.cleanup import Cleanup
from .passes.constants_to_initializers import ConstantsToInitializers
from .passes.fold_batchnorm import FoldBatchNorm
from .passes.fold_conv_bias_add import FoldConvBiasAdd
from .passes.insert_qdq import InsertQDQ
from .passes.lower_qop import LowerToQOperator
from .passes.matmul_bias_gemm import MatMulBiasToGemm
from .passes.placement import plan_quantization
from .passes.single_reader_dq import SingleReaderDequantize
from .report import Report, count_quantized
from .validate import validate
from .verify import verify_model

#: Progress hook: called with a label and a total (or None); returns a callable advanced once per sample.
ProgressFactory = Callable[[str, "int | None"], Callable[[], None]]


def prepare_passes():
    return [ConstantsToInitializers(), FoldBatchNorm(), FoldConvBiasAdd(), Cleanup()]


def quantize_passes(config: QuantConfig):
    passes = [InsertQDQ(), Cleanup()]
    if config.format == "qop":
        passes += [LowerToQOperator(), Cleanup()]
    else:
        passes += [MatMulBiasToGemm()]
    return passes + [SingleReaderDequantize()]


@dataclass
class QuantizeResult:
    model: onnx.ModelProto
    report: Report
    output_path: Path | None = None
    report_path: Path | None = None

    @property
    def passed(self) -> bool:
        v = self.report.validation
        return v is None or v.get("passed", True)


def default_output_path(model_path: str | os.PathLike) -> Path:
    p = Path(model_path)
    stem = p.name[:-5] if p.name.endswith(".onnx") else p.name
    return p.with_name(f"{stem}.qpass.onnx")


def report_path_for(output: str | os.PathLike) -> Path:
    p = Path(output)
    stem = p.name[:-5] if p.name.endswith(".onnx") else p.name
    return p.with_name(f"{stem}.report.json")


def quantize(model: str | os.PathLike | onnx.ModelProto, calib: str | os.PathLike | Iterable[Mapping[str, Any]] | None = None,
             *, config: QuantConfig | None = None, output: str | os.PathLike | None = None,
             val: str | os.PathLike | Iterable[Mapping[str, Any]] | None = None,
             load_calib: str | os.PathLike | None = None, save_calib: str | os.PathLike | None = None,
             dump_dir: str | os.PathLike | None = None, progress: ProgressFactory | None = None,
             **overrides: Any) -> QuantizeResult:
    """Quantize an fp32 ONNX model to int8 (QDQ) and validate it against the original.

    Args:
        model: a path to an ``.onnx`` file or an ``onnx.ModelProto`` (never modified, never written).
        calib: calibration data: a ``.npz`` file, a folder of ``.npz`` files (one sample each), a
            model-zoo ``test_data_set_*`` folder, or any iterable of feed dicts (name -> array).
        config: a :class:`QuantConfig`; keyword ``overrides`` replace its fields.
        output: where to write the model (atomically); its report goes beside it as ``*.report.json``.
        val: validation data in the same forms; by default a held-out split of ``calib``.
        load_calib / save_calib: read or write the calibration table as JSON.
        dump_dir: on a failing pass, the model from just before it is written here.
    Returns:
        :class:`QuantizeResult` with the quantized ``ModelProto`` and the :class:`Report`.
    Raises:
        QpassError subclasses for bad input, each naming the file, node or tensor.
    """
    cfg = (config or QuantConfig()).replace(**overrides) if overrides else (config or QuantConfig())
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    model_name = str(model) if not isinstance(model, onnx.ModelProto) else "<ModelProto>"
    original = load_model(model)
    times["load"] = time.perf_counter() - t0
    if not isinstance(model, onnx.ModelProto):  # every file this run writes, checked before any work
        writes = [("output", output), ("report", report_path_for(output) if output is not None else None),
                  ("save_calib", save_calib)]
        for what, path in writes:
            if path is not None and same_file(path, model):
                raise ModelSaveError(f"{what} path is the input model", subject=str(path),
                                     hint="qpass never writes its input; choose another path")
    report = Report(model=model_name, config=cfg.to_dict())

    present = used_quant_ops(original)
    if present:
        raise UnsupportedModelError(f"already quantized: it contains {sorted(present)}", subject=model_name,
                                    hint="qpass quantizes float models; give it the original fp32 model")

    working_model = _apply_opset(original, cfg, model_name, report)
    t = time.perf_counter()
    wg = WorkingGraph(infer_shapes(working_model))
    try:  # what the verifier rejects before any pass ran is the input's doing, not the first pass's
        verify_model(wg.export())
    except VerificationError as exc:
        raise UnsupportedModelError(f"the model is not valid after qpass's graph import/export, before any rewrite: "
                                    f"{exc.one_line()}", subject=model_name,
                                    hint="the ONNX checker accepts it, qpass's verifier does not") from exc
    manager_kw = dict(export=wg.export, verify=verify_model, dump_dir=dump_dir)
    ctx = PassContext(cfg)
    records = PassManager(prepare_passes(), **manager_kw).run(wg.graph, ctx)
    times["prepare"] = time.perf_counter() - t

    # ----------------------------------------------------------------- calibration
    plan = plan_quantization(wg.graph, cfg)
    absent = sorted(set(cfg.exclude_before) - op_types(working_model))
    if absent:
        report.warnings.append(f"exclude_before: no node of op type {', '.join(absent)} in the model (op types are "
                               "case-sensitive, e.g. HardSwish); it changed nothing")
    tensors = plan.calibrate
    specs = input_specs(working_model)
    held: list = []
    t = time.perf_counter()
    if load_calib is not None:
        table = CalibrationTable.load(load_calib)
        missing = [n for n in tensors if n not in table]
        if missing:
            raise CalibrationDataError(f"has no range for {len(missing)} tensor(s), e.g. '{missing[0]}'",
                                       subject=str(load_calib), hint="the table was made for another model or config")
    else:
        if calib is None:
            if not cfg.synthetic_calib:
                raise CalibrationDataError("no calibration data given", subject=model_name,
                                           hint="pass --calib PATH (or --synthetic-calib for a smoke run on random data)")
            samples = [(f, None) for f in synthetic_samples(specs, cfg.synthetic_samples, cfg.seed)]
            report.warnings.append("CALIBRATION USED RANDOM DATA (--synthetic-calib): the ranges, and the accuracy "
                                   "of this model, mean nothing for real inputs")
            source_desc, total = "synthetic", len(samples)
        else:
            source = open_samples(calib, specs)
            samples, source_desc = source, source.description
            total = len(source) or None
        stream: Iterable = samples
        if val is None and cfg.val_fraction > 0:
            stream, held = split_holdout(samples, cfg.val_fraction, cfg.max_val_samples)
            if total:
                total = total - min(cfg.max_val_samples, total // max(2, round(1 / cfg.val_fraction)))
        if cfg.max_calib_samples is not None:
            stream = _take(stream, cfg.max_calib_samples)
            total = min(total, cfg.max_calib_samples) if total else cfg.max_calib_samples
        tick = progress("calibrating", total) if progress else None
        providers, ep_note = pick_providers(cfg.calib_ep)
        if ep_note:
            report.warnings.append(ep_note)
        methods = {name: cfg.method_for(name, ops) for name, ops in plan.related_ops().items() if name in tensors}
        options = RangeOptions(cfg.percentile, cfg.bins, cfg.kl_levels, cfg.activation_type, cfg.activation_symmetric,
                               cfg.hist_sample)
        schedule: dict = {}
        table = collect_ranges(wg.export(), tensors, stream, methods=methods, options=options,
                               providers=providers, batch_size=cfg.calib_batch_size, specs=specs,
                               synthetic=calib is None, on_sample=tick,
                               overlap=None if cfg.calib_overlap else False, stats=schedule)
        report.calibration = {"source": source_desc, "samples": table.samples, "tensors": len(table),
                              "method": cfg.method, "methods_used": dict(Counter(methods.values())),
                              "provider": providers[0], "synthetic": table.synthetic,
                              "observer_thread": schedule.get("observer_thread", False),
                              "ignored_keys": sorted(getattr(samples, "ignored_keys", set()))}
        if save_calib is not None:
            table.save(save_calib)
    if load_calib is not None:
        report.calibration = {"source": str(load_calib), "samples": table.samples, "tensors": len(table),
                              "method": cfg.method, "synthetic": table.synthetic}
    times["calibrate"] = time.perf_counter() - t

    # ----------------------------------------------------------------- rewrite
    t = time.perf_counter()
    ctx = PassContext(cfg, table)
    records += PassManager(quantize_passes(cfg), **manager_kw).run(wg.graph, ctx)
    quantized = keep_value_info_of(wg.export(), original)
    times["quantize"] = time.perf_counter() - t
    report.passes = records
    report.quantized_nodes = count_quantized(records, "insert_qdq")
    if not report.quantized_nodes and not cfg.allow_empty:
        reasons = "; ".join(f"{s['node']}: {s['reason']}" for s in report.skipped[:3]) or "no Conv/ConvTranspose/MatMul/Gemm with float weights"
        raise NothingQuantizedError(f"nothing was quantized ({reasons})", subject=model_name,
                                    hint="pass allow_empty / --allow-empty to accept an unchanged model")
    report.sizes = {"input_bytes": _size(model, original), "output_bytes": quantized.ByteSize()}

    # ----------------------------------------------------------------- validate
    t = time.perf_counter()
    val_samples: Iterable | None
    if val is not None:
        val_samples = open_samples(val, specs, what="validation data")
        val_desc = val_samples.description
    elif calib is None and load_calib is None:
        val_samples = [(f, None) for f in synthetic_samples(specs, cfg.synthetic_samples, cfg.seed + 1)]
        val_desc = "synthetic"
    elif held:
        val_samples, val_desc = held, f"{len(held)} held-out calibration samples"
    elif load_calib is not None and calib is not None:
        val_samples = _take(open_samples(calib, specs), cfg.max_val_samples)
        val_desc = f"up to {cfg.max_val_samples} samples of {calib} (the loaded table's data is unknown)"
    else:
        val_samples, val_desc = None, None
        report.warnings.append("not validated: no held-out samples (give --val PATH or more calibration samples)")
    if val_samples is not None:
        _validate_into(report, working_model, quantized, val_samples, val_desc, cfg)
    times["validate"] = time.perf_counter() - t

    # ----------------------------------------------------------------- write
    result = QuantizeResult(quantized, report)
    if output is not None:
        t = time.perf_counter()
        src_path = None if isinstance(model, onnx.ModelProto) else model
        report.output = str(output)
        result.output_path = save_model(quantized, output, input_path=src_path, external_data=cfg.external_data)
        times["save"] = time.perf_counter() - t
        report.seconds = times
        result.report_path = report.save(report_path_for(output))
    report.seconds = times
    return result


def validate_models(original: str | os.PathLike | onnx.ModelProto, quantized: str | os.PathLike | onnx.ModelProto,
                    val: str | os.PathLike | Iterable[Mapping[str, Any]] | None = None, *, config: QuantConfig | None = None,
                    output: str | os.PathLike | None = None, **overrides: Any) -> Report:
    """Validate any pair of models (for instance one quantized by another tool) on ``val`` data.

    Without ``val``, random feeds are used and the report says so. Writes the JSON report (and the HTML
    page beside it) when ``output`` is given. ``report.validation["passed"]`` reflects the tolerances.
    """
    cfg = (config or QuantConfig()).replace(**overrides) if overrides else (config or QuantConfig())
    ref = load_model(original)
    q = load_model(quantized)
    specs = input_specs(ref)
    report = Report(model=str(original) if not isinstance(original, onnx.ModelProto) else "<ModelProto>",
                    output=str(quantized) if not isinstance(quantized, onnx.ModelProto) else "<ModelProto>",
                    config=cfg.to_dict())
    if val is None:
        samples: Iterable = [(f, None) for f in synthetic_samples(specs, cfg.synthetic_samples, cfg.seed)]
        desc = "synthetic random feeds"
        report.warnings.append("validated on RANDOM data (no --val): the numbers say little about real inputs")
        report.calibration = {"synthetic": True}
    else:
        src = open_samples(val, specs, what="validation data")
        samples, desc = _take(src, cfg.max_val_samples), f"{src.description} (up to {cfg.max_val_samples} samples)"
    _validate_into(report, ref, q, samples, desc, cfg)
    report.sizes = {"input_bytes": _size(original, ref), "output_bytes": _size(quantized, q)}
    if output is not None:
        report.save(output)
    return report


def _validate_into(report: Report, original: onnx.ModelProto, quantized: onnx.ModelProto, samples: Iterable,
                   description: str, cfg: QuantConfig) -> None:
    """Validate on the configured providers and record the result, the tolerance verdict and the findings."""
    report.validation = validate(original, quantized, samples, providers=list(cfg.providers) or None,
                                 per_layer=cfg.per_layer, latency=cfg.latency)
    report.validation["data"] = description
    report.validation.update(check_tolerance(report.validation, cfg))
    report.warnings.extend(report.validation["findings"])


def check_tolerance(validation: dict, cfg: QuantConfig) -> dict:
    """``passed`` and the failed checks, for the tolerances set in ``cfg`` (min cosine, SQNR, top-1 agreement)."""
    failures = []
    for o in validation.get("outputs", []):
        if cfg.min_cosine is not None and o["cosine_mean"] is not None and o["cosine_mean"] < cfg.min_cosine:
            failures.append(f"output '{o['output']}': mean cosine {o['cosine_mean']:.5f} < {cfg.min_cosine}")
        sq = o["sqnr_db"] if isinstance(o["sqnr_db"], float) else (float("inf") if o["sqnr_db"] == "inf" else float("-inf"))
        if cfg.min_sqnr is not None and sq < cfg.min_sqnr:
            failures.append(f"output '{o['output']}': SQNR {sq:.2f} dB < {cfg.min_sqnr}")
        if cfg.min_top1 is not None and "top1_agreement" in o and o["top1_agreement"] < cfg.min_top1:
            failures.append(f"output '{o['output']}': top-1 agreement {o['top1_agreement']:.4f} < {cfg.min_top1}")
    if any(v is not None for v in (cfg.min_cosine, cfg.min_sqnr, cfg.min_top1)) and not validation.get("outputs"):
        failures.append("no provider produced outputs to check")
    return {"passed": not failures, "tolerance_failures": failures}


def _take(it: Iterable, n: int):
    for i, x in enumerate(it):
        if i >= n:
            return
        yield x


def _size(source: Any, model: onnx.ModelProto) -> int:
    if isinstance(source, (str, os.PathLike)):
        return Path(source).stat().st_size
    return model.ByteSize()


def _interface(model: onnx.ModelProto) -> tuple[dict, dict]:
    """Graph inputs (not initializers) and outputs: name -> (value kind, element type, dims or None)."""
    inits = {t.name for t in model.graph.initializer}

    def sig(vi: onnx.ValueInfoProto) -> tuple:
        t = vi.type
        if t.HasField("tensor_type"):
            tt = t.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else "?" for d in tt.shape.dim] if tt.HasField("shape") else None
            return ("tensor", onnx.TensorProto.DataType.Name(tt.elem_type) if tt.elem_type else "?", dims)
        return (t.WhichOneof("value"), None, None)

    return ({vi.name: sig(vi) for vi in model.graph.input if vi.name not in inits},
            {vi.name: sig(vi) for vi in model.graph.output})


def _interface_changes(before: onnx.ModelProto, after: onnx.ModelProto) -> list[str]:
    """How the inputs and outputs of ``after`` differ from those of ``before`` (empty when they do not)."""
    changes = []
    for what, old, new in zip(("input", "output"), _interface(before), _interface(after)):
        if list(old) != list(new):
            changes.append(f"{what}s {list(old)} became {list(new)}")
            continue
        for n, (o, a) in ((n, (old[n], new[n])) for n in old):
            if o[:2] != a[:2] or (o[2] is not None and a[2] is not None and o[2] != a[2]):
                changes.append(f"{what} '{n}' {o[1]}{o[2]} became {a[1]}{a[2]}")
    return changes


def _apply_opset(model: onnx.ModelProto, cfg: QuantConfig, name: str, report: Report) -> onnx.ModelProto:
    opset = default_opset(model)
    report.opset = {"input": opset, "output": opset}
    hint_up = f"rerun with --target-opset {PER_CHANNEL_MIN_OPSET} to upgrade it with onnx.version_converter"
    final = cfg.target_opset or opset
    if cfg.activation_type in SIXTEEN_BIT_TYPES and final < INT16_MIN_OPSET:
        raise OpsetError(f"{cfg.activation_type} activations need QuantizeLinear from opset {INT16_MIN_OPSET}; "
                         f"the model would have {final}", subject=name,
                         hint=f"use --target-opset {INT16_MIN_OPSET} or an 8-bit --activation-type")
    if cfg.target_opset is not None:
        if cfg.target_opset < opset:
            raise OpsetError(f"model has opset {opset}; downgrading to {cfg.target_opset} is not supported",
                             subject=name, hint=f"use --target-opset {opset} or higher, or leave it out")
        if cfg.target_opset > opset:
            from onnx import version_converter

            try:
                converted = version_converter.convert_version(model, cfg.target_opset)
                converted.ir_version = max(converted.ir_version, min_ir_version(converted))
                onnx.checker.check_model(converted, full_check=True)
            except Exception as exc:  # noqa: BLE001 - the converter raises assorted types
                raise OpsetError(f"onnx.version_converter could not upgrade opset {opset} -> {cfg.target_opset}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", subject=name) from None
            changed = _interface_changes(model, converted)
            if changed:
                raise OpsetError(f"onnx.version_converter changed the model's interface upgrading opset {opset} -> "
                                 f"{cfg.target_opset}: {'; '.join(changed[:3])}", subject=name,
                                 hint="the upgraded model would not take the same inputs or give the same outputs; "
                                      "upgrade and check it yourself, or use --per-tensor (opset >= 10)")
            report.opset["output"] = cfg.target_opset
            report.warnings.append(f"opset upgraded {opset} -> {cfg.target_opset} as asked (--target-opset)")
            return converted
        return model
    if opset < QDQ_MIN_OPSET:
        raise OpsetError(f"opset {opset} has no QuantizeLinear/DequantizeLinear (needs >= {QDQ_MIN_OPSET})",
                         subject=name, hint=hint_up)
    if cfg.per_channel and opset < PER_CHANNEL_MIN_OPSET:
        raise OpsetError(f"opset {opset} is below {PER_CHANNEL_MIN_OPSET}, which per-channel DequantizeLinear needs; "
                         "qpass never changes the opset silently", subject=name,
                         hint=f"{hint_up}, or use --per-tensor")
    return model
