"""The stages of a run, each callable alone with plain, picklable inputs and outputs.

    load -> prepare -> [smooth] -> plan -> calibrate -> rewrite -> evaluate -> save

A pipeline can prepare and calibrate once and rewrite several plans; :func:`qpass.api.quantize` is these calls in
order. Every artifact (``Prepared``, ``QuantPlan``, ``CalibrationTable``, ``Rewritten``) holds ModelProtos, dataclasses
and dicts only, so it pickles and can go to another process.
"""
from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import onnx

from .calib.collect import collect_ranges
from .calib.observers import RangeOptions
from .calib.data import input_specs
from .calib.stats import BiasShift, Statistics
from .calib.table import CalibrationTable
from .config import SIXTEEN_BIT_TYPES, QuantConfig
from .errors import CalibrationDataError, NothingQuantizedError, PlanError, UnsupportedModelError, VerificationError
from .graph import WorkingGraph, node_label, op_types, producer, used_quant_ops
from .io import inferred_view, initializer_bytes, keep_value_info_of, load_model, model_bytes
from .ops import INT16_MIN_OPSET
from .opset import apply_opset_policy
from .pass_manager import PassContext, PassManager, PassRecord, run_model_passes
from .plan.bind import bind
from .plan.policy import build_plan, dependency_stages
from .plan.spec import QuantPlan
from .passes.bias_correction import BiasCorrection, correction_site
from .passes.smooth_quant import statistics_needed
from .recipes import prepare_passes, rewrite_passes, smooth_passes
from .report import count_quantized
from .runtime import ModelFile, pick_providers
from .evaluate.tolerance import check_tolerance
from .evaluate.validate import validate
from .verify import verify_model

#: Progress hook: called with a label and a total (or None); returns a callable advanced once per sample.
ProgressFactory = Callable[[str, "int | None"], Callable[[], None]]

load = load_model


@dataclass
class Prepared:
    """The prepared model (folds done, shapes inferred) that plans, calibration and rewrites read, and the
    reference the result is validated against (the input after an upgrade ``target_opset`` asked for, the input
    itself after one qpass chose, before any fold)."""

    model: onnx.ModelProto
    reference: onnx.ModelProto | None  # None once qpass.api spilled a large one to a file for validation
    records: list[PassRecord] = field(default_factory=list)
    opset: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    #: initializers of the input's top-level graph (kept there when a subgraph reads them; graph.WorkingGraph)
    outer_initializers: frozenset[str] = frozenset()
    #: tensors the input model (before any opset upgrade) described in its value_info: the output describes these
    described: frozenset[str] = frozenset()


@dataclass
class Calibrated:
    """The statistics table and what the report says of the calibration run."""

    table: CalibrationTable
    info: dict


@dataclass
class Rewritten:
    model: onnx.ModelProto
    records: list[PassRecord]
    quantized_nodes: dict[str, int]
    #: what a rewrite step reports besides its pass records (e.g. ``bias_correction``: layers, samples, seconds)
    info: dict = field(default_factory=dict)


def prepare(model: onnx.ModelProto, config: QuantConfig | None = None, *, name: str = "<ModelProto>",
            dump_dir: str | os.PathLike | None = None) -> Prepared:
    """Refuse what qpass cannot quantize, apply the opset policy, verify, and run the prepare passes."""
    config = config or QuantConfig()
    present = used_quant_ops(model)
    if present:
        raise UnsupportedModelError(f"already quantized: it contains {sorted(present)}", subject=name,
                                    hint="qpass quantizes float models and imports QuantizeLinear/DequantizeLinear "
                                         "ones (qpass run); give it the fp32 model or the QDQ form")
    reference, opset, warnings = apply_opset_policy(model, config, name)
    with inferred_view(reference):  # the working graph reads the reference's weights: no copy of them is made
        wg = WorkingGraph(reference)
    if "upgraded" in opset:  # qpass chose the upgrade: the result is validated against the model as given
        reference = model
    try:  # what the verifier rejects before any pass ran is the input's doing, not the first pass's
        verify_model(wg.export())
    except VerificationError as exc:
        raise UnsupportedModelError(f"the model is not valid after qpass's graph import/export, before any rewrite: "
                                    f"{exc.one_line()}", subject=name,
                                    hint="the ONNX checker accepts it, qpass's verifier does not") from exc
    manager = PassManager(prepare_passes(config), export=wg.export, verify=verify_model, dump_dir=dump_dir)
    records = manager.run(wg.graph, PassContext())
    absent = sorted(set(config.exclude_before) - op_types(reference))
    if absent:
        warnings.append(f"exclude_before: no node of op type {', '.join(absent)} in the model (op types are "
                        "case-sensitive, e.g. HardSwish); it changed nothing")
    prepared = manager.last_export or wg.export()
    if config.weight_only:  # its float part is not quantized: the RMS norms in the form onnxruntime fuses, before
        # every rewrite (the precision search's trials included)
        from .passes.rms_norm_divide import RmsNormDivide

        records += run_model_passes(prepared, [RmsNormDivide()], verify=verify_model)[1]
    return Prepared(prepared, reference, records, opset, warnings,
                    frozenset(wg.outer_initializers), frozenset(vi.name for vi in model.graph.value_info))


def smooth(prepared: Prepared, samples: Iterable, config: QuantConfig | None = None, *, total: int | None = None,
           progress: ProgressFactory | None = None, dump_dir: str | os.PathLike | None = None) -> Prepared:
    """SmoothQuant on the prepared model (static int8): plan it, measure each quantized MatMul input's per-channel
    range and a sample of its rows over ``samples``, and run the smoothing passes. Returns the prepared model with
    the smoothed weights (and the pass records appended); plan and calibrate it as usual, which measures the
    smoothed activations' ranges. The model is unchanged when no MatMul/Gemm reads a quantized 8-bit activation."""
    config = config or QuantConfig()
    wg = _working_graph(prepared)
    qplan = build_plan(wg.graph, config)
    needed = statistics_needed(qplan, wg.graph)
    table = CalibrationTable()  # no candidate: the pass records what it skipped, and no data is read
    if needed:
        providers, _ = pick_providers(config.calib_ep)
        table = collect_ranges(prepared.model, [], samples, providers=providers, batch_size=config.calib_batch_size,
                               specs=input_specs(prepared.model), extra=needed, overlap=False,
                               on_sample=progress("smoothing statistics", total) if progress else None)
    manager = PassManager(smooth_passes(config), export=wg.export, verify=verify_model, dump_dir=dump_dir)
    records = manager.run(wg.graph, PassContext(qplan, table))
    if not any(r.modified for r in records):
        return replace(prepared, records=prepared.records + records)
    return replace(prepared, model=manager.last_export or wg.export(), records=prepared.records + records)


def _working_graph(prepared: Prepared) -> WorkingGraph:
    return WorkingGraph(prepared.model, outer_initializers=prepared.outer_initializers)


def plan(prepared: Prepared, config: QuantConfig | None = None) -> QuantPlan:
    """Which nodes and activations to quantize, and how (per-tensor specs)."""
    return build_plan(_working_graph(prepared).graph, config or QuantConfig())


def calibrate(prepared: Prepared, quant_plan: QuantPlan, samples: Iterable, config: QuantConfig | None = None, *,
              total: int | None = None, synthetic: bool = False, description: str = "",
              progress: ProgressFactory | None = None, extra: dict[str, tuple[str, ...]] | None = None) -> Calibrated:
    """Stream ``samples`` ((feed, label) pairs) through onnxruntime and measure the ranges and statistics the plan
    needs, and any ``extra`` statistics by tensor (e.g. ``{"x": ("gram", "absmean")}``; see ``table.statistics``)."""
    config = config or QuantConfig()
    quant_plan = quant_plan.with_overrides()
    tensors = quant_plan.calibrate
    methods = quant_plan.methods()
    providers, note = pick_providers(config.calib_ep)
    options = RangeOptions(config.percentile, config.bins, config.kl_levels, config.activation_type,
                           config.activation_symmetric, config.hist_sample)
    # a tensor whose spec names another grid than the configuration's is calibrated for its own grid
    own = {name: replace(options, qtype=spec.dtype, symmetric=spec.symmetric)
           for name, spec in ((n, quant_plan.tensors[n].spec) for n in tensors if n in quant_plan.tensors)
           if (spec.dtype, spec.symmetric) != (options.qtype, options.symmetric)}
    schedule: dict = {}
    table = collect_ranges(prepared.model, tensors, samples, methods=methods, options=options, providers=providers,
                           batch_size=config.calib_batch_size, specs=input_specs(prepared.model), synthetic=synthetic,
                           on_sample=progress("calibrating", total) if progress else None,
                           overlap=None if config.calib_overlap else False, stats=schedule,
                           extra={**quant_plan.statistics, **(extra or {})} or None, tensor_options=own)
    info = {"source": description, "samples": table.samples, "tensors": len(table), "method": config.method,
            "methods_used": dict(Counter(methods.values())), "provider": providers[0], "synthetic": table.synthetic,
            "observer_thread": schedule.get("observer_thread", False)}
    if note:
        info["warnings"] = [note]
    for key in ("branches_not_taken", "unreachable"):  # If branches no sample took; tensors in Loop/Scan bodies
        if schedule.get(key):
            info[key] = schedule[key]
    return Calibrated(table, info)


def load_calibration(path: str | os.PathLike, quant_plan: QuantPlan, config: QuantConfig | None = None) -> Calibrated:
    """A saved calibration table, checked to hold every range the plan needs."""
    quant_plan = quant_plan.with_overrides()
    table = CalibrationTable.load(path)
    missing = [n for n in quant_plan.calibrate if n not in table]
    if missing:
        raise CalibrationDataError(f"has no range for {len(missing)} tensor(s), e.g. '{missing[0]}'",
                                   subject=str(path), hint="the table was made for another model or config")
    return Calibrated(table, {"source": str(path), "samples": table.samples, "tensors": len(table),
                              "method": (config or QuantConfig()).method, "synthetic": table.synthetic})


def rewrite(prepared: Prepared, quant_plan: QuantPlan, table: CalibrationTable, config: QuantConfig | None = None, *,
            dump_dir: str | os.PathLike | None = None, name: str = "<ModelProto>",
            samples: list | None = None) -> Rewritten:
    """Apply the plan with the recipe's passes (each verified); refuse a result that quantized nothing unless
    ``allow_empty``. ``samples`` (a list of (feed, label) pairs): what the recipe's bias correction measures on
    (:func:`correct_biases`); without them it corrects nothing and says so."""
    config = config or QuantConfig()
    wg = _working_graph(prepared)
    check_plan_fits(bind(quant_plan, wg.graph), wg.graph.opset, config)  # named here, not as a failing pass
    passes = rewrite_passes(config)
    at = next((i for i, p in enumerate(passes) if isinstance(p, BiasCorrection)), None)
    if at is None:
        manager = PassManager(passes, export=wg.export, verify=verify_model, dump_dir=dump_dir)
        records = manager.run(wg.graph, PassContext(quant_plan, table))
        return _rewritten(wg, prepared, records, config, name, manager.last_export)
    manager = PassManager(passes[:at], export=wg.export, verify=verify_model, dump_dir=dump_dir)
    records = manager.run(wg.graph, PassContext(quant_plan, table))
    t = time.perf_counter()
    corrected, info = correct_biases(wg, prepared, quant_plan, passes[at], samples, config)
    info["seconds"] = round(time.perf_counter() - t, 3)
    records += corrected
    finisher = PassManager(passes[at + 1:], export=wg.export, verify=verify_model, dump_dir=dump_dir)
    records += finisher.run(wg.graph, PassContext(quant_plan, table))
    exported = finisher.last_export
    if exported is None and info["layers"]:
        exported = wg.export()
        verify_model(exported)  # the corrections ran unverified: check the result once
    result = _rewritten(wg, prepared, records, config, name, exported or manager.last_export)
    result.info["bias_correction"] = info
    return result


def correct_biases(wg: WorkingGraph, prepared: Prepared, quant_plan: QuantPlan, corrector: BiasCorrection,
                   samples: list | None, config: QuantConfig) -> tuple[list[PassRecord], dict]:
    """Empirical bias correction of the quantized working graph ``wg``, sequentially: the float model's
    per-channel output mean of every correctable planned node is measured once on ``samples``; then, for
    ``config.bias_correction_stages`` dependency stages at a time (in order), the quantized model as corrected so
    far is run on the same samples and ``corrector`` moves those stages' biases by float mean - quantized mean.
    Returns the pass records and what the report says (layers corrected, samples, passes)."""
    info: dict = {"method": "empirical", "layers": 0, "samples": len(samples or ()), "passes": 0}
    graph = wg.graph
    by_label = {node_label(n): n for n in graph.nodes}
    sites = {}
    planned = quant_plan.with_overrides().nodes
    for n in planned:
        node = by_label.get(n.node)
        site = correction_site(node) if node is not None else None
        if site is not None and any(producer(t) is not None and producer(t).op == "DequantizeLinear"
                                    for t in node.inputs[1:2]):
            sites[n.node] = site
    if not samples:
        info["note"] = "no calibration samples to measure on (a loaded table brings none): biases not corrected"
        return [], info
    if not sites:
        info["note"] = "no quantized Conv/ConvTranspose/Gemm or MatMul with a bias Add"
        return [], info
    specs = input_specs(prepared.model)
    reference = collect_ranges(prepared.model, [], samples, specs=specs,
                               extra={t: (obs,) for t, obs in sites.values()}).statistics
    order = dependency_stages(graph, quant_plan)
    levels = sorted({order[label] for label in sites if label in order})
    step = max(1, config.bias_correction_stages)
    records: list[PassRecord] = []
    for i in range(0, len(levels), step):
        group = set(levels[i:i + step])
        labels = [label for label in sites if order.get(label) in group]
        extra = {sites[label][0]: (sites[label][1],) for label in labels}
        measured = collect_ranges(wg.export(), [], samples, specs=specs, extra=extra).statistics
        shifts = Statistics(samples=len(samples))
        for tensor in extra:
            ref, got = reference.get(tensor, "mean"), measured.get(tensor, "mean")
            if ref is not None and got is not None and ref.mean.shape == got.mean.shape:
                shifts.set(tensor, "bias_shift", BiasShift(ref.mean - got.mean, got.count))
        chosen = set(labels)
        nodes = tuple(n for n in planned if n.node in chosen)
        got_records = PassManager([corrector], export=wg.export, verify=None).run(
            graph, PassContext(QuantPlan(nodes, {}, ()), CalibrationTable(statistics=shifts)))
        records += got_records
        info["passes"] += 1
        info["layers"] += sum(r.stats.get("corrected", 0) for r in got_records)
    return _merged(records), info


def _merged(records: list[PassRecord]) -> list[PassRecord]:
    """The per-stage records of one pass as one record (seconds, skips and counts summed)."""
    if not records:
        return []
    stats: Counter = Counter()
    for r in records:
        stats.update(r.stats)
    return [PassRecord(records[0].name, sum(r.seconds for r in records), any(r.modified for r in records),
                       tuple(s for r in records for s in r.skipped), dict(stats), records[0].role)]


def _rewritten(wg: WorkingGraph, prepared: Prepared, records: list[PassRecord], config: QuantConfig,
               name: str, exported: onnx.ModelProto | None = None) -> Rewritten:
    """The rewritten model (value_info as the input described it), refused when nothing was quantized unless
    ``allow_empty``. ``exported``: the working graph as last exported, when nothing changed it since."""
    quantized = keep_value_info_of(exported or wg.export(), prepared.described)
    counts = count_quantized(records)
    if not counts and not config.allow_empty:
        skipped = [s for r in prepared.records + records for s in r.skipped]
        reasons = "; ".join(f"{s.node}: {s.reason}" for s in skipped[:3]) or \
            "no Conv/ConvTranspose/MatMul/Gemm with float weights"
        raise NothingQuantizedError(f"nothing was quantized ({reasons})", subject=name,
                                    hint="pass allow_empty / --allow-empty to accept an unchanged model")
    return Rewritten(quantized, records, counts)


def rewrite_sequential(prepared: Prepared, quant_plan: QuantPlan, samples: list, config: QuantConfig, *,
                       name: str = "<ModelProto>") -> Rewritten:
    """Weight-only GPTQ with each Hessian measured on the model whose earlier weights are already quantized:
    ``config.gptq_sequential`` dependency stages per calibration pass over ``samples`` (a list: it is read once a
    pass), each pass followed by the rewrite of those stages."""
    quant_plan = quant_plan.with_overrides()
    wg = _working_graph(prepared)
    check_plan_fits(bind(quant_plan, wg.graph), wg.graph.opset, config)
    order = dependency_stages(wg.graph, quant_plan)
    reads = {node_label(n): n.inputs[0].name for n in wg.graph.nodes if n.inputs}
    levels = sorted(set(order.values()))
    step = max(1, config.gptq_sequential)
    quantizer, *finish = rewrite_passes(config)  # the weight-only recipe: the quantizer, then what tidies up
    records: list[PassRecord] = []
    specs = input_specs(prepared.model)
    for i in range(0, len(levels), step):
        group = set(levels[i:i + step])
        nodes = tuple(n for n in quant_plan.nodes if order.get(n.node) in group)
        stats = {reads[n.node]: ("gram",) for n in nodes if n.op_type != "Gather" and n.node in reads}
        table = collect_ranges(wg.export(), [], samples, specs=specs, extra=stats) if stats else CalibrationTable()
        records += PassManager([quantizer], export=wg.export, verify=None).run(
            wg.graph, PassContext(QuantPlan(nodes, {}, (), (), stats), table))
    finisher = PassManager(finish, export=wg.export, verify=verify_model)
    records += finisher.run(wg.graph, PassContext())
    exported = finisher.last_export  # verified when a finishing pass changed the graph
    if exported is None:
        exported = wg.export()
        verify_model(exported)  # the per-stage passes ran unverified: check the result once
    return _rewritten(wg, prepared, records, config, name, exported)


def check_plan_fits(bound, opset: int, config: QuantConfig) -> None:
    """What the plan asks that this model's opset or the output format cannot hold is a :class:`PlanError` naming
    the tensor (16-bit activations need opset 21; integer operators exist for 8-bit activations only)."""
    for t in bound.tensors:
        if t.spec.dtype in SIXTEEN_BIT_TYPES and opset < INT16_MIN_OPSET:
            raise PlanError(f"{t.spec.dtype} activations need opset {INT16_MIN_OPSET}, the model has {opset}",
                            subject=f"plan: tensor '{t.name}'", hint=f"use --target-opset {INT16_MIN_OPSET}")
        if t.spec.dtype in SIXTEEN_BIT_TYPES and config.format == "qop":
            raise PlanError(f"{t.spec.dtype} activations have no integer operators (--format qop)",
                            subject=f"plan: tensor '{t.name}'", hint="use --format qdq or an 8-bit dtype")


def evaluate(reference: "onnx.ModelProto | ModelFile", quantized: "onnx.ModelProto | ModelFile", samples: Iterable, description: str,
             config: QuantConfig | None = None) -> dict:
    """Original vs quantized on the configured providers: metrics, per-layer ranking, placement, latency, and the
    tolerance verdict (``passed``, ``tolerance_failures``)."""
    config = config or QuantConfig()
    result = validate(reference, quantized, samples, providers=list(config.providers) or None,
                      per_layer=config.per_layer, latency=config.latency)
    result["data"] = description
    result.update(check_tolerance(result, config))
    return result


def model_size(source: Any, model: onnx.ModelProto) -> int:
    """Bytes of the file ``source`` names (with the external data files it names), or of the serialised model when
    it is not a file."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        size = path.stat().st_size
        if size < initializer_bytes(model):  # weights in external data: the .onnx file alone is small to parse
            files = {e.value for t in onnx.load(str(path), load_external_data=False).graph.initializer
                     for e in t.external_data if e.key == "location"}
            size += sum((path.parent / f).stat().st_size for f in files if (path.parent / f).is_file())
        return size
    return model_bytes(model)
