"""The latency objective: compute nodes whose integer form measured slower than float are kept float, until the
output is not slower than the fp32 model (medians of alternated runs), or the report says it could not.

Timing trials, each a rewrite from the same calibration table (no recalibration) timed against the current model:
1. The model and fp32 are timed, alternated; when the model is not slower, nothing moves.
2. *Float islands*: ops with no integer form that run in float between a DequantizeLinear and a QuantizeLinear
   (a HardSwish between two Convs) make the Q/DQ pairs around them cost time that the integer kernels do not
   save. The quantized compute nodes feeding such islands move to float together in one trial, kept if faster.
3. While the model is still slower than fp32, the next other quantized compute node (graph order) is tried in
   float alone and kept float where that is faster; once it is not slower, the next island node is tried back in
   its integer form alone and re-quantized where that is neither slower than its float form nor than fp32 (the
   decision per layer, measured). Until the trials (``search_budget``) or the nodes run out.
4. The last timing (``FINAL_REPEATS`` alternated runs against fp32) decides; when it says slower and trials and
   nodes remain, 3 goes on.
5. When it still says slower with the trials or nodes spent, the remaining quantized compute nodes go float
   together in one trial (past the budget when the budget is what ran out), kept if not slower than the current
   model (all float is the model itself), and timed against fp32 once more.
The trials are timed in this process, one after another: timing in parallel workers would measure contention.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import onnx

from ..errors import QpassError
from ..graph import proto_node_label
from ..io import model_bytes
from ..ops import DATA_MOVEMENT, NEIGHBOUR_OPS, RANGE_FOLDING
from ..plan.spec import QuantPlan
from .precision import _near, plan_for

#: alternated runs per timing (fewer for a model whose run takes long: about TIME_BUDGET_S per timing)
REPEATS = 30
#: alternated runs of the last timing (the model against fp32), which decides whether the objective is met
FINAL_REPEATS = 100
MIN_REPEATS = 8
TIME_BUDGET_S = 3.0
WARMUP = 3

#: a timer: models by key (and ``final=True`` for the last timing) -> median milliseconds by key, run alternated
Timer = Callable[..., dict]


def alternated_ms(models: dict, feed: dict, provider: str = "CPUExecutionProvider", repeats: int = REPEATS) -> dict:
    """Median milliseconds of each model (ModelProto or ModelFile) on ``feed``: sessions with onnxruntime's default
    optimisations and no spin-wait, ``WARMUP`` runs each, then rounds in which each model runs once, in turn."""
    from ..evaluate.validate import _session

    sessions = {k: _session(m, provider, spin=False) for k, m in models.items()}
    t = time.perf_counter()
    for s in sessions.values():
        for _ in range(WARMUP):
            s.run(None, feed)
    per_round = (time.perf_counter() - t) / WARMUP
    n = max(MIN_REPEATS, min(repeats, int(TIME_BUDGET_S * repeats / REPEATS / per_round) if per_round > 0 else repeats))
    times: dict = {k: [] for k in sessions}
    for _ in range(n):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feed)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


#: element-wise ops onnxruntime runs on the integers when every input is a uint8 DequantizeLinear's output and every
#: reader of the output a uint8 QuantizeLinear (with int8 it left them in float: qpass/passes/integer_hard_swish.py)
INTEGER_BINARY = frozenset({"Mul", "Add"})


def _uint8_dq(node: onnx.NodeProto | None, types: dict[str, int]) -> bool:
    return (node is not None and node.op_type == "DequantizeLinear" and len(node.input) > 2
            and types.get(node.input[2]) == onnx.TensorProto.UINT8)


def float_islands(model: onnx.ModelProto, quantized: set[str]) -> list[str]:
    """The quantized compute nodes (``quantized``: plan node labels) that feed a float island of ``model``: an op
    that reads a DequantizeLinear's output and whose output a QuantizeLinear reads, not itself a plan node, nor
    one onnxruntime runs on the integers (data movement, Relu/Clip, the joins and pools of ``NEIGHBOUR_OPS``, a
    Mul or Add of dequantized inputs only).
    In graph order."""
    types = {t.name: t.data_type for t in model.graph.initializer}  # the stored constants and their element types
    weights = set(types)
    producer, readers = {}, {}
    for n in model.graph.node:
        for o in n.output:
            producer[o] = n
        for i in n.input:
            readers.setdefault(i, []).append(n)
    skip = {"QuantizeLinear", "DequantizeLinear", *DATA_MOVEMENT, *RANGE_FOLDING, *NEIGHBOUR_OPS}
    found: list[str] = []
    for n in model.graph.node:
        if n.op_type in skip or proto_node_label(n) in quantized:
            continue
        dq_in = [i for i in n.input if i in producer and producer[i].op_type == "DequantizeLinear"
                 and producer[i].input[0] not in weights]
        to_q = any(r.op_type == "QuantizeLinear" for o in n.output for r in readers.get(o, []))
        if not (dq_in and to_q):
            continue
        outs = [r for o in n.output for r in readers.get(o, [])]
        if (n.op_type in INTEGER_BINARY and all(_uint8_dq(producer.get(i), types) for i in n.input)
                and all(r.op_type == "QuantizeLinear" and len(r.input) > 2
                        and types.get(r.input[2]) == onnx.TensorProto.UINT8 for r in outs)):
            continue  # onnxruntime runs it as QLinearMul / QLinearAdd (an integer hard-swish's pieces)
        for t in dq_in:
            for label in _near(t, quantized, lambda x: [producer[x]] if x in producer else [], lambda m: list(m.input)):
                if label not in found:
                    found.append(label)
    order = {proto_node_label(n): i for i, n in enumerate(model.graph.node)}
    return sorted(found, key=lambda x: order.get(x, len(order)))


@dataclass
class LatencyResult:
    floated: tuple[str, ...]  # every node float at the end (the accuracy search's moves first)
    model: onnx.ModelProto | None  # None when nothing moved
    rewritten: object | None  # the stages.Rewritten of ``model``
    report: dict = field(default_factory=dict)


def search_latency(prepared, plan: QuantPlan, table, config, reference, feed: dict, model: onnx.ModelProto, *,
                   floated: tuple[str, ...] = (), widened: tuple[str, ...] = (), corrections: list | None = None,
                   provider: str = "CPUExecutionProvider", timer: Timer | None = None,
                   rewrite: Callable | None = None) -> LatencyResult:
    """Keep float the compute nodes whose integer form measured slower (module docstring), starting from ``model``
    (of ``plan``, with ``floated`` already float and ``widened`` at 16-bit activations). At most
    ``config.search_budget`` trials. ``timer(models)``
    (default: :func:`alternated_ms` on ``feed``) and ``rewrite(floated) -> Rewritten`` (default: plan again with
    them float, :func:`qpass.search.precision.plan_for`, and rewrite from ``table``) can be injected (tests)."""
    from .. import stages

    t0 = time.perf_counter()
    timer = timer or (lambda models, final=False: alternated_ms(models, feed, provider,
                                                                  FINAL_REPEATS if final else REPEATS))
    overrides = tuple(plan.overrides)
    if rewrite is None:
        allow = config.replace(allow_empty=True)  # every compute node float is a trial like any other

        def rewrite(nodes: tuple[str, ...]):
            return stages.rewrite(prepared, plan_for(prepared, allow, nodes, overrides, widened), table, allow,
                                  samples=corrections)
    budget = config.search_budget
    report: dict = {"objective": "latency", "budget": budget, "trials": 0, "moves": [], "requantized": [],
                    "tried": []}
    start = timer({"fp32": reference, "model": model})
    report["start"] = {"fp32_ms": round(start["fp32"], 4), "ms": round(start["model"], 4),
                       "ratio": round(start["model"] / start["fp32"], 4)}
    cur_model, cur_rw, cur_float, cur_ms = model, None, tuple(floated), start["model"]
    quantized = {n.node for n in plan.with_overrides().nodes} - set(floated)

    def trial(nodes: tuple[str, ...], what: str, moved: list[str]):
        """Rewrite with ``nodes`` float and time it, alternated with the current model and fp32: (rewritten, its
        ms, current ms, fp32 ms); (None, None, and the last times) when the rewrite failed."""
        report["trials"] += 1
        try:
            rw = rewrite(nodes)
        except QpassError as exc:
            report["tried"].append({"step": what, "nodes": moved, "error": exc.one_line()})
            return None, None, cur_ms, fp32_ms
        ms = timer({"fp32": reference, "current": cur_model, "trial": rw.model})
        report["tried"].append({"step": what, "nodes": moved, "ms": round(ms["trial"], 4),
                                "current_ms": round(ms["current"], 4), "fp32_ms": round(ms["fp32"], 4)})
        return rw, ms["trial"], ms["current"], ms["fp32"]

    def move(rw, nodes: list[str], what: str, before: float, after: float) -> None:
        report["moves"].append({"nodes": nodes, "step": what, "ms_before": round(before, 4), "ms_after": round(after, 4),
                                "bytes_before": model_bytes(cur_model), "bytes_after": model_bytes(rw.model)})

    fp32_ms = start["fp32"]
    islands: list[str] = []
    if cur_ms > fp32_ms:
        # 2. the compute nodes feeding float islands, together
        islands = [x for x in float_islands(model, quantized) if x not in cur_float]
        report["islands"] = islands
        if islands and report["trials"] < budget:
            rw, ms, before, fp32_ms = trial(cur_float + tuple(islands), "islands to float", islands)
            if rw is not None and ms < before:
                move(rw, islands, "islands to float", before, ms)
                cur_model, cur_rw, cur_float, cur_ms = rw.model, rw, cur_float + tuple(islands), ms
            else:
                islands = []
        # 3 and 4, until the trials run out or neither has a node left: while slower than fp32, the next other
        # quantized compute node (graph order) to float; while not, the next island node back to integer
        order = [proto_node_label(n) for n in prepared.model.graph.node]
        to_float = [x for x in order if x in quantized and x not in cur_float]
        back_to_integer = list(islands)
        while True:
            while report["trials"] < budget:
                if cur_ms > fp32_ms:
                    if not to_float:
                        break
                    node = to_float.pop(0)
                    rw, ms, before, fp32_ms = trial(cur_float + (node,), "one to float", [node])
                    if rw is not None and ms < before:
                        move(rw, [node], "one to float", before, ms)
                        cur_model, cur_rw, cur_float, cur_ms = rw.model, rw, cur_float + (node,), ms
                        continue
                else:
                    if not back_to_integer:
                        break
                    node = back_to_integer.pop(0)
                    back = tuple(x for x in cur_float if x != node)
                    rw, ms, before, fp32_ms = trial(back, "back to integer", [node])
                    if rw is not None and ms <= before and ms <= fp32_ms:
                        report["requantized"].append({"node": node, "ms_float": round(before, 4),
                                                      "ms_integer": round(ms, 4)})
                        cur_model, cur_rw, cur_float, cur_ms = rw.model, rw, back, ms
                        continue
                cur_ms = before
            end = timer({"fp32": reference, "model": cur_model}, final=True)
            cur_ms, fp32_ms = end["model"], end["fp32"]
            if cur_ms <= fp32_ms or report["trials"] >= budget or not to_float:
                break
        rest = [x for x in order if x in quantized and x not in cur_float]
        if cur_ms > fp32_ms and rest:
            # 5. still slower with the trials or the order spent: the rest float together, in one trial (past the
            # budget when it is spent: the objective is an output not slower than fp32, and all float is the model)
            if report["trials"] >= budget:
                report["past_budget"] = 1
            rw, ms, before, fp32_ms = trial(cur_float + tuple(rest), "rest to float", rest)
            if rw is not None and ms <= before:
                move(rw, rest, "rest to float", before, ms)
                cur_model, cur_rw, cur_float, cur_ms = rw.model, rw, cur_float + tuple(rest), ms
                end = timer({"fp32": reference, "model": cur_model}, final=True)
    else:
        end = timer({"fp32": reference, "model": cur_model}, final=True)
    report["end"] = {"fp32_ms": round(end["fp32"], 4), "ms": round(end["model"], 4),
                     "ratio": round(end["model"] / end["fp32"], 4)}
    report["floated"] = [x for x in cur_float if x not in floated]
    all_float = bool(quantized) and quantized <= set(cur_float)
    # all float, the output is the float model after prepare's folds (no Q/DQ left): it does no more work than fp32,
    # so a last timing a hair above fp32's is noise, not a slower output
    report["met"] = end["model"] <= end["fp32"] or all_float
    if not report["met"]:
        report["note"] = (f"could not make the output as fast as fp32: x{report['end']['ratio']:.2f} fp32's latency "
                          f"after {report['trials']} trials (--search-budget {budget}"
                          + (", and one past it moving the rest to float" if report.get("past_budget") else "") + ")")
    elif all_float and end["model"] > end["fp32"]:
        report["note"] = (f"every quantized compute node ended float (--search-budget {budget}"
                          + (", and one trial past it moving the rest to float" if report.get("past_budget") else "")
                          + f"): the output is all float, the float model, no slower than fp32 by construction; its last timing, "
                            f"x{report['end']['ratio']:.4f}, is within the timing's noise")
    elif report.get("past_budget") and all_float:
        report["note"] = (f"the --search-budget of {budget} trials was spent with the output still slower than fp32; "
                          "a last trial moved the remaining quantized nodes to float together: the output is all float")
    elif all_float:
        report["note"] = "every quantized compute node measured slower than float: the output is all float"
    elif not report["trials"]:
        report["note"] = "the output is not slower than fp32: nothing moved"
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return LatencyResult(cur_float, cur_model if cur_rw is not None else None, cur_rw, report)
