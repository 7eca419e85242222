"""Which sensitivity ranking finds the layers whose 16-bit move matters to the task metric (issue 18, experiment).

    python -m benchmarks.search_predictors --model ppocrv6_det_small --ks 4,8,16,32 --out f.json

Calibrates once (20 % of the calibration data held out for validation, as the search does) and ranks the quantized
compute nodes three ways, every trial a rewrite from that one table (no recalibration):

- ``noise``: the per-layer analysis of the first rewrite (``added_noise_db``, what the search ranks by);
- ``relief``: every node moved to 16 bits alone (the rest uint8), ranked by the worst output's SQNR on the held-out
  split (a trial per node);
- ``alone``: every node alone quantized (the rest float, "quantize one layer at a time against the float model"),
  ranked by the worst output's SQNR lost (a trial per node).

Then, for each ranking and each k, the first k nodes go to 16 bits together (``--move float``: stay float), and that model is scored on the model's
own task metric (benchmarks.evaluate) and validated (worst output cosine, latency ratio to fp32).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tempfile
import time
from pathlib import Path

from qpass.io import save_model
import qpass
from qpass import stages
from qpass.calib.data import input_specs
from qpass.calib.sources import calibration_data
from qpass.config import QuantConfig
from qpass.evaluate.validate import validate
from qpass.search.precision import SIXTEEN, candidates, plan_for, run_trial, sixteen_bit, table_for

from .accuracy import MODEL_OPTIONS
from .evaluate import MODELS, SHARED, evaluate


def worst_sqnr(outputs: list[dict]) -> float:
    vals = [o.get("sqnr_db") for o in outputs]
    vals = [v if isinstance(v, (int, float)) else (math.inf if v == "inf" else -math.inf) for v in vals]
    return min(vals) if vals else -math.inf


def worst_cos(outputs: list[dict]) -> float | None:
    vals = [o["cosine_mean"] for o in outputs if o.get("cosine_mean") is not None]
    return min(vals) if vals else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ppocrv6_det_small")
    ap.add_argument("--ks", default="4,8,16,32")
    ap.add_argument("--rankings", default="noise,relief,alone")
    ap.add_argument("--shared", default=str(SHARED))
    ap.add_argument("--move", choices=("16-bit", "float"), default="16-bit",
                    help="what the first k nodes of a ranking become (float: excluded, as a float move of the search)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    log = lambda s: print(s, flush=True)  # noqa: E731
    spec = MODELS[args.model]
    cfg = QuantConfig(val_fraction=0.2, **MODEL_OPTIONS.get(args.model, {}))
    t0 = time.perf_counter()
    prepared = stages.prepare(stages.load(str(spec.model_path(args.shared))), cfg)
    plan = stages.plan(prepared, cfg)
    data = calibration_data(str(spec.calib_path(args.shared)), input_specs(prepared.model), cfg, val_given=False)
    table = stages.calibrate(prepared, plan, data.stream, cfg, total=data.total).table
    held = list(data.held)
    reference = prepared.reference
    first = stages.rewrite(prepared, plan, table, cfg)
    v = validate(reference, first.model, held, providers=["cpu"], latency=False, placement=False)
    provider = v["providers"][0]["provider"]
    wide, info = sixteen_bit(prepared, cfg)
    nodes = [n.node for n in plan.with_overrides().nodes]
    log(f"{args.model}: {len(nodes)} quantized nodes, {len(held)} held-out samples, first worst SQNR "
        f"{worst_sqnr(v['outputs']):.2f} dB; setup {time.perf_counter() - t0:.1f} s; 16-bit: {info}")
    result: dict = {"model": args.model, "nodes": len(nodes), "held": len(held), "first": v["outputs"],
                    "rankings": {}, "groups": []}
    rankings = {}
    if "noise" in args.rankings:
        rankings["noise"] = [c for c, _ in candidates(v["per_layer"], prepared.model, plan, len(nodes))]
        rankings["noise"] += [n for n in nodes if n not in rankings["noise"]]  # nodes the analysis did not name
    for how in ("relief", "alone"):
        if how not in args.rankings:
            continue
        t = time.perf_counter()
        scores = {}
        for node in nodes:
            if how == "relief":
                trial = run_trial(wide, cfg, (), (), table, reference, held, None, provider, None, (node, SIXTEEN))
                outputs = trial.outputs
            else:
                others = tuple(re.escape(n) for n in nodes if n != node)
                alone = stages.plan(prepared, cfg.replace(exclude_nodes=others))
                try:
                    model = stages.rewrite(prepared, alone, table, cfg).model
                except qpass.QpassError as exc:  # alone, the node is not quantized (e.g. no range of its own)
                    log(f"  {node}: {exc.one_line()[:120]}")
                    scores[node] = math.inf
                    continue
                outputs = validate(reference, model, held, providers=["cpu"], per_layer=False, latency=False,
                                   placement=False)["outputs"]
            scores[node] = worst_sqnr(outputs)
        # relief: the higher the SQNR with the node at 16 bits, the more it mattered; alone: the lower the SQNR
        # with only the node quantized, the more sensitive it is
        rankings[how] = sorted(nodes, key=lambda n: -scores[n] if how == "relief" else scores[n])
        result.setdefault("scores", {})[how] = scores
        log(f"{how}: {len(nodes)} trials in {time.perf_counter() - t:.1f} s; top 8: "
            + ", ".join(f"{n} {scores[n]:.2f}" for n in rankings[how][:8]))
    result["rankings"] = rankings
    with tempfile.TemporaryDirectory(prefix="qpass-pred-") as tmp:
        for how, order in rankings.items():
            for k in [int(x) for x in args.ks.split(",")]:
                group = tuple(order[:k])
                t = time.perf_counter()
                if args.move == "float" and k >= len(nodes):
                    log(f"k = {k}: every node float is the float model; not a trial")
                    continue
                if args.move == "float":
                    gplan = plan_for(prepared, cfg, group)
                    model = stages.rewrite(prepared, gplan, table, cfg).model
                else:
                    gplan = plan_for(wide, cfg, (), (), group)
                    model = stages.rewrite(wide, gplan, table_for(table, gplan), cfg).model
                out = Path(tmp) / f"{how}_{k}.onnx"
                save_model(model, out)
                gv = validate(reference, model, held, providers=["cpu"], per_layer=False, latency=True,
                              placement=False)
                metrics = evaluate(args.model, out, shared=Path(args.shared), cache_dir=Path(tmp))
                lat = (gv["providers"][0].get("latency") or {}).get("ratio")
                row = {"ranking": how, "move": args.move, "k": k, spec.primary: metrics[spec.primary], "worst_cos": worst_cos(gv["outputs"]),
                       "worst_sqnr": worst_sqnr(gv["outputs"]), "latency_ratio": lat, "bytes": out.stat().st_size,
                       "seconds": round(time.perf_counter() - t, 1)}
                result["groups"].append(row)
                log(json.dumps(row))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
