"""validate(): a corrupted layer is caught and ranked first, CUDA skips cleanly, the report matches its schema,
and the HTML page renders with its chart."""
from __future__ import annotations

import json
import shutil
import subprocess
from importlib import resources

import jsonschema
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import qpass
from qpass.evaluate.validate import PROVIDERS, available_providers, validate
from tests import builders

SCHEMA = json.loads(resources.files("qpass").joinpath("report/schema.json").read_text())


def _digits_samples(n=40):
    x = np.load(builders.DIGITS_TEST)
    return [({"input": x["input"][i:i + 1]}, x["label"][i:i + 1]) for i in range(n)]


@pytest.fixture(scope="module")
def digits_qdq():
    return qpass.quantize(builders.DIGITS_MODEL, builders.DIGITS_CALIB).model


def _corrupt_weight_scale(model: onnx.ModelProto, node_name: str, factor: float = 8.0) -> onnx.ModelProto:
    """Multiply the weight scale of one compute node by ``factor``: its weights dequantize wrong."""
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    producers = {o: n for n in bad.graph.node for o in n.output}
    node = next(n for n in bad.graph.node if n.name == node_name)
    scale_name = producers[node.input[1]].input[1]
    init = next(t for t in bad.graph.initializer if t.name == scale_name)
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(factor), scale_name))
    return bad


@pytest.mark.parametrize("victim", ["/2/Conv", "/6/Gemm"])
def test_a_wrong_scale_is_caught_and_its_layer_ranked_first(digits_qdq, victim):
    original = onnx.load(str(builders.DIGITS_MODEL))
    good = validate(original, digits_qdq, _digits_samples(), providers=["cpu"], latency=False, placement=False)
    bad = validate(original, _corrupt_weight_scale(digits_qdq, victim), _digits_samples(), providers=["cpu"],
                   latency=False, placement=False)
    assert good["outputs"][0]["sqnr_db"] > 35
    assert bad["outputs"][0]["sqnr_db"] < good["outputs"][0]["sqnr_db"] - 10  # the damage shows at the output
    assert bad["per_layer"][0]["node"] == victim
    assert good["per_layer"][0]["node"] != victim or victim == "/8/Gemm"


def test_cuda_is_reported_not_available_without_a_gpu(digits_qdq):
    if PROVIDERS["cuda"] in available_providers():
        pytest.skip("this onnxruntime has CUDA; the not-available path is for CPU-only machines")
    original = onnx.load(str(builders.DIGITS_MODEL))
    r = validate(original, digits_qdq, _digits_samples(4), providers=["cpu", "cuda"], latency=False)
    cuda = r["providers"][1]
    assert cuda == {"provider": "CUDAExecutionProvider", "available": False, "note": cuda["note"]}
    assert "not available" in cuda["note"]
    assert r["providers"][0]["available"] and r["outputs"]


@pytest.mark.skipif(PROVIDERS["cuda"] not in available_providers(), reason="needs onnxruntime-gpu and a GPU")
def test_cuda_runs_and_reports_placement(digits_qdq):  # pragma: no cover - exercised on the GPU machine
    original = onnx.load(str(builders.DIGITS_MODEL))
    r = validate(original, digits_qdq, _digits_samples(4), providers=["cuda"])
    assert r["providers"][0]["outputs"] and "placement" in r["providers"][0]


def test_a_model_that_does_not_load_is_a_finding_not_a_crash(digits_qdq):
    original = onnx.load(str(builders.DIGITS_MODEL))
    broken = onnx.ModelProto()
    broken.CopyFrom(digits_qdq)
    broken.graph.node[0].op_type = "NoSuchOp"
    r = validate(original, broken, _digits_samples(2), providers=["cpu"], latency=False)
    assert "error" in r["providers"][0] and "does not load" in r["providers"][0]["error"]
    assert r["findings"] and r["outputs"] == []


def test_run_and_validate_reports_match_the_schema(tmp_path):
    result = qpass.quantize(builders.DIGITS_MODEL, builders.DIGITS_CALIB, val=builders.DIGITS_TEST,
                            output=tmp_path / "d.onnx", min_top1=0.99)
    report = json.loads(result.report_path.read_text())
    jsonschema.validate(report, SCHEMA)
    assert report["validation"]["passed"] is True
    other = qpass.validate_models(builders.DIGITS_MODEL, tmp_path / "d.onnx", builders.DIGITS_TEST,
                                  output=tmp_path / "v.json")
    jsonschema.validate(json.loads((tmp_path / "v.json").read_text()), SCHEMA)
    assert other.validation["samples"] == 64
    with pytest.raises(jsonschema.ValidationError):
        broken = dict(report, schema_version=2)
        jsonschema.validate(broken, SCHEMA)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="no headless Chromium on this machine")
def test_html_report_renders_in_headless_chromium_with_its_chart(tmp_path):
    result = qpass.quantize(builders.DIGITS_MODEL, builders.DIGITS_CALIB, val=builders.DIGITS_TEST,
                            output=tmp_path / "d.onnx")
    page = result.report_path.with_suffix(".html")
    profile = tmp_path / "profile"
    proc = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    dom = proc.stdout
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'id="sqnr-chart"' in dom and dom.count('class="bar"') == len(result.report.validation["per_layer"])
    assert "Per-layer error" in dom and "CPUExecutionProvider" in dom


@pytest.mark.parametrize("latency", [True, False])
def test_one_pair_of_sessions_serves_metrics_and_latency_without_spin_wait(digits_qdq, latency):
    """fp32 and int8 are timed in turn: a spinning thread pool would slow whichever session runs next. The pair
    that compares outputs is the pair timed (a session of a large model costs seconds and a copy of its weights);
    without latency the sessions keep onnxruntime's default."""
    from unittest import mock

    import qpass.evaluate.validate as v

    made = []
    real = v._session

    def spy(model, provider, **kw):
        s = real(model, provider, **kw)
        made.append((kw.get("spin", True), s.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
                     if kw.get("spin", True) is False else None))
        return s

    with mock.patch.object(v, "_session", spy):
        report = validate(onnx.load(builders.DIGITS_MODEL), digits_qdq, _digits_samples(6), providers=["cpu"],
                          per_layer=False, placement=False, latency=latency, latency_repeats=3)
    assert len(made) == 2
    if latency:
        assert report["providers"][0]["latency"]["repeats"] == 3
        assert all(spin is False and value == "0" for spin, value in made)
    else:
        assert "latency" not in report["providers"][0] and all(spin is True for spin, _ in made)


def test_a_quantized_model_slower_than_the_original_is_a_finding_naming_where_its_time_went(digits_qdq):
    """The latency ratio is measured, not asserted here: _latency is replaced by fixed results either side of the
    threshold, and the placement profile's op shares (real, from this run) are what the finding quotes."""
    from unittest import mock

    import qpass.evaluate.validate as v

    def fixed(ratio):
        return lambda ref, q, feed, repeats: {"fp32_ms": 1.0, "quantized_ms": ratio, "ratio": ratio, "repeats": repeats}

    with mock.patch.object(v, "_latency", fixed(1.5)):
        slow = validate(onnx.load(builders.DIGITS_MODEL), digits_qdq, _digits_samples(4), providers=["cpu"],
                        per_layer=False, latency_repeats=3)
    share = slow["providers"][0]["placement"]["op_time_share"]
    assert share and abs(sum(share.values()) - 1.0) < 0.01 and list(share.values()) == sorted(share.values(), reverse=True)
    found = [f for f in slow["findings"] if "x1.50 the original's latency" in f]
    assert len(found) == 1 and next(iter(share)) in found[0]
    with mock.patch.object(v, "_latency", fixed(v.SLOWER_THAN_ORIGINAL - 0.05)):
        fast = validate(onnx.load(builders.DIGITS_MODEL), digits_qdq, _digits_samples(4), providers=["cpu"],
                        per_layer=False, latency_repeats=3)
    assert not any("latency" in f for f in fast["findings"])


def _bool_mask_model(w_scale: float = 1.0) -> onnx.ModelProto:
    """x[2,4] -> Mul(x, Cast(And(ConstantOfShape(Shape(x)) = True, x > 0))) -> MatMul(W) -> y, with no value_info:
    the bool tensors are described nowhere (as MiniLM's attention mask: ConstantOfShape -> And)."""
    from onnx import TensorProto, helper

    w = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32) * np.float32(w_scale)
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("ConstantOfShape", ["s"], ["ones"], name="ones",
                              value=helper.make_tensor("one", TensorProto.BOOL, [1], [True])),
             helper.make_node("Greater", ["x", "zero"], ["pos"], name="greater"),
             helper.make_node("And", ["ones", "pos"], ["mask"], name="and"),
             helper.make_node("Cast", ["mask"], ["maskf"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Mul", ["x", "maskf"], ["r"], name="mul"),
             helper.make_node("MatMul", ["r", "W"], ["y"], name="matmul")]
    inits = [numpy_helper.from_array(np.zeros((), np.float32), "zero"), numpy_helper.from_array(w, "W")]
    graph = helper.make_graph(nodes, "mask", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    assert not model.graph.value_info
    return model


def test_per_layer_analysis_survives_bool_tensors_without_value_info():
    """The extra outputs once defaulted to float when the model did not describe a tensor, and onnxruntime refused
    the model ("Type (tensor(float)) of output arg (ones) ... does not match expected type (tensor(bool))"):
    MiniLM's report had no per-layer ranking. Only float tensors are asked for now, each with its own type."""
    rng = np.random.default_rng(1)
    samples = [({"x": rng.normal(size=(2, 4)).astype(np.float32)}, None) for _ in range(3)]
    r = validate(_bool_mask_model(), _bool_mask_model(w_scale=1.05), samples, providers=["cpu"], latency=False,
                 placement=False)
    assert not [f for f in r["findings"] if "per-layer" in f], r["findings"]
    assert [row["node"] for row in r["per_layer"]] == ["matmul", "mul"]  # the bool-valued greater/and are not layers
    matmul, mul = r["per_layer"]
    assert mul["sqnr_db"] == "inf" and matmul["input_sqnr_db"] == "inf"  # the mask is exact
    assert 20 < matmul["sqnr_db"] < 30  # the weights are 5 % off: 20 log10(1/0.05) = 26 dB


def _tiny_lm(vocab: int = 50, dim: int = 32, seed: int = 0) -> onnx.ModelProto:
    """input_ids [B, S] -> Gather(E [V, D]) -> Tanh -> MatMul(W [D, V]) -> logits [B, S, V] (opset 21)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    e = rng.normal(0, 1, (vocab, dim)).astype(np.float32)
    w = rng.normal(0, 0.5, (dim, vocab)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["E", "input_ids"], ["h"]), helper.make_node("Tanh", ["h"], ["t"]),
         helper.make_node("MatMul", ["t", "W"], ["logits"], name="lm_head")], "lm",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "S"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", "S", vocab])],
        [numpy_helper.from_array(e, "E"), numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def test_language_model_outputs_get_perplexity_and_kl():
    model = _tiny_lm()
    rng = np.random.default_rng(3)
    samples = [({"input_ids": rng.integers(0, 50, (1, 16)).astype(np.int64)}, None) for _ in range(4)]
    same = validate(model, model, samples, providers=["cpu"], per_layer=False, latency=False)["outputs"][0]
    assert same["kl_mean"] == pytest.approx(0.0, abs=1e-9) and same["tokens"] == 4 * 15
    assert same["perplexity_fp32"] == pytest.approx(same["perplexity_quantized"])
    # the direct computation: exp(mean over positions of -log softmax(logits)[next token])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    nll = []
    for feed, _ in samples:
        z = sess.run(None, feed)[0][0, :-1].astype(np.float64)
        logp = z - z.max(-1, keepdims=True) - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
        nll.extend(-logp[np.arange(15), feed["input_ids"][0, 1:]])
    assert same["perplexity_fp32"] == pytest.approx(np.exp(np.mean(nll)), rel=1e-6)
    q = qpass.quantize(model, weight_only="int4", block_size=16, per_layer=False, latency=False,
                       weight_only_head="same").model
    got = validate(model, q, samples, providers=["cpu"], per_layer=False, latency=False)["outputs"][0]
    assert got["kl_mean"] > 1e-4 and got["perplexity_quantized"] != got["perplexity_fp32"]



def test_a_token_tagger_is_not_taken_for_a_language_model():
    """Integer input [B, S] and float output [B, S, C] with ids >= C: no perplexity, and validation still works."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["E", "ids"], ["h"]), helper.make_node("MatMul", ["h", "W"], ["tags"])], "tagger",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "S"])],
        [helper.make_tensor_value_info("tags", TensorProto.FLOAT, ["B", "S", 5])],
        [numpy_helper.from_array(rng.normal(size=(50, 8)).astype(np.float32), "E"),
         numpy_helper.from_array(rng.normal(size=(8, 5)).astype(np.float32), "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    samples = [({"ids": rng.integers(10, 50, (1, 6)).astype(np.int64)}, None) for _ in range(3)]
    [out] = validate(model, model, samples, providers=["cpu"], per_layer=False, latency=False)["outputs"]
    assert "perplexity_fp32" not in out and out["cosine_mean"] == pytest.approx(1.0)


def test_weight_only_matmuls_count_a_tied_heads_transposed_dequantize_too():
    from onnx import TensorProto, helper, numpy_helper

    from qpass.evaluate.validate import blocked_weight_matmuls

    q = numpy_helper.from_array(np.ones((32, 8), np.int8), "q")
    e = numpy_helper.from_array(np.ones((8, 32), np.int8), "e")
    s_block = numpy_helper.from_array(np.ones((2, 8), np.float32), "sb")
    s_row = numpy_helper.from_array(np.ones(8, np.float32), "sr")
    w = numpy_helper.from_array(np.ones((8, 8), np.float32), "w")
    nodes = [helper.make_node("DequantizeLinear", ["q", "sb"], ["qd"], axis=0, block_size=16),
             helper.make_node("MatMul", ["x", "qd"], ["h"]),
             helper.make_node("DequantizeLinear", ["e", "sr"], ["ed"], axis=0),
             helper.make_node("Transpose", ["ed"], ["et"], perm=[1, 0]),
             helper.make_node("MatMul", ["h", "w"], ["h2"]),
             helper.make_node("MatMul", ["h2", "et"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])], [q, e, s_block, s_row, w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    assert blocked_weight_matmuls(model) == 2  # the blocked weight and the transposed per-row head, not the float one
    del model.graph.node[:2]  # no block-wise DequantizeLinear left: not a weight-only model
    model.graph.node[1].input[0] = "x"
    assert blocked_weight_matmuls(model) == 0
