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
from .graph import WorkingGraph
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
    model, report.opset, more = apply_opset_policy(original, cfg, name)
    report.warnings += more
    with inferred_view(model):
        wg = WorkingGraph(model)
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
