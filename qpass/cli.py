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
from .config import (ACTIVATION_TYPES, FORMATS, INTEGER_HARD_SWISH, METHOD_CHOICES, OBJECTIVES, SMOOTH_QUANT, WEIGHT_ONLY_ALGORITHMS, WEIGHT_ONLY_MIXES,
                     WEIGHT_ONLY_TIED, WEIGHT_ONLY_TYPES, QuantConfig)
from .errors import QpassError

EXAMPLES = """\
examples:
  qpass run models/digits_cnn.onnx --calib models/digits/calib.npz
  qpass run model.onnx --calib samples/ -o model.int8.onnx      # a folder of .npz, one sample each
  qpass run model.onnx --calib calib.npz --val test.npz --min-cosine 0.99
  qpass run old_opset11.onnx --calib calib/                     # upgraded to opset 13 for per-channel, with a warning
  qpass run model.onnx --calib calib/ --method entropy --save-calib table.json
  qpass run model.onnx --calib calib/ --save-plan plan.json --save-calib table.json
  qpass run model.onnx --load-plan plan.json --load-calib table.json --val calib/   # edited plan, no recalibration
  qpass run model.onnx --synthetic-calib                        # smoke run on random data (loudly marked)

exit codes: 0 success, 1 validation below --min-cosine (or an output broken, see --allow-collapse), 2 bad input (one line names the file/node/tensor)
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
    run.add_argument("--reference", metavar="FP32",
                     help="a model holding Q/DQ (imported): the float model to validate it against (default: itself)")
    run.add_argument("--dump-dir", metavar="DIR", help="on a failing pass, write the model from just before it here")
    _config_option(run, "--target-opset", type=int, metavar="N", help="upgrade the model to opset N first (onnx.version_converter)")
    _config_option(run, "--keep-opset", dest="opset_upgrade", action="store_const", const=False,
                   help="refuse a model below the opset the run needs (13 for per-channel weights) instead of upgrading "
                        "it with a warning")
    _config_option(run, "--format", choices=FORMATS,
                     help="qdq: QuantizeLinear/DequantizeLinear pairs (default); qop: integer operators (QLinearConv, ...)")
    _config_option(run, "--op-types", type=_csv, metavar="OPS", help="comma-separated compute ops to quantize (default Conv,ConvTranspose,MatMul,Gemm)")
    _config_option(run, "--neighbour-ops", type=_ops_or_none, metavar="OPS",
                     help="comma-separated joins/pooling that run in int8 when their inputs are quantized "
                          "(default Add,Concat,AveragePool,GlobalAveragePool; 'none' turns it off)")
    _config_option(run, "--no-single-reader-dq", dest="single_reader_dq", action="store_const", const=False,
                     help="do not give a DequantizeLinear read by several float ops (a GELU) a single reader "
                          "(by default an Add of 2**-60, so onnxruntime still fuses the GELU)")
    _config_option(run, "--integer-hard-swish", choices=INTEGER_HARD_SWISH,
                     help="hard-swish between uint8 Q/DQ written as Add and Mul between Q/DQ pairs, which onnxruntime "
                          "runs as integer kernels: on (default; the gate's rounding is the only new error), offsets "
                          "(also before a constant offset: one more rounding, faster, less accurate), off")
    _config_option(run, "--method", choices=METHOD_CHOICES,
                     help="activation calibration method (default auto: percentile around Conv, min-max elsewhere; min-max everywhere with 16-bit activations)")
    _config_option(run, "--no-range-choice", dest="range_choice", action="store_const", const=False,
                     help="with --method auto: keep percentile around Conv instead of also trying min-max and MSE there "
                          "and keeping the best on the held-out split")
    _config_option(run, "--percentile", type=float, metavar="P", help="percentile kept by --method percentile (default 99.99)")
    _config_option(run, "--bins", type=int, metavar="N", help="histogram bins for percentile/mse/entropy (default 2048)")
    _config_option(run, "--kl-levels", type=int, metavar="N", help="quantized levels of the entropy search (default 128; a mostly one-signed tensor on the uint8 grid gets up to twice that)")
    _config_option(run, "--hist-sample", type=int, metavar="N",
                     help="values per sample and tensor the histogram counts, at most (default 65536; 0: every value)")
    _config_option(run, "--calib-batch-size", type=int, metavar="N", help="samples per onnxruntime run when shapes agree")
    _config_option(run, "--no-calib-overlap", dest="calib_overlap", action="store_const", const=False,
                     help="keep histogram updates in turn with onnxruntime (by default they move to a worker thread "
                          "where timed runs show it faster, holding two samples' activations instead of one)")
    _config_option(run, "--calib-ep", choices=("cpu", "cuda"), help="execution provider for calibration (default cpu)")
    _config_option(run, "--bias", choices=("int32", "float"),
                     help="int32 bias (default) or float bias left for the runtime to quantize")
    _config_option(run, "--bias-correction", choices=("off", "empirical"),
                   help="empirical: move each quantized Conv/ConvTranspose/Gemm bias (and a MatMul's bias Add) by the "
                        "float model's per-channel output mean minus the quantized model's, stage by stage on "
                        "calibration samples (default off)")
    _config_option(run, "--bias-correction-samples", type=int, metavar="N",
                   help="calibration samples bias correction measures on (default 8)")
    _config_option(run, "--bias-correction-stages", type=int, metavar="N",
                   help="dependency stages bias correction corrects per pass over its samples (default 1; more is faster but diverged on the shared CNNs)")
    _config_option(run, "--per-tensor", dest="per_channel", action="store_const", const=False, help="one weight scale per tensor (default: per output channel)")
    _config_option(run, "--equalize", action="store_const", const=True,
                     help="cross-layer equalization of Conv -> [Relu/LeakyRelu/PRelu/Identity/pooling] -> Conv weights "
                          "before quantizing (float function unchanged; pairs with other ops between are skipped; default: on with "
                          "--per-tensor only)")
    _config_option(run, "--no-equalize", dest="equalize", action="store_const", const=False,
                     help="no cross-layer equalization")
    _config_option(run, "--activation-type", choices=ACTIVATION_TYPES, help="uint8 asymmetric (default) or int8 symmetric; uint16/int16 need opset 21 (an older model is upgraded, with a warning) and run as float kernels on onnxruntime's CPU provider")
    _config_option(run, "--exclude", dest="exclude_nodes", action="append", metavar="NAME", help="node name or regex never quantized (repeatable)")
    _config_option(run, "--exclude-before", action="append", metavar="OP",
                     help="keep in float a compute node whose output only this op type reads (repeatable; "
                          "e.g. HardSwish, which onnxruntime fuses into a float Conv but has no integer kernel for)")
    _config_option(run, "--quantize-before-log", dest="float_before_log", action="store_const", const=False,
                     help="quantize the Conv/MatMul nodes that compute what a Log reads (an in-graph log spectrogram); "
                          "default: they stay float")
    _config_option(run, "--smooth-quant", choices=SMOOTH_QUANT,
                   help="static 8-bit: migrate activation outliers into the MatMul/Gemm weights first (SmoothQuant, "
                        "strength searched per layer on the calibration data; default off)")
    _config_option(run, "--smooth-alpha", type=float, metavar="A",
                   help="a fixed SmoothQuant strength in (0, 1] instead of the per-layer search")
    _config_option(run, "--dynamic", action="store_const", const=True,
                   help="dynamic quantization, no --calib needed: MatMul/Gemm weights int8 per channel, their inputs "
                        "quantized at run time (DynamicQuantizeLinear -> MatMulInteger, standard ONNX); other ops float")
    _config_option(run, "--weight-only", choices=WEIGHT_ONLY_TYPES,
                   help="weight-only mode: MatMul/Gemm weights block-wise int4 (symmetric), uint4 (asymmetric), "
                        "int8, nf4 (NormalFloat codebook) or ternary (int2, opset 25), activations "
                        "float (standard DequantizeLinear with block_size, opset 21; an older model is upgraded with a warning)")
    _config_option(run, "--double-quant", action="store_const", const=True,
                   help="weight-only: store the block scales as uint8 with a float scale per output channel")
    _config_option(run, "--double-quant-form", choices=("cast-mul", "dequantize"),
                   help="double-quantized scales as Mul(Cast(codes), s2) (default; onnxruntime folds it and still "
                        "fuses MatMulNBits) or DequantizeLinear(codes, s2) (no MatMulNBits on onnxruntime)")
    _config_option(run, "--block-size", type=int, metavar="N",
                   help="weight-only: input features per scale (default 128; a power of two >= 16 for MatMulNBits)")
    _config_option(run, "--algorithm", choices=WEIGHT_ONLY_ALGORITHMS,
                   help="weight-only: auto (default: awq-gptq with --calib or --load-calib, else rtn), rtn (round to "
                        "nearest), search (per-block scale search), gptq, awq (activation-aware scales + clipping search), "
                        "awq-gptq (awq's scales, then gptq); the last three need calibration data")
    _config_option(run, "--gptq-sequential", type=int, metavar="N",
                   help="weight-only GPTQ: measure the Hessians N dependency stages at a time on the model whose "
                        "earlier weights are already quantized (default 0: all from the float model in one pass)")
    _config_option(run, "--tied-head", dest="weight_only_tied", choices=WEIGHT_ONLY_TIED,
                   help="weight-only: an output head equal to the embedding table transposed reads the table's int8 "
                        "rows (once, the default: the table is stored once) or gets its own int8 copy (separate)")
    _config_option(run, "--weight-only-mix", choices=WEIGHT_ONLY_MIXES,
                   help="weight-only: a mixed-precision preset written into the plan as overrides: k-mix (int8 value "
                        "and FFN down projections of the first, last and every third layer, after llama.cpp's Q4_K_M); "
                        "k-mix-o (their attention output projections too)")
    _config_option(run, "--allow-contrib-ops", action="store_const", const=True,
                   help="weight-only: write onnxruntime's com.microsoft MatMulNBits / GatherBlockQuantized (runs on "
                        "onnxruntime only) instead of standard DequantizeLinear")
    half = run.add_mutually_exclusive_group()
    _config_option(half, "--float16", dest="float_type", action="store_const", const="float16",
                   help="convert the float part of the model (or of a quantized one) to float16, with measured float32 "
                        "fallback where calibration data shows a tensor out of float16's range; alone it does no int8 "
                        "quantization; with --weight-only the weight-only output is converted")
    _config_option(half, "--bfloat16", dest="float_type", action="store_const", const="bfloat16",
                   help="the same in bfloat16 (GPU providers: onnxruntime's CPU provider lacks most bfloat16 kernels)")
    _config_option(run, "--half-io", action="store_const", const=True,
                   help="float16/bfloat16: convert the model's float inputs and outputs too (default: they stay float32)")
    _config_option(run, "--float-block-ops", type=_ops_or_none, metavar="LIST",
                   help="float16/bfloat16: comma-separated op types kept in float32 (e.g. Softmax,LayerNormalization)")
    _config_option(run, "--float-keep-nodes", type=_csv, metavar="LIST",
                   help="float16/bfloat16: comma-separated node names or regular expressions kept in float32")
    _config_option(run, "--float-min-cosine", type=float, metavar="C",
                   help="float16/bfloat16: the fidelity check's worst per-sample cosine to fp32 (default 0.999); below "
                        "it the nodes adding the most error move back to float32")
    _config_option(run, "--max-calib-samples", type=int, metavar="N")
    _config_option(run, "--synthetic-calib", action="store_const", const=True, help="calibrate on random data (smoke runs only)")
    run.add_argument("--load-calib", metavar="JSON", help="use a saved calibration table instead of running calibration")
    run.add_argument("--save-calib", metavar="JSON", help="save the calibration table")
    run.add_argument("--save-plan", metavar="JSON",
                     help="save the quantization plan (per-tensor specs, nodes, skips) to edit and reuse with --load-plan")
    run.add_argument("--load-plan", metavar="JSON",
                     help="use a saved (possibly edited) plan instead of planning: a node's \"precision\": \"float\", a "
                          "tensor's spec, or \"overrides\" by node, op_type, node_regex, tensor or tensor_regex")
    _validation_args(run)
    _config_option(run, "--external-data", action="store_const", const=True, help="write weights to <output>.data")
    _config_option(run, "--allow-empty", action="store_const", const=True, help="accept a run that quantizes nothing")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    run.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    val = sub.add_parser("validate", help="compare any quantized model with its original on onnxruntime CPU (and CUDA)",
                         epilog="example:\n  qpass validate model.onnx model.int8.onnx --val test.npz --providers cpu,cuda -o report.json",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    val.add_argument("original", help="the fp32 model")
    val.add_argument("quantized", help="the quantized model (from qpass or any other tool)")
    val.add_argument("--val", metavar="PATH", help="validation data (same forms as --calib); default: random feeds")
    val.add_argument("-o", "--output", metavar="JSON", help="report path (default: <quantized stem>.validate.json)")
    _config_option(val, "--max-samples", dest="max_val_samples", type=int, metavar="N", help="validate on at most N samples (default 64)")
    _validation_args(val)
    val.add_argument("-q", "--quiet", action="store_true")
    val.add_argument("--debug", action="store_true")
    return parser


def _validation_args(p: argparse.ArgumentParser) -> None:
    _config_option(p, "--providers", type=_csv, metavar="LIST", help="comma-separated: cpu,cuda (default: cpu, and cuda when available)")
    _config_option(p, "--allow-collapse", dest="collapse_check", action="store_const", const=False,
                   help="with no --min-* set, do not fail (exit 1) an output that validation shows broken "
                        "(a language model's perplexity over 1.5x fp32's, another output under 10 dB SQNR)")
    _config_option(p, "--no-collapse-rescue", dest="collapse_rescue", action="store_const", const=False,
                   help="static mode: when 8-bit activations break the output, fail as the collapse check says "
                        "instead of quantizing again with 16-bit activations")
    _config_option(p, "--min-cosine", type=float, metavar="C", help="exit 1 if an output's mean cosine to fp32 is below C")
    _config_option(p, "--min-sqnr", type=float, metavar="DB", help="exit 1 if an output's SQNR is below DB")
    _config_option(p, "--min-top1", type=float, metavar="A", help="exit 1 if an output's top-1 agreement is below A")
    if p.prog.endswith(" run"):
        _config_option(p, "--target-cosine", type=float, metavar="C",
                       help="precision search (opt-in): move the layers adding the most error to 16-bit activations, "
                            "then float, until every output's mean cosine to fp32 reaches C (validation split), or "
                            "--search-budget runs out")
        _config_option(p, "--target-top1", type=float, metavar="A",
                       help="precision search: the same with each output's top-1 agreement with fp32")
        _config_option(p, "--search-budget", type=int, metavar="N", help="precision search: at most N trials (default 8)")
        _config_option(p, "--search-workers", type=int, metavar="N",
                       help="precision search: N processes score a step's candidate moves (default 1: in process)")
        _config_option(p, "--no-search-16bit", dest="search_16bit", action="store_const", const=False,
                       help="precision search: float moves only (no 16-bit activations, no opset 21 upgrade)")
        _config_option(p, "--ray", dest="ray_address", metavar="ADDRESS",
                       help="precision search: run the trials as Ray tasks on the cluster at ADDRESS (auto, "
                            "ray://host:port) or on a local Ray runtime (local); needs pip install 'qpass[ray]'")
        _config_option(p, "--objective", choices=OBJECTIVES,
                       help="accuracy (default): the search meets the target only; latency: also keep float the "
                            "compute nodes whose integer form measured slower than float, so the output is not "
                            "slower than fp32 (timing trials, within --search-budget)")
        _config_option(p, "--no-validate", dest="validate", action="store_const", const=False,
                       help="skip the comparison with the original (large models in pipelines that validate later)")
    _config_option(p, "--no-per-layer", dest="per_layer", action="store_const", const=False, help="skip the per-layer error ranking")
    _config_option(p, "--no-latency", dest="latency", action="store_const", const=False, help="skip the latency measurement")


def _config_option(parser: argparse.ArgumentParser, flag: str, **kw) -> None:
    """An option that sets the QuantConfig field of its ``dest`` (default: the flag's name); unset stays None, so a
    config file's value is kept."""
    dest = kw.pop("dest", flag.lstrip("-").replace("-", "_"))
    if dest not in QuantConfig.field_names():
        raise AssertionError(f"{flag}: {dest} is not a QuantConfig field")
    parser.add_argument(flag, dest=dest, default=None, **kw)
    CONFIG_DESTS.add(dest)


#: the QuantConfig fields that options set (filled by _config_option)
CONFIG_DESTS: set[str] = set()


def _csv(text: str) -> tuple[str, ...]:
    return tuple(x for x in text.split(",") if x)


def _ops_or_none(text: str) -> tuple[str, ...]:
    return () if text == "none" else _csv(text)


def _config_from_args(args: argparse.Namespace) -> QuantConfig:
    overrides = {d: getattr(args, d) for d in CONFIG_DESTS if getattr(args, d, None) is not None}
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    if getattr(args, "config", None):
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
                          dump_dir=args.dump_dir, reference=args.reference,
                          progress=None if args.quiet else _progress_factory(err, bars))
    finally:
        for bar in bars:
            bar.stop()
    report = result.report
    for w in report.warnings:
        err.print(f"[bold red]warning:[/] {w}", highlight=False, soft_wrap=True)
    if not args.quiet:
        print_summary(out, report.to_dict())
        if report.search is not None:
            print_search(out, report.search)
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


def _num(x) -> str:
    return f"{x:.5f}" if isinstance(x, float) else str(x)


def print_search(console: Console, s: dict) -> None:
    """The precision search in one line, then one line per move."""
    if "met" in s:
        state = "met" if s.get("met") else "NOT met"
        console.print(f"precision search: target {state} after {s.get('trials', 0)} trial(s), "
                      f"{len(s.get('moves', []))} move(s)", highlight=False, soft_wrap=True)
        if s.get("sixteen_bit", {}).get("reason"):
            console.print(f"  no 16-bit moves: {s['sixteen_bit']['reason']}", highlight=False, soft_wrap=True)
        if s.get("opset"):
            console.print(f"  opset {s['opset']['from']} -> {s['opset']['to']} for the 16-bit moves", highlight=False)
        for m in s.get("moves", []):
            to = ", ".join(f"{n} {k}" for k, n in m["kinds"].items()) if m.get("kinds") else m.get("to", "float")
            more = f" and {len(m['group']) - 1} more" if m.get("group") else ""
            console.print(f"  {m['node']} ({m['op_type']}){more} -> {to}: worst cosine {_num(m['before']['cosine_min'])} -> "
                          f"{_num(m['after']['cosine_min'])}, {m['bytes_before']} -> {m['bytes_after']} bytes",
                          highlight=False, soft_wrap=True)
    ratio = s.get("latency_ratio") or {}
    if ratio.get("first") is not None and ratio.get("final") is not None:
        console.print(f"  latency x{ratio['first']:.3f} -> x{ratio['final']:.3f} fp32's", highlight=False)
    lat = s.get("latency")
    if lat:
        state = "not slower than fp32" if lat["met"] else "STILL SLOWER than fp32"
        console.print(f"latency objective: x{lat['start']['ratio']:.2f} -> x{lat['end']['ratio']:.2f} fp32's latency "
                      f"({state}) after {lat['trials']} timing trial(s), {len(lat['floated'])} node(s) kept float",
                      highlight=False, soft_wrap=True)
        for m in lat.get("moves", []):
            console.print(f"  {m['step']}: {len(m['nodes'])} node(s), {m['ms_before']} -> {m['ms_after']} ms, "
                          f"{m['bytes_before']} -> {m['bytes_after']} bytes", highlight=False, soft_wrap=True)


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
    choice = r["calibration"].get("range_choice")
    if choice:
        tried = ", ".join(f"{k} {v if isinstance(v, str) else 'failed' if v is None else f'{v:.1f}'}"
                          for k, v in choice["worst_output_sqnr_db"].items())
        console.print(f"ranges around Conv ({choice['tensors']}): {choice['rule']} (held-out worst-output SQNR dB: "
                      f"{tried})", highlight=False)
    v = r.get("validation")
    if v:
        for prov in v.get("providers", []):
            if not prov.get("available"):
                console.print(f"{prov['provider']}: not available", highlight=False)
            elif prov.get("latency"):
                lat = prov["latency"]
                console.print(f"{prov['provider']}: latency fp32 {lat['fp32_ms']:.3f} ms, quantized {lat['quantized_ms']:.3f} ms "
                              f"(x{lat['ratio']:.2f})", highlight=False)
        if v.get("per_layer"):
            worst = v["per_layer"][0]
            console.print(f"layer adding the most error: {worst['node']} ({worst['op_type']}), SQNR {_db(worst['sqnr_db'])} dB "
                          f"at its output", highlight=False, soft_wrap=True)
    if v and v.get("outputs"):
        vt = Table(title=f"validation on {v['data']} ({v['samples']} samples, {v.get('provider')})", show_edge=False)
        for col in ("output", "SQNR dB", "cosine mean", "cosine min", "max abs err", "top-1 agree", "accuracy fp32 -> quantized"):
            vt.add_column(col)
        for o in v["outputs"]:
            acc = f"{o['accuracy_fp32']:.4f} -> {o['accuracy_quantized']:.4f}" if "accuracy_fp32" in o else "-"
            sq = o["sqnr_db"]
            vt.add_row(o["output"], f"{sq:.1f}" if isinstance(sq, float) else str(sq), f"{o['cosine_mean']:.5f}",
                       f"{o['cosine_min']:.5f}", f"{o['max_abs_error']:.4g}",
                       f"{o['top1_agreement']:.4f}" if "top1_agreement" in o else "-", acc)
        console.print(vt)
        first = next((p for p in v.get("providers", []) if p.get("outputs") is not None), {})
        level0 = {o["output"]: o for o in first.get("accuracy_level_0", [])}
        for o in v["outputs"]:
            if "perplexity_fp32" in o:
                console.print(f"{o['output']}: next-token perplexity fp32 {o['perplexity_fp32']:.2f} -> quantized "
                              f"{o['perplexity_quantized']:.2f}, KL {o['kl_mean']:.4f} nats over {o['tokens']} tokens",
                              highlight=False, soft_wrap=True)
                if o["output"] in level0:
                    z = level0[o["output"]]
                    console.print(f"  with MatMulNBits accuracy level 0 (float activations; onnxruntime's default is 4): "
                                  f"perplexity {z['perplexity_quantized']:.2f}, KL {z['kl_mean']:.4f}",
                                  highlight=False, soft_wrap=True)
        if "matmulnbits" in first:
            m = first["matmulnbits"]
            console.print(f"onnxruntime fused {m['formed']} of {m['weight_only_matmuls']} block-wise weight MatMuls into "
                          f"MatMulNBits ({first['provider']})", highlight=False)


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
