"""Original vs quantized on onnxruntime execution providers: per-output metrics, per-layer error, placement, latency.

``validate`` is tool-agnostic: it compares any two models with the same inputs and outputs, including
ones quantized by other tools. A provider that is not available is reported as such; a load or run
failure on a provider is a finding in the result, never a crash.
"""
from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import onnx

from ..io import infer_shapes_skeleton
from ..ops import RANGE_FOLDING
from ..runtime import (PROVIDERS, ModelFile, available_providers, extra_outputs, make_session, profile_placement,
                       release_freed_memory, with_cpu_fallback)

_DQ_SUFFIXES = ("_dequantized", "_DequantizeLinear_Output")
#: ops whose outputs are not worth ranking as layers (shapes, constants, pure data movement)
_NOT_LAYERS = frozenset({"Constant", "Shape", "Size", "Gather", "Unsqueeze", "Squeeze", "Reshape", "Identity", "Flatten",
                         "Transpose", "Concat", "Slice", "Cast", "ConstantOfShape", "Range", "Equal", "Where", "Not",
                         "Expand", "QuantizeLinear", "DequantizeLinear"})
#: element types whose error the per-layer analysis measures; other tensors (bool, integers) are exact
_FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE})


def default_providers() -> list[str]:
    """CPU always; CUDA too when this onnxruntime has it."""
    return ["cpu"] + (["cuda"] if PROVIDERS["cuda"] in available_providers() else [])


def first_provider(providers) -> str:
    """The first of ``providers`` (keys or onnxruntime names; empty: the default ones) this onnxruntime has; the
    provider :func:`validate`'s top-level ``outputs`` come from."""
    have = available_providers()
    return next((PROVIDERS.get(k, k) for k in (list(providers) or default_providers()) if PROVIDERS.get(k, k) in have),
                PROVIDERS["cpu"])


# ---------------------------------------------------------------------------------------------- metrics
@dataclass
class OutputStats:
    name: str
    signal: float = 0.0
    noise: float = 0.0
    max_abs: float = 0.0
    cosines: list = field(default_factory=list)
    top1_same: int = 0
    top1_total: int = 0
    correct_ref: int = 0
    correct_q: int = 0
    labelled: int = 0
    #: language-model outputs (logits [B, S, V] of token inputs [B, S]): next-token NLL sums and KL(ref || quantized)
    nll_ref: float = 0.0
    nll_q: float = 0.0
    kl: float = 0.0
    tokens: int = 0

    def add_language_model(self, ref: np.ndarray, out: np.ndarray, ids: np.ndarray) -> None:
        """Next-token log-likelihood of ``ids`` under both models (perplexity) and KL(softmax(ref) || softmax(out)),
        per position, for logits [B, S, V] of the token ids [B, S] that produced them (in float64, a block of
        positions at a time: :data:`SLICE` elements a temporary)."""
        ref, out, ids = np.asarray(ref), np.asarray(out), np.asarray(ids)
        step = max(1, SLICE // max(ref.shape[-1], 1))
        pick = np.take_along_axis
        for b in range(ref.shape[0]):
            for s in range(0, ref.shape[1] - 1, step):
                e = min(s + step, ref.shape[1] - 1)
                r, q = ref[b, s:e].astype(np.float64), out[b, s:e].astype(np.float64)
                target = ids[b, s + 1:e + 1]
                lse_r, lse_q = _logsumexp(r), _logsumexp(q)
                self.nll_ref += float(np.sum(lse_r - pick(r, target[..., None], -1)[..., 0]))
                self.nll_q += float(np.sum(lse_q - pick(q, target[..., None], -1)[..., 0]))
                p_ref = np.exp(r - lse_r[..., None])
                self.kl += float(np.sum(np.sum(p_ref * (r - q), axis=-1) - (lse_r - lse_q)))
                self.tokens += target.size

    def add(self, ref: np.ndarray, out: np.ndarray, label: Any = None) -> None:
        ref, out = np.asarray(ref), np.asarray(out)
        if ref.shape != out.shape:
            raise ValueError(f"output '{self.name}' shape {out.shape} differs from the original's {ref.shape}")
        rr, qq, rq, noise, max_abs = 0.0, 0.0, 0.0, 0.0, 0.0
        for r, q in slices64(ref, out):
            err = q - r
            rr, qq, rq = rr + float(np.dot(r, r)), qq + float(np.dot(q, q)), rq + float(np.dot(r, q))
            noise += float(np.dot(err, err))
            max_abs = max(max_abs, float(np.max(np.abs(err))))
        self.signal += rr
        self.noise += noise
        self.max_abs = max(self.max_abs, max_abs)
        nr, nq = math.sqrt(rr), math.sqrt(qq)
        self.cosines.append(1.0 if nr == 0 and nq == 0 else rq / max(nr * nq, 1e-30))
        if ref.ndim >= 2 and ref.shape[-1] > 1:
            r, q = ref.argmax(-1).ravel(), out.argmax(-1).ravel()
            self.top1_same += int(np.sum(r == q))
            self.top1_total += r.size
            if label is not None:
                lab = np.asarray(label).ravel()
                if lab.size == r.size and lab.dtype.kind in "iu":
                    self.correct_ref += int(np.sum(r == lab))
                    self.correct_q += int(np.sum(q == lab))
                    self.labelled += r.size

    @property
    def sqnr(self) -> float:
        return sqnr_db(self.signal, self.noise)

    def to_dict(self) -> dict:
        d = {"output": self.name, "sqnr_db": _json_float(self.sqnr),
             "cosine_mean": float(np.mean(self.cosines)) if self.cosines else None,
             "cosine_min": float(np.min(self.cosines)) if self.cosines else None, "max_abs_error": self.max_abs}
        if self.top1_total:
            d["top1_agreement"] = self.top1_same / self.top1_total
        if self.tokens:
            d["perplexity_fp32"] = math.exp(self.nll_ref / self.tokens)
            d["perplexity_quantized"] = math.exp(self.nll_q / self.tokens)
            d["kl_mean"] = self.kl / self.tokens
            d["tokens"] = self.tokens
        if self.labelled:
            d["accuracy_fp32"] = self.correct_ref / self.labelled
            d["accuracy_quantized"] = self.correct_q / self.labelled
            d["labelled_samples"] = self.labelled
        return d


#: elements of one float64 temporary in the error sums (8 MB): a language model's logits ([1, 256, 49152], 50 MB in
#: float32) made five 100 MB float64 temporaries at once when converted whole
SLICE = 1 << 20


def slices64(*arrays: np.ndarray):
    """The flattened ``arrays`` (of one size) side by side, :data:`SLICE` elements at a time, as float64 copies."""
    flat = [np.ravel(a) for a in arrays]
    for i in range(0, flat[0].size, SLICE):
        yield [f[i:i + SLICE].astype(np.float64) for f in flat]


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1)
    return m + np.log(np.exp(x - m[..., None]).sum(axis=-1))


def token_ids(feed: dict, logits: np.ndarray) -> np.ndarray | None:
    """The integer input [B, S] that logits [B, S, V] (V > 1) are next-token scores of: every value a valid index
    below V; of several such inputs, the one named ``input_ids`` (an attention mask is another [B, S] input)."""
    if np.ndim(logits) != 3 or np.shape(logits)[-1] < 2:
        return None
    vocab = np.shape(logits)[-1]
    found = {k: np.asarray(v) for k, v in feed.items() if np.asarray(v).dtype.kind in "iu"
             and np.shape(v) == np.shape(logits)[:2] and np.size(v) and 0 <= np.min(v) and np.max(v) < vocab}
    if len(found) > 1:
        found = {k: v for k, v in found.items() if k == "input_ids"}
    return next(iter(found.values())) if len(found) == 1 else None


def sqnr_db(signal: float, noise: float) -> float:
    if noise == 0:
        return math.inf
    if signal <= 0:
        return -math.inf
    return 10 * math.log10(signal / noise)


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


# ---------------------------------------------------------------------------------------------- sessions
#: onnxruntime's session setting for the MatMulNBits it fuses from DequantizeLinear -> MatMul (4, int8 activations,
#: unless told otherwise)
ACCURACY_LEVEL = "session.qdq_matmulnbits_accuracy_level"


def blocked_weight_matmuls(model: onnx.ModelProto) -> int:
    """In a weight-only model (one with a block-wise DequantizeLinear of constants), the MatMul nodes whose weight is
    a DequantizeLinear of constants, directly or through a Transpose (a tied head): what onnxruntime may fuse into
    MatMulNBits. 0 for any other model."""
    inits = {t.name for t in model.graph.initializer}
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    if not any(a.name == "block_size" and a.i for n in dq for a in n.attribute):
        return 0
    weights = {n.output[0] for n in dq}
    weights |= {n.output[0] for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in weights}
    return sum(1 for n in model.graph.node if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in weights)


def _session(model: onnx.ModelProto | ModelFile, provider: str, *, profile_prefix: str | None = None, outputs: list[str] | None = None,
             spin: bool = True, config: dict[str, str] | None = None):
    """A session on ``provider`` (CPU as the fallback). ``spin=False`` turns off the intra-op threads' spin-wait,
    for timing two sessions in turn: a session's threads otherwise keep spinning after its run and slow the
    next session's (measured: alternated Magika runs 2-4x slower than either alone). onnxruntime's default
    optimisation level (all), and its own exception when the model does not load (reported as a finding)."""
    settings = dict(what=None, level=None, spin=spin, profile_prefix=profile_prefix, config=config)
    if isinstance(model, ModelFile):  # extra outputs through a copy of the small .onnx file, deleted once loaded
        target = ModelFile(model.with_outputs(outputs)) if outputs else model
        try:
            return make_session(target, with_cpu_fallback(provider), **settings)
        finally:
            if target is not model:
                target.path.unlink(missing_ok=True)
    with extra_outputs(model, outputs or []):  # the session is made before the outputs are removed again
        return make_session(model, with_cpu_fallback(provider), **settings)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:500] if text else type(exc).__name__


#: A quantized model whose median latency exceeds the original's by more than this factor gets a finding.
SLOWER_THAN_ORIGINAL = 1.10


def _slower_finding(provider: str, lat: dict, share: dict[str, float] | None) -> str:
    """Say that the quantized model ran slower than the original, and where its time went (profile shares)."""
    text = (f"{provider}: the quantized model ran x{lat['ratio']:.2f} the original's latency ({lat['quantized_ms']:.3g} vs "
            f"{lat['fp32_ms']:.3g} ms, median of {lat['repeats']} alternated runs)")
    if share:
        top = ", ".join(f"{op} {100 * v:.0f} %" for op, v in list(share.items())[:4])
        text += (f"; its node time went to {top}. Float ops between a DequantizeLinear and a QuantizeLinear (ops "
                 "without an integer kernel) can cost more than the integer kernels save; keeping the compute nodes "
                 "that feed them in float (--exclude-before OP, --exclude NAME) may help")
    return text


def typed_feed(session, feed: dict) -> dict:
    """``feed`` with float32 arrays cast to float16 where ``session``'s model takes float16 inputs (a model
    converted with half inputs, validated on the original's data)."""
    half = {i.name for i in session.get_inputs() if i.type == "tensor(float16)"}
    if not half:
        return feed
    return {k: (v.astype(np.float16) if k in half and getattr(v, "dtype", None) == np.float32 else v)
            for k, v in feed.items()}


def _latency(ref, q, feed: dict, repeats: int) -> dict:
    qfeed = typed_feed(q, feed)
    for s, f in ((ref, feed), (q, qfeed)):
        for _ in range(3):
            s.run(None, f)
    times: dict[str, list[float]] = {"fp32": [], "quantized": []}
    for _ in range(repeats):
        for key, s, f in (("fp32", ref, feed), ("quantized", q, qfeed)):
            t = time.perf_counter()
            s.run(None, f)
            times[key].append(time.perf_counter() - t)
    f, qq = statistics.median(times["fp32"]) * 1e3, statistics.median(times["quantized"]) * 1e3
    return {"fp32_ms": round(f, 4), "quantized_ms": round(qq, 4), "ratio": round(qq / f, 4) if f else None,
            "repeats": repeats}


# ---------------------------------------------------------------------------------------------- per layer
def _matched_tensors(original: onnx.ModelProto, quantized: onnx.ModelProto) -> dict[str, str]:
    """original tensor name -> the quantized model's float tensor holding the same value (same name, or its DQ)."""
    q_names: set[str] = set()
    for n in quantized.graph.node:
        q_names.update(o for o in n.output if o)
    out: dict[str, str] = {}
    produced = {o for n in original.graph.node for o in n.output if o}
    for name in q_names:
        base = name
        for suffix in _DQ_SUFFIXES:
            if name.endswith(suffix):
                base = name[: -len(suffix)]
        if base in produced and (base == name or base not in q_names):
            out.setdefault(base, name)
    return out


def _elem_types(model: onnx.ModelProto) -> tuple[dict[str, int], dict[str, list]]:
    """The element type and the shape (dims: ints, dim_param strings or None) of each tensor of ``model`` that shape
    inference (or the model itself) knows."""
    graph = infer_shapes_skeleton(model).graph
    types = {t.name: t.data_type for t in graph.initializer}
    shapes: dict[str, list] = {}
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        if vi.type.WhichOneof("value") == "tensor_type" and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
            if vi.type.tensor_type.HasField("shape"):
                shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                   for d in vi.type.tensor_type.shape.dim]
    return types, shapes


def _sizes(types: dict[str, int], shapes: dict[str, list], inputs: list[str], feed: dict) -> dict[str, int]:
    """Bytes of each tensor whose shape is known once the graph inputs' symbolic dims take ``feed``'s sizes."""
    bound: dict[str, int] = {}
    for name in inputs:
        for d, n in zip(shapes.get(name, []), np.shape(feed.get(name, ()))):
            if isinstance(d, str):
                bound[d] = n
    out = {}
    for name, dims in shapes.items():
        values = [d if isinstance(d, int) else bound.get(d) for d in dims]
        if all(v is not None for v in values) and name in types:
            out[name] = int(np.prod(values, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(types[name]).itemsize
    return out


#: bytes of requested activations one per-layer run holds per model, about: more tensors are measured in chunks, a
#: session pair per chunk (the float intermediates of a 135M language model on a 256-token window: 0.94 GB a model)
PER_LAYER_RUN_BYTES = 128 * 2**20


def per_layer_error(original: onnx.ModelProto | ModelFile, quantized: onnx.ModelProto | ModelFile, samples: list,
                    provider: str, *, one_at_a_time: bool | None = None) -> list[dict]:
    """Accumulated SQNR at every node's output (shape and data-movement ops aside), and the noise each adds, ranked.

    A node's added noise is the growth of the noise-to-signal ratio from its worst input to its output
    (both measured against the original model on the same samples); the node that adds the most comes
    first. Graph inputs count as exact. A node whose output is folded away (a Conv whose Relu the
    quantized model fused) is measured at the folded activation's output.

    Only float tensors are asked of onnxruntime (types from shape inference; a tensor of unknown type is asked
    for too, and typed by onnxruntime). A bool or integer tensor counts as exact where a node reads it, and a
    node whose output is not float is not ranked. The tensors are asked for in chunks of about
    ``PER_LAYER_RUN_BYTES`` of activations a run (sizes from shape inference with the first sample's input sizes;
    a tensor of unknown shape counts as the mean size measured so far), so memory does not grow with the layers.
    ``one_at_a_time``: one session in memory at a time; the original's outputs of a chunk wait on disk (a temporary
    folder) while the quantized model's session runs, and are read back one tensor at a time. False: the two
    sessions of a chunk side by side (the same values, more memory). None (default): one at a time when the
    original is a :class:`ModelFile` (a model whose weights reach FILE_SESSION_BYTES, where the sessions' weights
    dominate); on a small model the files cost time for little memory (detector: validate 42.7 -> 70.4 s).
    """
    if one_at_a_time is None:
        one_at_a_time = isinstance(original, ModelFile)
    graph_model = original.skeleton() if isinstance(original, ModelFile) else original  # what the graph reads
    matched = _matched_tensors(graph_model, quantized.skeleton() if isinstance(quantized, ModelFile) else quantized)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph_model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    measured_at: dict[int, str] = {}
    for idx, n in enumerate(graph_model.graph.node):
        if n.op_type in _NOT_LAYERS or not n.output:
            continue
        y = n.output[0]
        if y not in matched and len(readers.get(y, [])) == 1 and readers[y][0].op_type in RANGE_FOLDING:
            y = readers[y][0].output[0]
        if y in matched:
            measured_at[idx] = y
    nodes = [(graph_model.graph.node[i], y) for i, y in measured_at.items()]
    wanted = sorted({t for n, y in nodes for t in list(n.input) + [y] if t in matched})
    types, shapes = _elem_types(graph_model)
    not_float = {t for t in wanted if types.get(t, onnx.TensorProto.FLOAT) not in _FLOAT_TYPES}
    asked = [t for t in wanted if t not in not_float]
    if not asked:
        return []
    sig = {t: 0.0 for t in wanted}
    noise = {t: 0.0 for t in wanted}
    inputs = [i.name for i in graph_model.graph.input]
    known = _sizes(types, shapes, inputs, samples[0][0]) if samples else {}
    measured: dict[str, int] = {}
    start = 0
    folder = tempfile.TemporaryDirectory(prefix="qpass-layers-") if one_at_a_time else None
    release_freed_memory()  # the validation runs' sessions are gone: their memory goes back before more sessions
    while start < len(asked):  # sessions per chunk of tensors: one run holds a chunk's activations only
        guess = (sum(measured.values()) // len(measured)) if measured else 2**20  # a tensor of unknown shape
        part, total = [], 0
        for t in asked[start:]:
            size = known.get(t, guess)
            if part and total + size > PER_LAYER_RUN_BYTES:
                break
            part.append(t)
            total += size
        ref = _session(original, provider, outputs=part)
        if one_at_a_time:  # the original's outputs wait on disk while the quantized model runs
            for i, (feed, _) in enumerate(samples):
                for j, a in enumerate(ref.run(part, feed)):
                    np.save(os.path.join(folder.name, f"{i}-{j}.npy"), np.asarray(a), allow_pickle=True)
            del ref
            release_freed_memory()
        q = _session(quantized, provider, outputs=[matched[t] for t in part])
        for i, (feed, _) in enumerate(samples):
            rv = (os.path.join(folder.name, f"{i}-{j}.npy") for j in range(len(part))) if one_at_a_time \
                else ref.run(part, feed)
            qv = q.run([matched[t] for t in part], feed)
            for t, a, b in zip(part, rv, qv):
                a = np.load(a, allow_pickle=True) if one_at_a_time else np.asarray(a)
                b = np.asarray(b)
                measured.setdefault(t, a.nbytes)
                if a.dtype.kind != "f":
                    not_float.add(t)  # its type was not known before the run
                if a.shape != b.shape or a.dtype.kind != "f" or b.dtype.kind != "f":
                    continue
                for x, y in slices64(a, b):
                    d = x - y
                    sig[t] += float(np.dot(x, x))
                    noise[t] += float(np.dot(d, d))
            rv = qv = a = b = None
        ref = q = None
        release_freed_memory()
        start += len(part)
    if folder is not None:
        folder.cleanup()  # (on an error, the object's finalizer removes it)

    def nsr(t: str) -> float:
        return noise[t] / sig[t] if sig.get(t, 0.0) > 0 else (0.0 if noise.get(t, 0.0) == 0 else math.inf)

    graph_inputs = {i.name for i in graph_model.graph.input}
    constants = {t.name for t in graph_model.graph.initializer} | {o for n in graph_model.graph.node if n.op_type == "Constant" for o in n.output}
    producer = {o: n for n in graph_model.graph.node for o in n.output}

    def input_nsr(t: str, depth: int = 0) -> float | None:
        """NSR of a node input: measured, exact (graph input or constant), or that of the nearest measured
        tensors upstream when this one was folded away in the quantized model (a Conv before its BN)."""
        if t in sig:
            return nsr(t)
        if not t or t in graph_inputs or t in constants:
            return 0.0
        p = producer.get(t)
        if p is None or depth >= 4:
            return None
        vals = [input_nsr(i, depth + 1) for i in p.input]
        known = [v for v in vals if v is not None]
        return max(known) if known and len(known) == len(vals) else None

    rows = []
    for n, y in nodes:
        if y in not_float:
            continue
        ins = [input_nsr(t) for t in n.input]
        if any(v is None for v in ins):
            in_nsr = None
        else:
            in_nsr = max(ins, default=0.0)
        added = nsr(y) - (in_nsr or 0.0)
        rows.append({"node": n.name or y, "op_type": n.op_type, "tensor": y,
                     "sqnr_db": _json_float(sqnr_db(sig[y], noise[y])),
                     "input_sqnr_db": None if in_nsr is None else _json_float(-10 * math.log10(in_nsr) if in_nsr > 0 else math.inf),
                     "added_noise_db": _json_float(10 * math.log10(added) if added > 0 else -math.inf),
                     "_added": added})
    # an input that exists only in integer form in the quantized model cannot be measured: the node's whole
    # accumulated noise is then attributed to it (input_sqnr_db is None)
    rows.sort(key=lambda r: -r["_added"] if math.isfinite(r["_added"]) else -1e300)
    for r in rows:
        del r["_added"]
    return rows


# ---------------------------------------------------------------------------------------------- entry point
def validate(original: onnx.ModelProto | ModelFile, quantized: onnx.ModelProto | ModelFile, samples: Iterable[tuple[dict, Any]], *,
             providers: list[str] | None = None, per_layer: bool = True, latency: bool = True,
             placement: bool = True, latency_repeats: int = 20, layer_samples: int = 4) -> dict:
    """Compare ``quantized`` with ``original`` on ``samples`` (pairs of feed and optional label) on each provider.

    Returns a JSON-ready dict: ``samples``, ``providers`` (one entry per requested provider with its
    outputs' metrics, placement, latency, or why it could not run), ``per_layer`` (ranked), ``findings``.
    The first available provider's per-output metrics are also under ``outputs``, for convenience.
    ``original`` and ``quantized`` may be :class:`~qpass.runtime.ModelFile` s: their sessions are made from the file
    (a large model's weights are then not held by Python).
    """
    samples = list(samples)
    providers = providers or default_providers()
    weight_only_matmuls = blocked_weight_matmuls(quantized.skeleton() if isinstance(quantized, ModelFile) else quantized)
    result: dict[str, Any] = {"samples": len(samples), "providers": [], "per_layer": [], "findings": []}
    have = available_providers()
    for key in providers:
        prov = PROVIDERS.get(key, key)
        entry: dict[str, Any] = {"provider": prov, "available": prov in have}
        result["providers"].append(entry)
        if prov not in have:
            entry["note"] = f"{prov} is not available in this onnxruntime ({', '.join(have)})"
            continue
        try:
            # one pair of sessions per provider serves the metrics and then the latency (made without spin-wait for
            # that: see _session); building a session costs seconds and a copy of the weights on a large model
            ref = _session(original, prov, spin=not latency)
        except Exception as exc:  # noqa: BLE001 - a finding, not a crash
            entry["error"] = f"original model does not load: {_first_line(exc)}"
            result["findings"].append(f"{prov}: {entry['error']}")
            continue
        with tempfile.TemporaryDirectory(prefix="qpass-prof-") as tmp:
            try:
                q = _session(quantized, prov, profile_prefix=os.path.join(tmp, "q") if placement else None,
                             spin=not latency)
            except Exception as exc:  # noqa: BLE001
                entry["error"] = f"quantized model does not load: {_first_line(exc)}"
                result["findings"].append(f"{prov}: {entry['error']}")
                continue
            names = [o.name for o in ref.get_outputs()]
            stats = {n: OutputStats(n) for n in names}
            stats0 = {n: OutputStats(n) for n in names}
            try:
                # weight-only outputs: the same model again with float activations in MatMulNBits (accuracy level 0)
                q0 = _session(quantized, prov, config={ACCURACY_LEVEL: "0"}) if weight_only_matmuls else None
                runs = [(stats, q)] + ([(stats0, q0)] if q0 is not None else [])
                for feed, label in samples:
                    refs = ref.run(names, feed)
                    ids = {n: token_ids(feed, r) for n, r in zip(names, refs) if np.asarray(r).dtype.kind == "f"}
                    for table, session in runs:
                        for n, r, o in zip(names, refs, session.run(names, typed_feed(session, feed))):
                            if n in ids:
                                table[n].add(r, o, label)
                                if ids[n] is not None:
                                    table[n].add_language_model(r, o, ids[n])
            except Exception as exc:  # noqa: BLE001
                entry["error"] = f"run failed: {_first_line(exc)}"
                result["findings"].append(f"{prov}: {entry['error']}")
                continue
            entry["outputs"] = [s.to_dict() for s in stats.values() if s.cosines]
            if q0 is not None:
                entry["accuracy_level_0"] = [s.to_dict() for s in stats0.values() if s.cosines]
            if placement:
                entry["placement"] = profile_placement(q)
                if weight_only_matmuls:
                    formed = sum(ops.get("MatMulNBits", 0) for ops in entry["placement"]["ops_by_provider"].values())
                    entry["matmulnbits"] = {"formed": formed, "weight_only_matmuls": weight_only_matmuls}
                    if formed < weight_only_matmuls:
                        result["findings"].append(
                            f"{prov}: onnxruntime fused {formed} of {weight_only_matmuls} block-wise weight MatMuls into "
                            "MatMulNBits; the others dequantize their weight on every run")
                if prov != "CPUExecutionProvider":
                    fell_back = [n for n in entry["placement"]["nodes"] if n["provider"] != prov]
                    entry["placement"]["fallback_nodes"] = fell_back
                    if fell_back:
                        ops = sorted({n["op_type"] for n in fell_back})
                        result["findings"].append(f"{prov}: {len(fell_back)} node(s) fell back to the CPU ({', '.join(ops)}), "
                                                  f"{entry['placement']['memcpy_nodes']} Memcpy node(s)")
        if latency and samples:
            entry["latency"] = lat = _latency(ref, q, samples[0][0], latency_repeats)  # profiling ended above
            if lat["ratio"] is not None and lat["ratio"] > SLOWER_THAN_ORIGINAL:
                result["findings"].append(_slower_finding(prov, lat, entry.get("placement", {}).get("op_time_share")))
        del ref, q, q0
        release_freed_memory()  # the sessions' memory, before the next provider's (or the per-layer analysis's)
        if "outputs" not in result:
            result["outputs"] = entry["outputs"]
            result["provider"] = prov
    if per_layer and samples:
        prov = next((e["provider"] for e in result["providers"] if e.get("outputs") is not None), None)
        if prov:
            try:
                result["per_layer"] = per_layer_error(original, quantized, samples[:layer_samples], prov)
            except Exception as exc:  # noqa: BLE001 - analysis is best effort; say why it is missing
                result["findings"].append(f"per-layer analysis failed: {_first_line(exc)}")
    result.setdefault("outputs", [])
    return result
