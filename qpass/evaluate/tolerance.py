"""The tolerance verdict: which of the configured minimums (cosine, SQNR, top-1 agreement) a validation missed, and,
when none is configured, whether an output is broken rather than degraded (a collapse)."""
from __future__ import annotations

from ..config import QuantConfig

#: below this SQNR against fp32 an output (other than a language model's next-token scores) is broken, not degraded:
#: noise at a tenth of the signal. The six shared models' default int8 outputs measure 19-42 dB (docs/benchmark-notes.md).
COLLAPSE_SQNR_DB = 10.0
#: a language model's next-token perplexity above this multiple of fp32's is broken (the logits' SQNR is no guide
#: there). Measured on SmolLM2-135M: static int8 x1.66 (top-1 agreement 0.49), 4-bit round to nearest x1.38 at 4 dB,
#: GPTQ x1.15
COLLAPSE_PERPLEXITY_RATIO = 1.5


def _sqnr(o: dict) -> float:
    sq = o["sqnr_db"]
    return sq if isinstance(sq, float) else (float("inf") if sq == "inf" else float("-inf"))


def check_tolerance(validation: dict, cfg: QuantConfig) -> dict:
    """``passed`` and the failed checks, for the tolerances set in ``cfg`` (min cosine, SQNR, top-1 agreement);
    with none set, the collapse check (:func:`collapse_failures`) unless ``cfg.collapse_check`` is off."""
    failures = []
    for o in validation.get("outputs", []):
        if cfg.min_cosine is not None and o["cosine_mean"] is not None and o["cosine_mean"] < cfg.min_cosine:
            failures.append(f"output '{o['output']}': mean cosine {o['cosine_mean']:.5f} < {cfg.min_cosine}")
        if cfg.min_sqnr is not None and _sqnr(o) < cfg.min_sqnr:
            failures.append(f"output '{o['output']}': SQNR {_sqnr(o):.2f} dB < {cfg.min_sqnr}")
        if cfg.min_top1 is not None and "top1_agreement" in o and o["top1_agreement"] < cfg.min_top1:
            failures.append(f"output '{o['output']}': top-1 agreement {o['top1_agreement']:.4f} < {cfg.min_top1}")
    explicit = any(v is not None for v in (cfg.min_cosine, cfg.min_sqnr, cfg.min_top1))
    if explicit and not validation.get("outputs"):
        failures.append("no provider produced outputs to check")
    if not explicit and cfg.collapse_check:
        failures += collapse_failures(validation, cfg)
    return {"passed": not failures, "tolerance_failures": failures}


def collapse_failures(validation: dict, cfg: QuantConfig) -> list[str]:
    """One line per broken output: a language model's perplexity more than COLLAPSE_PERPLEXITY_RATIO times fp32's,
    any other float output under COLLAPSE_SQNR_DB; each names the layers adding the most error (when ranked) and
    the mode to try instead."""
    broken = []
    for o in validation.get("outputs", []):
        if "perplexity_fp32" in o:
            ratio = o["perplexity_quantized"] / o["perplexity_fp32"] if o["perplexity_fp32"] > 0 else float("inf")
            if ratio > COLLAPSE_PERPLEXITY_RATIO:
                broken.append((o, f"next-token perplexity {o['perplexity_fp32']:.2f} -> {o['perplexity_quantized']:.2f} "
                                  f"(x{ratio:.2f}, over x{COLLAPSE_PERPLEXITY_RATIO:g})", True))
        elif _sqnr(o) < COLLAPSE_SQNR_DB:
            cos = f", mean cosine {o['cosine_mean']:.3f}" if o.get("cosine_mean") is not None else ""
            broken.append((o, f"SQNR {_sqnr(o):.1f} dB{cos} (under {COLLAPSE_SQNR_DB:g} dB)", False))
    if not broken:
        return []
    worst = [f"{r['node']} ({r['op_type']})" for r in validation.get("per_layer", [])[:3]]
    where = f"; layers adding the most error: {', '.join(worst)}" if worst else ""
    lines = []
    for o, what, language_model in broken:
        if cfg.weight_only:
            hint = "try GPTQ (--calib DATA), a smaller --block-size, or --weight-only int8"
        elif language_model and cfg.smooth_quant == "off":
            hint = ("for a language model try --smooth-quant on (activation outliers moved into the weights first), "
                    "or the weight-only mode: --weight-only int4 (activations stay float)")
        elif language_model:
            hint = "for a language model use the weight-only mode: --weight-only int4 (activations stay float)"
        else:
            hint = ("exclude those layers (--exclude NAME), or keep activations 16-bit (--activation-type uint16 "
                    "--target-opset 21)")
        lines.append(f"output '{o['output']}' is broken, not degraded: {what}{where}. {hint[0].upper() + hint[1:]}; "
                     "--allow-collapse accepts it")
    return lines
