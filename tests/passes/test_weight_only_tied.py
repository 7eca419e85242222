"""A head tied to the embedding table (an equal copy E^T, Transpose(E), Gemm transB=1 on E) reads the table's int8
rows: the table is stored once, the model runs in onnxruntime and stays close to the float model."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import qpass

V, D = 96, 32


def _tied_lm(form: str, seed: int = 0) -> onnx.ModelProto:
    """ids -> Gather(E [V, D]) -> Tanh -> head -> logits; the head's weight is the table: an equal copy E^T ("copy"),
    Transpose(E) ("transpose") or E itself in a Gemm with transB=1 ("gemm", 1-D ids)."""
    rng = np.random.default_rng(seed)
    e = rng.normal(0, 1, (V, D)).astype(np.float32)
    inits = [numpy_helper.from_array(e, "E")]
    nodes = [helper.make_node("Gather", ["E", "ids"], ["h"], name="embed"), helper.make_node("Tanh", ["h"], ["t"])]
    ids_shape, out_shape = ["B", "S"], ["B", "S", V]
    if form == "copy":
        inits.append(numpy_helper.from_array(np.ascontiguousarray(e.T), "W"))
        nodes.append(helper.make_node("MatMul", ["t", "W"], ["logits"], name="head"))
    elif form == "transpose":
        nodes += [helper.make_node("Transpose", ["E"], ["ET"], perm=[1, 0]),
                  helper.make_node("MatMul", ["t", "ET"], ["logits"], name="head")]
    else:
        ids_shape, out_shape = ["S"], ["S", V]
        nodes.append(helper.make_node("Gemm", ["t", "E"], ["logits"], name="head", transB=1))
    graph = helper.make_graph(nodes, "lm", [helper.make_tensor_value_info("ids", TensorProto.INT64, ids_shape)],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, out_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def _ids(form: str) -> dict[str, np.ndarray]:
    ids = np.array([0, 5, 95, 17, 5, 42], dtype=np.int64)
    return {"ids": ids if form == "gemm" else ids[None]}


def _big(model: onnx.ModelProto) -> list[tuple[tuple[int, ...], int]]:
    """(shape, element type) of the initializers with at least V values."""
    return sorted((tuple(t.dims), t.data_type) for t in model.graph.initializer if np.prod(t.dims) >= V)


def _quantize(model, **kw):
    return qpass.quantize(model, weight_only="int4", block_size=16, per_layer=False, latency=False, **kw)


@pytest.mark.parametrize("form", ["copy", "transpose", "gemm"])
def test_a_tied_head_reads_the_embedding_rows_stored_once(form):
    model = _tied_lm(form)
    out = _quantize(model)
    q = out.model
    if form == "transpose":  # planning leaves the Transpose to the rewrite, which says what it did
        assert [s["reason"] for s in out.report.skipped] == ["reads embedding table 'E' through Transpose: its int8 "
                                                             "rows (stored once)"]
    onnx.checker.check_model(q, full_check=True)
    # one table: int8 [V, D], plus its row scales ([V, 1] for the lookup, [V] for the head); no float table and no
    # second copy
    assert _big(q) == [((V,), TensorProto.FLOAT), ((V, 1), TensorProto.FLOAT), ((V, D), TensorProto.INT8)]
    head = next(n for n in q.graph.node if n.name == "head")
    producers = {o: n for n in q.graph.node for o in n.output}
    w = producers[head.input[1]]
    if form != "gemm":
        assert w.op_type == "Transpose"
        w = producers[w.input[0]]
    assert w.op_type == "DequantizeLinear"
    gather = next(n for n in q.graph.node if n.name == "embed")
    assert w.input[0] == gather.input[0]  # the head dequantizes the very rows the embedding gathers
    # the tied head reads exactly the embedding's quantization: emulate it in numpy
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    rows, scale = inits[gather.input[0]].astype(np.float32), next(a for a in inits.values() if a.shape == (V, 1))
    e_hat = rows * scale
    feed = _ids(form)
    expect = np.tanh(e_hat[feed["ids"]]) @ e_hat.T
    np.testing.assert_allclose(ReferenceEvaluator(q).run(None, feed)[0], expect, rtol=1e-5, atol=1e-5)
    # onnxruntime runs it, close to the float model (int8 rows: an error of half a step per value)
    got = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    e = numpy_helper.to_array(model.graph.initializer[0])
    ref = np.tanh(e[feed["ids"]]) @ e.T
    step = np.abs(e).max(axis=1) / 127
    bound = (np.abs(np.tanh(e[feed["ids"]])) @ np.broadcast_to(step / 2, (D, V)) * 2  # rows of both sides
             + (step[feed["ids"]] / 2)[..., None] * np.abs(e).sum(axis=1))
    assert np.all(np.abs(got - ref) <= bound * 1.5 + 1e-3)
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()


def test_separate_keeps_its_own_head_copy_and_the_bytes_say_so():
    model = _tied_lm("copy")
    once, separate = _quantize(model), _quantize(model, weight_only_tied="separate")
    assert ((D, V), TensorProto.INT8) in _big(separate.model) and ((V, D), TensorProto.INT8) in _big(separate.model)
    size = lambda m: sum(len(t.raw_data) for t in m.graph.initializer)  # noqa: E731
    assert size(separate.model) - size(once.model) >= V * D  # the int8 copy of the head is gone
    assert once.plan.node("head").weight.spec.granularity == "channel"  # the table's own quantization: per row
    assert separate.plan.node("head").weight.spec.granularity == "block"


def test_an_unequal_head_is_not_tied():
    model = _tied_lm("copy")
    w = next(t for t in model.graph.initializer if t.name == "W")
    values = numpy_helper.to_array(w).copy()
    values[3, 7] += 1e-3  # one value off: not the table
    w.CopyFrom(numpy_helper.from_array(values, "W"))
    q = _quantize(model).model
    assert ((D, V), TensorProto.INT8) in _big(q)  # its own block-wise int8 copy


def test_tied_option_is_validated():
    with pytest.raises(qpass.QpassError, match="weight_only_tied"):
        qpass.QuantConfig(weight_only="int4", weight_only_tied="twice")


@pytest.mark.parametrize("form", ["copy", "transpose"])
def test_the_codebook_types_honour_the_tied_option_too(form):
    model = _tied_lm(form)
    kw = dict(weight_only="nf4", block_size=16, per_layer=False, latency=False)
    once, separate = qpass.quantize(model, **kw), qpass.quantize(model, **kw, weight_only_tied="separate")
    assert ((V, D), TensorProto.INT8) in _big(once.model) and ((D, V), TensorProto.INT8) not in _big(once.model)
    # separate: the copy gets its own int8 weight; a head reading Transpose(E) has no constant weight of its own and
    # stays float, as with int4 (before, the codebook recipe ignored the option and shared the int8 rows)
    own = ((D, V), TensorProto.INT8) if form == "copy" else ((V, D), TensorProto.FLOAT)
    assert own in _big(separate.model)


def test_a_head_tied_to_a_table_the_plan_keeps_float_gets_its_own_weight():
    out = _quantize(_tied_lm("copy"), exclude_nodes=["embed"])  # the embedding stays float: nothing to share
    assert out.plan.node("head").weight.spec.granularity == "block"
    assert not any("stored once" in note for note in out.plan.node("head").notes)
