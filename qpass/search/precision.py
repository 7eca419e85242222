"""Precision search: the compute nodes that add the most error move to 16-bit activations, then to float, one a step,
each trial a rewrite from the same calibration table and a validation, until every output meets the target or the
trial budget is spent.

A step takes the first ``CANDIDATES`` quantized compute nodes of the per-layer ranking (``added_noise_db``, the error
each node adds; a ranked op that is not a plan node stands for the compute node(s) feeding it), scores each as a trial
(that node's move, everything else as before) and keeps the one that scores best; the per-layer ranking is measured
again on the kept model for the next step. After a kept move that leaves the target unmet, the next step moves a
group twice the size of the last (the first 2, 4, 8... nodes of the ranking, one trial): where the error is spread
over many layers (a detector whose 0.99 mask IoU took 64 of its 85 Convs at 16 bits) a budget of 8 trials reaches
over 60 nodes instead of 4, while a model with one bad layer still has it found and moved alone first. A group that
does not help sends the search back to single moves (only its first node counts as tried). The trials of a step are independent: with ``search_workers`` > 1 they run
in a process pool on the stage artifacts (prepared model, plan, table), and the moves do not depend on the worker count.

A node's first move is to 16-bit activations (the activations it reads and the quantized outputs it writes get
uint16/int16 Q/DQ pairs, their range the min-max range the same calibration run observed), its second to float.
16-bit QuantizeLinear needs opset 21: the search upgrades the prepared model (onnx.version_converter) for the trials
that move a node to 16 bits, and says so in its report; where that cannot be done (the converter fails or changes the
model's interface, integer-operator output, activations already 16-bit) every move is to float and the report says why.
"""
from __future__ import annotations

import math
import re
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

import onnx

from ..calib.stats import TensorRange
from ..calib.table import CalibrationTable
from ..config import SIXTEEN_BIT_TYPES, QuantConfig
from ..errors import OpsetError, QpassError
from ..graph import proto_node_label
from ..io import default_opset, model_bytes
from ..ops import INT16_MIN_OPSET
from ..plan.spec import QuantPlan
from ..evaluate.validate import per_layer_error, validate
from .executors import TrialExecutor, for_config

#: candidate moves scored per step (the first quantized compute nodes of the per-layer ranking)
CANDIDATES = 2
#: after a kept move that leaves the target unmet, the next step moves a group this many times the size of the last
GROUP_GROWTH = 2
#: validation samples the per-layer ranking runs on (as in qpass.evaluate.validate)
LAYER_SAMPLES = 4
#: how far up from a ranked op that is not a plan node (a Relu, an Add) the search looks for the compute node(s)
UPSTREAM_DEPTH = 3
#: the 16-bit type a move gives an 8-bit activation
WIDER = {"uint8": "uint16", "int8": "int16"}
#: move kinds, in the order a node takes them
SIXTEEN, FLOAT = "16-bit", "float"


@dataclass(frozen=True)
class Target:
    """Per-output minimums (mean cosine, top-1 agreement with fp32), and a minimum of a user's metric (``eval_fn``
    of the model: fp32's value less ``max_metric_drop``); None: not asked."""

    cosine: float | None = None
    top1: float | None = None
    metric: float | None = None

    @classmethod
    def of(cls, config: QuantConfig, metric: float | None = None) -> "Target":
        return cls(config.target_cosine, config.target_top1, metric)

    @property
    def active(self) -> bool:
        return self.cosine is not None or self.top1 is not None or self.metric is not None

    def failures(self, outputs: list[dict], metric: float | None = None) -> list[str]:
        out = []
        if self.metric is not None and (metric is None or not metric >= self.metric):
            out.append(f"metric {metric} < {self.metric:.6g} (fp32's less max_metric_drop)")
        if self.cosine is None and self.top1 is None:
            return out
        if not outputs:
            return out + ["no output was measured"]
        for o in outputs:
            if self.cosine is not None and o.get("cosine_mean") is not None and o["cosine_mean"] < self.cosine:
                out.append(f"output '{o['output']}': mean cosine {o['cosine_mean']:.6f} < {self.cosine}")
            if self.top1 is not None and o.get("top1_agreement") is not None and o["top1_agreement"] < self.top1:
                out.append(f"output '{o['output']}': top-1 agreement {o['top1_agreement']:.4f} < {self.top1}")
        return out

    def met(self, outputs: list[dict], metric: float | None = None) -> bool:
        return not self.failures(outputs, metric)

    def score(self, outputs: list[dict], metric: float | None = None) -> tuple:
        """Larger is better: the target met, then the user's metric (when asked), then the worst output's cosine and
        top-1 agreement, those the target asks for first (a top-1 target ranks by top-1 before cosine)."""
        s = summary(outputs)
        m = (metric if metric is not None and math.isfinite(metric) else -math.inf) if self.metric is not None else 0.0
        cos = s["cosine_min"] if s["cosine_min"] is not None else -math.inf
        top1 = s["top1_min"] if s["top1_min"] is not None else -math.inf
        first = self.top1 is not None and self.cosine is None
        return (self.met(outputs, metric), m) + ((top1, cos) if first else (cos, top1))


def summary(outputs: list[dict], metric: float | None = None) -> dict:
    """The worst output's mean cosine and top-1 agreement (None where no output has one), and the user's metric."""
    cos = [o["cosine_mean"] for o in outputs if o.get("cosine_mean") is not None]
    top1 = [o["top1_agreement"] for o in outputs if o.get("top1_agreement") is not None]
    out = {"cosine_min": min(cos) if cos else None, "top1_min": min(top1) if top1 else None}
    if metric is not None:
        out["metric"] = metric
    return out


@dataclass
class Trial:
    """One scored candidate: the rewritten model with its move (``node``: the first node of it) and the kept moves
    before it."""

    node: str
    outputs: list[dict]
    output_bytes: int
    model: onnx.ModelProto | None  # None when the rewrite failed (info['error'])
    records: list = field(default_factory=list)
    quantized_nodes: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    metric: float | None = None  # eval_fn of the model, when given


@dataclass
class SearchResult:
    plan: QuantPlan
    model: onnx.ModelProto | None  # None when no move was kept (the first rewrite stands)
    records: list
    quantized_nodes: dict
    info: dict
    report: dict  # what the report's "search" section says


def with_float(plan: QuantPlan, node: str, model: onnx.ModelProto) -> QuantPlan:
    """``plan`` (overrides folded in) with ``node`` kept in float: the node is marked ``precision: float``, and no
    longer reads the dequantized form of its inputs (a tensor read through one Q/DQ pair by every reader gets the
    explicit list of its other readers in ``model``; a pair nobody else reads goes). Its output's pair, which the
    next layer reads, stays."""
    folded = plan.with_overrides()
    readers: dict[str, list[str]] = {}
    for n in model.graph.node:
        for t in n.input:
            readers.setdefault(t, []).append(proto_node_label(n))
    target = next((n for n in model.graph.node if proto_node_label(n) == node), None)
    inputs = set(target.input) if target is not None else set()
    tensors = {}
    for name, tp in folded.tensors.items():
        if name in inputs:
            kept = tuple(r for r in (tp.readers if tp.readers is not None else readers.get(name, ())) if r != node)
            if not kept:
                continue
            tp = replace(tp, readers=kept)
        tensors[name] = tp
    nodes = tuple(replace(n, precision="float") if n.node == node else n for n in folded.nodes)
    return QuantPlan(nodes, tensors, folded.skipped, (), folded.statistics)


def plan_for(prepared, config: QuantConfig, floated: tuple[str, ...], overrides: tuple = (),
             widened: tuple[str, ...] = ()) -> QuantPlan:
    """The plan with the ``floated`` nodes kept in float: planned again with each named one in ``exclude_nodes``
    (so the Q/DQ pairs that only fed it go too, as with ``--exclude``), an unnamed one (no name to exclude it by)
    moved by :func:`with_float`. ``overrides``: a given plan's overrides, those naming a floated node left out.
    ``widened``: nodes whose activations go to 16 bits (:func:`widen`)."""
    from .. import stages  # stages imports the passes; a worker process imports it here

    named = {n.name for n in prepared.model.graph.node if n.name}
    excluded = tuple(re.escape(f) for f in floated if f in named)
    plan = stages.plan(prepared, config.replace(exclude_nodes=tuple(config.exclude_nodes) + excluded))
    kept = tuple(o for o in overrides if not (o.match == "node" and o.value in floated))
    if kept:
        plan = replace(plan, overrides=kept)
    for f in floated:
        if f not in named:
            plan = with_float(plan, f, prepared.model)
    widened = tuple(w for w in widened if w not in floated)
    return widen(plan, widened, prepared.model) if widened else plan


def widen(plan: QuantPlan, nodes: tuple[str, ...], model: onnx.ModelProto) -> QuantPlan:
    """``plan`` (overrides folded in) with the 8-bit activations each of ``nodes`` reads, and those it writes (its
    outputs, or theirs through the ops that are not plan nodes reading them, e.g. a Relu), at 16 bits (uint8 ->
    uint16, int8 -> int16), their range the min-max one (:func:`table_for`), with every activation sharing one's
    range (a data-movement chain: one range, one type). A pair shared by other readers is widened for them too."""
    folded = plan.with_overrides()
    planned = {n.node for n in folded.nodes}
    by_label = {proto_node_label(n): n for n in model.graph.node}
    readers: dict[str, list] = {}
    for n in model.graph.node:
        for t in n.input:
            readers.setdefault(t, []).append(n)
    names: set[str] = set()
    for label in nodes:
        node = by_label.get(label)
        if node is None:
            continue
        names.update(node.input)
        outs = list(node.output)
        for _ in range(UPSTREAM_DEPTH):
            names.update(outs)
            outs = [o for t in outs for r in readers.get(t, []) if proto_node_label(r) not in planned for o in r.output]
    groups = {tp.range_of for name, tp in folded.tensors.items() if name in names}
    tensors = {name: (replace(tp, spec=replace(tp.spec, dtype=WIDER[tp.spec.dtype], method="minmax"))
                      if tp.range_of in groups and tp.spec.dtype in WIDER else tp) for name, tp in folded.tensors.items()}
    return QuantPlan(folded.nodes, tensors, folded.skipped, (), folded.statistics)


def table_for(table: CalibrationTable, plan: QuantPlan) -> CalibrationTable:
    """``table``, where a range only 16-bit activations of ``plan`` use was clipped by its calibration method
    (percentile, mse, entropy), with the min-max range the same run observed instead (16-bit activations measured
    better with min-max, docs/benchmark-notes.md); the table itself unchanged (no tensor is calibrated again)."""
    wide = {t.range_of for t in plan.tensors.values() if t.spec.dtype in SIXTEEN_BIT_TYPES}
    wide -= {t.range_of for t in plan.tensors.values() if t.spec.dtype not in SIXTEEN_BIT_TYPES}
    swap = {}
    for name in wide:
        r = table.get(name)
        if r is not None and r.observed_min is not None and (r.min, r.max) != (r.observed_min, r.observed_max):
            swap[name] = TensorRange(r.observed_min, r.observed_max, "minmax", r.samples, r.observed_min, r.observed_max)
    return table.with_ranges(swap)


def sixteen_bit(prepared, config: QuantConfig) -> tuple[Any, dict]:
    """The prepared model the 16-bit moves rewrite (``prepared`` at opset >= 21, else a copy upgraded to 21 by
    onnx.version_converter, its interface and node labels unchanged), and what the report says; None (with the
    reason) when 16-bit moves cannot be made."""
    from ..opset import upgrade

    opset = default_opset(prepared.model)
    info: dict[str, Any] = {"opset": opset}
    if not config.search_16bit:
        return None, {**info, "reason": "search_16bit is off (--no-search-16bit)"}
    if config.activation_type in SIXTEEN_BIT_TYPES:
        return None, {**info, "reason": f"activations are already {config.activation_type}"}
    if config.activation_type not in WIDER:
        return None, {**info, "reason": f"no 16-bit form of {config.activation_type} activations"}
    if config.format == "qop":
        return None, {**info, "reason": "integer operators (--format qop) take 8-bit activations only"}
    if opset >= INT16_MIN_OPSET:
        return prepared, info
    try:  # the opset policy's own upgrade: converter, full check, interface kept
        converted = upgrade(prepared.model, opset, INT16_MIN_OPSET, "prepared model",
                            f"upgrading opset {opset} -> {INT16_MIN_OPSET}", "")
    except OpsetError as exc:
        return None, {**info, "reason": exc.message}
    lost = {proto_node_label(n) for n in prepared.model.graph.node} - {proto_node_label(n) for n in converted.graph.node}
    if lost:
        return None, {**info, "reason": f"upgrading opset {opset} -> {INT16_MIN_OPSET} changes the model "
                                        f"(nodes {sorted(lost)[:3]} are gone)"}
    return replace(prepared, model=converted), {**info, "upgraded_to": INT16_MIN_OPSET}


def run_trial(prepared, config: QuantConfig, overrides: tuple, moved: tuple, table: CalibrationTable,
              reference, samples: list, corrections: list | None, provider: str, eval_fn, move: tuple) -> Trial:
    """Rewrite ``prepared`` with the kept ``moved`` and the candidate ``move`` (both tuples of (node, kind) pairs, kind
    16-bit or float; :func:`plan_for`) from the same calibration ``table`` and validate it (outputs only) on ``samples``.
    Module-level and fed picklable artifacts only, so a process pool can run it. A rewrite that fails (a range the
    new plan needs is not in the table) scores worst."""
    from .. import stages

    node = move[0][0]
    floated, widened = split(moved + tuple(move))
    try:
        plan = plan_for(prepared, config, floated, overrides, widened)
        rewritten = stages.rewrite(prepared, plan, table_for(table, plan), config, samples=corrections)
    except QpassError as exc:
        return Trial(node, [], 0, None, info={"error": exc.one_line()})
    v = validate(reference, rewritten.model, samples, providers=[provider], per_layer=False, latency=False,
                 placement=False)
    metric = float(eval_fn(rewritten.model)) if eval_fn is not None else None
    return Trial(node, v.get("outputs", []), model_bytes(rewritten.model), rewritten.model, rewritten.records,
                 rewritten.quantized_nodes, rewritten.info, metric)


def split(moves: tuple) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(nodes moved to float, nodes moved to 16 bits and not later to float) of ``moves`` ((node, kind) pairs)."""
    floated = tuple(dict.fromkeys(n for n, k in moves if k == FLOAT))
    return floated, tuple(dict.fromkeys(n for n, k in moves if k == SIXTEEN and n not in floated))


def candidates(ranking: list[dict], model: onnx.ModelProto, plan: QuantPlan, k: int,
               skip: set[str] = frozenset()) -> list[tuple[str, dict]]:
    """The first ``k`` quantized plan nodes (not in ``skip``) named by ``ranking`` (rows that add no error left
    out), each with its row. A row naming a plan node is that node; a row naming another op (a Relu or MaxPool whose
    output is where the error shows) stands for the nearest plan nodes up its inputs, then the nearest plan nodes
    reading its output (the layers whose quantized input the error is in)."""
    quantized = {n.node for n in plan.with_overrides().nodes} - set(skip)
    producer, readers = {}, {}
    for n in model.graph.node:
        for o in n.output:
            producer[o] = n
        for i in n.input:
            readers.setdefault(i, []).append(n)
    out: list[tuple[str, dict]] = []
    for row in ranking:
        if len(out) >= k:
            break
        added = row.get("added_noise_db")
        if not isinstance(added, (int, float)) or not math.isfinite(added):
            continue  # "-inf": the node adds nothing
        if row.get("node") in quantized:
            found = [row["node"]]
        else:
            found = _near(row.get("tensor"), quantized, lambda t: [producer[t]] if t in producer else [],
                          lambda n: list(n.input))
            found += _near(row.get("tensor"), quantized, lambda t: readers.get(t, []), lambda n: list(n.output))
        for label in found:
            if label not in [c for c, _ in out] and len(out) < k:
                out.append((label, row))
    return out


def _near(tensor: str | None, quantized: set[str], nodes_at, onward) -> list[str]:
    """The plan nodes nearest ``tensor`` walking one way (``nodes_at``: the nodes producing or reading a tensor;
    ``onward``: the tensors to go on from a node that is not in the plan), within ``UPSTREAM_DEPTH`` steps."""
    frontier = [tensor] if tensor else []
    for _ in range(UPSTREAM_DEPTH + 1):
        found, nxt = [], []
        for t in frontier:
            for n in nodes_at(t):
                label = proto_node_label(n)
                if label in quantized:
                    found.append(label)
                else:
                    nxt += onward(n)
        if found:
            return list(dict.fromkeys(found))
        frontier = nxt
    return []


def search(prepared, plan: QuantPlan, table: CalibrationTable, config: QuantConfig, reference, samples: list,
           first_model: onnx.ModelProto, validation: dict, *, corrections: list | None = None, eval_fn=None,
           max_metric_drop: float | None = None, executor: TrialExecutor | None = None) -> SearchResult:
    """Run the precision search from the first rewrite (``first_model``, of ``plan``) and its ``validation``
    (outputs and per-layer ranking, measured again when absent). Trials plan again from ``config`` with the moved
    nodes excluded or widened to 16 bits (:func:`plan_for`), keeping ``plan``'s overrides; a node's first move is to
    16 bits when :func:`sixteen_bit` allows it, its next (after that one was kept, or scored and not kept) to float.
    A step keeps its best trial unless it scores
    below the current model; its candidates are then not tried again. ``corrections``: the samples bias
    correction measures on. ``eval_fn(model) -> float`` (larger is better; picklable with more than one worker)
    with ``max_metric_drop``: the target also asks ``eval_fn`` of each trial to stay within that drop of fp32's.
    ``executor``: where a step's trials run (qpass.search.executors; default from ``config``: Ray at
    ``ray_address``, else a pool of ``search_workers``)."""
    t0 = time.perf_counter()
    metric = fp32_metric = None
    if eval_fn is not None and max_metric_drop is not None:
        fp32_metric = float(eval_fn(reference.load() if hasattr(reference, "load") else reference))
        metric = float(eval_fn(first_model))
    target = Target.of(config, None if fp32_metric is None else fp32_metric - max_metric_drop)
    provider = validation.get("provider") or "CPUExecutionProvider"
    outputs = validation.get("outputs", [])
    ranking = validation.get("per_layer") or []
    samples = list(samples)
    report: dict[str, Any] = {"target": {"cosine": target.cosine, "top1": target.top1, "metric": target.metric,
                                         "metric_fp32": fp32_metric}, "budget": config.search_budget,
                              "workers": config.search_workers, "candidates_per_step": CANDIDATES,
                              "group_growth": GROUP_GROWTH,
                              "start": summary(outputs, metric), "moves": [], "rejected": [], "trials": 0}
    current = SearchResult(plan, None, [], {}, {}, report)
    model, size, moved, tried = first_model, model_bytes(first_model), (), set()
    upgraded: dict = {}  # the prepared model 16-bit moves rewrite, made on the first move that could be one

    def wide():
        if "model" not in upgraded:
            upgraded["model"], report["sixteen_bit"] = sixteen_bit(prepared, config)
        return upgraded["model"]

    def kind(label: str) -> str:  # 16-bit first; float once its 16-bit move was kept or scored and not kept
        fresh = label not in split(moved)[1] and (label, SIXTEEN) not in tried
        return SIXTEEN if fresh and wide() is not None else FLOAT

    pool, owned = for_config(config, executor)
    report["executor"], report["workers"] = pool.kind, pool.workers
    group = 1  # nodes a step moves: 1 (CANDIDATES trials), then growing after each kept move (one trial of a group)
    try:
        while not target.met(outputs, metric) and report["trials"] < config.search_budget:
            if not ranking:
                ranking = per_layer_error(reference, model, samples[:LAYER_SAMPLES], provider)
            skip = {n for n, k in tried if k == kind(n)}
            if group == 1:
                picks = candidates(ranking, prepared.model, current.plan,
                                   min(CANDIDATES, config.search_budget - report["trials"]), skip)
                steps = [((label, kind(label)),) for label, _ in picks]
            else:
                picks = candidates(ranking, prepared.model, current.plan, group, skip)
                steps = [tuple((label, kind(label)) for label, _ in picks)] if picks else []
                picks = picks[:1]
            if not picks:
                report["note"] = "no quantized compute node left that the per-layer ranking names"
                break
            sixteen = any(k == SIXTEEN for _, k in moved + tuple(p for step in steps for p in step))
            args = (wide() if sixteen else prepared, config, tuple(plan.overrides), moved, table, reference, samples,
                    corrections, provider, eval_fn if target.metric is not None else None)
            trials = pool.map(run_trial, args, steps)
            report["trials"] += len(trials)
            scored = [{"node": t.node, "to": step[0][1], **({"nodes": len(step), "kinds": dict(Counter(k for _, k in step))} if len(step) > 1 else {}),
                       **summary(t.outputs, t.metric), **({"error": t.info["error"]} if "error" in t.info else {})}
                      for t, step in zip(trials, steps)]
            best = max(range(len(trials)), key=lambda i: (trials[i].model is not None, target.score(trials[i].outputs, trials[i].metric), -i))
            kept, row = trials[best], picks[best][1]
            grouped = len(steps) == 1 and len(steps[0]) > 1
            tried.update([steps[0][0]] if grouped else [p for step in steps for p in step])
            if kept.model is None or target.score(kept.outputs, kept.metric) < target.score(outputs, metric):
                report["rejected"].append({"before": summary(outputs, metric), "candidates": scored})
                group = 1  # a group that did not help: single moves again, its other nodes still untried
                continue  # no candidate helped: the next ranked ones are tried on the same model
            if grouped:
                tried.update(steps[0])
            op = next((n.op_type for n in current.plan.with_overrides().nodes if n.node == kept.node), None)
            report["moves"].append({
                "node": kept.node, "op_type": op, "to": steps[best][0][1], "ranked": row.get("node"),
                **({"group": [{"node": n, "to": k} for n, k in steps[best]],
                    "kinds": dict(Counter(k for _, k in steps[best]))} if len(steps[best]) > 1 else {}),
                "added_noise_db": row.get("added_noise_db"), "before": summary(outputs, metric), "after": summary(kept.outputs, kept.metric),
                "bytes_before": size, "bytes_after": kept.output_bytes, "candidates": scored})
            moved += steps[best]
            group *= GROUP_GROWTH
            current = SearchResult(plan_for(args[0], config, *split(moved)[:1], tuple(plan.overrides), split(moved)[1]),
                                   kept.model, kept.records, kept.quantized_nodes, kept.info, report)
            model, outputs, size, ranking, metric = kept.model, kept.outputs, kept.output_bytes, [], kept.metric
    finally:
        if owned:
            pool.close()
    report["met"] = target.met(outputs, metric)
    if report["met"] and not report["trials"]:
        report["note"] = "the first rewrite meets the target"
    report["end"] = summary(outputs, metric)
    report["floated"], report["widened"] = map(list, split(moved))
    if current.model is not None and default_opset(current.model) != default_opset(prepared.model):
        report["opset"] = {"from": default_opset(prepared.model), "to": default_opset(current.model)}
    if not report["met"]:
        report["failures"] = target.failures(outputs, metric)
        if "note" not in report:
            report["note"] = f"trial budget spent ({report['trials']} of {config.search_budget} trials)"
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return current
