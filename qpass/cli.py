"""The `qpass` command: argument parsing and printing only; every command calls the public API."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__
from .config import ACTIVATION_TYPES, QuantConfig
from .errors import QpassError

EXAMPLES = """\
examples:
  qpass run models/digits_cnn.onnx --calib models/digits/calib.npz
  qpass run model.onnx --calib samples/ -o model.int8.onnx      # a folder of .npz, one sample each
  qpass run model.onnx --calib calib.npz --val test.npz --min-cosine 0.99
  qpass run old_opset11.onnx --calib calib/ --target-opset 13   # explicit upgrade for per-channel
  qpass run model.onnx --calib calib/ --method entropy --save-calib table.json
  qpass run model.onnx --calib calib/ --save-plan plan.json --save-calib table.json
  qpass run model.onnx --load-plan plan.json --load-calib table.json --val calib/   # edited plan, no recalibration
  qpass run model.onnx --synthetic-calib                        # smoke run on random data (loudly marked)

exit codes: 0 success, 1 validation below --min-cosine, 2 bad input (one line names the file/node/tensor)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qpass", description="ONNX post-training int8 quantizer (QDQ), validated on onnxruntime.",
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"qpass {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", help="quantize a model and validate the result", epilog=EXAMPLES,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("model", help="fp32 .onnx model (never written)")
    run.add_argument("-o", "--output", help="output model (default: <stem>.qpass.onnx beside the input)")
    run.add_argument("--calib", metavar="PATH", help=".npz of samples, a folder of .npz (one sample each), or a test_data_set_* folder")
    run.add_argument("--val", metavar="PATH", help="validation data (default: a held-out split of --calib)")
    run.add_argument("--config", metavar="FILE", help="TOML file with QuantConfig keys (under [qpass] or top level)")
    run.add_argument("--dump-dir", metavar="DIR", help="on a failing pass, write the model from just before it here")
    run.add_argument("--target-opset", type=int, metavar="N", help="upgrade the model to opset N first (onnx.version_converter)")
    run.add_argument("--format", choices=("qdq", "qop"),
                     help="qdq: QuantizeLinear/DequantizeLinear pairs (default); qop: integer operators (QLinearConv, ...)")
    run.add_argument("--op-types", metavar="OPS", help="comma-separated compute ops to quantize (default Conv,ConvTranspose,MatMul,Gemm)")
    run.add_argument("--neighbour-ops", metavar="OPS",
                     help="comma-separated joins/pooling that run in int8 when their inputs are quantized "
                          "(default Add,Concat,AveragePool,GlobalAveragePool; 'none' turns it off)")
    run.add_argument("--no-single-reader-dq", dest="single_reader_dq", action="store_const", const=False,
                     help="do not give a DequantizeLinear read by several float ops (a GELU) a single reader "
                          "(by default an Add of 2**-60, so onnxruntime still fuses the GELU)")
    run.add_argument("--method", choices=("auto", "minmax", "percentile", "mse", "entropy"),
                     help="activation calibration method (default auto: percentile around Conv, min-max elsewhere; min-max everywhere with 16-bit activations)")
    run.add_argument("--percentile", type=float, metavar="P", help="percentile kept by --method percentile (default 99.99)")
    run.add_argument("--bins", type=int, metavar="N", help="histogram bins for percentile/mse/entropy (default 2048)")
    run.add_argument("--kl-levels", type=int, metavar="N", help="quantized levels of the entropy search (default 128; a mostly one-signed tensor on the uint8 grid gets up to twice that)")
    run.add_argument("--hist-sample", type=int, metavar="N",
                     help="values per sample and tensor the histogram counts, at most (default 65536; 0: every value)")
    run.add_argument("--calib-batch-size", type=int, metavar="N", help="samples per onnxruntime run when shapes agree")
    run.add_argument("--no-calib-overlap", dest="calib_overlap", action="store_const", const=False,
                     help="keep histogram updates in turn with onnxruntime (by default they move to a worker thread "
                          "where timed runs show it faster, holding two samples' activations instead of one)")
    run.add_argument("--calib-ep", choices=("cpu", "cuda"), help="execution provider for calibration (default cpu)")
    run.add_argument("--bias", choices=("int32", "float"),
                     help="int32 bias (default) or float bias left for the runtime to quantize")
    run.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor (default: per output channel)")
    run.add_argument("--activation-type", choices=ACTIVATION_TYPES, help="uint8 asymmetric (default) or int8 symmetric; uint16/int16 need --target-opset 21 and run as float kernels on onnxruntime's CPU provider")
    run.add_argument("--exclude", action="append", metavar="NAME", help="node name or regex never quantized (repeatable)")
    run.add_argument("--exclude-before", action="append", metavar="OP",
                     help="keep in float a compute node whose output only this op type reads (repeatable; "
                          "e.g. HardSwish, which onnxruntime fuses into a float Conv but has no integer kernel for)")
    run.add_argument("--max-calib-samples", type=int, metavar="N")
    run.add_argument("--synthetic-calib", action="store_true", help="calibrate on random data (smoke runs only)")
    run.add_argument("--load-calib", metavar="JSON", help="use a saved calibration table instead of running calibration")
    run.add_argument("--save-calib", metavar="JSON", help="save the calibration table")
    run.add_argument("--save-plan", metavar="JSON",
                     help="save the quantization plan (per-tensor specs, nodes, skips) to edit and reuse with --load-plan")
    run.add_argument("--load-plan", metavar="JSON",
                     help="use a saved (possibly edited) plan instead of planning: a node's \"precision\": \"float\", a "
                          "tensor's spec, or \"overrides\" by node, op_type, node_regex, tensor or tensor_regex")
    _validation_args(run)
    run.add_argument("--external-data", action="store_true", help="write weights to <output>.data")
    run.add_argument("--allow-empty", action="store_true", help="accept a run that quantizes nothing")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    run.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    val = sub.add_parser("validate", help="compare any quantized model with its original on onnxruntime CPU (and CUDA)",
                         epilog="example:\n  qpass validate model.onnx model.int8.onnx --val test.npz --providers cpu,cuda -o report.json",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    val.add_argument("original", help="the fp32 model")
    val.add_argument("quantized", help="the quantized model (from qpass or any other tool)")
    val.add_argument("--val", metavar="PATH", help="validation data (same forms as --calib); default: random feeds")
    val.add_argument("-o", "--output", metavar="JSON", help="report path (default: <quantized stem>.validate.json)")
    val.add_argument("--max-samples", type=int, metavar="N", help="validate on at most N samples (default 64)")
    _validation_args(val)
    val.add_argument("-q", "--quiet", action="store_true")
    val.add_argument("--debug", action="store_true")
    return parser


def _validation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--providers", metavar="LIST", help="comma-separated: cpu,cuda (default: cpu, and cuda when available)")
    p.add_argument("--min-cosine", type=float, metavar="C", help="exit 1 if an output's mean cosine to fp32 is below C")
    p.add_argument("--min-sqnr", type=float, metavar="DB", help="exit 1 if an output's SQNR is below DB")
    p.add_argument("--min-top1", type=float, metavar="A", help="exit 1 if an output's top-1 agreement is below A")
    p.add_argument("--no-per-layer", action="store_true", help="skip the per-layer error ranking")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement")


def _validation_overrides(args: argparse.Namespace) -> dict:
    """QuantConfig fields set by the flags that `run` and `validate` share (_validation_args)."""
    return {
        "min_cosine": args.min_cosine,
        "min_sqnr": args.min_sqnr,
        "min_top1": args.min_top1,
        "providers": tuple(args.providers.split(",")) if args.providers else None,
        "per_layer": False if args.no_per_layer else None,
        "latency": False if args.no_latency else None,
    }


def _config_from_args(args: argparse.Namespace) -> QuantConfig:
    if args.command == "validate":
        ov = {**_validation_overrides(args), "max_val_samples": args.max_samples}
        return QuantConfig(**{k: v for k, v in ov.items() if v is not None})
    overrides = {
        **_validation_overrides(args),
        "format": getattr(args, "format", None),
        "bias": args.bias,
        "op_types": tuple(args.op_types.split(",")) if args.op_types else None,
        "neighbour_ops": (() if args.neighbour_ops == "none" else tuple(args.neighbour_ops.split(",")))
        if args.neighbour_ops else None,
        "single_reader_dq": args.single_reader_dq,
        "method": args.method,
        "percentile": args.percentile,
        "bins": args.bins,
        "kl_levels": args.kl_levels,
        "hist_sample": args.hist_sample,
        "calib_batch_size": args.calib_batch_size,
        "calib_overlap": args.calib_overlap,
        "calib_ep": args.calib_ep,
        "target_opset": args.target_opset,
        "per_channel": False if args.per_tensor else None,
        "activation_type": args.activation_type,
        "exclude_nodes": tuple(args.exclude) if args.exclude else None,
        "exclude_before": tuple(args.exclude_before) if args.exclude_before else None,
        "max_calib_samples": args.max_calib_samples,
        "synthetic_calib": True if args.synthetic_calib else None,
        "external_data": True if args.external_data else None,
        "allow_empty": True if args.allow_empty else None,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.config:
        return QuantConfig.from_toml(args.config, **overrides)
    return QuantConfig(**overrides)


def _progress_factory(console: Console, stack: list) -> Callable:
    def factory(label: str, total: int | None) -> Callable[[], None]:
        progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=console, transient=True)
        progress.start()
        stack.append(progress)
        task = progress.add_task(label, total=total)
        return lambda: progress.advance(task)

    return factory


def cmd_run(args: argparse.Namespace, out: Console, err: Console) -> int:
    from .api import default_output_path, quantize

    config = _config_from_args(args)
    output = Path(args.output) if args.output else default_output_path(args.model)
    bars: list = []
    try:
        result = quantize(args.model, args.calib, config=config, output=output, val=args.val, load_calib=args.load_calib,
                          save_calib=args.save_calib, plan=args.load_plan, save_plan=args.save_plan,
                          dump_dir=args.dump_dir,
                          progress=None if args.quiet else _progress_factory(err, bars))
    finally:
        for bar in bars:
            bar.stop()
    report = result.report
    for w in report.warnings:
        err.print(f"[bold red]warning:[/] {w}", highlight=False, soft_wrap=True)
    if not args.quiet:
        print_summary(out, report.to_dict())
    out.print(f"wrote {result.output_path} and {result.report_path}", highlight=False, soft_wrap=True)
    if not result.passed:
        for f in report.validation.get("tolerance_failures", []):
            err.print(f"[bold red]validation failed:[/] {f}", highlight=False, soft_wrap=True)
        return 1
    return 0


def cmd_validate(args: argparse.Namespace, out: Console, err: Console) -> int:
    from .api import validate_models

    config = _config_from_args(args)
    q = Path(args.quantized)
    output = Path(args.output) if args.output else q.with_name((q.name[:-5] if q.name.endswith(".onnx") else q.name) + ".validate.json")
    report = validate_models(args.original, args.quantized, args.val, config=config, output=output)
    for w in report.warnings:
        err.print(f"[bold red]warning:[/] {w}", highlight=False, soft_wrap=True)
    if not args.quiet:
        print_summary(out, report.to_dict())
    out.print(f"wrote {output} and {output.with_suffix('.html')}", highlight=False, soft_wrap=True)
    if not report.validation.get("passed", True):
        for f in report.validation.get("tolerance_failures", []):
            err.print(f"[bold red]validation failed:[/] {f}", highlight=False, soft_wrap=True)
        return 1
    return 0


def print_summary(console: Console, r: dict) -> None:
    if r["synthetic_calibration"]:
        console.print("[bold red]RANGES FROM RANDOM DATA (--synthetic-calib): not for deployment[/]")
    if r["quantized_nodes"]:
        t = Table(title="quantized nodes", show_edge=False)
        t.add_column("op type")
        t.add_column("count", justify="right")
        for op, n in sorted(r["quantized_nodes"].items()):
            t.add_row(op, str(n))
        console.print(t)
    if r["skipped"]:
        s = Table(title=f"skipped ({len(r['skipped'])})", show_edge=False)
        s.add_column("node")
        s.add_column("op")
        s.add_column("reason")
        for row in r["skipped"][:20]:
            s.add_row(row["node"], row["op_type"], row["reason"])
        if len(r["skipped"]) > 20:
            s.add_row("…", "", f"{len(r['skipped']) - 20} more in the report")
        console.print(s)
    if r["passes"]:
        p = Table(title="passes", show_edge=False)
        p.add_column("pass")
        p.add_column("ms", justify="right")
        p.add_column("modified")
        for rec in r["passes"]:
            p.add_row(rec["name"], f"{rec['seconds'] * 1000:.1f}", "yes" if rec["modified"] else "no")
        console.print(p)
    sizes = r["sizes"]
    if sizes:
        console.print(f"size: {sizes['input_bytes']:,} -> {sizes['output_bytes']:,} bytes "
                      f"({sizes['output_bytes'] / max(sizes['input_bytes'], 1):.2f}x)", highlight=False)
    if r["calibration"].get("samples"):
        console.print(f"calibration: {r['calibration'].get('samples')} samples, {r['calibration'].get('tensors')} tensors",
                      highlight=False)
    v = r.get("validation")
    if v:
        for prov in v.get("providers", []):
            if not prov.get("available"):
                console.print(f"{prov['provider']}: not available", highlight=False)
            elif prov.get("latency"):
                lat = prov["latency"]
                console.print(f"{prov['provider']}: latency fp32 {lat['fp32_ms']:.3f} ms, int8 {lat['quantized_ms']:.3f} ms "
                              f"(x{lat['ratio']:.2f})", highlight=False)
        if v.get("per_layer"):
            worst = v["per_layer"][0]
            console.print(f"layer adding the most error: {worst['node']} ({worst['op_type']}), SQNR {_db(worst['sqnr_db'])} dB "
                          f"at its output", highlight=False, soft_wrap=True)
    if v and v.get("outputs"):
        vt = Table(title=f"validation on {v['data']} ({v['samples']} samples, {v.get('provider')})", show_edge=False)
        for col in ("output", "SQNR dB", "cosine mean", "cosine min", "max abs err", "top-1 agree", "accuracy fp32 -> int8"):
            vt.add_column(col)
        for o in v["outputs"]:
            acc = f"{o['accuracy_fp32']:.4f} -> {o['accuracy_quantized']:.4f}" if "accuracy_fp32" in o else "-"
            sq = o["sqnr_db"]
            vt.add_row(o["output"], f"{sq:.1f}" if isinstance(sq, float) else str(sq), f"{o['cosine_mean']:.5f}",
                       f"{o['cosine_min']:.5f}", f"{o['max_abs_error']:.4g}",
                       f"{o['top1_agreement']:.4f}" if "top1_agreement" in o else "-", acc)
        console.print(vt)


def _db(x) -> str:
    return f"{x:.1f}" if isinstance(x, float) else str(x)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Console(highlight=False)
    err = Console(stderr=True, highlight=False)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "run":
            return cmd_run(args, out, err)
        if args.command == "validate":
            return cmd_validate(args, out, err)
    except QpassError as exc:
        if getattr(args, "debug", False):
            raise
        err.print(f"qpass: error: {exc.one_line()}", highlight=False, markup=False, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        err.print("qpass: interrupted; no output written", highlight=False)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
