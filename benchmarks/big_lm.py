"""A language model over 2 GB, quantized weight-only end to end: wall time and peak RSS of every stage.

    python -m benchmarks.big_lm --out /tmp/big_lm [--layers 3] [--vocab 8192] [--gptq 4] [--keep]

Builds a stack of Llama-7B-shaped decoder layers (hidden 4096, SiLU-gated MLP 11008, 32 heads, RMSNorm, causal
attention without rotary embeddings, a token embedding and an LM head) in standard ONNX (opset 21) with its weights
in external data, written tensor by tensor (never two copies in memory). The weights are random (normal, scaled
1/sqrt(fan-in) so that activations keep their scale through the layers): this measures plumbing, memory and time,
not accuracy. Then, each in a fresh process: ``qpass run MODEL --weight-only int4`` (round to nearest, validated on
qpass's synthetic feeds), optionally with GPTQ on ``--gptq N`` calibration samples of random token ids, and a check
that each output loads in onnxruntime and gives logits close to the float model's (cosine). Prints one JSON line
per stage and a summary table; the files are deleted at the end unless ``--keep``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ---------------------------------------------------------------------------------------------- build
class _Writer:
    """Initializers as external data, appended to one file as they are made (64 KiB aligned)."""

    def __init__(self, folder: Path, data_name: str, seed: int):
        self.data_name = data_name
        self.fh = open(folder / data_name, "wb")  # noqa: SIM115 - closed by close()
        self.offset = 0
        self.tensors = []
        self.rng = np.random.default_rng(seed)

    def add(self, name: str, array: np.ndarray):
        import onnx
        import onnx.numpy_helper
        from onnx import helper

        array = np.ascontiguousarray(array)
        if array.nbytes < 1024:  # shape inference reads small constants (a Reshape's shape): they stay inline
            self.tensors.append(onnx.numpy_helper.from_array(array, name))
            return name
        pad = -self.offset % 65536
        self.fh.write(b"\0" * pad)
        self.offset += pad
        self.fh.write(array.tobytes())
        t = onnx.TensorProto(name=name, dims=array.shape, data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
                             data_location=onnx.TensorProto.EXTERNAL)
        for k, v in (("location", self.data_name), ("offset", str(self.offset)), ("length", str(array.nbytes))):
            t.external_data.add(key=k, value=v)
        self.offset += array.nbytes
        self.tensors.append(t)
        return name

    def weight(self, name: str, rows: int, cols: int) -> str:
        w = self.rng.standard_normal((rows, cols), dtype=np.float32)
        w *= np.float32(1 / np.sqrt(rows))
        return self.add(name, w)

    def close(self) -> None:
        self.fh.close()


def build(path: Path, *, layers: int, hidden: int, ffn: int, heads: int, vocab: int, seq: int, seed: int = 0) -> dict:
    import onnx
    from onnx import TensorProto, helper

    w = _Writer(path.parent, path.name + ".data", seed)
    nodes = []
    hd = hidden // heads
    const = lambda name, arr: w.add(name, np.asarray(arr))  # noqa: E731
    axes_last = const("axes_last", np.array([-1], np.int64))
    eps = const("eps", np.array(1e-5, np.float32))
    split_heads = const("split_heads", np.array([1, seq, heads, hd], np.int64))
    merge_heads = const("merge_heads", np.array([1, seq, hidden], np.int64))
    scale = const("attn_scale", np.array(1 / np.sqrt(hd), np.float32))
    mask = const("causal_mask", np.triu(np.full((seq, seq), -1e9, np.float32), 1))

    def node(op, inputs, name, **attrs):
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def rms_norm(x, p):
        gamma = const(f"{p}.weight", np.ones(hidden, np.float32))
        ms = node("ReduceMean", [node("Mul", [x, x], f"{p}.sq"), axes_last], f"{p}.ms", keepdims=1)
        rms = node("Sqrt", [node("Add", [ms, eps], f"{p}.ms_eps")], f"{p}.rms")
        return node("Mul", [node("Div", [x, rms], f"{p}.normed"), gamma], f"{p}.out")

    embed = w.weight("embed_tokens.weight", vocab, hidden)
    h = node("Gather", [embed, "input_ids"], "embed", axis=0)
    for i in range(layers):
        p = f"layers.{i}"
        x = rms_norm(h, f"{p}.input_layernorm")
        qkv = []
        for proj in ("q", "k", "v"):
            y = node("MatMul", [x, w.weight(f"{p}.self_attn.{proj}_proj.weight", hidden, hidden)], f"{p}.{proj}_proj")
            y = node("Reshape", [y, split_heads], f"{p}.{proj}_heads")
            qkv.append(node("Transpose", [y], f"{p}.{proj}_t", perm=[0, 2, 1, 3] if proj != "k" else [0, 2, 3, 1]))
        q, k, v = qkv
        s = node("Add", [node("Mul", [node("MatMul", [q, k], f"{p}.qk"), scale], f"{p}.qk_scaled"), mask], f"{p}.masked")
        a = node("MatMul", [node("Softmax", [s], f"{p}.probs", axis=-1), v], f"{p}.attn")
        a = node("Reshape", [node("Transpose", [a], f"{p}.attn_t", perm=[0, 2, 1, 3]), merge_heads], f"{p}.attn_merged")
        o = node("MatMul", [a, w.weight(f"{p}.self_attn.o_proj.weight", hidden, hidden)], f"{p}.o_proj")
        h = node("Add", [h, o], f"{p}.attn_residual")
        x = rms_norm(h, f"{p}.post_attention_layernorm")
        g = node("MatMul", [x, w.weight(f"{p}.mlp.gate_proj.weight", hidden, ffn)], f"{p}.gate_proj")
        u = node("MatMul", [x, w.weight(f"{p}.mlp.up_proj.weight", hidden, ffn)], f"{p}.up_proj")
        silu = node("Mul", [g, node("Sigmoid", [g], f"{p}.gate_sigmoid")], f"{p}.silu")
        d = node("MatMul", [node("Mul", [silu, u], f"{p}.gated"), w.weight(f"{p}.mlp.down_proj.weight", ffn, hidden)],
                 f"{p}.down_proj")
        h = node("Add", [h, d], f"{p}.mlp_residual")
    x = rms_norm(h, "norm")
    node("MatMul", [x, w.weight("lm_head.weight", hidden, vocab)], "logits")
    w.close()
    graph = helper.make_graph(nodes, "big_lm", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, seq])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, seq, vocab])])
    graph.initializer.extend(w.tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], producer_name="qpass big_lm")
    model.ir_version = 10
    path.write_bytes(model.SerializeToString())
    onnx.checker.check_model(str(path), full_check=True)
    params = sum(int(np.prod(t.dims)) for t in w.tensors)
    return {"params": params, "model_bytes": path.stat().st_size + (path.parent / w.data_name).stat().st_size}


# ---------------------------------------------------------------------------------------------- check
def check(float_path: Path, quantized: list[Path], *, vocab: int, seq: int, samples: int = 3) -> dict:
    """Logits of each quantized model against the float model's in onnxruntime (sessions made from the files)."""
    import onnx
    import onnxruntime as ort

    rng = np.random.default_rng(1)
    feeds = [{"input_ids": rng.integers(0, vocab, (1, seq), dtype=np.int64)} for _ in range(samples)]
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    ref = ort.InferenceSession(str(float_path), opts, providers=["CPUExecutionProvider"])
    want = [ref.run(None, f)[0] for f in feeds]
    del ref
    out = {}
    for path in quantized:
        model = onnx.load(str(path), load_external_data=False)
        ops = sorted({n.op_type for n in model.graph.node})
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        cos = []
        for f, r in zip(feeds, want):
            q = sess.run(None, f)[0].astype(np.float64).ravel()
            r = r.astype(np.float64).ravel()
            cos.append(float(q @ r / (np.linalg.norm(q) * np.linalg.norm(r))))
        out[path.name] = {"cosine_min": min(cos), "cosine_mean": float(np.mean(cos)), "ops": ops,
                          "files": sorted(p.name for p in path.parent.iterdir() if p.name.startswith(path.name))}
        del sess
    return out


# ---------------------------------------------------------------------------------------------- driver
def _child(stage: str, args: argparse.Namespace) -> dict:
    """Run one stage in a fresh process; its wall time and peak RSS (VmHWM) come back as JSON."""
    cmd = [sys.executable, "-m", "benchmarks.big_lm", "--stage", stage, "--out", str(args.out), "--layers",
           str(args.layers), "--hidden", str(args.hidden), "--ffn", str(args.ffn), "--heads", str(args.heads),
           "--vocab", str(args.vocab), "--seq", str(args.seq), "--gptq", str(args.gptq)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        return {"stage": stage, "error": proc.stderr[-3000:], "wall_s": round(wall, 1)}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = round(wall, 1)
    return result


def _qpass_stage(args: argparse.Namespace, name: str, extra: list[str]) -> dict:
    from qpass.cli import main as qpass_main

    out = args.out / f"{name}.onnx"
    t = time.perf_counter()
    rc = qpass_main(["run", str(args.out / "big_lm.onnx"), "--weight-only", "int4", "-o", str(out), "-q", *extra])
    report = json.loads((args.out / f"{name}.report.json").read_text()) if rc == 0 else {}
    val = (report.get("validation") or {}).get("outputs") or [{}]
    return {"rc": rc, "seconds": report.get("seconds"), "in_process_s": round(time.perf_counter() - t, 1),
            "output_bytes": sum(p.stat().st_size for p in args.out.glob(f"{name}.onnx*")),
            "validation_cosine": val[0].get("cosine_mean"), "warnings": report.get("warnings")}


def run_stage(args: argparse.Namespace) -> dict:
    stage = args.stage
    if stage == "build":
        info = build(args.out / "big_lm.onnx", layers=args.layers, hidden=args.hidden, ffn=args.ffn, heads=args.heads,
                     vocab=args.vocab, seq=args.seq)
    elif stage == "rtn":
        info = _qpass_stage(args, "rtn", ["--algorithm", "rtn"])
    elif stage == "rtn-novalidate":
        info = _qpass_stage(args, "rtn_novalidate", ["--algorithm", "rtn", "--no-validate", "--external-data"])
    elif stage == "gptq":
        calib = args.out / "calib.npz"
        rng = np.random.default_rng(2)
        np.savez(calib, input_ids=rng.integers(0, args.vocab, (args.gptq, 1, args.seq), dtype=np.int64))
        info = _qpass_stage(args, "gptq", ["--algorithm", "gptq", "--calib", str(calib), "--no-validate"])
    elif stage == "check":
        outs = [args.out / n for n in ("rtn.onnx", "rtn_novalidate.onnx", "gptq.onnx") if (args.out / n).exists()]
        info = check(args.out / "big_lm.onnx", outs, vocab=args.vocab, seq=args.seq)
    else:
        raise SystemExit(f"unknown stage {stage}")
    return {"stage": stage, **info, "peak_rss_mb": round(peak_rss_mb())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="a folder for the models (several GB)")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--gptq", type=int, default=0, help="also GPTQ with N calibration samples (0: no)")
    ap.add_argument("--stages", default="build,rtn,rtn-novalidate,gptq,check")
    ap.add_argument("--keep", action="store_true", help="keep the models")
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.out = args.out.resolve()
    if args.stage:
        print(json.dumps(run_stage(args)))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for stage in args.stages.split(","):
            if stage == "gptq" and not args.gptq:
                continue
            rows.append(_child(stage, args))
            print(json.dumps(rows[-1]), flush=True)
            if "error" in rows[-1]:
                break
    finally:
        if not args.keep:
            shutil.rmtree(args.out, ignore_errors=True)
    print(f"\n{'stage':16s} {'wall s':>8s} {'peak RSS MB':>12s}")
    for r in rows:
        print(f"{r['stage']:16s} {r['wall_s']:8.1f} {r.get('peak_rss_mb', float('nan')):12.0f}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    sys.exit(main())
