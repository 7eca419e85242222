"""The CI subset of the backend-test sweep (tools/sweep.py): no case may crash qpass or make it write an invalid model.

Each case goes through :func:`tools.sweep.classify`, the classification of the full sweep
(``python -m tools.sweep``), in process. ``crashed`` covers exceptions other than QpassError, a
written model that fails the checker / does not load (``invalid_written``) or does not run in
onnxruntime. A refusal whose cause is internal (``suspect_bug``: a PassError wrapping an exception
that is not a PreconditionError, onnxruntime rejecting the calibration model qpass built) fails too;
other ``refused`` outcomes (a QpassError) and ``quantized_inaccurate`` are allowed here and listed in
docs/sweep.md. The rerun of an OpsetError refusal with ``target_opset=13`` is held to the same rule, and
so are the few cases of :data:`tools.sweep.CI_VARIANTS` run under other configurations (qop, per-tensor, ...).
"""
from __future__ import annotations

import warnings

import pytest

from tools import sweep

_CASES: dict[str, sweep.Case] | None = None
_RESULTS: dict[str, dict] = {}


def _case(name: str) -> sweep.Case:
    global _CASES
    if _CASES is None:
        names = list(dict.fromkeys(list(sweep.CI_SUBSET) + [n for n, _ in sweep.CI_VARIANTS]))
        _CASES = {c.name: c for c in sweep.select(sweep.all_cases(), names)}
    return _CASES[name]


def result(name: str, overrides: dict | None = None) -> dict:
    key = name + repr(sorted((overrides or {}).items()))
    if key not in _RESULTS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _RESULTS[key] = sweep.classify(_case(name), overrides=overrides)
    return _RESULTS[key]


def _describe(r: dict) -> str:
    return (f"{r['outcome']}: {r.get('error_type', '')}: {r.get('message', r.get('reason', ''))}"
            + (f"\n  at {r['frame']}" if r.get("frame") else "") + (f"\n{r['traceback']}" if r.get("traceback") else ""))


def test_subset_names_exist_and_are_unique():
    assert len(set(sweep.CI_SUBSET)) == len(sweep.CI_SUBSET)
    sweep.select(sweep.all_cases(), list(sweep.CI_SUBSET) + [n for n, _ in sweep.CI_VARIANTS])  # KeyError names a missing one


def _check(r: dict) -> None:
    assert r["outcome"] in sweep.OUTCOMES
    for label, rec in (("case", r), ("retry with target_opset=13", r.get("retry"))):
        if rec is None:
            continue
        assert not rec.get("invalid_written"), f"{label}: qpass wrote an invalid model: {_describe(rec)}"
        assert rec["outcome"] != "crashed", f"{label}: {_describe(rec)}"
        assert not rec.get("input_mutated"), f"{label}: qpass modified the ModelProto it was given"
        assert not rec.get("suspect_bug"), f"{label}: refusal from an internal failure ({rec['suspect_bug']}): {_describe(rec)}"


@pytest.mark.parametrize("name", sweep.CI_SUBSET)
def test_case_does_not_crash_or_write_an_invalid_model(name):
    _check(result(name))


@pytest.mark.parametrize("name,overrides", sweep.CI_VARIANTS,
                         ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for n, o in sweep.CI_VARIANTS])
def test_case_under_another_config_does_not_crash(name, overrides):
    _check(result(name, overrides))


def test_subset_exercises_quantization():
    """Guards the harness: the subset must really quantize (Conv, ConvTranspose, MatMul and Gemm)."""
    done = {}
    for name in sweep.CI_SUBSET:
        for rec in (result(name), result(name).get("retry")):
            if rec and rec["outcome"] in ("quantized", "quantized_inaccurate"):
                for op, n in rec["quantized_nodes"].items():
                    done[op] = done.get(op, 0) + n
    assert set(done) >= {"Conv", "ConvTranspose", "MatMul", "Gemm"}, done
    assert sum(done.values()) >= 15, done
