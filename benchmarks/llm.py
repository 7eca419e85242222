"""Weight-only quantization of SmolLM2-135M: qpass against onnxruntime's matmul_nbits_quantizer, side by side.

    python -m benchmarks.llm quantize --kit ~/.cache/qpass-models/smollm2 --out /tmp/llm VARIANT [VARIANT ...]
    python -m benchmarks.llm score --kit ... MODEL.onnx [...] [--accuracy-level 0|4] [--n 40]
    python -m benchmarks.llm latency MODEL.onnx [...] [--repeats 30]

``quantize`` runs each variant in a fresh process (wall time and peak RSS of that process), ``score`` scores
models with the kit's own scorer (perplexity, next-token top-1 agreement and KL against fp32 on the kit's 40
evaluation windows), with onnxruntime's ``session.qdq_matmulnbits_accuracy_level`` set as asked: onnxruntime
fuses DequantizeLinear(int4, block) -> MatMul into MatMulNBits with accuracy level 4 (int8 activations) unless
told otherwise, while its own MatMulNBits output carries the level the quantizer wrote (0 here).

Variants: ``qpass:ALG:TYPE:BLOCK`` (ALG rtn|search|gptq|gptq-seqN|awq|awq-gptq, TYPE int4|uint4|int8|nf4|ternary, a ``-dq``
suffix for uint8 block scales as Mul(Cast), ``-dqdq`` as DequantizeLinear, e.g. ``qpass:rtn:int4-dq:128``; ternary
is written at opset 25; a fifth field OPTIONS, a comma-separated list of ``tied=once|separate``,
``mix=k-mix|k-mix-o``, ``contrib``) and ``ort:ALG:SYM:BLOCK``
(ALG rtn|gptq|hqq, SYM sym|asym), ``ort-qdq:rtn:SYM:BLOCK`` (onnxruntime's standard QDQ output). The onnxruntime
variants need ``pip install -e '.[bench]'``; its GPTQ also needs torch (the SmolLM2 kit's venv has both).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

KIT = Path(os.environ.get("QPASS_MODELS_CACHE", Path.home() / ".cache" / "qpass-models")) / "smollm2"


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def quantize_one(variant: str, kit: Path, out: Path, calib_windows: int) -> dict:
    """Quantize in this process; returns wall seconds, peak RSS and the output path."""
    tool, alg, kind, block, *extra = variant.split(":")
    block = int(block)
    names = {"tied": "weight_only_tied", "mix": "weight_only_mix"}
    options = {}
    for item in (extra[0].split(",") if extra else ()):
        key, _, value = item.partition("=")
        options["allow_contrib_ops" if key == "contrib" else names[key]] = True if key == "contrib" else value
    src = kit / "smollm2_135m.onnx"
    dst = out / (variant.replace(":", "_").replace(",", "_").replace("=", "-") + ".onnx")
    t = time.perf_counter()
    if tool == "qpass":
        import qpass

        seq = int(alg[len("gptq-seq"):]) if alg.startswith("gptq-seq") else 0  # gptq-seqN: N stages a pass
        alg = "gptq" if seq else alg
        form = {"dq": "cast-mul", "dqdq": "dequantize"}.get(kind.partition("-")[2])
        kind = kind.partition("-")[0]
        calibrated = alg in ("gptq", "awq", "awq-gptq")
        qpass.quantize(src, kit / "calib" if calibrated else None, output=dst, weight_only=kind, block_size=block,
                       algorithm=alg, max_calib_samples=calib_windows, validate=False, external_data=False,
                       gptq_sequential=seq, double_quant=form is not None,
                       double_quant_form=form or "cast-mul",
                       target_opset=25 if kind == "ternary" else None, **options)
    else:
        import numpy as np
        import onnx
        from onnxruntime.quantization import matmul_nbits_quantizer as mnq
        from onnxruntime.quantization.quant_utils import QuantFormat

        model = onnx.load(str(src))
        sym = kind == "sym"
        fmt = QuantFormat.QDQ if tool == "ort-qdq" else QuantFormat.QOperator
        if alg == "rtn":
            cfg = mnq.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=sym, quant_format=fmt)
        elif alg == "hqq":
            cfg = mnq.HQQWeightOnlyQuantConfig(block_size=block)
        else:
            from onnxruntime.quantization import CalibrationDataReader

            files = sorted((kit / "calib").glob("*.npz"))[:calib_windows]

            class Reader(CalibrationDataReader):
                def __init__(self):
                    self.it = iter(files)

                def get_next(self):
                    f = next(self.it, None)
                    return None if f is None else {"input_ids": np.load(f)["input_ids"]}

                def rewind(self):
                    self.it = iter(files)

            cfg = mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=Reader(), block_size=block)
        q = mnq.MatMulNBitsQuantizer(model, block_size=block, is_symmetric=sym, algo_config=cfg)
        q.process()
        q.model.save_model_to_file(str(dst), use_external_data_format=False)
    seconds = time.perf_counter() - t
    return {"variant": variant, "path": str(dst), "seconds": round(seconds, 1), "peak_rss_mb": round(_peak_rss_mb()),
            "bytes": dst.stat().st_size, "calib_windows": calib_windows if "gptq" in alg or "awq" in alg else 0}


def _kit_scorer(kit: Path, level: int | None):
    spec = importlib.util.spec_from_file_location("eval_smollm2", kit / "eval_smollm2.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if level is not None:
        import onnxruntime as ort

        def make_session(path: str, threads: int = 2):
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
            so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(level))
            return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])

        mod.make_session = make_session
    return mod


def latency(models: list[str], lengths=(1, 128), repeats: int = 30, levels=(0, 4), threads: int = 2) -> list[dict]:
    """Median forward time per model, token count and MatMulNBits accuracy level, runs alternated between models
    (each round runs every model once), after 3 warm-up runs each; also whether MatMulNBits was formed."""
    import statistics
    import tempfile

    import numpy as np
    import onnx
    import onnxruntime as ort

    sessions, formed = {}, {}
    for m in models:
        for level in levels:
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(level))
            with tempfile.TemporaryDirectory() as tmp:
                so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
                sessions[(m, level)] = ort.InferenceSession(m, so, providers=["CPUExecutionProvider"])
                ops = [n.op_type for n in onnx.load(so.optimized_model_filepath, load_external_data=False).graph.node]
            formed[(m, level)] = (ops.count("MatMulNBits"), ops.count("DequantizeLinear"))
    rng = np.random.default_rng(0)
    rows = []
    for n in lengths:
        feed = {"input_ids": rng.integers(0, 49152, (1, n)).astype(np.int64)}
        times = {k: [] for k in sessions}
        for s in sessions.values():
            for _ in range(3):
                s.run(None, feed)
        for _ in range(repeats):
            for k, s in sessions.items():
                t = time.perf_counter()
                s.run(None, feed)
                times[k].append(time.perf_counter() - t)
        for (m, level), ts in times.items():
            rows.append({"model": m, "tokens": n, "accuracy_level": level, "median_ms": round(1000 * statistics.median(ts), 2),
                         "matmulnbits": formed[(m, level)][0], "dequantizelinear": formed[(m, level)][1],
                         "repeats": repeats})
    return rows


def _emit(row: dict, jsonl: Path | None) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    if jsonl:
        with open(jsonl, "a") as f:
            f.write(line + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quantize")
    q.add_argument("variants", nargs="+")
    q.add_argument("--kit", type=Path, default=KIT)
    q.add_argument("--out", type=Path, default=Path("/tmp/qpass-llm"))
    q.add_argument("--calib-windows", type=int, default=32)
    q.add_argument("--jsonl", type=Path)
    q.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    s = sub.add_parser("score")
    s.add_argument("models", nargs="+")
    s.add_argument("--kit", type=Path, default=KIT)
    s.add_argument("--accuracy-level", type=int, default=0)
    s.add_argument("--n", type=int, default=0)
    s.add_argument("--jsonl", type=Path)
    lat = sub.add_parser("latency")
    lat.add_argument("models", nargs="+")
    lat.add_argument("--repeats", type=int, default=30)
    lat.add_argument("--lengths", type=int, nargs="+", default=[1, 128], help="token counts timed")
    lat.add_argument("--levels", type=int, nargs="+", default=[0, 4], help="MatMulNBits accuracy levels")
    lat.add_argument("--jsonl", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "latency":
        for r in latency(args.models, lengths=args.lengths, repeats=args.repeats, levels=args.levels):
            _emit(r, args.jsonl)
        return 0
    if args.cmd == "quantize":
        args.out.mkdir(parents=True, exist_ok=True)
        if args.child:
            print(json.dumps(quantize_one(args.variants[0], args.kit, args.out, args.calib_windows)))
            return 0
        for v in args.variants:  # a fresh process each: wall time and peak RSS of that quantization alone
            cmd = [sys.executable, "-m", "benchmarks.llm", "quantize", "--child", "--kit", str(args.kit), "--out",
                   str(args.out), "--calib-windows", str(args.calib_windows), v]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            _emit(json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else
                  {"variant": v, "error": proc.stderr.strip().splitlines()[-1:]}, args.jsonl)
        return 0
    import numpy as np

    mod = _kit_scorer(args.kit, args.accuracy_level)
    windows = np.load(args.kit / "eval" / "windows.npz")["input_ids"].astype(np.int64)
    if args.n:
        windows = windows[: args.n]
    for r in mod.evaluate(args.models, windows, str(args.kit / "smollm2_135m.onnx"), progress=False):
        r["accuracy_level"] = args.accuracy_level
        _emit(r, args.jsonl)
    return 0


if __name__ == "__main__":
    sys.exit(main())
