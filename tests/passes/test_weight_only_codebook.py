"""Weight-only NF4, ternary and double-quantized scales: standard ONNX forms whose weights match the numpy
quantizers bit for bit on onnxruntime and onnx.reference."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import qpass
from qpass.cli import main
from qpass.errors import ConfigError, OpsetError
from qpass.qparams import block_qparams, dequantize, quantize, unpack_4bit
from qpass.weights.double_quant import quantize_scales
from qpass.weights.nf4 import block_absmax, nf4_dequantize, nf4_quantize
from qpass.weights.ternary import ternary

from .test_weight_only import K, N, _feeds, _inits, _mlp

B = 24  # K = 64: blocks of 24, 24 and 16 (a ragged last block)
STANDARD = {"Cast", "Gather", "Mul", "DequantizeLinear", "MatMul", "Gemm", "Tanh"}


def _weights(out: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The float weight each MatMul/Gemm reads, as onnxruntime and onnx.reference compute it (made graph outputs)."""
    model = onnx.ModelProto()
    model.CopyFrom(out)
    names = {n.name: n.input[1] for n in model.graph.node if n.op_type in ("MatMul", "Gemm")}
    for name in names.values():
        model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    x = _feeds(1)[0]
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(list(names.values()), x)
    ref = ReferenceEvaluator(model).run(list(names.values()), x)
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a, b)
    return dict(zip(names, got))


def _float(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(_inits(model)[name])


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_is_a_codebook_gather_matching_numpy_bit_for_bit(double_quant):
    model = _mlp(gemm_trans_b=True)  # W1 [K, K] blocked on axis 0; the Gemm's W2 [N, K] (transB) on axis 1
    out = qpass.quantize(model, weight_only="nf4", block_size=B, weight_only_head="same", double_quant=double_quant,
                         per_layer=False, latency=False).model
    onnx.checker.check_model(out, full_check=True)
    assert {n.op_type for n in out.graph.node} <= STANDARD
    codes = [t for t in out.graph.initializer if t.data_type == TensorProto.UINT4]
    assert sorted(tuple(t.dims) for t in codes) == [(N, K), (K, K)]
    got = _weights(out)
    w1, w2t = _float(model, "W1"), _float(model, "W2").T
    expected = {}
    for name, w in (("mm1", w1), ("gemm", w2t)):
        scale = quantize_scales(block_absmax(w, B), channel_axis=1)[2] if double_quant else None
        expected[name] = nf4_dequantize(*nf4_quantize(w, B, scale), B)
        np.testing.assert_array_equal(got[name] if name == "mm1" else got[name].T, expected[name])
    c1 = next(t for t in codes if tuple(t.dims) == (K, K))  # the stored codes are the numpy codes
    stored = unpack_4bit(np.frombuffer(c1.raw_data, np.uint8), K * K, signed=False).reshape(K, K)
    np.testing.assert_array_equal(stored, nf4_quantize(w1, B, quantize_scales(block_absmax(w1, B), 1)[2]
                                                       if double_quant else None)[0])
    assert len(c1.raw_data) == K * K // 2
    if double_quant:  # every block scale is uint8 codes (3 blocks) x a float scale per output channel
        uint8 = {tuple(t.dims) for t in out.graph.initializer if t.data_type == TensorProto.UINT8}
        assert uint8 == {(3, K), (N, 3)}
        assert not any(t.data_type == TensorProto.FLOAT and 3 in t.dims for t in out.graph.initializer)
    x = _feeds(1)[0]
    y = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    np.testing.assert_allclose(y, np.tanh(x["x"] @ expected["mm1"]) @ expected["gemm"], atol=1e-4)


def _fused(model: onnx.ModelProto, tmp_path) -> list[str]:
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]


@pytest.mark.parametrize("form", ["cast-mul", "dequantize"])
def test_double_quant_int4_scales_are_uint8_codes_times_a_channel_scale(form, tmp_path):
    model = _mlp()
    out = qpass.quantize(model, weight_only="int4", block_size=16, double_quant=True, double_quant_form=form,
                         per_layer=False, latency=False).model
    onnx.checker.check_model(out, full_check=True)
    inits = _inits(out)
    producer = {o: n for n in out.graph.node for o in n.output}
    dq = producer[next(n for n in out.graph.node if n.name == "mm1").input[1]]
    assert dq.op_type == "DequantizeLinear" and dq.input[1] not in inits  # the block scale is computed
    sdq = producer[dq.input[1]]
    if form == "dequantize":
        assert sdq.op_type == "DequantizeLinear"
        assert {a.name: helper.get_attribute_value(a) for a in sdq.attribute} == {"axis": 1}
        codes, s2 = inits[sdq.input[0]], inits[sdq.input[1]]
        assert list(s2.dims) == [K]
    else:
        assert sdq.op_type == "Mul" and producer[sdq.input[0]].op_type == "Cast"
        codes, s2 = inits[producer[sdq.input[0]].input[0]], inits[sdq.input[1]]
        assert list(s2.dims) == [1, K]
    assert codes.data_type == TensorProto.UINT8 and list(codes.dims) == [K // 16, K]
    w1 = _float(model, "W1")
    s, zp = block_qparams(w1, 0, 16, "int4", symmetric=True, full_range=True)
    _, _, s_dq = quantize_scales(s, channel_axis=1)
    q = quantize(w1, s_dq, zp, axis=0, block_size=16, qtype="int4")  # the values rounded again to the uint8 scales
    np.testing.assert_array_equal(_weights(out)["mm1"], dequantize(q, s_dq, zp, axis=0, block_size=16))
    # onnxruntime folds Mul(Cast(constant)) into a constant scale and fuses MatMulNBits; a DequantizeLinear it keeps
    ops = _fused(out, tmp_path)
    assert ops.count("MatMulNBits") == (2 if form == "cast-mul" else 0)


def test_ternary_writes_int2_at_opset_25_and_refuses_lower_opsets():
    model = _mlp()
    with pytest.raises(OpsetError, match="--target-opset 25"):
        qpass.quantize(model, weight_only="ternary", block_size=B, opset_upgrade=False, per_layer=False, latency=False)
    with pytest.raises(OpsetError, match="--target-opset 25"):
        qpass.quantize(model, weight_only="ternary", block_size=B, target_opset=21, per_layer=False, latency=False)
    upgraded = qpass.quantize(model, weight_only="ternary", block_size=B, per_layer=False, latency=False)
    assert upgraded.report.opset["output"] == 25 and "int2 DequantizeLinear" in upgraded.report.opset["upgraded"]
    out = qpass.quantize(model, weight_only="ternary", block_size=B, target_opset=25, per_layer=False,
                         latency=False).model
    onnx.checker.check_model(out, full_check=True)
    inits = _inits(out)
    mm1 = next(n for n in out.graph.node if n.name == "mm1")
    dq = next(n for n in out.graph.node if n.output[0] == mm1.input[1])
    assert inits[dq.input[0]].data_type == TensorProto.INT2
    values = numpy_helper.to_array(inits[dq.input[0]])
    assert set(np.unique(values)) <= {-1, 0, 1}
    w1 = _float(model, "W1")
    qw = ternary(w1, B)
    np.testing.assert_array_equal(values, qw.q)
    np.testing.assert_array_equal(_weights(out)["mm1"], dequantize(qw.q, qw.scale, qw.zero_point, axis=0, block_size=B))


def test_nearest_only_types_refuse_gptq_and_the_cli_names_the_opset(tmp_path, capsys):
    with pytest.raises(ConfigError, match="algorithm"):
        qpass.quantize(_mlp(), weight_only="nf4", algorithm="gptq")
    path = tmp_path / "mlp.onnx"
    onnx.save(_mlp(), path)
    rc = main(["run", str(path), "--weight-only", "ternary", "--keep-opset", "-o", str(tmp_path / "out.onnx"),
               "--no-per-layer"])
    err = capsys.readouterr().err
    assert rc == 2 and "--target-opset 25" in err and not (tmp_path / "out.onnx").exists()


def test_gptq_keeps_its_gain_with_double_quantized_scales_and_nf4_with_data_rounds_to_nearest():
    model, feeds = _mlp(), _feeds(48, correlated=True)
    kw = dict(weight_only="int4", block_size=16, per_layer=False, latency=False)
    rtn = qpass.quantize(model, feeds, algorithm="rtn", **kw)
    gptq = qpass.quantize(model, feeds, algorithm="gptq", double_quant=True, **kw)
    assert any(t.data_type == TensorProto.UINT8 for t in gptq.model.graph.initializer)  # the scales' codes
    sqnr = {name: r.report.validation["outputs"][0]["sqnr_db"] for name, r in (("rtn", rtn), ("gptq", gptq))}
    assert sqnr["gptq"] > sqnr["rtn"] + 1.0, sqnr  # GPTQ's values rounded again to the uint8 scales stay better
    nf4 = qpass.quantize(model, feeds, weight_only="nf4", block_size=16, per_layer=False, latency=False)
    assert nf4.report.config["algorithm"] == "rtn" and not nf4.plan.statistics  # auto: no calibration pass needed
