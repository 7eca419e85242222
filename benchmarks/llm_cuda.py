"""A weight-only int4 language model on onnxruntime's CUDA provider: MatMulNBits formed, speed against fp32, accuracy
against the same model on the CPU provider.

    python benchmarks/llm_cuda.py INT4.onnx --windows windows.npz [--out result.json] [--repeats 50]

Runs where only numpy, onnx and onnxruntime-gpu are installed (the GPU machine has no onnx-graphsurgeon), so it
imports nothing from qpass. The fp32 model it compares speed against is rebuilt from the int4 file itself: every
DequantizeLinear of constant initializers (and the embedding's Gather -> DequantizeLinear of gathered rows) is
replaced by its float result, giving the original graph with the same shapes (the original fp32 file, 651 MB, does
not fit through the GPU machine's 64 MiB transfers). Speed depends on shapes only, so this is the fp32 baseline for
time; it is not the fp32 model for accuracy (its weights are the dequantized ones).

Reports: GPU and versions, the optimized graph's op counts per model and accuracy level (MatMulNBits formed or not),
the nodes the CUDA provider did not take, median forward time of 1-token and 128-token inputs (models alternated
each round, after warm-up), and perplexity / top-1 agreement between the int4 model on CUDA and on the CPU on the
given token windows.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from collections import Counter

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _unpack4(t: TensorProto) -> np.ndarray:
    raw = np.frombuffer(t.raw_data, dtype=np.uint8)
    nib = np.empty(raw.size * 2, dtype=np.int16)
    nib[0::2], nib[1::2] = raw & 0xF, raw >> 4
    n = int(np.prod(t.dims))
    nib = nib[:n]
    if t.data_type == TensorProto.INT4:
        nib = np.where(nib >= 8, nib - 16, nib)
    return nib.reshape(tuple(t.dims)).astype(np.float32)


def _array(t: TensorProto) -> np.ndarray:
    if t.data_type in (TensorProto.INT4, TensorProto.UINT4):
        return _unpack4(t)
    return numpy_helper.to_array(t).astype(np.float32)


def _dequantize(q: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, axis: int, block: int) -> np.ndarray:
    axis = axis % q.ndim
    if scale.ndim == 0 or scale.size == 1:
        s, z = scale.reshape(()), (zp.reshape(()) if zp is not None else 0.0)
    elif block:
        s = np.repeat(scale, block, axis=axis).take(range(q.shape[axis]), axis=axis)
        z = 0.0 if zp is None else np.repeat(zp, block, axis=axis).take(range(q.shape[axis]), axis=axis)
    else:
        shape = [1] * q.ndim
        shape[axis] = -1
        s, z = scale.reshape(shape), (0.0 if zp is None else zp.reshape(shape))
    return ((q - z) * s).astype(np.float32)


def float_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with every weight DequantizeLinear folded to a float initializer (same shapes, dequantized values)."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    new_inits, drop, rename = {}, set(), {}
    for n in g.node:
        if n.op_type != "DequantizeLinear":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        axis, block = int(attrs.get("axis", 1)), int(attrs.get("block_size", 0))
        zp = n.input[2] if len(n.input) > 2 and n.input[2] else None
        if all(i in inits for i in n.input if i):
            w = _dequantize(_array(inits[n.input[0]]), _array(inits[n.input[1]]), _array(inits[zp]) if zp else None,
                            axis, block)
            new_inits[n.output[0]] = numpy_helper.from_array(w, n.output[0])
            drop.add(id(n))
            continue
        rows, scales = producer.get(n.input[0]), producer.get(n.input[1])  # Gather(E_q, ids) -> DQ(rows, Gather(s, ids))
        if (rows is not None and scales is not None and rows.op_type == scales.op_type == "Gather"
                and rows.input[0] in inits and scales.input[0] in inits and zp is None):
            table = _array(inits[rows.input[0]]) * _array(inits[scales.input[0]]).reshape(-1, 1)
            name = rows.input[0] + "_float"
            new_inits[name] = numpy_helper.from_array(table.astype(np.float32), name)
            rows.input[0] = name
            rename[n.output[0]] = rows.output[0]
            drop.update({id(n), id(scales)})
    nodes = [n for n in g.node if id(n) not in drop]
    for n in nodes:
        for i, x in enumerate(n.input):
            if x in rename:
                n.input[i] = rename[x]
    for o in g.output:
        if o.name in rename:
            raise ValueError(f"graph output {o.name} is a dequantized embedding")
    out = helper.make_graph(nodes, g.name, list(g.input), list(g.output), [])
    used = {x for n in nodes for x in n.input}
    out.initializer.extend(t for t in g.initializer if t.name in used and t.name not in new_inits)
    out.initializer.extend(t for name, t in new_inits.items() if name in used)
    fm = helper.make_model(out, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    return fm


def embedding_cast_mul(model: onnx.ModelProto) -> int:
    """Rewrite, in place, DequantizeLinear(Gather(E_q, ids), Gather(scale, ids)) (the per-row embedding form) as
    Mul(Cast(Gather(E_q, ids), float), Gather(scale, ids)); returns how many were rewritten."""
    g = model.graph
    inits = {t.name for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    count = 0
    for i, n in enumerate(list(g.node)):
        if n.op_type != "DequantizeLinear" or n.input[0] in inits:
            continue
        rows = producer.get(n.input[0])
        if rows is None or rows.op_type != "Gather" or (len(n.input) > 2 and n.input[2]):
            continue
        cast = helper.make_node("Cast", [n.input[0]], [n.input[0] + "_float"], to=TensorProto.FLOAT,
                                name=n.name + "_cast")
        mul = helper.make_node("Mul", [n.input[0] + "_float", n.input[1]], list(n.output), name=n.name + "_mul")
        pos = list(g.node).index(n)
        g.node.remove(n)
        g.node.insert(pos, mul)
        g.node.insert(pos, cast)
        count += 1
    return count


def session(ort, path: str, provider: str, level: int | None = None, optimized: str | None = None, verbose=False):
    so = ort.SessionOptions()
    if level is not None:
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(level))
    if optimized:
        so.optimized_model_filepath = optimized
    if verbose:
        so.log_severity_level = 1
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if provider == "cuda" else ["CPUExecutionProvider"]
    return ort.InferenceSession(path, so, providers=providers)


def cpu_nodes(ort, path: str, level: int) -> list[str]:
    """The node-placement lines of onnxruntime's verbose log (a child process): what the CUDA provider left to the CPU."""
    code = (f"import onnxruntime as o; so=o.SessionOptions(); so.log_severity_level=0; "
            f"so.add_session_config_entry('session.qdq_matmulnbits_accuracy_level','{level}'); "
            f"o.InferenceSession({path!r}, so, providers=['CUDAExecutionProvider','CPUExecutionProvider'])")
    proc = subprocess.run(["python3", "-c", code], capture_output=True, text=True, env=os.environ)
    lines = (proc.stderr + proc.stdout).splitlines()
    out = []
    for i, ln in enumerate(lines):
        if "placed on [" in ln or "All nodes placed" in ln:
            out.append(ln.split("] ")[-1])
            if "CPUExecutionProvider" in ln:
                out.extend(x.strip() for x in lines[i + 1:i + 16] if x.startswith((" ", "\t")))
    return out[:40]


def perplexity(sess, windows: np.ndarray) -> tuple[float, np.ndarray]:
    nll, count, args = 0.0, 0, []
    for w in windows:
        x = w[None].astype(np.int64)
        logits = sess.run(None, {"input_ids": x})[0][0, :-1].astype(np.float64)
        mx = logits.max(-1)
        lse = mx + np.log(np.exp(logits - mx[:, None]).sum(-1))
        nll += float((lse - logits[np.arange(len(x[0]) - 1), x[0, 1:]]).sum())
        count += len(x[0]) - 1
        args.append(logits.argmax(-1))
    return float(np.exp(nll / count)), np.concatenate(args)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--windows", required=True)
    ap.add_argument("--out")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--n-windows", type=int, default=40)
    ap.add_argument("--embedding-cast", action="store_true",
                    help="first rewrite the embedding's Gather -> DequantizeLinear as Gather -> Cast -> Mul")
    args = ap.parse_args()
    import onnxruntime as ort

    result = {"onnxruntime": ort.__version__, "onnx": onnx.__version__, "providers": ort.get_available_providers()}
    try:
        result["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                        "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    except OSError:
        result["gpu"] = None
    tmp = tempfile.mkdtemp()
    if args.embedding_cast:
        model = onnx.load(args.model)
        result["embedding_cast_mul_rewrites"] = embedding_cast_mul(model)
        args.model = os.path.join(tmp, "int4_cast.onnx")
        onnx.save(model, args.model)
    fp32 = os.path.join(tmp, "fp32_from_int4.onnx")
    t = time.perf_counter()
    onnx.save(float_model(onnx.load(args.model)), fp32)
    result["fp32_rebuilt_s"] = round(time.perf_counter() - t, 1)
    result["bytes"] = {"int4": os.path.getsize(args.model), "fp32_rebuilt": os.path.getsize(fp32)}
    models = {"int4": args.model, "fp32": fp32}
    sessions, graphs = {}, {}
    for name, path in models.items():
        for level in ((0, 4) if name == "int4" else (0,)):
            opt = os.path.join(tmp, f"{name}_{level}_opt.onnx")
            sessions[(name, level)] = session(ort, path, "cuda", level, opt)
            ops = Counter(n.op_type for n in onnx.load(opt, load_external_data=False).graph.node)
            graphs[f"{name}/level{level}"] = {k: ops[k] for k in ("MatMulNBits", "MatMul", "DequantizeLinear",
                                                                 "Gather", "GatherBlockQuantized") if ops[k]}
            result.setdefault("cpu_placed", {})[f"{name}/level{level}"] = cpu_nodes(ort, path, level)
    result["optimized_ops"] = graphs
    rng = np.random.default_rng(0)
    lat = []
    for n in (1, 128):
        feed = {"input_ids": rng.integers(0, 49152, (1, n)).astype(np.int64)}
        for k, s in list(sessions.items()):
            try:
                for _ in range(5):
                    s.run(None, feed)
            except Exception as exc:  # noqa: BLE001 - recorded, the others still run
                result.setdefault("errors", {})[f"{k[0]}/level{k[1]}"] = str(exc).splitlines()[0][:400]
                del sessions[k]
        times = {k: [] for k in sessions}
        for _ in range(args.repeats):
            for k, s in sessions.items():
                t = time.perf_counter()
                s.run(None, feed)
                times[k].append(time.perf_counter() - t)
        for (name, level), ts in times.items():
            med = statistics.median(ts)
            lat.append({"model": name, "accuracy_level": level, "tokens": n, "median_ms": round(1000 * med, 3),
                        "tokens_per_s": round(n / med, 1), "repeats": args.repeats})
    result["latency_cuda"] = lat
    windows = np.load(args.windows)["input_ids"][: args.n_windows]
    acc = {}
    ppl_cpu, arg_cpu = perplexity(session(ort, args.model, "cpu", 0), windows)
    acc["int4_cpu_level0"] = {"ppl": round(ppl_cpu, 3)}
    for level in (0, 4):
        if ("int4", level) not in sessions:
            continue
        ppl, arg = perplexity(sessions[("int4", level)], windows)
        acc[f"int4_cuda_level{level}"] = {"ppl": round(ppl, 3), "top1_agree_with_cpu": round(float((arg == arg_cpu).mean()), 4)}
    result["accuracy"] = acc
    result["windows"] = int(len(windows))
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
