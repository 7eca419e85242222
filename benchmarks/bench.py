"""qpass against onnxruntime.quantization on the ../shared/models suite, in one run; writes BENCHMARKS.md.

    python -m benchmarks.bench [--models m1,m2] [--out BENCHMARKS.md] [--json benchmarks/results.json]
                               [--repeats 20] [--cap-gb 16]

Rows per model: fp32; onnxruntime ``quantize_static`` (QDQ, per-channel, S8 weights, U8 activations) with
each calibration method (MinMax, Entropy, Percentile) on all op types, and the "tuned" recipe of
shared/models/README.md (opset 13 for opset-11 models, ``quant_pre_process``, Conv/MatMul/Gemm only);
qpass with each method (minmax, percentile, mse, entropy), default placement, format qdq, and the
default method in format qop. Columns: the model's metrics (shared/models/README.md definitions,
benchmarks/evaluate.py), quantization wall time and peak RSS (each quantization in a fresh process, with a
memory cap), file size, CPU latency (median of alternated batch-1 runs after warm-up, all rows of a model
in one process), and latency relative to fp32. A failure is a row with its reason, never a silent gap.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .accuracy import MODEL_OPTIONS
from .calibration import peak_rss_mb, run_capped
from .evaluate import MODELS, SHARED, evaluate
from .latency import first_sample, measure

QPASS_ROWS = {
    "qpass minmax": {"method": "minmax"},  # the default until this benchmark chose "auto"
    "qpass percentile": {"method": "percentile"},
    "qpass mse": {"method": "mse"},
    "qpass entropy": {"method": "entropy"},
    "qpass minmax qop": {"method": "minmax", "format": "qop"},
    "qpass auto (default)": {"method": "auto"},
}
ORT_ROWS = {
    "ORT MinMax": {"method": "MinMax"},
    "ORT Entropy": {"method": "Entropy"},
    "ORT Percentile": {"method": "Percentile"},
    "ORT tuned": {"method": "MinMax", "tuned": True},
}


# ------------------------------------------------------------------------------------------ quantizers (child side)
class _Reader:
    def __init__(self, name: str, shared: Path):
        import onnx

        from qpass.calib.data import input_specs, open_samples

        specs = input_specs(onnx.load(str(MODELS[name].model_path(shared)), load_external_data=False))
        self.it = iter(open_samples(MODELS[name].calib_path(shared), specs))

    def get_next(self):
        item = next(self.it, None)
        return None if item is None else item[0]


def quantize_ort(name: str, row: str, out: Path, shared: Path) -> str:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    opts = ORT_ROWS[row]
    src = MODELS[name].model_path(shared)
    note = ""
    kwargs = dict(quant_format=QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt8,
                  activation_type=QuantType.QUInt8, calibrate_method=getattr(CalibrationMethod, opts["method"]))
    with tempfile.TemporaryDirectory() as tmp:
        model_in = str(src)
        if opts.get("tuned"):
            model = onnx.load(str(src))
            if MODEL_OPTIONS.get(name, {}).get("target_opset"):
                model = onnx.version_converter.convert_version(model, 13)
                note += "opset 11->13; "
            up = Path(tmp) / "up.onnx"
            onnx.save_model(model, str(up))
            pre = Path(tmp) / "pre.onnx"
            try:
                quant_pre_process(str(up), str(pre))
            except Exception:  # noqa: BLE001 - the README's recipe: retry without symbolic shape inference
                quant_pre_process(str(up), str(pre), skip_symbolic_shape=True)
                note += "pre-process skip_symbolic_shape; "
            model_in = str(pre)
            kwargs["op_types_to_quantize"] = ["Conv", "MatMul", "Gemm"]
        try:
            quantize_static(model_in, str(out), _Reader(name, shared), **kwargs)
        except ValueError as exc:
            if "truth value of an array" not in str(exc):
                raise
            # Gemm [1,N] bias crash in the int32-bias scale adjustment (shared/models README, magika)
            quantize_static(model_in, str(out), _Reader(name, shared), **kwargs,
                            extra_options={"QDQDisableWeightAdjustForInt32Bias": True})
            note += "crashed; retried with QDQDisableWeightAdjustForInt32Bias; "
    return note.strip("; ")


def quantize_qpass(name: str, row: str, out: Path, shared: Path) -> str:
    import qpass

    qpass.quantize(MODELS[name].model_path(shared), MODELS[name].calib_path(shared), output=out, val_fraction=0.0,
                   per_layer=False, latency=False, **MODEL_OPTIONS.get(name, {}), **QPASS_ROWS[row])
    return "--target-opset 13" if MODEL_OPTIONS.get(name) else ""


def child(tool: str, name: str, row: str, out: str, shared: Path) -> dict:
    t = time.perf_counter()
    note = (quantize_qpass if tool == "qpass" else quantize_ort)(name, row, Path(out), shared)
    return {"seconds": time.perf_counter() - t, "peak_rss_mb": peak_rss_mb(),
            "note": note}


# ------------------------------------------------------------------------------------------ parent
def run_child(tool: str, name: str, row: str, out: Path, shared: Path, cap_gb: float) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench", "--child", tool, name, row, str(out), "--shared", str(shared)]
    return run_capped(cmd, cap_gb)


def bench_model(name: str, shared: Path, tmp: Path, cap_gb: float, repeats: int, log) -> list[dict]:
    spec = MODELS[name]
    rows = [{"row": "fp32", "path": str(spec.model_path(shared)), "status": "ok"}]
    for tool, table in (("onnxruntime", ORT_ROWS), ("qpass", QPASS_ROWS)):
        for row in table:
            out = tmp / f"{name}.{row.replace(' ', '_')}.onnx"
            r = run_child(tool, name, row, out, shared, cap_gb)
            r.update(row=row, path=str(out))
            rows.append(r)
            log(f"{name}: {row}: {r['status']} {r.get('seconds', 0):.1f}s {r.get('peak_rss_mb', 0):.0f}MB {r.get('note', '')}")
    for r in rows:
        if r["status"] != "ok":
            continue
        r["size_bytes"] = os.path.getsize(r["path"]) + sum(
            os.path.getsize(p) for p in Path(r["path"]).parent.glob(Path(r["path"]).name + ".data"))
        try:
            m = evaluate(name, r["path"], shared=shared, cache_dir=tmp)
            r["metrics"] = {k: m[k] for k in spec.metrics}
        except Exception as exc:  # noqa: BLE001 - a model that does not load or run is a result
            r["status"] = f"does not run: {str(exc).splitlines()[0][:160]}"
        log(f"{name}: {r['row']}: {r.get('metrics', r['status'])}")
    ok = {r["row"]: Path(r["path"]) for r in rows if r["status"] == "ok"}
    ms = measure(ok, first_sample(name, shared), repeats, threads=2)
    for r in rows:
        if r["row"] in ms:
            r["latency_ms"] = ms[r["row"]]
            r["latency_vs_fp32"] = ms[r["row"]] / ms["fp32"]
    for r in rows:
        r.pop("path")
    return rows


def _machine() -> str:
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnx
    import onnxruntime

    import qpass

    return (f"{cpu}, {os.cpu_count()} cores; Python {platform.python_version()}, onnxruntime {onnxruntime.__version__} "
            f"(CPUExecutionProvider, 2 intra-op threads for latency), onnx {onnx.__version__}, numpy {np.__version__}, "
            f"qpass {qpass.__version__}")


def _fmt(x, digits=4):
    return "" if x is None else (f"{x:.{digits}f}" if isinstance(x, float) else str(x))


def render_calibration(rows: list[dict]) -> list[str]:
    """The calibration-cost table (benchmarks/calibration.py output), with qpass/onnxruntime ratios."""
    out = ["## Calibration cost: qpass against onnxruntime.quantization.calibrate", "",
           "`python -m benchmarks.calibration` (fresh process per run, 16 GB cap): wall time and peak RSS of calibration "
           "alone, same model, samples and machine. onnxruntime calibrates Conv/MatMul/Gemm tensors with "
           "`create_calibrator`; its Entropy/Percentile get 2048 bins like qpass. qpass times are medians of "
           "3 fresh processes; `/ qpass min-max` is issue 3's ratio (target at most 1.5).", "",
           "| model | samples | method | qpass s | / qpass min-max | qpass MB | ORT s | ORT MB | ORT/qpass time | ORT/qpass RSS |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    by = {(r["model"], r["samples"], r["method"], r["tool"]): r for r in rows}
    for (model, n, method, tool), r in by.items():
        if tool != "qpass":
            continue
        o = by.get((model, n, method, "onnxruntime"))

        def cell(x, key, digits):
            if x is None:
                return "n/a", None
            if x["status"] != "ok":
                return (x["status"][:60] + f" (at {x.get('peak_rss_mb', 0):.0f} MB)"), None
            return _fmt(x[key], digits), x[key]

        qs, qsv = cell(r, "seconds", 1)
        qm, qmv = cell(r, "peak_rss_mb", 0)
        os_, osv = cell(o, "seconds", 1)
        om, omv = cell(o, "peak_rss_mb", 0)
        rt = _fmt(osv / qsv, 2) if osv and qsv else ""
        rm = _fmt(omv / qmv, 2) if omv and qmv else ""
        base = by.get((model, n, "minmax", "qpass"))
        own = (_fmt(r["seconds"] / base["seconds"], 2) if method != "minmax" and base and base["status"] == "ok"
               and r["status"] == "ok" else "")
        out.append(f"| {model} | {n} | {method} | {qs} | {own} | {qm} | {os_} | {om} | {rt} | {rm} |")
    return out + [""]


def render_latency(data: dict) -> list[str]:
    rows = data["rows"]
    out = ["## Integer types and formats: CPU latency", "",
           f"`python -m benchmarks.latency` (onnxruntime {data['onnxruntime']}, {data['threads']} threads, batch 1, median of "
           f"{data['repeats']} alternated runs): which activation type runs fastest in each format. Default is the "
           "fastest accurate one.", "",
           "| model | " + " | ".join(sorted({r['variant'] for r in rows}, key=lambda v: (v != 'fp32', v))) + " |"]
    variants = sorted({r['variant'] for r in rows}, key=lambda v: (v != 'fp32', v))
    out.append("|---" * (len(variants) + 1) + "|")
    for model in dict.fromkeys(r["model"] for r in rows):
        cells = []
        for v in variants:
            r = next((x for x in rows if x["model"] == model and x["variant"] == v), None)
            cells.append(f"{r['ms']:.2f} ms (x{r['vs_fp32']:.2f})" if r else "")
        out.append(f"| {model} | " + " | ".join(cells) + " |")
    return out + [""]


def render(results: dict) -> str:
    out = ["# Benchmarks: qpass against onnxruntime.quantization", "",
           f"Generated by `python -m benchmarks.bench` on {results['date']}: {results['machine']}.", "",
           "Every number below comes from that one run on one machine. Quantization time and peak RSS: each "
           "quantization in a fresh process (calibration on all stored calibration samples, one per call). Latency: "
           "median of alternated batch-1 runs after warm-up, all rows of a model in one process. Metrics: "
           "shared/models/README.md definitions (benchmarks/evaluate.py). ORT rows: `quantize_static`, QDQ, "
           "per-channel, int8 weights, uint8 activations; 'tuned' is the README's recipe. qpass rows: default "
           "placement; 'qop' is the integer-operator form; 'auto (default)' is what `qpass run` does without options. "
           "What these numbers say, and which targets they meet, is in docs/benchmark-notes.md.", ""]
    for name, rows in results["models"].items():
        spec = MODELS[name]
        mcols = list(spec.metrics[:3])
        out += [f"## {name}", "", "| row | " + " | ".join(mcols) + " | quantize s | peak RSS MB | size MB | latency ms | vs fp32 | note |",
                "|---" * (len(mcols) + 7) + "|"]
        for r in rows:
            met = r.get("metrics", {})
            status = r["status"] if len(r["status"]) <= 90 else r["status"][:87] + "..."
            cells = [_fmt(met.get(c)) for c in mcols] if met else [status] + [""] * (len(mcols) - 1)
            out.append(f"| {r['row']} | " + " | ".join(cells) + f" | {_fmt(r.get('seconds'), 1)} | {_fmt(r.get('peak_rss_mb'), 0)} | "
                       f"{_fmt(r['size_bytes'] / 1e6 if 'size_bytes' in r else None, 2)} | {_fmt(r.get('latency_ms'), 2)} | "
                       f"{_fmt(r.get('latency_vs_fp32'), 2)} | {r.get('note', '') if r['status'] == 'ok' else ''} |")
        out.append("")
    here = Path(__file__).resolve().parent
    if (here / "calibration.json").exists():
        out += render_calibration(json.loads((here / "calibration.json").read_text()))
    if (here / "latency.json").exists():
        out += render_latency(json.loads((here / "latency.json").read_text()))
    if (here / "llm.json").exists():
        out += render_llm(json.loads((here / "llm.json").read_text()))
    if (here / "techniques.json").exists():
        out += render_techniques(json.loads((here / "techniques.json").read_text()))
    if (here / "cuda" / "llm_cuda_h200.json").exists():
        out += render_llm_cuda(json.loads((here / "cuda" / "llm_cuda_h200.json").read_text()),
                               json.loads((here / "cuda" / "dq_forms_h200.json").read_text()))
    return "\n".join(out)


#: what each technique column of the techniques table is (benchmarks/accuracy.py VARIANTS)
TECHNIQUES = {"default": "default", "cle": "+ cross-layer equalization", "biascorr": "+ bias correction",
              "smooth": "+ SmoothQuant", "per_tensor": "per-tensor weights", "cle_per_tensor": "per-tensor + CLE"}


def render_techniques(data: dict) -> list[str]:
    """Issue 17's table: each shared model's primary metric with and without each accuracy technique
    (``python -m benchmarks.accuracy --variants ...`` rows, one run), and the quantization time of each."""
    rows = data["rows"]
    variants = [v for v in TECHNIQUES if any(r["variant"] == v for r in rows)]
    out = ["## Accuracy techniques: with and without each", "",
           f"`{data['command']}` on {data['date']}: {data['machine']}. Primary metric of each model (its README "
           "definition; benchmarks/evaluate.py), then quantization seconds (one run each, machine shared: indicative). "
           "None of the three techniques is on by default: docs/benchmark-notes.md says what each measured and why.", "",
           "| model | metric | " + " | ".join(TECHNIQUES[v] for v in variants) + " | quantize s (" +
           " / ".join(variants) + ") |", "|---" * (len(variants) + 3) + "|"]
    for name in dict.fromkeys(r["model"] for r in rows):
        primary = MODELS[name].primary
        got = {r["variant"]: r for r in rows if r["model"] == name}
        cells = [_fmt(got[v].get(primary)) if v in got and "error" not in got[v] else ("error" if v in got else "")
                 for v in variants]
        secs = " / ".join(_fmt(got[v].get("quantize_seconds"), 1) if v in got else "-" for v in variants)
        out.append(f"| {name} | {primary} | " + " | ".join(cells) + f" | {secs} |")
    return out + [""]


def render_llm(data: dict) -> list[str]:
    """The weight-only language-model table (benchmarks/llm.py results, collected in benchmarks/llm.json)."""
    out = ["## Language model: weight-only int4 on SmolLM2-135M", "", data.get("about", ""), "",
           "| variant | block | perplexity | vs fp32 | top-1 agreement | KL (nats) | size MB | quantize s | peak RSS MB | note |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        vs = r.get("ppl_vs_fp32")
        size = r["bytes"] / 1e6 if r.get("bytes") else None
        ppl = r.get("ppl")
        out.append(f"| {r['variant']} | {r.get('block', '')} | {f'{ppl:.3g}' if ppl and ppl > 1e5 else _fmt(ppl, 2)} | "
                   f"{'' if vs is None else (f'x{vs + 1:.3g}' if vs > 1e3 else f'{100 * vs:+.1f}%')} | {_fmt(r.get('top1_agree'), 3)} | "
                   f"{_fmt(r.get('kl_mean'), 3)} | {_fmt(size, 1)} | {_fmt(r.get('seconds'), 1)} | "
                   f"{_fmt(r.get('peak_rss_mb'), 0)} | {r.get('note', '')} |")
    if data.get("latency"):
        out += ["", data.get("latency_about", ""), "",
                "| model | tokens | MatMulNBits accuracy level | median ms | MatMulNBits nodes |", "|---|---|---|---|---|"]
        for r in data["latency"]:
            out.append(f"| {r['label']} | {r['tokens']} | {r['accuracy_level']} | {_fmt(r['median_ms'], 2)} | {r['matmulnbits']} |")
    for paragraph in data.get("after", []):
        out += ["", paragraph]
    return out + [""]


def render_llm_cuda(run: dict, forms: dict) -> list[str]:
    """The CUDA-provider table (benchmarks/llm_cuda.py and benchmarks/cuda_dq_forms.py results from the GPU machine)."""
    out = ["### On the CUDA provider", "",
           f"`benchmarks/llm_cuda.py` on {run['gpu']} (GPU, driver, memory), onnxruntime-gpu {run['onnxruntime']}, "
           f"onnx {run['onnx']}. The model is qpass's default output as written (awq-gptq int4 block 128 with 32 calibration "
           "windows, the int8 embedding table stored once for the embedding (Gather -> Cast -> Mul) and the tied head "
           "(per-axis DequantizeLinear -> Transpose -> MatMul)). fp32 for speed is "
           "that model with every weight dequantized (the same graph and shapes; the 651 MB original does not pass "
           "the GPU machine's 64 MiB transfers). qpass's earlier form, a block-wise DequantizeLinear after the Gather, "
           "failed on this provider ('Unsupported quantization type'; docs/benchmark-notes.md). The CUDA tests of the "
           "suite (tests/passes/test_weight_only.py, tests/test_validate.py) passed there too "
           "(benchmarks/cuda/pytest_cuda_h200.log). Median of "
           f"{run['latency_cuda'][0]['repeats']} runs, models alternated each round, after 5 warm-ups.", "",
           "| model | accuracy level | tokens | median ms | tokens/s | vs fp32 |", "|---|---|---|---|---|---|"]
    fp32 = {r["tokens"]: r["median_ms"] for r in run["latency_cuda"] if r["model"] == "fp32"}
    for r in run["latency_cuda"]:
        out.append(f"| {r['model']} | {r['accuracy_level'] if r['model'] != 'fp32' else ''} | {r['tokens']} | "
                   f"{_fmt(r['median_ms'], 2)} | {_fmt(r['tokens_per_s'], 1)} | "
                   f"{_fmt(fp32[r['tokens']] / r['median_ms'], 2)}x |")
    graphs = "; ".join(f"{k}: " + ", ".join(f"{op} {n}" for op, n in v.items()) for k, v in run["optimized_ops"].items())
    acc = run["accuracy"]
    out += ["", f"Optimized graphs on CUDA: {graphs}. Perplexity on the {run['windows']} evaluation windows: CPU "
            f"{acc['int4_cpu_level0']['ppl']}, CUDA {acc['int4_cuda_level0']['ppl']} (top-1 agreement with the CPU "
            f"{acc['int4_cuda_level0']['top1_agree_with_cpu']}).", "",
            f"Which DequantizeLinear forms the CUDA provider runs (`benchmarks/cuda_dq_forms.py`, onnxruntime-gpu "
            f"{forms['onnxruntime']}):", "", "| form | optimized graph | ran on CUDA |", "|---|---|---|"]
    for name, r in forms["forms"].items():
        ops = ", ".join(f"{op} {n}" for op, n in r.get("optimized_ops", {}).items())
        ran = "yes" if r.get("ran") else "no: " + r.get("error", "").split("Status Message: ")[-1]
        out.append(f"| {name} | {ops} | {ran} |")
    return out + [""]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs=4, metavar=("TOOL", "MODEL", "ROW", "OUT"))
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--shared", default=str(SHARED))
    ap.add_argument("--out", default="BENCHMARKS.md")
    ap.add_argument("--json", default="benchmarks/results.json")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--cap-gb", type=float, default=16.0)
    ap.add_argument("--render-only", action="store_true", help="rewrite --out from the saved JSON results")
    args = ap.parse_args(argv)
    if args.render_only:
        Path(args.out).write_text(render(json.loads(Path(args.json).read_text())))
        return 0
    shared = Path(args.shared)
    if args.child:
        tool, name, row, out = args.child
        print(json.dumps(child(tool, name, row, out, shared)))
        return 0
    results = {"date": datetime.date.today().isoformat(), "machine": _machine(), "models": {}}
    if Path(args.json).exists():  # keep other models' rows when re-running a subset
        old = json.loads(Path(args.json).read_text())
        results["models"].update({k: v for k, v in old.get("models", {}).items() if k not in args.models.split(",")})
    with tempfile.TemporaryDirectory(prefix="qpass-bench-") as tmp:
        for name in args.models.split(","):
            results["models"][name] = bench_model(name, shared, Path(tmp), args.cap_gb, args.repeats,
                                                  log=lambda s: print(s, flush=True))
            Path(args.json).write_text(json.dumps(results, indent=1))
            Path(args.out).write_text(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
