"""float16 side by side on onnxruntime's CUDA provider: qpass --float16 against onnxconverter-common and onnxruntime.

    python -m benchmarks.float16_gpu [--models m1,m2] [--providers CUDAExecutionProvider,CPUExecutionProvider]
                                     [--converters qpass,occ_default,occ_keep_io,ort_fp16,occ_amp] [--out f.json]
    python -m benchmarks.float16_gpu --llm [--kit ~/.cache/qpass-models/smollm2] [--out f.json]

Per shared model and converter (each conversion in its own process, with a time limit: "where it completes"):
its task metric from benchmarks.evaluate against fp32 (same providers), inf/NaN seen in its outputs on the
evaluation set, latency against fp32 (median of alternated runs on the first calibration sample), and placement
(nodes that did not run on the first provider, Memcpy nodes, from onnxruntime's profiler). Converters:

  qpass        qpass.quantize(float_type="float16") with the model's calibration data (its fidelity check on the
               first provider)
  qpass_half_io  ... with half_io=True (float16 inputs and outputs, like occ_default)
  qpass_bf16   qpass.quantize(float_type="bfloat16"), the model upgraded to opset 13 first where it is older
  occ_default  onnxconverter_common.float16.convert_float_to_float16(model)
  occ_keep_io  ... (model, keep_io_types=True)
  ort_fp16     onnxruntime.transformers.float16.convert_float_to_float16(model, keep_io_types=True)
  occ_amp      onnxconverter_common.auto_mixed_precision.auto_convert_mixed_precision(model, feed, rtol=0.01,
               atol=0.001, keep_io_types=True) on the first calibration sample

Imports: numpy, onnx, onnxruntime(-gpu); qpass and onnxconverter-common only inside the conversions that need
them (a missing one is an error row, not a crash). On a machine without qpass's dependencies installed, carry the
wheels of onnx-graphsurgeon, rich (qpass) and onnxconverter-common (pure Python; needs protobuf, packaging) and run
from the repository root with PYTHONPATH including it. The JSON's ``environment`` records GPU, driver and versions. ``--llm``: SmolLM2-135M from the kit, fp32 against qpass
float16 and qpass int4 weight-only + float16 (``--llm-variants``): tokens/s of a 1-token and a 128-token forward,
and perplexity / top-1 agreement / KL against fp32 over the kit's evaluation windows.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from . import evaluate as ev

CONVERTERS = ("qpass", "qpass_half_io", "qpass_bf16", "occ_default", "occ_keep_io", "ort_fp16", "occ_amp")
#: seconds one conversion may take
CONVERT_TIMEOUT = 900
NP = {"tensor(float16)": np.float16, "tensor(float)": np.float32, "tensor(bfloat16)": None}


# ------------------------------------------------------------------------------------------- conversions (child)
def _first_feed(name: str, shared: Path) -> dict:
    spec = ev.MODELS[name]
    path = spec.calib_path(shared)
    if path.is_dir():
        f = sorted(path.glob("*.npz"))[0]
        with np.load(f) as z:
            return {k: np.asarray(z[k]) for k in z.files}
    with np.load(path) as z:
        return {k: np.asarray(z[k][0]) for k in z.files}


def convert(kind: str, name: str, src: str, dst: str, shared: Path, providers=("CPUExecutionProvider",)) -> dict:
    """Write ``src`` converted by ``kind`` to ``dst`` (runs in a child process)."""
    t = time.perf_counter()
    info: dict = {}
    if kind in ("qpass", "qpass_int4", "qpass_half_io", "qpass_bf16"):
        import qpass

        spec = ev.MODELS[name] if name in ev.MODELS else None
        calib = str(spec.calib_path(shared)) if spec else str(shared)  # --llm: the kit's calib folder
        kw: dict = {"max_calib_samples": 8} if spec is None else {}
        if kind == "qpass_int4":  # int4 weight-only (qpass's default algorithm) with the float remainder in float16
            kw["weight_only"] = "int4"
        if kind == "qpass_half_io":
            kw["half_io"] = True
        float_type = "float16"
        if kind == "qpass_bf16":
            float_type = "bfloat16"
            opset = next(o.version for o in onnx.load(src, load_external_data=False).opset_import
                         if o.domain in ("", "ai.onnx"))
            if opset < 13:
                kw["target_opset"] = 13
        where = ("cuda",) if "CUDAExecutionProvider" in providers else ("cpu",)  # the fidelity check runs there
        res = qpass.quantize(src, calib, output=dst, float_type=float_type, providers=where, latency=False,
                             per_layer=False, validate=spec is not None, **kw)
        half = res.report.calibration.get("half", {})
        info = {"measured_float32": len(half.get("measured_float32", {})),
                "fidelity_met": half.get("fidelity", {}).get("met"),
                "fallback_trials": half.get("fidelity", {}).get("trials"),
                "fidelity_provider": half.get("fidelity", {}).get("provider"),
                "fallback_moved": [len(m["tensors"]) for m in half.get("fidelity", {}).get("moves", [])],
                "fidelity_cosine_min": (half.get("fidelity", {}).get("end")
                                        or half.get("fidelity", {}).get("start", {})).get("cosine_min")}
    elif kind in ("occ_default", "occ_keep_io"):
        from onnxconverter_common import float16

        m = float16.convert_float_to_float16(onnx.load(src), keep_io_types=kind == "occ_keep_io")
        onnx.save(m, dst)
    elif kind == "ort_fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        m = convert_float_to_float16(onnx.load(src), keep_io_types=True)
        onnx.save(m, dst)
    elif kind == "occ_amp":
        from onnxconverter_common.auto_mixed_precision import auto_convert_mixed_precision

        model = onnx.load(src)
        inputs = {i.name for i in model.graph.input}
        feed = {k: v for k, v in _first_feed(name, shared).items() if k in inputs}
        m = auto_convert_mixed_precision(model, feed, rtol=0.01, atol=0.001, keep_io_types=True)
        onnx.save(m, dst)
    else:
        raise ValueError(kind)
    info["convert_seconds"] = round(time.perf_counter() - t, 2)
    return info


def convert_in_child(kind: str, name: str, src: Path, dst: Path, shared: Path, timeout: int, providers) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.float16_gpu", "--convert", kind, "--model", name, "--src", str(src),
           "--dst", str(dst), "--shared", str(shared), "--providers", ",".join(providers)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=Path(__file__).resolve().parents[1])
    except subprocess.TimeoutExpired:
        return {"error": f"conversion did not complete in {timeout} s"}
    if p.returncode != 0 or not dst.exists():
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        return {"error": f"conversion failed (rc {p.returncode}): {' | '.join(tail)}"}
    try:
        return json.loads(p.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {}


# ------------------------------------------------------------------------------------------- measuring
def evaluation_providers(providers) -> list:
    """``providers`` for the metric's sessions: CUDA with cuDNN's heuristic convolution algorithms. The default
    (an exhaustive search per input shape) is what the latency timings keep; an evaluation set of many shapes (the
    recognizer's 240 crops have 76 widths) would repeat that search for every Conv at every new width."""
    return [(p, {"cudnn_conv_algo_search": "HEURISTIC"}) if p == "CUDAExecutionProvider" else p for p in providers]


class CastingSession:
    """An InferenceSession whose run() casts float feeds to the model's input types and returns float32 outputs,
    counting inf/NaN values seen (models with float16 inputs/outputs run under the fp32 evaluation code)."""

    def __init__(self, path, providers):
        self.s = ort.InferenceSession(str(path), providers=evaluation_providers(providers))
        self.types = {i.name: i.type for i in self.s.get_inputs()}
        self.nonfinite = 0
        self.outputs_seen = 0

    def __getattr__(self, item):
        return getattr(self.s, item)

    def run(self, names, feed, *a, **k):
        cast = {}
        for key, v in feed.items():
            v = np.asarray(v)
            t = NP.get(self.types.get(key, ""))
            cast[key] = v.astype(t) if t is not None and v.dtype.kind == "f" and v.dtype != t else v
        outs = self.s.run(names, cast, *a, **k)
        res = []
        for o in outs:
            o = np.asarray(o)
            if o.dtype.kind == "f":
                self.nonfinite += int(o.size - np.count_nonzero(np.isfinite(o)))
                self.outputs_seen += 1
                o = o.astype(np.float32)
            res.append(o)
        return res


def fidelity(name: str, path: Path, providers, shared: Path, cache: Path) -> dict:
    made: list[CastingSession] = []
    original = ev._session

    def session(p, prov):
        s = CastingSession(p, prov)
        if Path(p).resolve() == Path(path).resolve():
            made.append(s)
        return s

    ev._session = session
    try:
        metrics = ev.evaluate(name, path, providers=providers, shared=shared, cache_dir=cache)
    finally:
        ev._session = original
    metrics["nonfinite_values"] = sum(s.nonfinite for s in made)
    return metrics


def _cast_feed(sess, feed: dict) -> dict:
    types = {i.name: i.type for i in sess.get_inputs()}
    out = {}
    for k, v in feed.items():
        if k not in types:  # labels and other keys of the data files
            continue
        t = NP.get(types.get(k, ""))
        v = np.asarray(v)
        out[k] = v.astype(t) if t is not None and v.dtype.kind == "f" and v.dtype != t else v
    return out


def latency_round_robin(paths: dict[str, Path], feed: dict, providers, repeats: int) -> dict[str, float]:
    """Median ms of each model in ``paths`` (label -> file): every round runs each model once, in an order rotated
    by one each round (so no model always follows the same one), after five warm-up runs each."""
    sessions = {k: ort.InferenceSession(str(p), providers=list(providers)) for k, p in paths.items()}
    return rotated_medians(sessions, feed, repeats)


def rotated_medians(sessions: dict, feed: dict, repeats: int) -> dict[str, float]:
    """Median ms of each session (label -> InferenceSession) on ``feed`` (cast to its input types): five warm-up
    runs each, then ``repeats`` rounds in which every session runs once, in an order rotated by one each round."""
    labels = list(sessions)
    feeds = {k: _cast_feed(sessions[k], feed) for k in labels}
    for _ in range(5):
        for k in labels:
            sessions[k].run(None, feeds[k])
    times: dict[str, list[float]] = {k: [] for k in labels}
    for r in range(repeats):
        for k in labels[r % len(labels):] + labels[:r % len(labels)]:
            t = time.perf_counter()
            sessions[k].run(None, feeds[k])
            times[k].append(time.perf_counter() - t)
    return {k: round(statistics.median(v) * 1e3, 4) for k, v in times.items()}


def placement(path: Path, feed: dict, providers) -> dict:
    """Nodes by provider, Memcpy nodes and the op types run (after onnxruntime's fusions), from its profiler over
    three runs."""
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tmp, "p")
        s = ort.InferenceSession(str(path), so, providers=list(providers))
        f = _cast_feed(s, feed)
        for _ in range(3):
            s.run(None, f)
        events = json.loads(Path(s.end_profiling()).read_text())
    nodes: dict[str, tuple[str, str]] = {}
    for e in events:
        args = e.get("args", {})
        if e.get("cat") == "Node" and "provider" in args:
            nodes[e["name"].removesuffix("_kernel_time").removesuffix("_fence_before").removesuffix("_fence_after")] = (
                args.get("op_name", ""), args["provider"])
    first = providers[0]
    off = {n: v for n, v in nodes.items() if v[1] != first}
    ops: dict[str, int] = {}
    for op, _prov in off.values():
        ops[op] = ops.get(op, 0) + 1
    every: dict[str, int] = {}
    for op, _prov in nodes.values():
        every[op] = every.get(op, 0) + 1
    return {"nodes": len(nodes), "not_on_" + first: len(off), "off_ops": dict(sorted(ops.items())),
            "memcpy": sum(1 for op, _ in nodes.values() if op.startswith("Memcpy")),
            "ops": dict(sorted(every.items(), key=lambda kv: -kv[1]))}


def environment(providers) -> dict:
    env = {"python": platform.python_version(), "onnxruntime": ort.__version__, "onnx": onnx.__version__,
           "numpy": np.__version__, "available_providers": ort.get_available_providers(), "providers": list(providers)}
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        env["gpu"] = q.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        env["gpu"] = None
    for mod in ("qpass", "onnxconverter_common"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            env[mod] = f"not importable: {type(exc).__name__}"
    return env


# ------------------------------------------------------------------------------------------- shared models
def run_models(models, converters, providers, shared: Path, repeats: int, timeout: int, log) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="qpass-fp16-") as tmp:
        tmp = Path(tmp)
        cache = tmp / "cache"
        for name in models:
            spec = ev.MODELS[name]
            src = spec.model_path(shared)
            feed = _first_feed(name, shared)
            base = {"model": name, "converter": "fp32", "primary": spec.primary}
            timed = {"fp32": src}
            try:
                base.update(fidelity(name, src, providers, shared, cache))
                base["placement"] = placement(src, feed, providers)
            except Exception as exc:  # noqa: BLE001
                base["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            rows.append(base)
            log(json.dumps(base))
            for kind in converters:
                dst = tmp / f"{name}.{kind}.onnx"
                row = {"model": name, "converter": kind, "primary": spec.primary}
                row.update(convert_in_child(kind, name, src, dst, shared, timeout, providers))
                if "error" not in row:
                    try:
                        onnx.checker.check_model(str(dst), full_check=True)
                        row["checker"] = "ok"
                    except Exception as exc:  # noqa: BLE001
                        row["checker"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
                    try:
                        row.update(fidelity(name, dst, providers, shared, cache))
                        row["metric_vs_fp32"] = round(row[spec.primary] / base[spec.primary], 5) \
                            if base.get(spec.primary) else None
                        row["placement"] = placement(dst, feed, providers)
                        timed[kind] = dst
                    except Exception as exc:  # noqa: BLE001
                        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                rows.append(row)
                log(json.dumps(row))
            if "error" not in base and len(timed) > 1:
                ms = latency_round_robin(timed, feed, providers, repeats)
                for row in rows:
                    if row["model"] == name and row["converter"] in ms:
                        row["latency"] = {"fp32_ms": ms["fp32"], "ms": ms[row["converter"]],
                                          "ratio": round(ms[row["converter"]] / ms["fp32"], 4), "rounds": repeats}
                log(json.dumps({"model": name, "latency_ms": ms, "rounds": repeats}))
    return rows


# ------------------------------------------------------------------------------------------- language model
def _logsoftmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def run_llm(kit: Path, providers, repeats: int, timeout: int, windows: int, log,
            variants=("qpass", "qpass_int4")) -> dict:
    """SmolLM2 fp32 against each qpass conversion in ``variants`` (float16; int4 weight-only + float16): forward
    timings (1 and 128 tokens; fp32 and every variant in one rotated loop), then perplexity / top-1 agreement / KL
    on the kit's windows."""
    src = kit / "smollm2_135m.onnx"
    out: dict = {"model": str(src)}
    with np.load(kit / "eval" / "windows.npz") as z:
        ids = z["input_ids"][:windows]
    with tempfile.TemporaryDirectory(prefix="qpass-fp16-llm-") as tmp:
        made: dict[str, Path] = {}
        for kind in variants:
            row: dict = {}
            out[kind] = row
            dst = Path(tmp) / f"smollm2.{kind}.onnx"
            row["convert"] = convert_in_child(kind, "smollm2", src, dst, kit / "calib", timeout, providers)
            log(json.dumps({kind: row["convert"]}))
            if "error" in row["convert"]:
                continue
            row["bytes"] = dst.stat().st_size + sum(f.stat().st_size for f in Path(tmp).glob(f"{dst.name}*.data"))
            try:
                row["placement"] = placement(dst, {"input_ids": ids[0][None, :16]}, providers)
            except Exception as exc:  # noqa: BLE001 - a session that cannot be made is a result row
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:400] if str(exc) else ''}"
                log(json.dumps({kind: row["error"]}))
                continue
            made[kind] = dst
        for tokens in (1, 128):
            feed = {"input_ids": np.resize(ids[0], tokens)[None, :].astype(np.int64)}  # real tokens
            ms = latency_round_robin({"fp32": src, **made}, feed, providers, repeats)
            for kind in made:
                out[kind][f"forward_{tokens}"] = {
                    "fp32_ms": ms["fp32"], "ms": ms[kind], "fp32_tokens_per_s": round(tokens / ms["fp32"] * 1e3, 1),
                    "tokens_per_s": round(tokens / ms[kind] * 1e3, 1), "ratio": round(ms[kind] / ms["fp32"], 4),
                    "rounds": repeats}
            log(json.dumps({f"forward_{tokens}_ms": ms}))
        a = ort.InferenceSession(str(src), providers=list(providers))
        ref = [a.run(None, {"input_ids": w[None, :]})[0][0, :-1] for w in ids]
        del a
        for kind, dst in made.items():
            row = out[kind]
            b = ort.InferenceSession(str(dst), providers=list(providers))
            nll_a = nll_b = kl = 0.0
            agree = n = nonfinite = 0
            for w, la in zip(ids, ref):
                lb = np.asarray(b.run(None, {"input_ids": w[None, :]})[0][0, :-1])
                nonfinite += int(lb.size - np.count_nonzero(np.isfinite(lb)))
                pa, pb = _logsoftmax(la), _logsoftmax(lb.astype(np.float32))
                nxt = w[1:]
                nll_a -= float(pa[np.arange(len(nxt)), nxt].sum())
                nll_b -= float(pb[np.arange(len(nxt)), nxt].sum())
                kl += float((np.exp(pa) * (pa - pb)).sum())
                agree += int((la.argmax(-1) == lb.argmax(-1)).sum())
                n += len(nxt)
            row["eval"] = {"windows": int(len(ids)), "tokens": n, "ppl_fp32": round(float(np.exp(nll_a / n)), 4),
                           "ppl": round(float(np.exp(nll_b / n)), 4),
                           "ppl_ratio": round(float(np.exp((nll_b - nll_a) / n)), 5),
                           "top1_agree": round(agree / n, 5), "kl_mean": round(kl / n, 6),
                           "nonfinite_values": nonfinite}
            log(json.dumps({kind: row["eval"]}))
            del b
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(ev.MODELS))
    ap.add_argument("--converters", default=",".join(CONVERTERS))
    ap.add_argument("--providers", default="CUDAExecutionProvider,CPUExecutionProvider",
                    help="onnxruntime providers, first = the one measured (CPUExecutionProvider to test the script)")
    ap.add_argument("--shared", default=str(ev.SHARED))
    ap.add_argument("--repeats", type=int, default=200, help="timed rounds (each variant once per round)")
    ap.add_argument("--timeout", type=int, default=CONVERT_TIMEOUT, help="seconds a conversion may take")
    ap.add_argument("--llm", action="store_true", help="SmolLM2 fp16 vs fp32 instead of the shared models")
    ap.add_argument("--kit", default=str(Path.home() / ".cache" / "qpass-models" / "smollm2"))
    ap.add_argument("--windows", type=int, default=40, help="--llm: evaluation windows scored")
    ap.add_argument("--llm-variants", default="qpass,qpass_int4",
                    help="--llm: qpass (float16), qpass_int4 (int4 weight-only + float16)")
    ap.add_argument("--out")
    ap.add_argument("--convert", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--src", help=argparse.SUPPRESS)
    ap.add_argument("--dst", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.convert:  # child process: one conversion, its info as the last stdout line
        info = convert(args.convert, args.model, args.src, args.dst, Path(args.shared),
                       [p for p in args.providers.split(",") if p])
        print(json.dumps(info))
        return 0
    providers = [p for p in args.providers.split(",") if p]
    missing = [p for p in providers if p not in ort.get_available_providers()]
    if missing:
        print(f"providers not available in this onnxruntime: {missing} (have {ort.get_available_providers()})",
              file=sys.stderr)
        return 2
    result = {"environment": environment(providers)}
    print(json.dumps(result["environment"]), flush=True)
    log = lambda s: print(s, flush=True)  # noqa: E731
    if args.llm:
        result["llm"] = run_llm(Path(args.kit).expanduser(), providers, args.repeats, args.timeout, args.windows, log,
                                tuple(v for v in args.llm_variants.split(",") if v))
    else:
        result["rows"] = run_models(args.models.split(","), [c for c in args.converters.split(",") if c], providers,
                                    Path(args.shared), args.repeats, args.timeout, log)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
