"""The tolerance verdict: which of the configured minimums (cosine, SQNR, top-1 agreement) a validation missed."""
from __future__ import annotations

from ..config import QuantConfig


def check_tolerance(validation: dict, cfg: QuantConfig) -> dict:
    """``passed`` and the failed checks, for the tolerances set in ``cfg`` (min cosine, SQNR, top-1 agreement)."""
    failures = []
    for o in validation.get("outputs", []):
        if cfg.min_cosine is not None and o["cosine_mean"] is not None and o["cosine_mean"] < cfg.min_cosine:
            failures.append(f"output '{o['output']}': mean cosine {o['cosine_mean']:.5f} < {cfg.min_cosine}")
        sq = o["sqnr_db"] if isinstance(o["sqnr_db"], float) else (float("inf") if o["sqnr_db"] == "inf" else float("-inf"))
        if cfg.min_sqnr is not None and sq < cfg.min_sqnr:
            failures.append(f"output '{o['output']}': SQNR {sq:.2f} dB < {cfg.min_sqnr}")
        if cfg.min_top1 is not None and "top1_agreement" in o and o["top1_agreement"] < cfg.min_top1:
            failures.append(f"output '{o['output']}': top-1 agreement {o['top1_agreement']:.4f} < {cfg.min_top1}")
    if any(v is not None for v in (cfg.min_cosine, cfg.min_sqnr, cfg.min_top1)) and not validation.get("outputs"):
        failures.append("no provider produced outputs to check")
    return {"passed": not failures, "tolerance_failures": failures}
