"""The float16 mode's fidelity check and fallback: while an output's worst per-sample cosine to fp32 is below the
target (or an output has inf/NaN), the converted nodes that add the most error move back to float32.

The error a node adds is measured, not bisected: both models run on the validation samples with every main-graph
float tensor as an extra output; a node's added error is its output's relative error (||half - fp32|| / ||fp32||)
less the largest of its inputs'. A step keeps the outputs of the worst nodes in float32 (qpass.half.convert with
those tensors kept: their producers and readers run in float32) and checks again, for at most ``search_budget``
trials. The first step moves ``MOVE_SHARE`` of the measured half-precision nodes (at least one) and each later step
twice as many as the one before, so a model whose error is spread over many nodes (bfloat16's 8-bit significand)
reaches the target within a few trials where a fixed step would run out of budget; the last step may move more
nodes than the target needed. Only nodes that add error are moved, and in bfloat16 never a LayerNorm's gamma or
beta, or its input (:func:`qpass.passes.rms_norm_divide.layer_norm_boundary`).

The check's sessions use onnxruntime's default graph optimizations, as a user's session does: its fusions can make
a bfloat16 model it cannot run (a LayerNormalization of mixed types), which then shows here. A bfloat16 trial whose
model does not load ends the search with the last model that loads; in float16 that is an error, as it is for the
first conversion. Tensors inside If/Loop/Scan bodies cannot be fetched from onnxruntime; their
nodes are not candidates (an If's own outputs are). bfloat16 tensors are fetched through Casts to float32.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx

from ..config import QuantConfig
from ..passes.convert_float16 import value_types
from ..runtime import CUDA, augmented_model, available_providers, make_session, with_cpu_fallback

#: share of the converted main-graph nodes moved back to float32 by the first step (each later step doubles it)
MOVE_SHARE = 0.05
#: samples the per-node error is measured on
LAYER_SAMPLES = 4


@dataclass
class Found:
    model: onnx.ModelProto | None
    records: list
    report: dict = field(default_factory=dict)


def _feed_for(session, feed: dict) -> dict:
    """``feed`` with float arrays cast to the session's input types (a model with half inputs)."""
    types = {i.name: i.type for i in session.get_inputs()}
    out = {}
    for k, v in feed.items():
        v = np.asarray(v)
        if types.get(k) == "tensor(float16)" and v.dtype == np.float32:
            v = v.astype(np.float16)
        out[k] = v
    return out


def cosines(ref: list[np.ndarray], got: list[np.ndarray]) -> list[float]:
    out = []
    for r, g in zip(ref, got):
        r = np.asarray(r, dtype=np.float64).ravel()
        g = np.asarray(g, dtype=np.float64).ravel()
        if not np.all(np.isfinite(g)):
            out.append(float("-inf"))
            continue
        nr, ng = np.linalg.norm(r), np.linalg.norm(g)
        out.append(1.0 if nr == 0 and ng == 0 else float(r @ g / (nr * ng)) if nr and ng else 0.0)
    return out


def check(reference_session, session, samples: list) -> dict:
    """Worst per-sample cosine of each float output, and whether any output had inf/NaN."""
    names = [o.name for o in reference_session.get_outputs()]
    worst = {n: 1.0 for n in names}
    nonfinite = set()
    for feed, _label in samples:
        ref = reference_session.run(names, feed)
        got = session.run(names, _feed_for(session, feed))
        for n, r, g, c in zip(names, ref, got, cosines(ref, got)):
            if np.asarray(r).dtype.kind != "f":
                continue
            if not np.all(np.isfinite(np.asarray(g, dtype=np.float32))) and np.all(np.isfinite(r)):
                nonfinite.add(n)
            worst[n] = min(worst[n], c)
    return {"cosine_min": {n: round(c, 7) for n, c in worst.items()}, "nonfinite": sorted(nonfinite)}


def _met(result: dict, target: float) -> bool:
    return not result["nonfinite"] and all(c >= target for c in result["cosine_min"].values())


def added_error(reference: onnx.ModelProto, model: onnx.ModelProto, samples: list, providers: list[str]) -> dict[str, float]:
    """The error each main-graph node adds (see the module docstring), by its output's name in ``reference`` (the
    names ``keep_tensors`` takes): only nodes that run in half precision in ``model`` are candidates. A graph
    output keeps its name in ``model`` (a Cast writes it), so its producer is measured through it."""
    half_types = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    types = value_types(model)
    made = {o: n for n in model.graph.node for o in n.output if o}
    outputs = {o.name for o in model.graph.output}

    def runs_half(t: str) -> bool:
        if types.get(t) in half_types:
            return True
        n = made.get(t)  # a graph output: the Cast that writes it reads the half tensor of its producer
        return t in outputs and n is not None and n.op_type == "Cast" and types.get(n.input[0]) in half_types

    in_model = set(made)
    tensors = [o for n in reference.graph.node for o in n.output if o and o in in_model and types.get(o) is not None]
    extra = [t for t in tensors if t not in outputs]
    # basic optimizations: every tensor is fetched as an output, so later fusions would change nothing measured
    ref_s = make_session(augmented_model(reference, extra), providers, what=None)
    fetched, as_fetched = bfloat16_as_float32(model, extra, types)
    got_s = make_session(fetched, providers, what=None)
    names = [o.name for o in ref_s.get_outputs()]
    got_names = {o.name for o in got_s.get_outputs()}
    names = [n for n in names if as_fetched.get(n, n) in got_names]
    num: dict[str, float] = {}
    den: dict[str, float] = {}
    for feed, _ in samples[:LAYER_SAMPLES]:
        ref = dict(zip(names, ref_s.run(names, feed)))
        got = dict(zip(names, got_s.run([as_fetched.get(n, n) for n in names], _feed_for(got_s, feed))))
        for n in names:
            r, g = np.asarray(ref[n]), np.asarray(got[n])
            if r.dtype.kind != "f" or r.shape != g.shape:
                continue
            r64, g64 = r.astype(np.float64), g.astype(np.float64)
            if not np.all(np.isfinite(g64)) and np.all(np.isfinite(r64)):
                num[n], den[n] = float("inf"), 1.0
                continue
            num[n] = num.get(n, 0.0) + float(np.sum((r64 - g64) ** 2))
            den[n] = den.get(n, 0.0) + float(np.sum(r64 ** 2))
    err = {n: (float(np.sqrt(num[n] / den[n])) if den[n] > 0 else (0.0 if num[n] == 0 else float("inf"))) for n in num}
    added = {}
    for node in reference.graph.node:
        out = next((o for o in node.output if o), None)
        if out not in err or not runs_half(out):
            continue
        before = max([err.get(i, 0.0) for i in node.input if i] or [0.0])
        e = err[out]
        added[out] = float("inf") if e == float("inf") and before != float("inf") else max(0.0, e - before)
    return added


def bfloat16_as_float32(model: onnx.ModelProto, tensors: list[str], types: dict[str, int]
                        ) -> tuple[onnx.ModelProto, dict[str, str]]:
    """A copy of ``model`` with ``tensors`` as extra outputs; a bfloat16 one through a Cast to float32 (onnxruntime's
    Python binding cannot return bfloat16 arrays), named in the returned map."""
    model = augmented_model(model, [])
    renamed: dict[str, str] = {}
    existing = {o.name for o in model.graph.output}
    for t in tensors:
        if t in existing:
            continue
        if types.get(t) == onnx.TensorProto.BFLOAT16:
            out = f"{t}__qpass_fp32"
            model.graph.node.append(onnx.helper.make_node("Cast", [t], [out], to=onnx.TensorProto.FLOAT,
                                                          name=f"{out}_Cast"))
            model.graph.output.append(onnx.ValueInfoProto(name=out))
            renamed[t] = out
        else:
            model.graph.output.append(onnx.ValueInfoProto(name=t))
        existing.add(t)
    return model, renamed


def step_size(half_nodes: int, trial: int) -> int:
    """Nodes moved back by step ``trial`` (0-based): ``MOVE_SHARE`` of the converted nodes, doubled each step."""
    return max(1, int(MOVE_SHARE * half_nodes * 2 ** trial))


def check_providers(config: QuantConfig) -> list[str]:
    """Where the check runs: CUDA when this onnxruntime has it and the configuration's providers allow it (half
    arithmetic as deployed), else the CPU, whose provider computes most float16 ops in float32 between Casts of its
    own, so there the check sees the weights' and the boundaries' rounding only."""
    if CUDA in available_providers() and (not config.providers or "cuda" in config.providers):
        return with_cpu_fallback(CUDA)
    return with_cpu_fallback("CPUExecutionProvider")


def fallback(reference: onnx.ModelProto, converted: onnx.ModelProto, config: QuantConfig, samples: list,
             keep: dict[str, str], convert: Callable) -> Found:
    """Check ``converted`` against ``reference``; move the worst nodes' outputs to float32 until the target is met."""
    providers = check_providers(config)
    target = float(config.float_min_cosine)
    ref_s = make_session(reference, providers, what=None, level=None)  # onnxruntime's default level, as deployed
    try:
        converted_s = make_session(converted, providers, what=None, level=None)
    except Exception as exc:  # noqa: BLE001 - a provider without the half kernels (bfloat16 on the CPU)
        if config.float_type != "bfloat16":  # float16 has kernels everywhere: a model that does not load is a bug
            raise
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return Found(None, [], {"target_cosine_min": target, "samples": len(samples), "provider": providers[0],
                                "met": False, "runnable": False, "moves": [], "trials": 0,
                                "note": f"onnxruntime's {providers[0]} cannot run the converted model ({why[:300]}); "
                                        "check it where a provider has the kernels (CUDA for bfloat16)"})
    first = check(ref_s, converted_s, samples)
    report = {"target_cosine_min": target, "samples": len(samples), "provider": providers[0], "start": first,
              "moves": [], "trials": 0}
    if _met(first, target):
        report.update(met=True, note="met by the first conversion")
        return Found(None, [], report)
    kept = dict(keep)
    model, records, result = None, [], first
    current = converted
    first_half_nodes = None
    pinned = set()
    if config.float_type == "bfloat16":  # moves that would make onnxruntime fuse a LayerNorm it cannot run
        from ..passes.rms_norm_divide import layer_norm_boundary

        pinned = layer_norm_boundary(reference)
    for trial in range(config.search_budget):
        try:
            added = added_error(reference, current, samples, providers)
        except Exception as exc:  # noqa: BLE001 - the analysis is best effort; say why it stopped
            report["note"] = f"per-node error not measurable: {type(exc).__name__}: {str(exc).splitlines()[0]}"
            break
        ranked = [t for t, e in sorted(added.items(), key=lambda kv: -kv[1])
                  if e > 0 and t not in kept and t not in pinned]
        if not ranked:
            report["note"] = "no converted main-graph node adds error left to move"
            break
        if first_half_nodes is None:
            first_half_nodes = len(added)
        step = ranked[:step_size(first_half_nodes, trial)]
        for t in step:
            kept[t] = f"moved back by the fidelity check (trial {trial + 1}, added error {added[t]:.3g})"
        candidate, candidate_records = convert(reference, config, kept)
        try:
            session = make_session(candidate, providers, what=None, level=None)
        except Exception as exc:  # noqa: BLE001 - onnxruntime's fusions can make a mixed-type node it has no kernel for
            if config.float_type != "bfloat16":  # float16 has kernels everywhere: a model that does not load is a bug
                raise
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            report["unloadable_trial"] = trial + 1
            report["note"] = (f"trial {trial + 1}'s model does not load on {providers[0]} ({why[:300]}); the last "
                              "model that loads is kept")
            break
        current, records = candidate, candidate_records
        result = check(ref_s, session, samples)
        report["trials"] = trial + 1
        report["moves"].append({"tensors": step, "after": result})
        model = current
        if _met(result, target):
            break
    met = _met(result, target)
    report["met"] = met
    report["end"] = result
    report.setdefault("note", "met" if met else f"target not met after {report['trials']} trial(s)")
    if met:
        report["note"] = f"met after {report['trials']} trial(s)"
    return Found(model, records, report)
