"""A self-contained HTML page for a report dict: summary, per-output metrics, per-layer SQNR chart (inline SVG),
placement, skipped nodes, configuration and time per pass. No scripts, no external files."""
from __future__ import annotations

import html
import json
from typing import Any


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt(x: Any, digits: int = 4) -> str:
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return "" if x is None else str(x)


def _table(headers: list[str], rows: list[list[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_e(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def sqnr_chart(rows: list[dict], width: int = 760, bar_h: int = 16, max_rows: int = 60) -> str:
    """Horizontal bars of each layer's accumulated SQNR (dB), in the ranked order of the rows."""
    rows = [r for r in rows if isinstance(r.get("sqnr_db"), (int, float))][:max_rows]
    if not rows:
        return '<p class="muted">no per-layer measurements</p>'
    top = max(60.0, max(float(r["sqnr_db"]) for r in rows))
    label_w, h = 300, bar_h * len(rows) + 30
    parts = [f'<svg id="sqnr-chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h}" role="img" '
             f'aria-label="per-layer SQNR in dB">']
    for i, r in enumerate(rows):
        y = 20 + i * bar_h
        val = max(0.0, float(r["sqnr_db"]))
        w = (width - label_w - 60) * val / top
        color = "#c0392b" if val < 20 else ("#e67e22" if val < 30 else "#2e86c1")
        parts.append(f'<text x="{label_w - 6}" y="{y + bar_h - 4}" text-anchor="end" font-size="11">{_e(r["node"])[:48]}</text>')
        parts.append(f'<rect class="bar" x="{label_w}" y="{y + 2}" width="{w:.1f}" height="{bar_h - 4}" fill="{color}">'
                     f'<title>{_e(r["node"])}: {val:.1f} dB</title></rect>')
        parts.append(f'<text x="{label_w + w + 4:.1f}" y="{y + bar_h - 4}" font-size="11">{val:.1f}</text>')
    parts.append(f'<text x="{label_w}" y="12" font-size="11" fill="#555">SQNR at the layer output (dB), most error added first</text>')
    parts.append("</svg>")
    return "".join(parts)


def render_html(report: dict) -> str:
    v = report.get("validation") or {}
    title = f"qpass report: {report.get('model', '')}"
    out = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(title)}</title>",
           "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}"
           "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}"
           "th{background:#f2f2f2}.warn{color:#b03a2e;font-weight:bold}.muted{color:#777}"
           "section{margin-bottom:1.5em}</style></head><body>",
           f"<h1>{_e(title)}</h1>"]
    if report.get("synthetic_calibration"):
        out.append('<p class="warn">Calibrated on RANDOM data (--synthetic-calib): not for deployment.</p>')
    passed = v.get("passed")
    status = "no tolerance set" if not v.get("tolerance_failures") and passed is True else ("passed" if passed else "FAILED")
    out.append("<section><h2>Summary</h2>" + _table(["item", "value"], [
        ["model", report.get("model")], ["output", report.get("output")],
        ["quantized nodes", ", ".join(f"{k}: {n}" for k, n in (report.get("quantized_nodes") or {}).items()) or "-"],
        ["skipped", len(report.get("skipped") or [])],
        ["size", f"{(report.get('sizes') or {}).get('input_bytes', '?')} -> {(report.get('sizes') or {}).get('output_bytes', '?')} bytes"],
        ["validation", f"{v.get('samples', 0)} samples on {v.get('data', '?')}: {status}"],
    ]) + "</section>")
    for w in report.get("warnings") or []:
        out.append(f'<p class="warn">{_e(w)}</p>')
    for prov in v.get("providers", []):
        out.append(f"<section><h2>{_e(prov['provider'])}</h2>")
        if not prov.get("available"):
            out.append(f'<p class="muted">{_e(prov.get("note", "not available"))}</p></section>')
            continue
        if prov.get("error"):
            out.append(f'<p class="warn">{_e(prov["error"])}</p>')
        outs = prov.get("outputs") or []
        if outs:
            out.append(_table(["output", "SQNR dB", "cosine mean", "cosine min", "max abs error", "top-1 agreement",
                               "accuracy fp32", "accuracy int8"],
                              [[o["output"], o["sqnr_db"], o["cosine_mean"], o["cosine_min"], o["max_abs_error"],
                                o.get("top1_agreement"), o.get("accuracy_fp32"), o.get("accuracy_quantized")] for o in outs]))
        lat = prov.get("latency")
        if lat:
            out.append(f"<p>latency (median of {lat['repeats']} alternated runs): fp32 {lat['fp32_ms']:.3f} ms, "
                       f"quantized {lat['quantized_ms']:.3f} ms, ratio {lat['ratio']:.2f}</p>")
        pl = prov.get("placement")
        if pl:
            rows = [[p, op, n] for p, ops in pl["ops_by_provider"].items() for op, n in sorted(ops.items())]
            out.append("<h3>placement (nodes after onnxruntime's optimisations)</h3>" + _table(["provider", "op type", "nodes"], rows))
            if pl.get("fallback_nodes"):
                out.append(f'<p class="warn">{len(pl["fallback_nodes"])} node(s) fell back to the CPU; '
                           f'{pl["memcpy_nodes"]} Memcpy node(s).</p>')
        out.append("</section>")
    if v.get("per_layer"):
        out.append("<section><h2>Per-layer error</h2>" + sqnr_chart(v["per_layer"]))
        out.append(_table(["node", "op", "SQNR dB", "input SQNR dB", "added noise dB"],
                          [[r["node"], r["op_type"], r["sqnr_db"], r["input_sqnr_db"], r["added_noise_db"]]
                           for r in v["per_layer"][:30]]) + "</section>")
    if v.get("findings"):
        out.append("<section><h2>Findings</h2><ul>" + "".join(f"<li>{_e(f)}</li>" for f in v["findings"]) + "</ul></section>")
    if report.get("skipped"):
        out.append("<section><h2>Skipped</h2>" + _table(["node", "op", "reason"],
                                                         [[s["node"], s["op_type"], s["reason"]] for s in report["skipped"]]) + "</section>")
    if report.get("passes"):
        out.append("<section><h2>Passes</h2>" + _table(["pass", "ms", "modified", "stats"],
                                                        [[p["name"], round(p["seconds"] * 1000, 2), p["modified"], json.dumps(p["stats"])]
                                                         for p in report["passes"]]) + "</section>")
    if report.get("config"):
        out.append("<section><h2>Configuration</h2><pre>" + _e(json.dumps(report["config"], indent=1)) + "</pre></section>")
    out.append("</body></html>")
    return "\n".join(out)
