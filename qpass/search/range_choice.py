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

from ..calib.stats import TensorRange
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
    errors: dict[str, str] = field(default_factory=dict)

    def report(self, tensors: int) -> dict:
        out = {"rule": self.rule, "tensors": tensors, "worst_output_sqnr_db": {
            k: (None if v is None else (round(v, 3) if math.isfinite(v) else str(v))) for k, v in self.scores.items()},
            "seconds": round(self.seconds, 3)}
        if self.errors:
            out["errors"] = dict(self.errors)
        return out


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
    return table.with_ranges(swap), relabel(plan, list(swap), rule)


def _float_outputs(session) -> list[str]:
    return [o.name for o in session.get_outputs() if o.type in ("tensor(float)", "tensor(float16)", "tensor(double)")]


#: the reference outputs of the held-out split are kept for the three rules up to this many bytes; above it the
#: reference runs again beside each rule (a segmentation or super-resolution model's outputs can be large)
KEEP_REFERENCE_BYTES = 1 << 28


class _Reference:
    """The reference model's float outputs on the held-out samples: kept once when small, else run per rule."""

    def __init__(self, reference, samples: list, provider: str):
        self.session = make_session(reference, with_cpu_fallback(provider), what=None, level=None)
        self.names = _float_outputs(self.session)
        self.samples = samples
        self.kept: list | None = []
        total = 0
        for feed, _ in samples:
            out = self.session.run(self.names, feed)
            total += sum(np.asarray(o).nbytes for o in out)
            if total > KEEP_REFERENCE_BYTES:
                self.kept = None
                break
            self.kept.append(out)
        if self.kept is not None:
            self.session = None

    def outputs(self):
        if self.kept is not None:
            yield from zip(self.samples, self.kept)
            return
        for feed, label in self.samples:
            yield (feed, label), self.session.run(self.names, feed)


def worst_sqnr(model, ref: _Reference, provider: str) -> float:
    """The lowest SQNR (dB) over the reference's float outputs of ``model`` on its samples (onnxruntime's default
    optimisation level, as validation runs it)."""
    session = make_session(model, with_cpu_fallback(provider), what=None, level=None)
    stats = {n: OutputStats(n) for n in ref.names}
    for (feed, _), want in ref.outputs():
        for n, r, o in zip(ref.names, want, session.run(ref.names, typed_feed(session, feed))):
            stats[n].add(r, o)
    return min(st.sqnr for st in stats.values())


def relabel(plan: QuantPlan, names: list[str], rule: str) -> QuantPlan:
    """``plan`` with the tensors on ``names`` that it labels percentile labelled ``rule`` (the choice's rewrite, and a
    plan made again from the configuration, as the precision search's, after the choice kept ``rule``)."""
    if not names:
        return plan
    keep = set(names)
    tensors = {n: (replace(t, spec=replace(t.spec, method=rule)) if t.range_of in keep and t.spec.method == "percentile"
                   else t) for n, t in plan.tensors.items()}
    return replace(plan, tensors=tensors)


def choose(prepared, plan: QuantPlan, table: CalibrationTable, config: QuantConfig, reference, samples: list,
           names: list[str], *, provider: str, margin_db: float) -> RangeChoice | None:
    """Rewrite ``prepared`` once per rule in :data:`RULES` over ``names`` and keep the best by the worst output's
    SQNR on ``samples`` (another rule only when it beats percentile by ``margin_db``). None when no rule could be
    scored: the reference or the percentile rewrite fails (the normal path then reports it), or the model has no
    float output. A rule whose rewrite or run fails scores None, with its error in ``errors``."""
    from .. import stages

    t0 = time.perf_counter()
    try:
        ref = _Reference(reference, samples, provider)
    except Exception:  # noqa: BLE001 - validation runs the reference again and reports why it fails
        return None
    if not ref.names:
        return None
    scores: dict[str, float | None] = {}
    errors: dict[str, str] = {}
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
            score = worst_sqnr(rewritten.model, ref, provider)
        except Exception as exc:  # noqa: BLE001 - a rule whose rewrite fails or does not run is not kept
            if rule == RULES[0]:
                return None
            scores[rule] = None
            errors[rule] = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            continue
        scores[rule] = score
        if best is None:
            best = RangeChoice(rule, rewritten, t, p)
        elif score >= scores[RULES[0]] + margin_db and score > scores[best.rule]:
            best = RangeChoice(rule, rewritten, t, p)
        del rewritten
    best.errors = errors
    best.scores, best.seconds = scores, time.perf_counter() - t0
    return best
