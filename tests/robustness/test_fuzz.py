"""Fuzzing qpass.quantize with broken models: it either succeeds or raises a QpassError, never anything else,
and every model it returns (or writes) passes the full ONNX checker.

Two properties, each bounded (max_examples=60, no deadline; QPASS_FUZZ_EXAMPLES=N for a deeper run):

* byte mutations of a valid model's serialized file (bit flips, inserted / deleted / overwritten bytes,
  truncation), quantized from a temporary path;
* field mutations of a valid ModelProto (a wrong input dtype, a dangling node input, a duplicated
  output name, a negative or zero dim, a removed initializer, a bogus opset or IR version, an unknown
  op, broken attributes, non-finite or huge weights, a renamed input, a cycle, ...), quantized in memory.

A PassError that wraps anything but a PreconditionError counts as a crash: it is an exception inside a
pass, or a pass leaving an invalid graph, on a model the loader accepted.

Calibration data: a few small random feeds matching the inputs of the model before mutation (so a
mutation of an input's dtype or shape also exercises the calibration-data checks), or of the
mutated model where that is possible.
"""
from __future__ import annotations

import os
import tempfile
import traceback
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from onnx import TensorProto, numpy_helper

import qpass
from qpass.errors import PassError, PreconditionError, QpassError
from tests import builders

#: QPASS_FUZZ_EXAMPLES=2000 for a deeper local run
SETTINGS = settings(max_examples=int(os.environ.get("QPASS_FUZZ_EXAMPLES", "60")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

_BASE: dict[str, onnx.ModelProto] = {}


def base_model(name: str) -> onnx.ModelProto:
    if name not in _BASE:
        _BASE[name] = {
            "conv": builders.conv_model,
            "conv_const_node": lambda: builders.conv_model(weight_as_constant_node=True),
            "gemm": builders.gemm_model,
            "matmul": builders.matmul_model,
            "conv_transpose": builders.conv_transpose_model,
            "digits": lambda: onnx.load(str(builders.DIGITS_MODEL)),
        }[name]()
    out = onnx.ModelProto()
    out.CopyFrom(_BASE[name])
    return out


MODELS = ["conv", "conv_const_node", "gemm", "matmul", "conv_transpose", "digits"]


def random_feeds(model: onnx.ModelProto, n: int = 3, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Small random feeds for the model's tensor inputs (dynamic or non-positive dims -> 2)."""
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = []
    for _ in range(n):
        feed = {}
        for vi in model.graph.input:
            if vi.name in inits:
                continue
            tt = vi.type.tensor_type
            shape = [d.dim_value if d.HasField("dim_value") and 0 < d.dim_value <= 64 else 2 for d in tt.shape.dim]
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
            if dtype.kind == "f":
                feed[vi.name] = rng.standard_normal(shape).astype(dtype)
            elif dtype.kind in "iu":
                feed[vi.name] = rng.integers(0, 3, shape).astype(dtype)
            elif dtype.kind == "b":
                feed[vi.name] = rng.integers(0, 2, shape).astype(bool)
            else:
                feed[vi.name] = np.full(shape, "a", dtype=object)
        feeds.append(feed)
    return feeds


def _feeds_for(original: onnx.ModelProto, mutated: onnx.ModelProto | None, use_mutated: bool) -> list[dict]:
    if use_mutated and mutated is not None:
        try:
            return random_feeds(mutated)
        except Exception:  # noqa: BLE001 - inputs the feed maker cannot express: use the original's
            pass
    return random_feeds(original)


def assert_valid_returned(result: qpass.QuantizeResult, written: Path | None) -> None:
    try:
        onnx.checker.check_model(result.model, full_check=True)
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"qpass returned a model the ONNX checker rejects: {type(exc).__name__}: {exc}")
    if written is not None:
        assert written.exists(), "qpass returned without writing the output"
        try:
            onnx.checker.check_model(str(written), full_check=True)
        except Exception as exc:  # noqa: BLE001
            pytest.fail(f"qpass wrote a model the ONNX checker rejects: {type(exc).__name__}: {exc}")


def run_quantize(model, feeds, out: Path | None) -> qpass.QuantizeResult | None:
    """quantize(); a QpassError is an accepted outcome (None), any other exception fails the test.

    So does a PassError that wraps anything but a PreconditionError: that is an exception inside a
    pass (or a pass leaving an invalid graph) on a model the loader accepted, i.e. a crash in a typed coat.
    """
    try:
        return qpass.quantize(model, calib=feeds, allow_empty=True, val_fraction=0.0, output=out)
    except PassError as exc:
        if isinstance(exc.__cause__, PreconditionError):
            return None
        pytest.fail(f"a pass failed inside qpass: {exc}\ncaused by: "
                    + "".join(traceback.format_exception(exc.__cause__)[-4:]) if exc.__cause__ else str(exc))
    except QpassError:
        return None
    except Exception as exc:  # noqa: BLE001 - the property under test
        pytest.fail("qpass.quantize raised a non-QpassError: "
                    + "".join(traceback.format_exception(exc)[-4:]))


# ---------------------------------------------------------------------------------------------- byte mutations
def _mutate_bytes(data: bytes, ops: list[tuple]) -> bytes:
    b = bytearray(data)
    for op, pos, arg in ops:
        if not b:
            break
        pos %= len(b)
        if op == "flip":
            b[pos] ^= 1 << (arg % 8)
        elif op == "set":
            b[pos] = arg % 256
        elif op == "insert":
            b[pos:pos] = bytes([arg % 256]) * (1 + arg % 7)
        elif op == "delete":
            del b[pos:pos + 1 + arg % 16]
        elif op == "truncate":
            del b[pos:]
    return bytes(b)


byte_ops = st.lists(st.tuples(st.sampled_from(["flip", "flip", "set", "insert", "delete", "truncate"]),
                              st.integers(0, 2**31), st.integers(0, 255)), min_size=1, max_size=4)


@SETTINGS
@given(name=st.sampled_from(MODELS), ops=byte_ops)
def test_byte_mutations_succeed_or_raise_qpass_error(name, ops):
    original = base_model(name)
    data = _mutate_bytes(original.SerializeToString(), ops)
    feeds = random_feeds(original)
    with tempfile.TemporaryDirectory(prefix="qpass-fuzz-") as tmp:
        src, out = Path(tmp) / "model.onnx", Path(tmp) / "model.qpass.onnx"
        src.write_bytes(data)
        result = run_quantize(src, feeds, out)
        if result is not None:
            assert_valid_returned(result, out)


# ---------------------------------------------------------------------------------------------- field mutations
def _pick(draw, seq):
    return seq[draw(st.integers(0, len(seq) - 1))] if len(seq) else None


def _real_inputs(m):
    inits = {t.name for t in m.graph.initializer}
    return [vi for vi in m.graph.input if vi.name not in inits]


def mutate_fields(draw, m: onnx.ModelProto) -> str:
    """Apply one drawn mutation to ``m`` in place; returns its description."""
    g = m.graph
    kind = draw(st.sampled_from([
        "input_dtype", "dangling_input", "duplicate_output", "duplicate_graph_output", "negative_dim", "zero_dim",
        "drop_shape", "remove_initializer", "bogus_opset", "bogus_domain", "ir_version", "unknown_op",
        "attribute", "weight_values", "initializer_dtype", "rename_input", "cycle", "remove_outputs",
        "remove_nodes", "duplicate_node_name", "empty_name", "output_dtype", "input_is_initializer",
    ]))
    nodes, inits, inputs = list(g.node), list(g.initializer), _real_inputs(m)
    if kind == "input_dtype" and inputs:
        vi = _pick(draw, inputs)
        vi.type.tensor_type.elem_type = draw(st.sampled_from(
            [TensorProto.INT64, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BOOL, TensorProto.STRING,
             TensorProto.UINT8, TensorProto.BFLOAT16, 0, 77]))
    elif kind == "dangling_input" and nodes:
        n = _pick(draw, nodes)
        if n.input:
            n.input[draw(st.integers(0, len(n.input) - 1))] = "no_such_tensor"
    elif kind == "duplicate_output" and len(nodes) >= 2:
        a, b = _pick(draw, nodes), _pick(draw, nodes)
        if a.output and b.output:
            a.output[0] = b.output[0]
    elif kind == "duplicate_graph_output" and g.output:
        g.output.append(g.output[0])
    elif kind in ("negative_dim", "zero_dim") and inputs:
        dims = _pick(draw, inputs).type.tensor_type.shape.dim
        if dims:
            d = dims[draw(st.integers(0, len(dims) - 1))]
            d.dim_value = draw(st.sampled_from([-1, -7])) if kind == "negative_dim" else 0
    elif kind == "drop_shape" and inputs:
        _pick(draw, inputs).type.tensor_type.ClearField("shape")
    elif kind == "remove_initializer" and inits:
        g.initializer.remove(_pick(draw, inits))
    elif kind == "bogus_opset":
        m.opset_import[0].version = draw(st.sampled_from([0, 1, 7, 9, 10, 12, 99, 10_000, -3]))
    elif kind == "bogus_domain":
        if nodes:
            _pick(draw, nodes).domain = "com.example.bogus"
        m.opset_import.add(domain="com.example.bogus", version=1)
    elif kind == "ir_version":
        m.ir_version = draw(st.sampled_from([0, 1, 2, 3, 4, 99]))
    elif kind == "unknown_op" and nodes:
        _pick(draw, nodes).op_type = draw(st.sampled_from(["NoSuchOp", "QuantizeLinear", "DequantizeLinear", "Conv", "Loop"]))
    elif kind == "attribute" and nodes:
        n = _pick(draw, nodes)
        name, value = draw(st.sampled_from([("pads", [-1, 0, 0, 0]), ("pads", [1, 1]), ("strides", [0, 0]),
                                            ("kernel_shape", [99, 99]), ("group", 3), ("transB", 5),
                                            ("alpha", float("nan")), ("axis", 9), ("dilations", [-2, 1])]))
        for a in list(n.attribute):
            if a.name == name:
                n.attribute.remove(a)
        n.attribute.append(onnx.helper.make_attribute(name, value))
    elif kind == "weight_values" and inits:
        t = _pick(draw, inits)
        try:
            arr = numpy_helper.to_array(t).copy()
        except Exception:  # noqa: BLE001 - an initializer an earlier mutation broke
            return kind + " (not applied)"
        if arr.dtype.kind == "f" and arr.size:
            fill = draw(st.sampled_from([np.nan, np.inf, -np.inf, 0.0, 1e38, -3e38, 1e-45]))
            where = draw(st.sampled_from(["one", "all"]))
            if where == "one":
                arr.flat[draw(st.integers(0, arr.size - 1))] = fill
            else:
                arr[...] = fill
            t.CopyFrom(numpy_helper.from_array(arr.astype(arr.dtype), t.name))
    elif kind == "initializer_dtype" and inits:
        t = _pick(draw, inits)
        t.data_type = draw(st.sampled_from([TensorProto.INT8, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.INT32]))
    elif kind == "rename_input" and inputs:
        old = _pick(draw, inputs)
        new = "renamed_" + old.name
        for n in nodes:
            for i, x in enumerate(n.input):
                if x == old.name:
                    n.input[i] = new
        old.name = new
    elif kind == "cycle" and nodes:
        n = _pick(draw, nodes)
        if n.input and n.output:
            n.input[0] = n.output[0]
    elif kind == "remove_outputs":
        del g.output[:]
    elif kind == "remove_nodes" and nodes:
        g.node.remove(_pick(draw, nodes))
    elif kind == "duplicate_node_name" and len(nodes) >= 2:
        nodes[1].name = nodes[0].name = "same"
    elif kind == "empty_name" and nodes:
        n = _pick(draw, nodes)
        n.name = ""
        if n.output:
            n.output[0] = ""
    elif kind == "output_dtype" and g.output:
        g.output[0].type.tensor_type.elem_type = draw(st.sampled_from([TensorProto.INT64, TensorProto.DOUBLE]))
    elif kind == "input_is_initializer" and inputs:
        # an initializer that shadows a real input (IR >= 4: a default value the feed overrides)
        vi = _pick(draw, inputs)
        try:
            value = random_feeds(m, n=1)[0][vi.name]
        except Exception:  # noqa: BLE001 - an input an earlier mutation made inexpressible
            return kind + " (not applied)"
        g.initializer.append(numpy_helper.from_array(value, vi.name))
    return kind


@SETTINGS
@given(name=st.sampled_from(MODELS), data=st.data(), count=st.integers(1, 3), use_mutated=st.booleans(),
       as_path=st.booleans())
def test_field_mutations_succeed_or_raise_qpass_error(name, data, count, use_mutated, as_path):
    original = base_model(name)
    m = base_model(name)
    kinds = [mutate_fields(data.draw, m) for _ in range(count)]
    note(f"mutations: {kinds}")
    feeds = _feeds_for(original, m, use_mutated)
    with tempfile.TemporaryDirectory(prefix="qpass-fuzz-") as tmp:
        out = Path(tmp) / "out.onnx"
        src: onnx.ModelProto | Path = m
        if as_path:
            src = Path(tmp) / "model.onnx"
            src.write_bytes(m.SerializeToString())
        before = m.SerializeToString(deterministic=True)
        result = run_quantize(src, feeds, out)
        assert m.SerializeToString(deterministic=True) == before, "qpass mutated its input ModelProto"
        if result is not None:
            assert_valid_returned(result, out)


def test_unmutated_models_quantize():
    """The fuzz bases themselves are fine: each quantizes and passes the checker (guards the harness)."""
    for name in MODELS:
        m = base_model(name)
        with tempfile.TemporaryDirectory(prefix="qpass-fuzz-") as tmp:
            out = Path(tmp) / "out.onnx"
            result = qpass.quantize(m, calib=random_feeds(m), allow_empty=True, val_fraction=0.0, output=out)
            assert result.report.quantized_nodes, name
            assert_valid_returned(result, out)
