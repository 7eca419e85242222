"""qpass.runtime: the one module of qpass that imports onnxruntime; its sessions, providers and profiles."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qpass import io as qio
from qpass import runtime
from qpass.errors import QpassError
from tests import builders

QPASS = Path(runtime.__file__).resolve().parent


def _onnxruntime_imports(path: Path) -> list[int]:
    """Lines of ``path`` that import onnxruntime (or a submodule of it), at any depth: module level, inside
    functions, classes, ``if``/``try`` blocks; ``import``, ``from ... import`` and ``__import__``/
    ``importlib.import_module`` of a literal name."""

    def is_ort(name: str | None) -> bool:
        return bool(name) and (name == "onnxruntime" or name.startswith("onnxruntime."))

    lines = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import) and any(is_ort(a.name) for a in node.names):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and is_ort(node.module):
            lines.append(node.lineno)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
            if name in ("__import__", "import_module") and isinstance(node.args[0].value, str) and is_ort(node.args[0].value):
                lines.append(node.lineno)
    return lines


def test_only_runtime_imports_onnxruntime():
    offenders = {str(p.relative_to(QPASS.parent)): lines for p in sorted(QPASS.rglob("*.py"))
                 if p != QPASS / "runtime.py" and (lines := _onnxruntime_imports(p))}
    assert not offenders, f"only qpass/runtime.py may import onnxruntime; also imported at (file: lines) {offenders}"
    assert _onnxruntime_imports(QPASS / "runtime.py"), "the check finds no import in runtime.py: it checks nothing"


@pytest.mark.parametrize("source", ["import onnxruntime as ort", "import onnxruntime.quantization",
                                    "from onnxruntime import InferenceSession", "from onnxruntime.capi import _pybind_state",
                                    "def f():\n    if True:\n        import onnxruntime\n",
                                    "class C:\n    def m(self):\n        from onnxruntime import SessionOptions\n",
                                    "import importlib\nort = importlib.import_module('onnxruntime')",
                                    "ort = __import__('onnxruntime')"])
def test_the_import_check_finds_every_form(tmp_path, source):
    path = tmp_path / "m.py"
    path.write_text(source)
    assert _onnxruntime_imports(path)


@pytest.mark.parametrize("source", ["import onnx", "from . import runtime", "from .onnxruntime import x",
                                    "import onnxruntime_extensions_x", "s = 'import onnxruntime'"])
def test_the_import_check_leaves_other_imports_alone(tmp_path, source):
    path = tmp_path / "m.py"
    path.write_text(source)
    assert not _onnxruntime_imports(path)


def test_importing_qpass_does_not_load_onnxruntime():
    """onnxruntime is imported on first use (the CLI's --help does not pay for it)."""
    code = "import sys, qpass, qpass.cli, qpass.evaluate.validate, qpass.calib.collect; print('onnxruntime' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------- providers
def test_pick_providers(monkeypatch):
    assert runtime.pick_providers("cpu") == (["CPUExecutionProvider"], None)
    monkeypatch.setattr(runtime, "available_providers", lambda: ["CPUExecutionProvider"])
    providers, note = runtime.pick_providers("cuda")
    assert providers == ["CPUExecutionProvider"] and "not available" in note
    monkeypatch.setattr(runtime, "available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert runtime.pick_providers("cuda") == (["CUDAExecutionProvider", "CPUExecutionProvider"], None)


def test_with_cpu_fallback():
    assert runtime.with_cpu_fallback("CPUExecutionProvider") == ["CPUExecutionProvider"]
    assert runtime.with_cpu_fallback("CUDAExecutionProvider") == ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_available_providers_include_the_cpu():
    assert "CPUExecutionProvider" in runtime.available_providers()


# ---------------------------------------------------------------------------------------------- sessions
def _feed(seed: int = 0) -> dict:
    return {"x": np.random.default_rng(seed).normal(size=(2, 3, 8, 8)).astype(np.float32)}


def _config(opts, key: str) -> str | None:
    try:
        return opts.get_session_config_entry(key)
    except RuntimeError:  # not set
        return None


def test_session_options_follow_the_arguments(tmp_path):
    import onnxruntime as ort

    model = builders.conv_model()
    opts = runtime.make_session(model).get_session_options()
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # calibration's default
    assert opts.log_severity_level == 3 and not opts.enable_profiling
    assert _config(opts, "session.intra_op.allow_spinning") is None
    opts = runtime.make_session(model, level=None, threads=1, spin=False,
                                profile_prefix=str(tmp_path / "p")).get_session_options()
    assert opts.graph_optimization_level == ort.SessionOptions().graph_optimization_level  # onnxruntime's default
    assert opts.intra_op_num_threads == 1 and opts.enable_profiling
    assert _config(opts, "session.intra_op.allow_spinning") == "0"
    for name, level in runtime.LEVELS.items():
        got = runtime.make_session(model, level=name).get_session_options().graph_optimization_level
        assert got == getattr(ort.GraphOptimizationLevel, level)


def test_cuda_sessions_use_the_heuristic_convolution_search(monkeypatch):
    """What onnxruntime is handed for CUDA (a stand-in session records it: CI has no GPU)."""
    import onnxruntime as ort

    seen = []
    monkeypatch.setattr(ort, "InferenceSession", lambda model, opts, providers: seen.append(providers))
    runtime.make_session(builders.conv_model(), runtime.with_cpu_fallback(runtime.CUDA))
    runtime.make_session(builders.conv_model())
    assert seen == [[(runtime.CUDA, {"cudnn_conv_algo_search": "HEURISTIC"}), runtime.CPU], [runtime.CPU]]


def test_a_large_model_goes_through_a_file_with_external_data_and_is_not_mutated(monkeypatch):
    """The temporary-file path (large models, and the only one over 2 GB), exercised by lowering the threshold:
    same outputs, the weights written to external data, and the caller's model left as it was."""
    model = builders.conv_model()
    before = model.SerializeToString()
    want = runtime.make_session(model).run(None, _feed())[0]
    monkeypatch.setattr(runtime, "FILE_SESSION_BYTES", 0)
    monkeypatch.setattr(qio, "EXTERNAL_MIN_BYTES", 1)  # the test model's weights are small
    written = []
    real = runtime.write_external
    monkeypatch.setattr(runtime, "write_external", lambda m, path, data: (written.append(real(m, path, data)), None)[1])
    got = runtime.make_session(model).run(None, _feed())[0]
    assert written == [True]  # a data file was written
    np.testing.assert_array_equal(got, want)
    assert model.SerializeToString() == before


def test_a_model_that_does_not_load_is_a_qpass_error_or_onnxruntime_s_own():
    model = builders.conv_model()
    model.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(QpassError, match="onnxruntime cannot load the calibration model"):
        runtime.make_session(model, what="calibration model")
    with pytest.raises(Exception) as info:
        runtime.make_session(model, what=None)
    assert not isinstance(info.value, QpassError) and "NoSuchOp" in str(info.value)


def test_augmented_model_outputs_intermediate_tensors():
    model = builders.conv_model()
    aug = runtime.augmented_model(model, ["c", "y"])
    assert [o.name for o in aug.graph.output] == ["y", "c"] and [o.name for o in model.graph.output] == ["y"]
    c, y = runtime.make_session(aug).run(["c", "y"], _feed())
    np.testing.assert_array_equal(y, np.maximum(c, 0))


# ---------------------------------------------------------------------------------------------- profiles
def test_profile_placement_names_the_provider_of_every_node(tmp_path):
    session = runtime.make_session(builders.conv_model(), level=None, profile_prefix=str(tmp_path / "prof"))
    session.run(None, _feed())
    placement = runtime.profile_placement(session)
    assert set(placement["nodes_by_provider"]) == {"CPUExecutionProvider"}
    assert {n["op_type"] for n in placement["nodes"]} >= {"Conv"}
    assert placement["memcpy_nodes"] == 0 and abs(sum(placement["op_time_share"].values()) - 1) < 0.01


def test_augmented_model_types_undescribed_tensors_as_onnxruntime_does():
    """A tensor without value_info gets an untyped output, which onnxruntime types from its producer (a float
    guess made a bool or int64 tensor fail to load). A described tensor keeps its value_info."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("ConstantOfShape", ["s"], ["ones"], value=helper.make_tensor("one", TensorProto.BOOL, [1], [True])),
             helper.make_node("Cast", ["ones"], ["y"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    aug = runtime.augmented_model(model, ["ones", "s"])
    session = runtime.make_session(aug)
    assert {o.name: o.type for o in session.get_outputs()} == {"y": "tensor(float)", "ones": "tensor(bool)",
                                                               "s": "tensor(int64)"}
    ones, s = session.run(["ones", "s"], {"x": np.zeros((2, 3), np.float32)})
    assert ones.dtype == np.bool_ and ones.all() and s.tolist() == [2, 3]
    described = builders.conv_model()
    described.graph.value_info.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, ["N", 4, 8, 8]))
    assert runtime.augmented_model(described, ["c"]).graph.output[-1] == described.graph.value_info[0]
