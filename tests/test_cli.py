"""The `qpass` command: exit codes, one-line errors, what it writes (and never writes).

Most tests call :func:`qpass.cli.main` in-process (fast, output via capsys); the subprocess tests
check the real process exit code of ``python -m qpass``.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import qpass
from qpass.cli import main

from .builders import DIGITS_CALIB, DIGITS_MODEL, DIGITS_TEST, REPO, conv_model


# ---------------------------------------------------------------------------------------------- helpers
def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """Run ``qpass <args>`` in-process; return (exit code, stdout, stderr)."""
    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def run_subprocess(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "qpass", *[str(a) for a in args]], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def listing(folder: Path) -> set[str]:
    """Every path under ``folder`` (hidden temp files included), relative to it."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def assert_one_line_error(err: str, *names: str) -> str:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected a one-line error, got {len(lines)} lines:\n{err}"
    line = lines[0]
    assert line.startswith("qpass: error: "), line
    for name in names:
        assert name in line, f"{name!r} not named in: {line}"
    return line


def load_report(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def ort_session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture
def digits(tmp_path: Path) -> Path:
    """A private copy of the shipped digits model (nothing is ever written into the repo)."""
    p = tmp_path / "digits.onnx"
    shutil.copyfile(DIGITS_MODEL, p)
    return p


@pytest.fixture
def calib_array() -> np.ndarray:
    with np.load(DIGITS_CALIB) as data:
        return data["input"]


@pytest.fixture
def opset11(tmp_path: Path) -> tuple[Path, Path]:
    """An opset-11 Conv model and calibration data for it (.npz, key 'x', split on the batch axis)."""
    model = tmp_path / "conv11.onnx"
    onnx.save_model(conv_model(opset=11), str(model))
    calib = tmp_path / "conv11_calib.npz"
    np.savez(calib, x=np.random.default_rng(0).normal(0, 1, (20, 3, 8, 8)).astype(np.float32))
    return model, calib


# ---------------------------------------------------------------------------------------------- happy path
def test_happy_path_digits(tmp_path, digits, capsys):
    out = tmp_path / "out" / "digits.qpass.onnx"
    out.parent.mkdir()
    before = sha256(digits)
    rc, stdout, stderr = run_cli(capsys, "run", digits, "--calib", DIGITS_CALIB, "-o", out)
    assert rc == 0, stderr
    assert "Traceback" not in stderr
    assert out.is_file()
    report_path = out.with_name("digits.qpass.report.json")
    assert report_path.is_file()
    assert str(out) in stdout and str(report_path) in stdout
    assert sha256(digits) == before

    report = load_report(report_path)
    assert report["quantized_total"] > 0
    assert report["quantized_nodes"].get("Conv", 0) >= 1
    assert report["synthetic_calibration"] is False
    v = report["validation"]
    assert v is not None and v["samples"] > 0
    (logits,) = v["outputs"]
    assert logits["output"] == "logits"
    assert logits["top1_agreement"] >= 0.99
    assert report["sizes"]["output_bytes"] < report["sizes"]["input_bytes"]

    onnx.checker.check_model(str(out), full_check=True)
    q = onnx.load(str(out))
    ops = {n.op_type for n in q.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops

    # runs on onnxruntime CPU and agrees with the fp32 model on the held-out test split
    with np.load(DIGITS_TEST) as data:
        x, labels = data["input"], data["label"]
    ref = ort_session(DIGITS_MODEL).run(None, {"input": x})[0]
    got = ort_session(out).run(None, {"input": x})[0]
    assert got.shape == ref.shape == (len(x), 10)
    assert np.all(np.isfinite(got))
    assert np.mean(got.argmax(1) == ref.argmax(1)) >= 0.97
    assert np.mean(got.argmax(1) == labels) >= 0.93


def test_happy_path_subprocess_exit_code(tmp_path, digits):
    out = tmp_path / "sub.onnx"
    proc = run_subprocess("run", digits, "--calib", DIGITS_CALIB, "-o", out, "-q", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert out.is_file() and (tmp_path / "sub.report.json").is_file()
    onnx.checker.check_model(str(out), full_check=True)


def test_default_output_path_beside_input(tmp_path, digits, capsys):
    before = sha256(digits)
    rc, stdout, stderr = run_cli(capsys, "run", digits, "--calib", DIGITS_CALIB, "-q")
    assert rc == 0, stderr
    out = tmp_path / "digits.qpass.onnx"
    assert out.is_file()
    assert (tmp_path / "digits.qpass.report.json").is_file()
    assert sha256(digits) == before
    # nothing else was written there (no temp files left)
    assert listing(tmp_path) == {"digits.onnx", "digits.qpass.onnx", "digits.qpass.report.json",
                                 "digits.qpass.report.html"}
    onnx.checker.check_model(str(out), full_check=True)


# ---------------------------------------------------------------------------------------------- bad input
def _text_model(tmp_path: Path) -> Path:
    p = tmp_path / "notes.onnx"
    p.write_text("this is a text file, not an ONNX model\n", encoding="utf-8")
    return p


def _truncated_model(tmp_path: Path) -> Path:
    data = DIGITS_MODEL.read_bytes()
    p = tmp_path / "truncated.onnx"
    p.write_bytes(data[: len(data) // 2])
    return p


def _dir_model(tmp_path: Path) -> Path:
    p = tmp_path / "folder.onnx"
    p.mkdir()
    return p


@pytest.mark.parametrize("make, names", [
    (lambda t: t / "missing.onnx", ["missing.onnx", "not found"]),
    (_text_model, ["notes.onnx"]),
    (_truncated_model, ["truncated.onnx"]),
    (_dir_model, ["folder.onnx", "directory"]),
], ids=["missing-file", "text-file", "truncated", "directory"])
def test_bad_model_file(tmp_path, capsys, make, names):
    model = make(tmp_path)
    before_sha = sha256(model) if model.is_file() else None
    out = tmp_path / "out.onnx"
    before = listing(tmp_path)
    rc, _, err = run_cli(capsys, "run", model, "--calib", DIGITS_CALIB, "-o", out)
    assert rc == 2
    assert_one_line_error(err, *names)
    if before_sha is not None:
        assert sha256(model) == before_sha
    assert listing(tmp_path) == before  # no output, no report, no temp files


@pytest.mark.parametrize("make, names", [
    (lambda t: t / "missing.onnx", ["missing.onnx"]),
    (_truncated_model, ["truncated.onnx"]),
], ids=["missing-file", "truncated"])
def test_bad_model_file_subprocess(tmp_path, make, names):
    model = make(tmp_path)
    before_sha = sha256(model) if model.is_file() else None
    proc = run_subprocess("run", model, "--calib", DIGITS_CALIB, "-o", tmp_path / "out.onnx", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert_one_line_error(proc.stderr, *names)
    if before_sha is not None:
        assert sha256(model) == before_sha
    assert not (tmp_path / "out.onnx").exists()


def _same_plain(tmp_path: Path, model: Path) -> Path:
    return model


def _same_dotdot(tmp_path: Path, model: Path) -> str:
    # ./x/../x/model.onnx spelled relative to the current directory (monkeypatched to tmp_path)
    return f"./x/../x/{model.name}"


def _same_symlink(tmp_path: Path, model: Path) -> Path:
    link = model.with_name("link.onnx")
    link.symlink_to(model.name)
    return link


def _same_absolute(tmp_path: Path, model: Path) -> Path:
    return model.resolve()


@pytest.mark.parametrize("spell", [_same_plain, _same_dotdot, _same_symlink, _same_absolute],
                         ids=["same", "dotdot", "symlink", "absolute"])
def test_output_equal_to_input_is_refused(tmp_path, capsys, monkeypatch, spell):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x").mkdir()
    model = tmp_path / "x" / "model.onnx"
    shutil.copyfile(DIGITS_MODEL, model)
    before_sha = sha256(model)
    out = spell(tmp_path, model)
    before = listing(tmp_path)
    rc, _, err = run_cli(capsys, "run", Path("x") / "model.onnx", "--calib", DIGITS_CALIB, "-o", out, "-q")
    assert rc == 2
    line = assert_one_line_error(err, "input")
    assert str(Path(out)) in line
    assert sha256(model) == before_sha
    assert listing(tmp_path) == before  # not even a report beside it


def test_output_symlink_as_input_is_refused(tmp_path, capsys, monkeypatch):
    """The input given through a symlink, the output as the real file."""
    model = tmp_path / "model.onnx"
    shutil.copyfile(DIGITS_MODEL, model)
    link = tmp_path / "link.onnx"
    link.symlink_to(model)
    before_sha = sha256(model)
    rc, _, err = run_cli(capsys, "run", link, "--calib", DIGITS_CALIB, "-o", model, "-q")
    assert rc == 2
    assert_one_line_error(err, "model.onnx")
    assert sha256(model) == before_sha
    assert not (tmp_path / "model.report.json").exists()


def _npz(tmp_path: Path, name: str, **arrays) -> Path:
    p = tmp_path / name
    np.savez(p, **arrays)
    return p


@pytest.mark.parametrize("case", ["wrong-name", "rank3", "rank6", "float64", "nan"])
def test_bad_calibration_data(tmp_path, digits, calib_array, capsys, case):
    if case == "wrong-name":
        calib = _npz(tmp_path, "wrong_name.npz", wrong=calib_array)
        names = ["wrong_name.npz", "'input'", "wrong"]
    elif case == "rank3":
        calib = _npz(tmp_path, "rank3.npz", input=calib_array[:, 0])  # [200, 8, 8]
        assert calib_array[:, 0].shape == (200, 8, 8)
        names = ["rank3.npz", "'input'", "rank 3", "[200, 8, 8]", "rank 4"]
    elif case == "rank6":
        arr = calib_array[:, :, None, None]  # [200, 1, 1, 1, 8, 8]
        assert arr.shape == (200, 1, 1, 1, 8, 8)
        calib = _npz(tmp_path, "rank6.npz", input=arr)
        names = ["rank6.npz", "'input'", "rank 6", "rank 4"]
    elif case == "float64":
        calib = _npz(tmp_path, "f64.npz", input=calib_array.astype(np.float64))
        names = ["f64.npz", "'input'", "float64", "float32"]
    else:
        bad = calib_array.copy()
        bad[3, 0, 2, 2] = np.nan
        calib = _npz(tmp_path, "nan.npz", input=bad)
        names = ["nan.npz", "'input'", "NaN"]
    before_sha = sha256(digits)
    before = listing(tmp_path)
    rc, _, err = run_cli(capsys, "run", digits, "--calib", calib, "-o", tmp_path / "out.onnx")
    assert rc == 2
    assert_one_line_error(err, *names)
    assert sha256(digits) == before_sha
    assert listing(tmp_path) == before


def test_no_calibration_data(tmp_path, digits, capsys):
    before_sha = sha256(digits)
    before = listing(tmp_path)
    rc, _, err = run_cli(capsys, "run", digits, "-o", tmp_path / "out.onnx")
    assert rc == 2
    assert_one_line_error(err, str(digits), "--calib", "--synthetic-calib")
    assert sha256(digits) == before_sha
    assert listing(tmp_path) == before


def test_config_unknown_key(tmp_path, digits, capsys):
    cfg = tmp_path / "qpass.toml"
    cfg.write_text('[qpass]\nper_channel = true\nbogus_key = 3\n', encoding="utf-8")
    before_sha = sha256(digits)
    before = listing(tmp_path)
    rc, _, err = run_cli(capsys, "run", digits, "--calib", DIGITS_CALIB, "--config", cfg, "-o", tmp_path / "out.onnx")
    assert rc == 2
    assert_one_line_error(err, "qpass.toml", "bogus_key")
    assert sha256(digits) == before_sha
    assert listing(tmp_path) == before


def test_opset11_with_keep_opset_is_refused_naming_target_opset(tmp_path, opset11, capsys):
    model, calib = opset11
    before_sha = sha256(model)
    before = listing(tmp_path)
    rc, _, err = run_cli(capsys, "run", model, "--calib", calib, "-o", tmp_path / "out.onnx", "--keep-opset")
    assert rc == 2
    assert_one_line_error(err, "conv11.onnx", "--target-opset", "11")
    assert sha256(model) == before_sha
    assert listing(tmp_path) == before


def test_opset11_is_upgraded_to_13_with_a_warning(tmp_path, opset11, capsys):
    model, calib = opset11
    before_sha = sha256(model)
    out = tmp_path / "out.onnx"
    rc, _, err = run_cli(capsys, "run", model, "--calib", calib, "-o", out)
    assert rc == 0, err
    assert "opset upgraded 11 -> 13: per-channel DequantizeLinear needs it" in err
    assert sha256(model) == before_sha and _default_opset(onnx.load(str(out))) == 13
    report = json.loads(out.with_name("out.report.json").read_text())
    assert report["opset"]["input"] == 11 and report["opset"]["output"] == 13 and "upgraded" in report["opset"]


def test_opset11_subprocess(tmp_path, opset11):
    model, calib = opset11
    proc = run_subprocess("run", model, "--calib", calib, "-o", tmp_path / "out.onnx", "--keep-opset", cwd=tmp_path)
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, "conv11.onnx", "--target-opset")


def _default_opset(model: onnx.ModelProto) -> int:
    return next(op.version for op in model.opset_import if op.domain in ("", "ai.onnx"))


def test_opset11_target_opset_13_succeeds(tmp_path, opset11, capsys):
    model, calib = opset11
    before_sha = sha256(model)
    out = tmp_path / "up.onnx"
    rc, _, err = run_cli(capsys, "run", model, "--calib", calib, "--target-opset", "13", "-o", out, "-q")
    assert rc == 0, err
    assert sha256(model) == before_sha
    onnx.checker.check_model(str(out), full_check=True)
    q = onnx.load(str(out))
    assert _default_opset(q) == 13
    # per-channel weights: a DequantizeLinear with an axis attribute and a vector scale
    assert any(n.op_type == "DequantizeLinear" and any(a.name == "axis" for a in n.attribute) for n in q.graph.node)
    report = load_report(tmp_path / "up.report.json")
    assert report["opset"] == {"input": 11, "output": 13}
    assert any("upgraded" in w for w in report["warnings"])
    assert report["quantized_total"] > 0
    ort_session(out).run(None, {"x": np.zeros((2, 3, 8, 8), np.float32)})


def test_opset11_per_tensor_succeeds_without_upgrade(tmp_path, opset11, capsys):
    model, calib = opset11
    out = tmp_path / "pt.onnx"
    rc, _, err = run_cli(capsys, "run", model, "--calib", calib, "--per-tensor", "-o", out, "-q")
    assert rc == 0, err
    onnx.checker.check_model(str(out), full_check=True)
    q = onnx.load(str(out))
    assert _default_opset(q) == 11
    assert not any(a.name == "axis" for n in q.graph.node if n.op_type == "DequantizeLinear" for a in n.attribute)
    report = load_report(tmp_path / "pt.report.json")
    assert report["opset"] == {"input": 11, "output": 11}
    assert not any("upgraded" in w for w in report["warnings"])
    assert report["quantized_total"] > 0
    ort_session(out).run(None, {"x": np.zeros((2, 3, 8, 8), np.float32)})


# ---------------------------------------------------------------------------------------------- options
def test_synthetic_calib(tmp_path, digits, capsys):
    out = tmp_path / "syn.onnx"
    rc, stdout, stderr = run_cli(capsys, "run", digits, "--synthetic-calib", "-o", out)
    assert rc == 0, stderr
    assert "random" in (stdout + stderr).lower()
    report = load_report(tmp_path / "syn.report.json")
    assert report["synthetic_calibration"] is True
    assert report["calibration"]["synthetic"] is True
    assert any("RANDOM" in w for w in report["warnings"])
    assert report["quantized_total"] > 0
    onnx.checker.check_model(str(out), full_check=True)


def test_synthetic_calib_is_loud_even_when_quiet(tmp_path, digits, capsys):
    rc, stdout, stderr = run_cli(capsys, "run", digits, "--synthetic-calib", "-q", "-o", tmp_path / "syn.onnx")
    assert rc == 0, stderr
    assert "random" in (stdout + stderr).lower()


def test_min_cosine_above_one_is_a_config_error(tmp_path, digits, capsys):
    before = listing(tmp_path)
    rc, _, err = run_cli(capsys, "run", digits, "--calib", DIGITS_CALIB, "--min-cosine", "1.01",
                         "-o", tmp_path / "out.onnx")
    assert rc == 2
    assert_one_line_error(err, "min_cosine", "1.01")
    assert listing(tmp_path) == before


def test_min_cosine_exit_code_follows_measured_cosine(tmp_path, digits):
    threshold = 0.99999999
    out = tmp_path / "mc.onnx"
    proc = run_subprocess("run", digits, "--calib", DIGITS_CALIB, "--min-cosine", repr(threshold), "-o", out, "-q",
                          cwd=tmp_path)
    assert "Traceback" not in proc.stderr
    report = load_report(tmp_path / "mc.report.json")
    cosine = min(o["cosine_mean"] for o in report["validation"]["outputs"])
    below = cosine < threshold
    assert proc.returncode == (1 if below else 0), (cosine, proc.stderr)
    assert report["validation"]["passed"] is (not below)
    assert report["config"]["min_cosine"] == threshold
    assert bool(report["validation"]["tolerance_failures"]) is below
    if below:
        assert "validation failed" in proc.stderr
    assert out.is_file()  # the model is written either way; the exit code says it failed


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code in (0, None)
    out = capsys.readouterr().out
    assert qpass.__version__ in out


def test_version_subprocess(tmp_path):
    proc = run_subprocess("--version", cwd=tmp_path)
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"qpass {qpass.__version__}"


def test_run_help_shows_examples(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--help"])
    assert exc.value.code in (0, None)
    out = capsys.readouterr().out
    assert "examples:" in out
    assert "qpass run" in out
    assert "--calib" in out and "--target-opset" in out
    assert "exit codes" in out


def test_no_command_prints_help_and_exits_2(capsys):
    rc = main([])
    assert rc == 2
    assert "run" in capsys.readouterr().out


def test_save_calib_then_load_calib_is_byte_identical(tmp_path, digits, capsys):
    table = tmp_path / "calib.json"
    first = tmp_path / "first.onnx"
    rc, _, err = run_cli(capsys, "run", digits, "--calib", DIGITS_CALIB, "--save-calib", table, "-o", first, "-q")
    assert rc == 0, err
    data = json.loads(table.read_text(encoding="utf-8"))
    assert data["ranges"] and data["samples"] > 0 and data["synthetic"] is False
    for r in data["ranges"].values():
        assert r["min"] <= r["max"]

    second = tmp_path / "second.onnx"
    rc, _, err = run_cli(capsys, "run", digits, "--load-calib", table, "-o", second, "-q")
    assert rc == 0, err
    assert second.read_bytes() == first.read_bytes()
    report = load_report(tmp_path / "second.report.json")
    assert report["calibration"]["source"] == str(table)


def test_external_data_flag(tmp_path, digits, capsys):
    out = tmp_path / "ext.onnx"
    rc, _, err = run_cli(capsys, "run", digits, "--calib", DIGITS_CALIB, "--external-data", "-o", out, "-q")
    assert rc == 0, err
    assert (tmp_path / "ext.onnx.data").is_file()
    onnx.checker.check_model(str(out), full_check=True)
    with np.load(DIGITS_TEST) as data:
        x = data["input"][:16]
    assert ort_session(out).run(None, {"input": x})[0].shape == (16, 10)


def test_load_calib_for_another_model_is_refused(tmp_path, digits, opset11, capsys):
    model11, calib11 = opset11
    table = tmp_path / "conv.json"
    rc, _, err = run_cli(capsys, "run", model11, "--calib", calib11, "--per-tensor", "--save-calib", table,
                         "-o", tmp_path / "c.onnx", "-q")
    assert rc == 0, err
    rc, _, err = run_cli(capsys, "run", digits, "--load-calib", table, "-o", tmp_path / "d.onnx", "-q")
    assert rc == 2
    assert_one_line_error(err, "conv.json")
    assert not (tmp_path / "d.onnx").exists()


# ---------------------------------------------------------------------------------------------- qpass bugs
def test_save_calib_never_overwrites_the_input_model(tmp_path, digits, capsys):
    """QPASS BUG (found by this test): --save-calib is written with no same-file check, so a
    --save-calib path equal to the model replaces the fp32 model with calibration JSON."""
    before_sha = sha256(digits)
    rc, _, err = run_cli(capsys, "run", digits, "--calib", DIGITS_CALIB, "--save-calib", digits,
                         "-o", tmp_path / "out.onnx", "-q")
    assert sha256(digits) == before_sha, "the input model was overwritten by --save-calib"
    assert rc == 2
    assert_one_line_error(err, str(digits))


@pytest.mark.parametrize("flag, value, key", [("--hist-sample", "7", "hist_sample"),
                                              ("--neighbour-ops", "Add,Mul", "neighbour_ops")])
def test_bad_histogram_cap_or_join_list_is_a_config_error(tmp_path, digits, capsys, flag, value, key):
    before = listing(tmp_path)
    rc, _, err = run_cli(capsys, "run", digits, "--calib", DIGITS_CALIB, flag, value, "-o", tmp_path / "out.onnx")
    assert rc == 2
    assert_one_line_error(err, key, value.split(",")[-1] if key == "neighbour_ops" else value)
    assert listing(tmp_path) == before


def test_hist_sample_and_neighbour_ops_reach_the_config(tmp_path, digits, capsys):
    out = tmp_path / "o.onnx"
    rc, _, err = run_cli(capsys, "run", digits, "--calib", DIGITS_CALIB, "--hist-sample", "0", "--neighbour-ops", "none",
                         "-o", out, "-q")
    assert rc == 0, err
    config = load_report(tmp_path / "o.report.json")["config"]
    assert config["hist_sample"] == 0 and config["neighbour_ops"] == []


def _run_exclude_before(tmp_path, digits, capsys, op: str) -> dict:
    out = tmp_path / "d.onnx"
    rc, _, stderr = run_cli(capsys, "run", digits, "--calib", DIGITS_CALIB, "-o", out, "--exclude-before", op,
                            "--no-latency", "--no-per-layer")
    assert rc == 0, stderr
    return load_report(out.with_name("d.report.json"))


def test_exclude_before_keeps_the_convs_that_feed_the_op_in_float(tmp_path, digits, capsys):
    """The digits CNN's two Convs are read only by Relu: --exclude-before Relu keeps them float, the Gemms stay int8."""
    report = _run_exclude_before(tmp_path, digits, capsys, "Relu")
    assert "Conv" not in report["quantized_nodes"] and report["quantized_nodes"].get("Gemm", 0) >= 1
    reasons = {s["node"]: s["reason"] for s in report["skipped"] if s["op_type"] == "Conv"}
    assert len(reasons) == 2 and all("exclude_before" in r for r in reasons.values())


def test_exclude_before_an_op_type_the_model_lacks_is_a_warning(tmp_path, digits, capsys):
    report = _run_exclude_before(tmp_path, digits, capsys, "relu")
    assert any("exclude_before" in w and "relu" in w for w in report["warnings"])
    assert report["quantized_nodes"].get("Conv", 0) == 2  # nothing was excluded


def test_no_calib_overlap_reaches_the_config_and_the_report(tmp_path, digits, capsys):
    out = tmp_path / "o.onnx"
    rc, _, err = run_cli(capsys, "run", digits, "--calib", DIGITS_CALIB, "--method", "percentile", "--no-calib-overlap",
                         "-o", out, "-q", "--no-latency", "--no-per-layer")
    assert rc == 0, err
    report = load_report(tmp_path / "o.report.json")
    assert report["config"]["calib_overlap"] is False and report["calibration"]["observer_thread"] is False


# ---------------------------------------------------------------------------------------------- plans
def test_save_plan_edit_and_load_plan_without_recalibrating(capsys, tmp_path):
    plan, table = tmp_path / "plan.json", tmp_path / "table.json"
    rc, _, err = run_cli(capsys, "run", DIGITS_MODEL, "--calib", DIGITS_CALIB, "-o", tmp_path / "a.onnx", "-q",
                         "--no-latency", "--no-per-layer", "--save-plan", plan, "--save-calib", table)
    assert rc == 0, err
    data = json.loads(plan.read_text())
    data["overrides"] = [{"op_type": "Conv", "precision": "float"}]
    plan.write_text(json.dumps(data))
    rc, _, err = run_cli(capsys, "run", DIGITS_MODEL, "--load-plan", plan, "--load-calib", table, "--val", DIGITS_TEST,
                         "-o", tmp_path / "b.onnx", "-q", "--no-latency", "--no-per-layer")
    assert rc == 0, err
    report = json.loads((tmp_path / "b.report.json").read_text())
    assert report["quantized_nodes"] == {"Gemm": 2}
    assert report["calibration"]["source"] == str(table)
    assert all(n["op_type"] != "Conv" for n in report["plan"]["nodes"])


def test_a_bad_plan_file_is_a_one_line_error_naming_it(capsys, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text('{"nodes": [], "tensors": {}, "overrides": [{"node": "nope", "precision": "float"}]}')
    rc, _, err = run_cli(capsys, "run", DIGITS_MODEL, "--calib", DIGITS_CALIB, "--load-plan", plan,
                         "-o", tmp_path / "a.onnx", "-q")
    assert rc == 2
    assert_one_line_error(err, "nope")
    assert not (tmp_path / "a.onnx").exists()


def test_options_set_their_config_fields_and_unset_ones_keep_the_config_file(tmp_path):
    from qpass.cli import _config_from_args, build_parser

    parse = build_parser().parse_args
    cfg = _config_from_args(parse(["run", "m.onnx", "--per-tensor", "--exclude", "a", "--exclude", "b.*",
                                   "--neighbour-ops", "none", "--providers", "cpu", "--no-per-layer", "--no-latency",
                                   "--op-types", "Conv,Gemm", "--method", "mse", "--no-calib-overlap",
                                   "--exclude-before", "HardSwish", "--synthetic-calib"]))
    assert (cfg.per_channel, cfg.exclude_nodes, cfg.neighbour_ops, cfg.providers) == (False, ("a", "b.*"), (), ("cpu",))
    assert (cfg.per_layer, cfg.latency, cfg.op_types, cfg.method) == (False, False, ("Conv", "Gemm"), "mse")
    assert (cfg.calib_overlap, cfg.exclude_before, cfg.synthetic_calib) == (False, ("HardSwish",), True)
    assert _config_from_args(parse(["validate", "a.onnx", "b.onnx", "--max-samples", "5"])).max_val_samples == 5
    toml = tmp_path / "q.toml"
    toml.write_text("[qpass]\nper_channel = false\nmethod = \"entropy\"\n")
    from_file = _config_from_args(parse(["run", "m.onnx", "--config", str(toml), "--method", "minmax"]))
    assert (from_file.per_channel, from_file.method, from_file.latency) == (False, "minmax", True)


def test_no_validate_skips_the_comparison_and_says_so(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "run", DIGITS_MODEL, "--calib", DIGITS_CALIB, "-o", tmp_path / "a.onnx", "-q",
                         "--no-validate")
    assert rc == 0, err
    report = json.loads((tmp_path / "a.report.json").read_text())
    assert report["validation"] is None and "not validated" in err


def test_awq_without_calibration_data_exits_2_naming_the_fix(tmp_path, capsys):
    from tests.passes.test_activation_scale import norm_mul

    model = tmp_path / "m.onnx"
    onnx.save(norm_mul(), model)
    rc, _, err = run_cli(capsys, "run", model, "-o", tmp_path / "q.onnx", "--weight-only", "int4", "--algorithm", "awq")
    assert rc == 2
    line = assert_one_line_error(err, "no calibration data")
    assert "--calib" in line and not (tmp_path / "q.onnx").exists()
