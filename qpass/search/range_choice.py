"""Choose the clipping rule of the ranges ``auto`` calibrates with percentile (percentile, min-max or MSE) by the
held-out split's worst-output SQNR, from one calibration.

``auto`` clips the activations a Conv/ConvTranspose reads or writes at the 99.99th percentile. That is the best
rule on some CNNs and the worst on others (measured, docs/benchmark-notes.md): whether the values beyond the
percentile carry the signal depends on the model. The percentile observer keeps the observed min/max and the MSE
range of its histogram beside its own range, so each rule is a rewrite of the same table; each is scored on the
held-out samples (the reference run once, outputs only) and the best kept. Another rule must beat percentile's SQNR
by ``margin_db`` to replace it.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..calib.stats import RANGE, Statistics, TensorRange
from ..calib.table import CalibrationTable
from ..config import SIXTEEN_BIT_TYPES, QuantConfig
from ..evaluate.validate import OutputStats, typed_feed
from ..plan.spec import QuantPlan
from ..runtime import make_session, with_cpu_fallback

#: the rules tried, the calibrated one first
RULES = ("percentile", "minmax", "mse")


@dataclass
class RangeChoice:
    """The kept rule, its rewrite, table and plan, and every rule's score (worst-output SQNR in dB)."""

    rule: str
    rewritten: Any
    table: CalibrationTable
    plan: QuantPlan
    scores: dict[str, float | None] = field(default_factory=dict)
    seconds: float = 0.0

    def report(self, tensors: int) -> dict:
        return {"rule": self.rule, "tensors": tensors, "worst_output_sqnr_db": {
            k: (None if v is None else (round(v, 3) if math.isfinite(v) else str(v))) for k, v in self.scores.items()},
            "seconds": round(self.seconds, 3)}


def applies(config: QuantConfig, plan: QuantPlan, table: CalibrationTable) -> list[str]:
    """The ranges the choice would change (those ``auto`` calibrated with percentile that know their alternatives);
    empty when the run is not ``auto`` with 8-bit activations and no method set per op or tensor."""
    if (config.method != "auto" or config.op_methods or config.tensor_methods or not config.range_choice
            or config.activation_type in SIXTEEN_BIT_TYPES or config.weight_only):
        return []
    planned = {t.range_of for t in plan.tensors.values() if t.spec.method == "percentile"}
    return sorted(n for n, r in table.ranges.items()
                  if n in planned and r.method == "percentile" and r.alternative("minmax") is not None)


def with_rule(table: CalibrationTable, plan: QuantPlan, names: list[str], rule: str) -> tuple[CalibrationTable, QuantPlan]:
    """``table`` and ``plan`` with the ranges ``names`` (and the plan's tensors that share them) set by ``rule``; a
    range that does not know ``rule``'s result keeps its own."""
    swap = {}
    for name in names:
        r = table.get(name)
        got = r.alternative(rule)
        if got is not None and rule != r.method:
            swap[name] = TensorRange(got[0], got[1], rule, r.samples, r.observed_min, r.observed_max, r.alternatives)
    if not swap:
        return table, plan
    stats = Statistics(samples=table.statistics.samples, synthetic=table.statistics.synthetic)
    for name in table.statistics:
        for kind in table.statistics.kinds(name):
            stats.set(name, kind, swap[name] if kind == RANGE and name in swap else table.statistics.get(name, kind))
    tensors = {n: (replace(t, spec=replace(t.spec, method=rule)) if t.range_of in swap else t)
               for n, t in plan.tensors.items()}
    return CalibrationTable(statistics=stats), replace(plan, tensors=tensors)


def _float_outputs(session) -> list[str]:
    return [o.name for o in session.get_outputs() if o.type in ("tensor(float)", "tensor(float16)", "tensor(double)")]


def reference_outputs(reference, samples: list, provider: str) -> tuple[list[str], list[list[np.ndarray]]]:
    """The float outputs' names and ``reference``'s values of them on each sample (run once for every rule)."""
    session = make_session(reference, with_cpu_fallback(provider), what=None, level=None)
    names = _float_outputs(session)
    return names, [session.run(names, feed) for feed, _ in samples]


def worst_sqnr(model, names: list[str], refs: list[list[np.ndarray]], samples: list, provider: str) -> float:
    """The lowest SQNR (dB) over ``names`` of ``model`` against ``refs`` on ``samples`` (onnxruntime's default
    optimisation level, as validation runs it)."""
    session = make_session(model, with_cpu_fallback(provider), what=None, level=None)
    stats = {n: OutputStats(n) for n in names}
    for (feed, _), ref in zip(samples, refs):
        for n, r, o in zip(names, ref, session.run(names, typed_feed(session, feed))):
            stats[n].add(r, o)
    return min(st.sqnr for st in stats.values())


def choose(prepared, plan: QuantPlan, table: CalibrationTable, config: QuantConfig, reference, samples: list,
           names: list[str], *, provider: str, margin_db: float) -> RangeChoice | None:
    """Rewrite ``prepared`` once per rule in :data:`RULES` over ``names`` and keep the best by the worst output's
    SQNR on ``samples`` (another rule only when it beats percentile by ``margin_db``). None when no rule could be
    scored (the percentile rewrite failed or the model has no float output)."""
    from .. import stages

    t0 = time.perf_counter()
    outputs, refs = reference_outputs(reference, samples, provider)
    if not outputs:
        return None
    scores: dict[str, float | None] = {}
    best: RangeChoice | None = None
    seen: list[dict] = []
    for rule in RULES:
        t, p = with_rule(table, plan, names, rule)
        ranges = {n: (t.get(n).min, t.get(n).max) for n in names}
        if ranges in seen:  # the same ranges as a rule already scored (e.g. no value clipped)
            continue
        seen.append(ranges)
        try:
            rewritten = stages.rewrite(prepared, p, t, config)
            score = worst_sqnr(rewritten.model, outputs, refs, samples, provider)
        except Exception:  # noqa: BLE001 - a rule whose rewrite fails or does not run is not kept
            if rule == RULES[0]:
                return None
            scores[rule] = None
            continue
        scores[rule] = score
        if best is None:
            best = RangeChoice(rule, rewritten, t, p)
        elif score >= scores[RULES[0]] + margin_db and score > scores[best.rule]:
            best = RangeChoice(rule, rewritten, t, p)
        del rewritten
    best.scores, best.seconds = scores, time.perf_counter() - t0
    return best
