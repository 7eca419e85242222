"""quantize() and validate_models(): the stages called in order, and the report assembled from their artifacts."""
from __future__ import annotations

import contextlib
import gc
import os
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import onnx

from . import stages
from .calib.data import input_specs, synthetic_samples
from .calib.sources import calibration_data, keep_spread, take, validation_data
from .calib.table import CalibrationTable
from .config import QuantConfig
from .evaluate.validate import first_provider
from .errors import ConfigError, ModelLoadError, ModelSaveError, OpsetError, PlanError
from .graph import op_types
from .io import initializer_bytes, model_bytes, same_file, save_model
from .plan.importer import holds_qdq
from .plan.spec import QuantPlan
from .recipes import resolve, smooths
from .report import Report
from .search import range_choice
from .search.executors import TrialExecutor, require_ray
from .search.latency import search_latency
from .search.precision import Target, plan_for, search, sixteen_bit
from .runtime import FILE_SESSION_BYTES, ModelFile, release_freed_memory

Data = "str | os.PathLike | Iterable[Mapping[str, Any]] | None"


@dataclass
class QuantizeResult:
    model: onnx.ModelProto
    report: Report
    output_path: Path | None = None
    report_path: Path | None = None
    plan: QuantPlan | None = None

    @property
    def passed(self) -> bool:
        v = self.report.validation
        return v is None or v.get("passed", True)


def default_output_path(model_path: str | os.PathLike) -> Path:
    p = Path(model_path)
    return p.with_name(f"{p.name[:-5] if p.name.endswith('.onnx') else p.name}.qpass.onnx")


def report_path_for(output: str | os.PathLike) -> Path:
    p = Path(output)
    return p.with_name(f"{p.name[:-5] if p.name.endswith('.onnx') else p.name}.report.json")


def quantize(model: str | os.PathLike | onnx.ModelProto, calib: Data = None, *, config: QuantConfig | None = None,
             output: str | os.PathLike | None = None, val: Data = None, load_calib: str | os.PathLike | None = None,
             save_calib: str | os.PathLike | None = None, plan: QuantPlan | str | os.PathLike | None = None,
             save_plan: str | os.PathLike | None = None, dump_dir: str | os.PathLike | None = None,
             progress: stages.ProgressFactory | None = None, eval_fn: Callable[[onnx.ModelProto], float] | None = None,
             max_metric_drop: float | None = None, executor: TrialExecutor | None = None,
             reference: str | os.PathLike | onnx.ModelProto | None = None,
             **overrides: Any) -> QuantizeResult:
    """Quantize an fp32 ONNX model (QDQ or integer operators) and validate it against the original.

    ``model``: a path or ModelProto (never modified or written). ``calib`` / ``val``: a ``.npz``, a folder of
    ``.npz`` (one sample each), a ``test_data_set_*`` folder, or an iterable of feed dicts; ``val`` defaults to a
    held-out split of ``calib``. ``load_calib`` / ``save_calib``: the calibration table as JSON. ``plan``: a
    QuantPlan or plan file to use instead of planning (``save_plan`` writes the one used). ``output``: written
    atomically, with ``*.report.json`` beside it. ``config`` and keyword ``overrides``: :class:`QuantConfig`.
    ``eval_fn(model) -> float`` (larger is better) with ``max_metric_drop``: the precision search's target also
    asks that metric of the result to be at least fp32's less the drop (qpass.search.precision; a module-level
    function when ``search_workers`` > 1). ``executor``: where the search's trials run (a
    qpass.search.executors.RayTrials for a Ray cluster; default from the config: ``ray_address``, else a process
    pool of ``search_workers``). A model that already holds QuantizeLinear/DequantizeLinear is imported
    instead (:mod:`qpass.import_qdq`) and validated against ``reference`` (a float model) when given, else against
    itself before the rewrite. Raises QpassError subclasses for bad input, each naming the file, node
    or tensor.
    """
    cfg = (config or QuantConfig()).replace(**overrides) if overrides else (config or QuantConfig())
    asked = cfg  # before resolve(): a collapse rescue starts from what was asked
    cfg, notes = resolve(cfg, has_data=calib is not None or load_calib is not None)
    if (eval_fn is None) != (max_metric_drop is None) or (max_metric_drop is not None and not (
            isinstance(max_metric_drop, (int, float)) and not isinstance(max_metric_drop, bool) and max_metric_drop >= 0)):
        raise ConfigError(f"eval_fn and max_metric_drop go together (got {max_metric_drop!r})", subject="max_metric_drop",
                          hint="give both, max_metric_drop a number >= 0, or neither")
    metric = (eval_fn, max_metric_drop) if eval_fn is not None else None
    if cfg.ray_address and executor is None:
        require_ray(f"--ray {cfg.ray_address}")  # before any work
    if cfg.float_type is not None and not cfg.weight_only:  # the float16/bfloat16 mode (qpass.half)
        from . import half

        return half.run(model, calib, config=cfg, notes=notes, output=output, val=val, load_calib=load_calib,
                        save_calib=save_calib, progress=progress, check_writes=_check_writes)
    t0 = time.perf_counter()
    name = "<ModelProto>" if isinstance(model, onnx.ModelProto) else str(model)
    try:
        original = stages.load(model)
    except ModelLoadError as exc:  # another tool's QDQ output left unsorted is sorted (QDQ import), else raised
        from .import_qdq import load_unsorted

        original, note = load_unsorted(model, exc)
        notes = [*notes, note]
    times = {"load": time.perf_counter() - t0}
    if not isinstance(model, onnx.ModelProto):
        _check_writes(model, output=output, report=output and report_path_for(output), save_calib=save_calib,
                      save_plan=save_plan)
    if holds_qdq(op_types(original)):
        return _imported(model, original, name, cfg, notes, output=output, val=val, calib=calib, reference=reference,
                         dump_dir=dump_dir, save_calib=save_calib, save_plan=save_plan, load_time=times["load"])
    if reference is not None:
        raise ConfigError("a reference model validates a model that already holds Q/DQ (QDQ import); this one holds "
                          "none, and is validated against itself", subject="reference", hint="drop --reference")
    report = Report(model=name, config=cfg.to_dict(), warnings=notes)
    prepared = _timed(times, "prepare", stages.prepare, original, cfg, name=name, dump_dir=dump_dir)
    report.opset, report.passes = prepared.opset, list(prepared.records)
    report.warnings += prepared.warnings
    _release()  # prepare's working graph (reference cycles) holds exports and loaded values until collected
    specs = input_specs(prepared.reference)
    input_bytes = stages.model_size(model, original)
    del original  # the reference holds it (or its opset upgrade)
    spilled = _spill_reference(prepared, cfg)  # a large reference waits for validation on disk, not in memory
    if smooths(cfg):
        if plan is not None or load_calib is not None:
            report.warnings.append("smooth_quant: not applied with a given plan or calibration table (both name the "
                                   "tensors of the model before smoothing)")
        else:
            if calib is not None and not isinstance(calib, (str, os.PathLike)) and iter(calib) is calib:
                calib = list(calib)  # an iterator of feeds: read twice (smoothing statistics, then calibration)
            data = calibration_data(calib, specs, cfg, val_given=val is not None, subject=name)
            prepared = _timed(times, "smooth", stages.smooth, prepared, data.stream, cfg, total=data.total,
                              progress=progress, dump_dir=dump_dir)
            report.passes = list(prepared.records)
    qplan = QuantPlan.load(plan) if isinstance(plan, (str, os.PathLike)) else plan
    qplan = qplan or _timed(times, "plan", stages.plan, prepared, cfg)
    if cfg.weight_only and qplan.tensors:
        raise PlanError(f"the plan quantizes {len(qplan.tensors)} activation(s): it was made for static quantization",
                        subject=str(plan) if isinstance(plan, (str, os.PathLike)) else "plan",
                        hint="save a plan with --weight-only, or run without --weight-only")
    if save_plan is not None:
        qplan.save(save_plan)
    clamped = _clamp_mask_fills(prepared, cfg)
    held = []
    t = time.perf_counter()
    half_measures = cfg.float_type is not None and calib is not None  # the float remainder's ranges, measured
    half_stats = None
    needs_data = bool(qplan.calibrate or qplan.statistics) or half_measures
    sequential = None  # the calibration samples, when GPTQ measures its Hessians stage by stage while rewriting
    corrections = None  # the calibration samples bias correction measures on
    if load_calib is not None:
        calibrated = stages.load_calibration(load_calib, qplan, cfg)
    elif not needs_data:
        calibrated = stages.Calibrated(CalibrationTable(), {"source": None, "samples": 0, "tensors": 0,
                                                            "note": "the plan needs no calibration data"})
    elif cfg.weight_only and cfg.algorithm == "gptq" and cfg.gptq_sequential:
        if save_calib is not None:
            raise ConfigError("sequential GPTQ measures its statistics on partly quantized models: there is no one "
                              "table to save", subject="save_calib", hint="drop --save-calib or --gptq-sequential")
        data = calibration_data(calib, specs, cfg, val_given=val is not None, subject=name)
        report.warnings += data.warnings
        sequential, held = [s for s in data.stream], data.held
        calibrated = stages.Calibrated(CalibrationTable(samples=len(sequential)), {
            "source": data.description, "samples": len(sequential), "synthetic": data.synthetic,
            "note": f"GPTQ Hessians measured while rewriting, {cfg.gptq_sequential} stage(s) a pass"})
        if half_measures:  # the float remainder's ranges: one pass of their own over the same samples
            half_stats = stages.calibrate(prepared, QuantPlan(), iter(sequential), cfg, total=len(sequential),
                                          extra=half_statistics(prepared.model, qplan)).table.statistics
    else:
        data = calibration_data(calib, specs, cfg, val_given=val is not None, subject=name)
        report.warnings += data.warnings
        stream = data.stream
        if cfg.bias_correction != "off" and not cfg.weight_only:  # the samples it measures on, kept as they stream
            stream, corrections = keep_spread(stream, cfg.bias_correction_samples, data.total)
        calibrated = stages.calibrate(prepared, qplan, stream, cfg, total=data.total, synthetic=data.synthetic,
                                      description=data.description, progress=progress,
                                      extra=half_statistics(prepared.model, qplan) if half_measures else None)
        calibrated.info["ignored_keys"], held = data.ignored_keys, data.held
        half_stats = calibrated.table.statistics if half_measures else None
        if save_calib is not None:
            calibrated.table.save(save_calib)
    _release()  # the calibration sessions' memory, before the rewrite copies weights
    report.warnings += calibrated.info.pop("warnings", [])
    report.calibration, times["calibrate"] = calibrated.info, time.perf_counter() - t
    table, early = calibrated.table, None
    choosing = (plan is None and sequential is None and load_calib is None and needs_data and cfg.validate
                and corrections is None
                and cfg.float_type is None and not table.synthetic and (val is not None or bool(held)))
    names = range_choice.applies(cfg, qplan, table) if choosing else []
    chosen = None
    if names:  # auto's percentile ranges: min-max and MSE tried too, on the held-out samples
        got, got_desc = validation_data(val, specs, cfg, calib=calib, held=held, calibrated=True)
        early = (list(got), got_desc)
        chosen = _timed(times, "range_choice", range_choice.choose, prepared, qplan, table, cfg,
                        spilled[1] if spilled is not None else prepared.reference, early[0], names,
                        provider=first_provider(cfg.providers), margin_db=cfg.range_choice_margin_db)
    kept_rule = None
    if chosen is not None:
        report.calibration["range_choice"] = chosen.report(len(names))
        for rule, error in chosen.errors.items():
            report.warnings.append(f"range choice: the {rule} rule could not be scored ({error})")
        if chosen.rule != range_choice.RULES[0]:
            kept_rule = chosen.rule
            table, qplan = chosen.table, chosen.plan
            report.calibration["methods_used"] = dict(Counter(r.method for r in table.ranges.values()))
            if save_calib is not None:
                table.save(save_calib)
            if save_plan is not None:
                qplan.save(save_plan)
        rewritten = chosen.rewritten
        del chosen
    elif sequential is not None:
        rewritten = _timed(times, "quantize", stages.rewrite_sequential, prepared, qplan, sequential, cfg, name=name)
    else:
        rewritten = _timed(times, "quantize", stages.rewrite, prepared, qplan, calibrated.table, cfg,
                           dump_dir=dump_dir, name=name, samples=corrections)
    if cfg.float_type is not None:  # weight-only (or static) output, then its float remainder to half precision
        from .half import convert as to_half, float_tensors, measured_keep, zero_sensitive
        from .io import annotate_shapes

        t = time.perf_counter()
        stats = half_stats
        keep = measured_keep(stats, float_tensors(prepared.model), cfg.float_type,
                             zero_sensitive(prepared.model)) if stats is not None else {}
        half_model, half_records = to_half(rewritten.model, cfg, keep)
        annotate_shapes(half_model)
        times["float16"] = time.perf_counter() - t
        rewritten = stages.Rewritten(half_model, list(rewritten.records) + half_records, rewritten.quantized_nodes,
                                     rewritten.info)
        report.calibration["half"] = {"type": cfg.float_type, "half_io": cfg.half_io,
                                      "measured_float32": dict(sorted(keep.items())), "data_free": stats is None,
                                      "mask_fills_clamped": clamped}
        if stats is None:
            report.warnings.append(f"{cfg.float_type}: the float remainder converted data-free (op block list, type "
                                   "constraints, weight values); give --calib to keep the activations that overflow "
                                   "or underflow in float32")
    if "bias_correction" in rewritten.info:
        report.calibration["bias_correction"] = rewritten.info["bias_correction"]
        if rewritten.info["bias_correction"].get("note"):
            report.warnings.append(f"bias correction: {rewritten.info['bias_correction']['note']}")
    report.passes += rewritten.records
    report.quantized_nodes, report.plan = rewritten.quantized_nodes, qplan.with_overrides().to_dict()
    report.sizes = {"input_bytes": input_bytes, "output_bytes": model_bytes(rewritten.model)}
    # what validation and saving need is the reference and the result: the prepared model (a copy of every weight)
    # and the loaded input (another, when the opset policy upgraded it) go now, with the working graphs (gs tensors
    # sit in reference cycles, which only the cycle collector frees)
    reference = spilled[1] if spilled is not None else prepared.reference
    searching = (Target.of(cfg).active or metric is not None or cfg.objective == "latency") and cfg.validate
    if not searching:
        del prepared
    _release()
    t = time.perf_counter()
    samples, desc = early or (validation_data(val, specs, cfg, calib=calib, held=held, loaded_table=load_calib is not None,
                                              calibrated=needs_data) if cfg.validate else (None, None))
    if not cfg.validate:
        report.warnings.append("not validated (validate = false / --no-validate)"
                               + ("; the precision search did not run" if Target.of(cfg).active or metric is not None
                                  or cfg.objective == "latency" else ""))
    elif samples is None:
        report.warnings.append("not validated: no held-out samples (give --val PATH or more calibration samples)"
                               + ("; the accuracy target was not searched for" if searching else ""))
    else:
        if searching:
            samples = list(samples)  # read again by the search's trials
            report.validation = stages.evaluate(reference, rewritten.model, samples, desc, cfg)
        else:
            with _spilled_result(rewritten) as quantized:  # a large result waits on disk while it is validated
                report.validation = stages.evaluate(reference, quantized, samples, desc, cfg)
        if searching:
            rewritten, qplan = _search(report, times, prepared, qplan, table, cfg, reference, samples,
                                       desc, rewritten, corrections, sequential is not None, save_plan, metric,
                                       executor)
            del prepared
            if kept_rule is not None:  # a plan the search made again from the configuration says percentile there
                qplan = range_choice.relabel(qplan, names, kept_rule)
                report.plan = qplan.with_overrides().to_dict()
                if save_plan is not None:
                    qplan.save(save_plan)
        report.warnings.extend(report.validation["findings"])
    times["validate"] = time.perf_counter() - t - times.get("search", 0.0)
    del reference
    if spilled is not None:
        spilled[0].cleanup()
    wider = _collapse_rescue(asked, cfg, report, searching, plan=plan, load_calib=load_calib, calib=calib, val=val)
    if wider is not None:
        _release()
        t = time.perf_counter()
        side = tempfile.TemporaryDirectory(prefix="qpass-rescue-")  # its table replaces save_calib only when kept
        with side:
            try:
                rescued = quantize(model, calib, config=wider, output=None, val=val,
                                   save_calib=Path(side.name) / "table.json" if save_calib is not None else None,
                                   dump_dir=Path(dump_dir) / "collapse_rescue" if dump_dir is not None else None,
                                   progress=progress)
            except OpsetError as exc:  # the upgrade to 16-bit Q/DQ's opset failed: the 8-bit result stands
                rescued = None
                report.warnings.append(f"16-bit activations could not be tried: {exc}")
            kept = rescued is not None and rescued.passed
            if kept and save_calib is not None:
                os.replace(Path(side.name) / "table.json", save_calib)
        times["collapse_rescue"] = time.perf_counter() - t
        if kept:
            rescued.report.warnings.insert(0, (
                f"8-bit activations broke the output ({_broken(report.validation)}); quantized again with "
                f"{wider.activation_type} activations (opset {rescued.report.opset.get('output')}, weights int8) and "
                f"kept ({_broken(rescued.report.validation)}). onnxruntime's CPU provider runs 16-bit Q/DQ with float "
                "kernels (the speed is in the validation's latency); --no-collapse-rescue fails instead"))
            rescued.report.search = {**(rescued.report.search or {}), "collapse_rescue": {
                "activation_type": wider.activation_type, "first": report.validation.get("outputs"),
                "first_failures": report.validation["tolerance_failures"],
                "first_seconds": {k: round(v, 3) for k, v in times.items() if k != "collapse_rescue"}}}
            if save_plan is not None and rescued.plan is not None:
                rescued.plan.save(save_plan)
            return _save_result(rescued, model, output, wider)
        if rescued is not None:
            report.warnings.append(f"16-bit activations ({wider.activation_type}) were tried and broke the output "
                                   "too: " + "; ".join((rescued.report.validation or {}).get("tolerance_failures", [])[:1]))
        del rescued
    report.seconds = times
    return _save_result(QuantizeResult(rewritten.model, report, plan=qplan), model, output, cfg)


def _imported(model, original: onnx.ModelProto, name: str, cfg: QuantConfig, notes: list[str], *, output, val, calib,
              reference, dump_dir, save_calib, save_plan, load_time: float) -> QuantizeResult:
    """QDQ import (qpass.import_qdq) of a model that holds Q/DQ, saved as :func:`quantize` saves."""
    from .import_qdq import run_import

    result, report, qplan, table = run_import(original, cfg, name=name, source=model, val=val, calib=calib,
                                              reference=reference, dump_dir=dump_dir, warnings=notes)
    report.seconds["load"] = load_time
    if save_calib is not None:
        table.save(save_calib)
    if save_plan is not None:
        qplan.save(save_plan)
    out = QuantizeResult(result, report, plan=qplan)
    if output is not None:
        report.output = str(output)
        out.output_path = save_model(result, output, input_path=None if isinstance(model, onnx.ModelProto) else model,
                                     external_data=cfg.external_data)
        out.report_path = report.save(report_path_for(output))
    return out


def validate_models(original: str | os.PathLike | onnx.ModelProto, quantized: str | os.PathLike | onnx.ModelProto,
                    val: Data = None, *, config: QuantConfig | None = None, output: str | os.PathLike | None = None,
                    **overrides: Any) -> Report:
    """Validate any pair of models (for instance one quantized by another tool) on ``val`` data.

    Without ``val``, random feeds are used and the report says so. Writes the JSON report (and the HTML
    page beside it) when ``output`` is given. ``report.validation["passed"]`` reflects the tolerances.
    """
    cfg = (config or QuantConfig()).replace(**overrides) if overrides else (config or QuantConfig())
    ref, q = stages.load(original), stages.load(quantized)
    report = Report(model=str(original) if not isinstance(original, onnx.ModelProto) else "<ModelProto>",
                    output=str(quantized) if not isinstance(quantized, onnx.ModelProto) else "<ModelProto>",
                    config=cfg.to_dict())
    if val is None:
        samples: Iterable = [(f, None) for f in synthetic_samples(input_specs(ref), cfg.synthetic_samples, cfg.seed)]
        desc = "synthetic random feeds"
        report.warnings.append("validated on RANDOM data (no --val): the numbers say little about real inputs")
        report.calibration = {"synthetic": True}
    else:
        src, desc = validation_data(val, input_specs(ref), cfg)
        samples, desc = take(src, cfg.max_val_samples), f"{desc} (up to {cfg.max_val_samples} samples)"
    report.validation = stages.evaluate(ref, q, samples, desc, cfg)
    report.warnings.extend(report.validation["findings"])
    report.sizes = {"input_bytes": stages.model_size(original, ref), "output_bytes": stages.model_size(quantized, q)}
    if output is not None:
        report.save(output)
    return report


def _search(report: Report, times: dict, prepared: stages.Prepared, qplan: QuantPlan, table: CalibrationTable,
            cfg: QuantConfig, reference, samples, desc: str, rewritten: stages.Rewritten, corrections,
            sequential: bool, save_plan, metric, executor=None) -> tuple[stages.Rewritten, QuantPlan]:
    """The precision search after the first validation (a target is set, or the latency objective): the report's
    ``search`` section (the latency objective's under ``search["latency"]``), and, when a move was kept, the final
    model validated again (``validation``), its plan (saved to ``save_plan``)."""
    if sequential:
        report.warnings.append("precision search: not run with sequential GPTQ (its statistics depend on the "
                               "weights before each stage)")
        return rewritten, qplan
    t = time.perf_counter()
    samples = list(samples)
    if Target.of(cfg).active or metric is not None:
        found = search(prepared, qplan, table, cfg, reference, samples, rewritten.model, report.validation,
                       corrections=corrections, eval_fn=metric and metric[0], max_metric_drop=metric and metric[1],
                       executor=executor)
        report.search = found.report
        if not found.report["met"]:
            report.warnings.append(f"precision search: target not met ({found.report['note']}; "
                                   f"{len(found.report['moves'])} move(s) kept): "
                                   + "; ".join(found.report.get("failures", [])))
        if found.report.get("opset"):
            o = found.report["opset"]
            report.warnings.append(f"precision search: the output is at opset {o['to']} (the prepared model's "
                                   f"{o['from']}, upgraded by onnx.version_converter for its 16-bit activations)")
            report.opset = {**(report.opset or {}), "output": o["to"]}
        model, plan = found.model, found.plan
        floated, widened = tuple(found.report["floated"]), tuple(found.report.get("widened", ()))
        if model is not None:
            rewritten = stages.Rewritten(found.model, found.records, found.quantized_nodes, found.info)
    else:
        report.search, model, plan, floated, widened = {}, None, qplan, (), ()
    first_latency = _latency_ratio(report.validation)
    if cfg.objective == "latency":
        base = sixteen_bit(prepared, cfg)[0] if widened else prepared  # the kept 16-bit moves stay
        lat = search_latency(base, qplan, table, cfg, reference, samples[0][0], rewritten.model, floated=floated,
                             widened=widened, corrections=corrections,
                             provider=report.validation.get("provider") or "CPUExecutionProvider")
        report.search["latency"] = lat.report
        if not lat.report["met"] or "all float" in lat.report.get("note", ""):
            report.warnings.append(f"latency objective: {lat.report['note']}")
        if lat.model is not None:
            rewritten, model = lat.rewritten, lat.model
            plan = plan_for(base, cfg, lat.floated, tuple(qplan.overrides), widened)
    times["search"] = time.perf_counter() - t
    if model is None:
        return rewritten, qplan
    report.passes = list(prepared.records) + list(rewritten.records)  # the kept rewrite's records replace the first's
    report.quantized_nodes, report.plan = rewritten.quantized_nodes, plan.with_overrides().to_dict()
    report.sizes["output_bytes"] = model_bytes(rewritten.model)
    report.validation = stages.evaluate(reference, rewritten.model, samples, desc, cfg)
    report.search["latency_ratio"] = {"first": first_latency, "final": _latency_ratio(report.validation)}
    if save_plan is not None:
        plan.save(save_plan)
    return rewritten, plan


def _clamp_mask_fills(prepared: stages.Prepared, cfg: QuantConfig) -> list[str]:
    """Weight-only + float16: clamp the prepared model's Softmax mask fills (passes/saturate_mask_fills.py) before
    its float remainder is measured, as the float16 mode does; the reference keeps the original values. Static int8
    is left alone (the fills' Q/DQ ranges would change)."""
    if not cfg.weight_only:
        return []
    from .half import clamp_mask_fills

    prepared.model, names = clamp_mask_fills(prepared.model, cfg, in_place=prepared.model is not prepared.reference)
    return names


def half_statistics(model: onnx.ModelProto, qplan: QuantPlan) -> dict[str, tuple[str, ...]]:
    """The statistics calibration measures for a float16/bfloat16 remainder: each float activation's half-precision
    range (``halfrange``) beside what the plan already asks of it."""
    from .half import float_tensors

    asked = qplan.with_overrides().statistics
    return {t: tuple(dict.fromkeys((*asked.get(t, ()), "halfrange"))) for t in float_tensors(model)}


def _collapse_rescue(asked: QuantConfig, cfg: QuantConfig, report: Report, searching: bool, *, plan, load_calib,
                     calib, val) -> QuantConfig | None:
    """The configuration to quantize again with when static quantization with 8-bit activations broke the output
    (the collapse check failed): ``asked`` with 16-bit activations at opset >= 21 (ranges by ``asked``'s method:
    ``auto`` chooses min-max at 16 bits); None when the run is not such a case (weight-only, dynamic, float16,
    integer operators, 16-bit already, a ``target_opset`` below 21, a given plan or calibration table, a search,
    explicit minimums, data that cannot be read twice) or ``collapse_rescue`` is off. An ``activation_type`` of
    8 bits given explicitly is rescued too (it is the default)."""
    from .search.precision import WIDER

    v = report.validation or {}
    explicit = any(x is not None for x in (cfg.min_cosine, cfg.min_sqnr, cfg.min_top1))
    if not (cfg.collapse_rescue and cfg.collapse_check) or explicit or v.get("passed", True) or searching:
        return None
    if cfg.weight_only or cfg.dynamic or cfg.float_type is not None or cfg.format != "qdq" or \
            cfg.activation_type not in WIDER:
        return None
    if asked.target_opset is not None and asked.target_opset < 21:  # an opset the user pinned below 16-bit Q/DQ's
        return None
    if asked.target_opset is None and not asked.opset_upgrade and ((report.opset or {}).get("input") or 0) < 21:
        return None  # --keep-opset: 16-bit Q/DQ would need an upgrade
    if plan is not None or load_calib is not None:
        return None
    if any(d is not None and not isinstance(d, (str, os.PathLike, list, tuple)) for d in (calib, val)):
        return None  # an iterator of feeds is read once
    if asked.target_opset is None:  # the opset policy upgrades to 21 as 16-bit Q/DQ needs, and says so
        return asked.replace(activation_type=WIDER[cfg.activation_type], collapse_rescue=False)
    return asked.replace(activation_type=WIDER[cfg.activation_type], target_opset=max(asked.target_opset, 21),
                         collapse_rescue=False)


def _broken(validation: dict | None) -> str:
    """Each validated output in a few words: perplexity against fp32's and top-1 agreement for a language model's
    scores, SQNR for another output."""
    parts = []
    for o in (validation or {}).get("outputs", []):
        if "perplexity_fp32" in o:
            parts.append(f"'{o['output']}': perplexity {o['perplexity_fp32']:.2f} -> {o['perplexity_quantized']:.2f}"
                         + (f", top-1 agreement {o['top1_agreement']:.3f}" if "top1_agreement" in o else ""))
        else:
            sq = o.get("sqnr_db")
            parts.append(f"'{o['output']}': SQNR {sq:.1f} dB" if isinstance(sq, float) else f"'{o['output']}': SQNR {sq}")
    return "; ".join(parts)


def _save_result(result: QuantizeResult, model, output, cfg: QuantConfig) -> QuantizeResult:
    """Write ``result`` to ``output`` (atomically, its report beside it, the save's seconds in it); ``model`` is the
    input (never written over)."""
    if output is not None:
        result.report.output = str(output)
        t = time.perf_counter()
        result.output_path = save_model(result.model, output,
                                        input_path=None if isinstance(model, onnx.ModelProto) else model,
                                        external_data=cfg.external_data)
        result.report.seconds["save"] = time.perf_counter() - t
        result.report_path = result.report.save(report_path_for(output))
    return result


def _latency_ratio(validation: dict | None) -> float | None:
    """Validation's quantized / fp32 latency ratio (its first provider that timed both), None when not measured."""
    return next((e["latency"].get("ratio") for e in (validation or {}).get("providers", []) if e.get("latency")), None)


def _spill_reference(prepared: stages.Prepared, cfg: QuantConfig) -> tuple[tempfile.TemporaryDirectory, ModelFile] | None:
    """Write the validation reference of a model whose weights reach ``FILE_SESSION_BYTES`` to a temporary folder
    (weights as external data) and drop it from ``prepared``: calibration and rewrite hold their own copy, and
    validation makes its sessions from the file (a session of such a model went through a file anyway)."""
    if not cfg.validate or initializer_bytes(prepared.reference) < FILE_SESSION_BYTES:
        return None
    folder = tempfile.TemporaryDirectory(prefix="qpass-reference-")  # removed with the object if the run fails
    file = ModelFile.write(prepared.reference, folder.name)
    prepared.reference = None
    _release()
    return folder, file


def _release() -> None:
    """Collect garbage (working graphs sit in reference cycles) and hand freed memory back to the system between
    stages: glibc otherwise keeps the freed blocks of one stage's copies while the next stage makes its own."""
    gc.collect()
    release_freed_memory()


@contextlib.contextmanager
def _spilled_result(rewritten: stages.Rewritten):
    """``rewritten.model``, or, when its weights reach ``FILE_SESSION_BYTES``, a :class:`ModelFile` of it in a
    temporary folder with ``rewritten.model`` dropped for the block and loaded back from the file on exit (the same
    bytes): validation's sessions are made from that file, and Python does not hold the model meanwhile."""
    if initializer_bytes(rewritten.model) < FILE_SESSION_BYTES:
        yield rewritten.model
        return
    with tempfile.TemporaryDirectory(prefix="qpass-result-") as folder:
        file = ModelFile.write(rewritten.model, folder)
        rewritten.model = None
        _release()
        try:
            yield file
        finally:
            rewritten.model = file.load()


def _timed(times: dict, key: str, fn, *args, **kwargs):
    t = time.perf_counter()
    try:
        return fn(*args, **kwargs)
    finally:
        times[key] = time.perf_counter() - t


def _check_writes(model: str | os.PathLike, **paths: Any) -> None:
    """Every file this run writes, checked before any work: never the input, never one path for two files, and the
    side files (plan, table) into an existing folder."""
    seen: dict[Path, str] = {}
    for what, path in paths.items():
        if path is None:
            continue
        if same_file(path, model):
            raise ModelSaveError(f"{what} path is the input model", subject=str(path),
                                 hint="qpass never writes its input; choose another path")
        key = Path(path).resolve()
        if key in seen:
            raise ModelSaveError(f"{what} and {seen[key]} would be written to the same file", subject=str(path))
        seen[key] = what
        if what in ("save_calib", "save_plan") and (Path(path).is_dir() or not key.parent.is_dir()):
            raise ModelSaveError("is a folder" if Path(path).is_dir() else "its folder does not exist",
                                 subject=str(path), hint=f"give {what.replace('_', '-')} a file path in an existing folder")
