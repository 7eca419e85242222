"""QDQ import: a model that already holds QuantizeLinear/DequantizeLinear (a QAT export, another tool's output) read
into a plan and ranges, put in qpass's QDQ form, optionally lowered to integer operators, and validated.

    load -> repair (axes; the model the run validates against without a float reference) -> normalize (duplicate
    pairs, fake-quantized weights folded to integers, biases to int32) -> import plan and table -> [lower] -> validate

The passes are listed in :func:`qpass.recipes.import_repair_passes` / :func:`~qpass.recipes.import_passes`.
"""
from __future__ import annotations

import os
import time
from collections import Counter
from typing import Any

import onnx

from . import stages
from .calib.data import input_specs
from .calib.sources import validation_data
from .config import QuantConfig
from .errors import PassError, UnsupportedModelError
from .graph import WorkingGraph, constant_behind, is_onnx_op, scopes
from .io import inferred_view, keep_value_info_of, model_bytes
from .opset import apply_opset_policy
from .pass_manager import PassContext, PassManager
from .plan.importer import import_plan
from .recipes import import_passes, import_repair_passes, lower_passes
from .report import Report
from .verify import verify_model


def _run(manager: PassManager, wg: WorkingGraph, ctx: PassContext = PassContext()):
    try:
        return manager.run(wg.graph, ctx)
    except PassError as exc:  # a refusal a pass raised names the node: it is the input's doing, shown as it is
        if isinstance(exc.__cause__, UnsupportedModelError):
            raise exc.__cause__ from None
        raise


def run_import(original: onnx.ModelProto, cfg: QuantConfig, *, name: str, source: Any, val: Any = None,
               calib: Any = None, reference: str | os.PathLike | onnx.ModelProto | None = None,
               dump_dir: str | os.PathLike | None = None, warnings: list[str] | None = None):
    """Import, normalize, [lower] and validate ``original``; returns (model, report, plan, table)."""
    times: dict[str, float] = {}
    t = time.perf_counter()
    report = Report(model=name, config=cfg.to_dict(), warnings=list(warnings or []))
    # the model's own Q/DQ say per channel or not: only QuantizeLinear's opset is needed
    model, report.opset, more = apply_opset_policy(original, cfg.replace(per_channel=False), name)
    report.warnings += more
    with inferred_view(model):
        wg = WorkingGraph(model)
    _refuse_computed_scales(wg, name)
    repair = PassManager(import_repair_passes(cfg), export=wg.export, verify=verify_model, dump_dir=dump_dir)
    records = _run(repair, wg)
    imported = repair.last_export or wg.export()  # what the run validates against without a float reference
    normalize = PassManager(import_passes(cfg), export=wg.export, verify=verify_model, dump_dir=dump_dir)
    records += _run(normalize, wg)
    qplan, table = import_plan(wg.graph)
    if not qplan.nodes and not qplan.tensors:
        raise UnsupportedModelError("its Q/DQ nodes quantize no activation and no constant weight qpass reads",
                                    subject=name, hint="Q/DQ parameters must be constants")
    lower = PassManager(lower_passes(cfg), export=wg.export, verify=verify_model, dump_dir=dump_dir)
    records += _run(lower, wg)
    result = lower.last_export or normalize.last_export or imported
    # value_info as the input described it (the export carries every inferred shape)
    result = keep_value_info_of(result, frozenset(vi.name for vi in original.graph.value_info))
    times["import"] = time.perf_counter() - t
    report.passes = records
    report.plan = qplan.to_dict()
    report.quantized_nodes = dict(Counter(n.op_type for n in qplan.nodes))
    report.calibration = {"source": "imported from the model's QuantizeLinear/DequantizeLinear nodes",
                          "samples": 0, "tensors": len(table), "imported": True,
                          "weights_folded": sum(r.stats.get("folded", 0) for r in records)}
    report.sizes = {"input_bytes": stages.model_size(source, original), "output_bytes": model_bytes(result)}
    t = time.perf_counter()
    if not cfg.validate:
        report.warnings.append("not validated (validate = false / --no-validate)")
    else:
        if reference is not None:
            ref = stages.load(reference)
            against = f"the float reference {reference if not isinstance(reference, onnx.ModelProto) else '<ModelProto>'}"
        else:
            ref, against = imported, "the imported QDQ model itself, before the rewrite (no --reference given)"
        samples, desc = validation_data(val, input_specs(ref), cfg, calib=calib, calibrated=False)
        report.validation = stages.evaluate(ref, result, samples, desc, cfg)
        report.validation["reference"] = against
        report.warnings.extend(report.validation["findings"])
        if desc == "synthetic":
            report.warnings.append("validated on RANDOM data (no --val or --calib): the numbers say little about real "
                                   "inputs")
    times["validate"] = time.perf_counter() - t
    report.seconds = times
    return result, report, qplan, table


def _refuse_computed_scales(wg: WorkingGraph, name: str) -> None:
    """A QuantizeLinear/DequantizeLinear whose scale is computed at run time (dynamic quantization written out with
    standard ops) has no range to import: refused, naming the node."""
    for scope in scopes(wg.graph):
        for node in scope.graph.nodes:
            if node.op in ("QuantizeLinear", "DequantizeLinear") and is_onnx_op(node) and len(node.inputs) > 1:
                if constant_behind(node.inputs[1]) is None and node.inputs[1].inputs and node.inputs[1].inputs[0].op != "Gather":
                    raise UnsupportedModelError(
                        f"{node.op} '{scope.label(node)}': its scale is not a constant but computed by "
                        f"{node.inputs[1].inputs[0].op} (e.g. dynamic quantization written out); qpass imports Q/DQ "
                        "whose scales are constants", subject=name,
                        hint="give qpass the float model (qpass run --dynamic quantizes dynamically)")


def _reads(node: onnx.NodeProto) -> set[str]:
    """The values a node reads, those its subgraphs read from outer scopes included."""
    names = {i for i in node.input if i}
    for a in node.attribute:
        for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            for n in g.node:
                names |= _reads(n)
    return names


def sorted_nodes(model: onnx.ModelProto) -> int:
    """Reorder the main graph's nodes topologically (in place), stable otherwise; returns how many moved.
    Another tool's QDQ output can list a node before the one it reads (the ONNX checker refuses it,
    onnxruntime sorts it itself)."""
    nodes = list(model.graph.node)
    made = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    deps = [{made[r] for r in _reads(n) if r in made and made[r] != i} for i, n in enumerate(nodes)]
    order: list[int] = []
    done: set[int] = set()
    while len(order) < len(nodes):
        ready = [i for i in range(len(nodes)) if i not in done and deps[i] <= done]
        if not ready:
            return -1  # a cycle: left to the checker to name
        order.append(ready[0])
        done.add(ready[0])
    moved = sum(1 for k, i in enumerate(order) if k != i)
    del model.graph.node[:]
    model.graph.node.extend(nodes[i] for i in order)
    return moved


def load_unsorted(source, error: Exception) -> tuple[onnx.ModelProto, str]:
    """A QDQ model that failed to load only because its nodes are not topologically sorted, sorted and loaded;
    ``error`` is raised again for anything else."""
    from .graph import op_types
    from .plan.importer import holds_qdq

    if "topologically sorted" not in str(error):
        raise error
    raw = onnx.ModelProto()
    if isinstance(source, onnx.ModelProto):
        raw.CopyFrom(source)
    else:
        raw = onnx.load(str(source), load_external_data=True)
    if not holds_qdq(op_types(raw)) or sorted_nodes(raw) <= 0:
        raise error
    return stages.load(raw), "the model's nodes were not topologically sorted (the ONNX checker refused it): sorted"
