"""Peak resident memory of one ``qpass run``, phase by phase, in this process.

    python -m benchmarks.memory [--interval 0.05] -- run MODEL.onnx --calib DIR --val DIR [...]

The arguments after ``--`` are qpass's CLI arguments. A thread samples VmRSS every ``--interval`` seconds; the
stages qpass.api calls (prepare, spill, plan, calibrate, rewrite, evaluate) and, inside evaluation, the per-layer
analysis are wrapped so that each sample is charged to the phase running then. Prints one JSON object: per phase its
seconds, the RSS when it (first) began and the peak during it (MB; "other": what no wrapped stage covers), sampled (``peak_mb``) and the kernel's own
(``hwm_mb``: VmHWM read and reset at each phase boundary, which catches what the sampler misses), and the
process's peak (``peak_mb``: the largest of them). Exit status: qpass's.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import threading
import time


def _status(key: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    return float("nan")


class Phases:
    def __init__(self, interval: float):
        self.interval = interval
        self.stack: list[str] = ["other"]
        self.rows: dict[str, dict] = {}
        self._begin("other")
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _begin(self, name: str) -> None:
        row = self.rows.setdefault(name, {"seconds": 0.0, "start_mb": round(_status("VmRSS:")), "peak_mb": 0.0,
                                          "hwm_mb": 0.0})
        row["_t"] = time.perf_counter()

    def segment_ends(self) -> None:
        """The kernel's peak since the last phase boundary goes to the phase that ran (the stack's top), and the
        peak is reset (``/proc/self/clear_refs``): exact per-phase peaks, which the sampler can miss."""
        row = self.rows[self.stack[-1]]
        row["hwm_mb"] = max(row["hwm_mb"], _status("VmHWM:"))
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        except OSError:
            pass

    def _pause_other(self) -> None:
        """An "other" segment (between stages) stops when a stage starts: its seconds so far."""
        if self.stack[-1].startswith("other"):
            row = self.rows[self.stack[-1]]
            row["seconds"] += time.perf_counter() - row.pop("_t")

    def _sample(self) -> None:
        while not self.stop.wait(self.interval):
            rss = _status("VmRSS:")
            row = self.rows[self.stack[-1]]
            row["peak_mb"] = max(row["peak_mb"], rss)

    def wrap(self, module, attr: str, name: str) -> None:
        fn = getattr(module, attr)

        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            self.segment_ends()
            self._pause_other()
            self._begin(name)
            self.stack.append(name)
            try:
                return fn(*args, **kwargs)
            finally:
                self.segment_ends()
                self.stack.pop()
                row = self.rows[name]
                row["seconds"] += time.perf_counter() - row.pop("_t")
                if self.stack[-1].startswith("other"):  # what runs between stages, named by the stage before it
                    self._begin(f"other after {name}")
                    self.stack[-1] = f"other after {name}"
        setattr(module, attr, wrapped)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = argparse.ArgumentParser()
    ap.add_argument("--interval", type=float, default=0.05)
    args = ap.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    from qpass import api, cli, runtime, stages
    from qpass.evaluate import validate

    phases = Phases(args.interval)
    for attr in ("prepare", "plan", "calibrate", "rewrite", "evaluate"):
        phases.wrap(stages, attr, attr)
    phases.wrap(stages, "load", "load")
    phases.wrap(api, "_spill_reference", "spill")
    phases.wrap(api, "save_model", "save")
    phases.wrap(runtime.ModelFile, "write", "model_file_write")
    phases.wrap(runtime.ModelFile, "load", "model_file_load")
    phases.wrap(validate, "per_layer_error", "per_layer")
    from qpass.calib import collect

    phases.wrap(collect, "make_session", "calib_session")  # inside calibrate: its session's creation
    phases.wrap(collect, "_observe", "calib_observe")  # and the observers' updates of each run
    phases.thread.start()
    t = time.perf_counter()
    try:
        rc = cli.main(rest)
    finally:
        phases.stop.set()
        phases.thread.join()
        phases.segment_ends()
        phases._pause_other()
        rows = {k: {"seconds": round(v["seconds"], 1), "start_mb": v["start_mb"], "peak_mb": round(v["peak_mb"]),
                    "hwm_mb": round(v["hwm_mb"])}
                for k, v in phases.rows.items()}
        print(json.dumps({"phases": rows, "seconds": round(time.perf_counter() - t, 1),
                          "peak_mb": max(r["hwm_mb"] for r in rows.values())}), flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
