"""qpass.io: loading (paths, ModelProtos, external data), model metadata round trips, atomic saves."""
from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import qpass
from qpass import io as qio
from qpass.errors import ModelLoadError, ModelSaveError
from qpass.io import load_model, save_model, write_text_atomic

from .builders import DIGITS_MODEL, conv_model, feeds, matmul_model


# ---------------------------------------------------------------------------------------------- helpers
def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def assert_same_weights(a: onnx.ModelProto, b: onnx.ModelProto) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        np.testing.assert_array_equal(wa[name], wb[name], err_msg=name)


def entries(folder: Path) -> set[str]:
    """Every name in ``folder``, hidden temp files and temp folders included."""
    return set(os.listdir(folder))


def digits() -> onnx.ModelProto:
    return onnx.load(str(DIGITS_MODEL))


def scaled(model: onnx.ModelProto, factor: float) -> onnx.ModelProto:
    """A copy of ``model`` with every float initializer multiplied by ``factor`` (same layout)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        arr = numpy_helper.to_array(t)
        if arr.dtype.kind == "f":
            t.CopyFrom(numpy_helper.from_array((arr * factor).astype(arr.dtype), t.name))
    return out


# ---------------------------------------------------------------------------------------------- load
def test_load_from_path(tmp_path):
    model = load_model(DIGITS_MODEL)
    assert isinstance(model, onnx.ModelProto)
    ref = onnx.load(str(DIGITS_MODEL))
    assert model.SerializeToString() == ref.SerializeToString()


def test_load_from_pathlike_and_str(tmp_path):
    a = load_model(str(DIGITS_MODEL))
    b = load_model(Path(DIGITS_MODEL))
    assert a.SerializeToString() == b.SerializeToString()


def test_load_from_modelproto_copies_and_does_not_mutate():
    source = conv_model()
    before = source.SerializeToString()
    model = load_model(source)
    assert model is not source
    assert model.SerializeToString() == before
    assert source.SerializeToString() == before
    # the returned copy is the caller's to modify
    model.graph.node[0].name = "renamed"
    model.metadata_props.add(key="k", value="v")
    assert source.SerializeToString() == before


def test_load_does_not_touch_the_file(tmp_path):
    p = tmp_path / "m.onnx"
    shutil.copyfile(DIGITS_MODEL, p)
    before = p.read_bytes()
    stat_before = p.stat()
    load_model(p)
    assert p.read_bytes() == before
    assert p.stat().st_mtime_ns == stat_before.st_mtime_ns
    assert entries(tmp_path) == {"m.onnx"}


def test_load_missing_file(tmp_path):
    p = tmp_path / "nope.onnx"
    with pytest.raises(ModelLoadError) as exc:
        load_model(p)
    assert str(p) in str(exc.value)
    assert "not found" in str(exc.value)


def test_load_directory(tmp_path):
    d = tmp_path / "dir.onnx"
    d.mkdir()
    with pytest.raises(ModelLoadError) as exc:
        load_model(d)
    assert str(d) in str(exc.value) and "directory" in str(exc.value)


@pytest.mark.parametrize("content", [b"hello, not a model\n", b"", b"\x00" * 64], ids=["text", "empty", "zeros"])
def test_load_not_a_model(tmp_path, content):
    p = tmp_path / "bad.onnx"
    p.write_bytes(content)
    with pytest.raises(ModelLoadError) as exc:
        load_model(p)
    assert str(p) in str(exc.value)
    assert "\n" not in str(exc.value)


def test_load_truncated_model(tmp_path):
    data = DIGITS_MODEL.read_bytes()
    p = tmp_path / "half.onnx"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError) as exc:
        load_model(p)
    assert str(p) in str(exc.value)
    assert p.read_bytes() == data[: len(data) // 2]


def test_load_invalid_modelproto():
    model = conv_model()
    model.graph.node[1].input[0] = "undefined_tensor"
    with pytest.raises(ModelLoadError) as exc:
        load_model(model)
    assert "<ModelProto>" in str(exc.value)
    assert "\n" not in str(exc.value)


def test_load_wrong_argument_type():
    with pytest.raises(ModelLoadError):
        load_model(12345)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- metadata
CHARSET = "".join(chr(c) for c in range(0x20, 0x7F)) + "\n" + "äöüßéèçñ€£¥" + "\n" + "\n".join(
    chr(c) for c in range(0x4E00, 0x4E00 + 3000))  # a long multi-line OCR-style charset, ~9 KB


def rich_model() -> onnx.ModelProto:
    model = conv_model()
    model.metadata_props.add(key="charset", value=CHARSET)
    model.metadata_props.add(key="author", value="qpass tests")
    model.metadata_props.add(key="empty", value="")
    model.model_version = 42
    model.doc_string = "a model with metadata\nover two lines"
    model.producer_name = "test-producer"
    model.producer_version = "9.8.7"
    model.domain = "org.example.qpass"
    model.opset_import.append(helper.make_opsetid("ai.onnx.ml", 3))  # imported, used by no node
    onnx.checker.check_model(model, full_check=True)
    return model


def assert_metadata_kept(src: onnx.ModelProto, out: onnx.ModelProto) -> None:
    assert [(p.key, p.value) for p in out.metadata_props] == [(p.key, p.value) for p in src.metadata_props]
    assert out.model_version == src.model_version
    assert out.doc_string == src.doc_string
    assert out.producer_name == src.producer_name
    assert out.producer_version == src.producer_version
    assert out.domain == src.domain
    opsets = {op.domain: op.version for op in out.opset_import}
    assert opsets.get("ai.onnx.ml") == 3
    assert opsets.get("", opsets.get("ai.onnx")) == 13
    assert out.ir_version >= src.ir_version


def test_metadata_survives_quantize():
    model = rich_model()
    before = model.SerializeToString()
    result = qpass.quantize(model, feeds(model))
    assert model.SerializeToString() == before  # the argument is not mutated
    assert sum(result.report.quantized_nodes.values()) > 0
    assert_metadata_kept(model, result.model)
    onnx.checker.check_model(result.model, full_check=True)


def test_metadata_survives_quantize_to_disk(tmp_path):
    model = rich_model()
    out = tmp_path / "rich.qpass.onnx"
    result = qpass.quantize(model, feeds(model), output=out)
    assert result.output_path == out
    written = onnx.load(str(out))
    assert_metadata_kept(model, written)
    assert written.metadata_props[0].value == CHARSET  # byte-exact, newlines and non-ASCII included
    onnx.checker.check_model(str(out), full_check=True)


def test_metadata_survives_quantize_from_path(tmp_path):
    model = rich_model()
    src = tmp_path / "rich.onnx"
    onnx.save_model(model, str(src))
    before = src.read_bytes()
    result = qpass.quantize(src, feeds(model), output=tmp_path / "rich.q.onnx")
    assert src.read_bytes() == before
    assert_metadata_kept(model, onnx.load(str(tmp_path / "rich.q.onnx")))
    assert_metadata_kept(model, result.model)


def test_save_model_keeps_metadata(tmp_path):
    model = rich_model()
    out = save_model(model, tmp_path / "m.onnx")
    back = load_model(out)
    assert back.SerializeToString() == model.SerializeToString()


# ---------------------------------------------------------------------------------------------- atomic save
def test_save_returns_path_and_leaves_no_temp_files(tmp_path):
    model = conv_model()
    out = tmp_path / "m.onnx"
    written = save_model(model, out)
    assert Path(written) == out
    assert entries(tmp_path) == {"m.onnx"}
    assert onnx.load(str(out)).SerializeToString() == model.SerializeToString()


def test_save_relative_path_in_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_model(conv_model(), "rel.onnx")
    assert entries(tmp_path) == {"rel.onnx"}


def test_save_replaces_existing_output(tmp_path):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"old content")
    model = matmul_model()
    save_model(model, out)
    assert onnx.load(str(out)).SerializeToString() == model.SerializeToString()
    assert entries(tmp_path) == {"m.onnx"}


def _raise_before_writing(*args, **kwargs):
    raise OSError(28, "No space left on device")


def _write_half_then_raise(model, f, *args, **kwargs):
    data = model.SerializeToString()
    with open(f, "wb") as fh:
        fh.write(data[: len(data) // 2])
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("failing_save", [_raise_before_writing, _write_half_then_raise], ids=["raise", "half-written"])
def test_failed_save_leaves_nothing(tmp_path, monkeypatch, failing_save):
    monkeypatch.setattr(onnx, "save_model", failing_save)
    out = tmp_path / "m.onnx"
    with pytest.raises(ModelSaveError) as exc:
        save_model(conv_model(), out)
    assert str(out) in str(exc.value)
    assert not out.exists()
    assert entries(tmp_path) == set()


@pytest.mark.parametrize("failing_save", [_raise_before_writing, _write_half_then_raise], ids=["raise", "half-written"])
def test_failed_save_keeps_previous_output(tmp_path, monkeypatch, failing_save):
    out = tmp_path / "m.onnx"
    old = matmul_model()
    save_model(old, out)
    before = out.read_bytes()
    monkeypatch.setattr(onnx, "save_model", failing_save)
    with pytest.raises(ModelSaveError):
        save_model(conv_model(), out)
    assert out.read_bytes() == before
    assert entries(tmp_path) == {"m.onnx"}


def _write_external_half_then_raise(model, path, data_name):
    with open(path.parent / data_name, "wb") as fh:
        fh.write(b"\0" * 1000)
    path.write_bytes(b"\0" * 10)
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("failing_save", [_raise_before_writing, _write_external_half_then_raise],
                         ids=["raise", "half-written"])
def test_failed_external_data_save_leaves_nothing(tmp_path, monkeypatch, failing_save):
    monkeypatch.setattr(qio, "write_external", failing_save)
    with pytest.raises(ModelSaveError):
        save_model(digits(), tmp_path / "m.onnx", external_data=True)
    assert entries(tmp_path) == set()


# ---------------------------------------------------------------------------------------------- external data
def test_external_data_round_trip(tmp_path):
    model = digits()
    out = tmp_path / "ext.onnx"
    save_model(model, out, external_data=True)
    data = tmp_path / "ext.onnx.data"
    assert data.is_file() and data.stat().st_size > 0
    assert entries(tmp_path) == {"ext.onnx", "ext.onnx.data"}
    assert out.stat().st_size < DIGITS_MODEL.stat().st_size  # the weights moved out
    back = load_model(out)
    assert_same_weights(model, back)
    # the loaded model carries its weights in memory (no external references left)
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in back.graph.initializer)
    # and save_model did not mutate its argument into an external-data model
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert model.SerializeToString() == digits().SerializeToString()


def test_external_data_model_loads_after_the_folder_moves(tmp_path):
    first = tmp_path / "a"
    first.mkdir()
    save_model(digits(), first / "m.onnx", external_data=True)
    moved = tmp_path / "b"
    shutil.move(str(first), str(moved))
    assert_same_weights(digits(), load_model(moved / "m.onnx"))


def test_external_data_missing_data_file(tmp_path):
    out = tmp_path / "ext.onnx"
    save_model(digits(), out, external_data=True)
    (tmp_path / "ext.onnx.data").unlink()
    with pytest.raises(ModelLoadError) as exc:
        load_model(out)
    msg = str(exc.value)
    assert "ext.onnx" in msg
    assert "ext.onnx.data" in msg  # names the missing data file
    assert "\n" not in msg


def test_external_data_small_model(tmp_path):
    """QPASS BUG (found by this test): with external_data=True and no tensor over onnx's
    size_threshold (1024 bytes), onnx writes no .data file and the os.replace of it fails."""
    model = conv_model()  # all initializers < 1 KB
    out = tmp_path / "small.onnx"
    save_model(model, out, external_data=True)
    assert_same_weights(model, load_model(out))
    assert not any(n.startswith(".") for n in entries(tmp_path))


def test_external_data_quantize_small_model(tmp_path):
    """The same bug through the public API: quantize(..., external_data=True) of a small model."""
    model = conv_model()
    out = tmp_path / "small.qpass.onnx"
    qpass.quantize(model, feeds(model), output=out, external_data=True)
    assert out.is_file()
    onnx.checker.check_model(str(out), full_check=True)


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "replacing"])
def test_external_data_failed_rename_keeps_model_and_data_consistent(tmp_path, monkeypatch, existing):
    """QPASS BUG (found by this test): the .data file is renamed into place before the model file;
    when the second rename fails, a fresh save leaves a stray .data file and a replacing save
    pairs the old model file with the new weights."""
    out = tmp_path / "m.onnx"
    old, new = digits(), scaled(digits(), 2.0)
    if existing:
        save_model(old, out, external_data=True)
    before = entries(tmp_path)
    real_replace = os.replace

    def replace(src, dst, *a, **kw):
        if Path(dst) == out:
            raise OSError(5, "Input/output error")
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(ModelSaveError):
        save_model(new, out, external_data=True)
    monkeypatch.setattr(os, "replace", real_replace)
    assert entries(tmp_path) == before
    if existing:
        assert_same_weights(old, load_model(out))


# ---------------------------------------------------------------------------------------------- refusals
def test_refuses_output_equal_to_input(tmp_path):
    src = tmp_path / "in.onnx"
    shutil.copyfile(DIGITS_MODEL, src)
    before = src.read_bytes()
    for spelling in (src, str(src), tmp_path / "." / "in.onnx", tmp_path / "sub" / ".." / "in.onnx"):
        if "sub" in str(spelling):
            (tmp_path / "sub").mkdir(exist_ok=True)
        with pytest.raises(ModelSaveError) as exc:
            save_model(conv_model(), spelling, input_path=src)
        assert "input" in str(exc.value)
    assert src.read_bytes() == before


def test_refuses_output_equal_to_input_through_symlink(tmp_path):
    src = tmp_path / "in.onnx"
    shutil.copyfile(DIGITS_MODEL, src)
    link = tmp_path / "link.onnx"
    link.symlink_to(src)
    before = src.read_bytes()
    with pytest.raises(ModelSaveError):
        save_model(conv_model(), link, input_path=src)
    with pytest.raises(ModelSaveError):
        save_model(conv_model(), src, input_path=link)
    assert src.read_bytes() == before
    assert link.is_symlink()


def test_refuses_output_equal_to_input_through_hardlink(tmp_path):
    src = tmp_path / "in.onnx"
    shutil.copyfile(DIGITS_MODEL, src)
    hard = tmp_path / "hard.onnx"
    os.link(src, hard)
    before = src.read_bytes()
    with pytest.raises(ModelSaveError):
        save_model(conv_model(), hard, input_path=src)
    assert src.read_bytes() == before


def test_other_output_with_input_path_is_fine(tmp_path):
    src = tmp_path / "in.onnx"
    shutil.copyfile(DIGITS_MODEL, src)
    save_model(conv_model(), tmp_path / "out.onnx", input_path=src)
    assert (tmp_path / "out.onnx").is_file()


def test_refuses_missing_output_directory(tmp_path):
    out = tmp_path / "missing" / "m.onnx"
    with pytest.raises(ModelSaveError) as exc:
        save_model(conv_model(), out)
    assert str(tmp_path / "missing") in str(exc.value)
    assert not (tmp_path / "missing").exists()


def test_refuses_output_that_is_a_directory(tmp_path):
    d = tmp_path / "m.onnx"
    d.mkdir()
    with pytest.raises(ModelSaveError) as exc:
        save_model(conv_model(), d)
    assert str(d) in str(exc.value)
    assert d.is_dir() and not any(d.iterdir())


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root can write into a read-only directory")
def test_refuses_read_only_directory(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(ModelSaveError) as exc:
            save_model(conv_model(), ro / "m.onnx")
        assert str(ro) in str(exc.value)
        assert not any(ro.iterdir())
    finally:
        ro.chmod(stat.S_IRWXU)


def test_refuses_unwritable_directory_as_reported_by_access(tmp_path, monkeypatch):
    """The same refusal where the test runs as root: os.access says the folder is not writable."""
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **kw: False if mode == os.W_OK else real_access(p, mode, *a, **kw))
    with pytest.raises(ModelSaveError) as exc:
        save_model(conv_model(), tmp_path / "m.onnx")
    assert "writable" in str(exc.value)
    assert entries(tmp_path) == set()


# ---------------------------------------------------------------------------------------------- text files
def test_write_text_atomic(tmp_path):
    out = tmp_path / "r.json"
    out.write_text("old", encoding="utf-8")
    write_text_atomic(out, "new ü\n")
    assert out.read_text(encoding="utf-8") == "new ü\n"
    assert entries(tmp_path) == {"r.json"}


def test_write_text_atomic_failure_leaves_no_temp(tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    out.write_text("old", encoding="utf-8")

    def boom(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        write_text_atomic(out, "new")
    assert out.read_text(encoding="utf-8") == "old"
    assert entries(tmp_path) == {"r.json"}


def test_written_files_have_ordinary_permissions(tmp_path):
    """QPASS BUG (found by this test): write_text_atomic uses tempfile.mkstemp, whose file is mode
    0600, so reports and calibration tables are unreadable by group/others, unlike the model
    written beside them (which follows the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    expected = 0o666 & ~umask
    model = save_model(conv_model(), tmp_path / "m.onnx")
    report = write_text_atomic(tmp_path / "m.report.json", "{}\n")
    assert stat.S_IMODE(model.stat().st_mode) == expected
    assert stat.S_IMODE(report.stat().st_mode) == expected


def test_io_module_constants():
    assert qio.PROTOBUF_LIMIT == 2**31 - 1
    assert qio.EXTERNAL_DATA_THRESHOLD < qio.PROTOBUF_LIMIT


def test_models_over_the_protobuf_limit_are_written_with_external_data(tmp_path, monkeypatch):
    """A >2 GB model cannot be one protobuf; the threshold is lowered here so a small model takes that path."""
    import qpass.io as qio

    model = onnx.load(str(DIGITS_MODEL))
    monkeypatch.setattr(qio, "EXTERNAL_DATA_THRESHOLD", 1000)
    out = qio.save_model(model, tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").is_file()
    monkeypatch.undo()
    back = qio.load_model(out)
    assert [t.name for t in back.graph.initializer] == [t.name for t in model.graph.initializer]
    for a, b in zip(back.graph.initializer, model.graph.initializer):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))


def test_output_keeps_only_the_value_info_the_input_had():
    from tests import builders

    model = builders.conv_model()
    model.graph.value_info.append(onnx.helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, ["N", 4, 8, 8]))
    res = qpass.quantize(model, builders.feeds(model, n=4, batch=1), val_fraction=0.0)
    assert [vi.name for vi in res.model.graph.value_info] == ["c"]


# ---------------------------------------------------------------------------------------------- large models
def _tiny_lm(folder: Path) -> Path:
    """A two-layer decoder (benchmarks/big_lm.py's builder, tiny sizes) with its weights in external data."""
    from benchmarks.big_lm import build

    path = folder / "lm.onnx"
    build(path, layers=2, hidden=64, ffn=128, heads=4, vocab=96, seq=8)
    return path


def test_skeleton_stubs_large_weights_and_inference_matches_the_full_model():
    model = onnx.load(DIGITS_MODEL)
    sk = qio.skeleton(model, min_bytes=1024)
    stubbed = [t for t in sk.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert stubbed and all(not t.raw_data for t in stubbed) and sk.ByteSize() < model.ByteSize() // 2
    full = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    assert qio.infer_shapes(model).SerializeToString() == full.SerializeToString()
    before = model.SerializeToString()
    with qio.inferred_view(model) as view:
        assert list(view.graph.value_info) == list(full.graph.value_info)
    assert model.SerializeToString() == before  # put back as it was


def test_write_external_streams_tensors_without_mutating_the_model(tmp_path, monkeypatch):
    model = onnx.load(DIGITS_MODEL)
    before = model.SerializeToString()
    assert qio.write_external(model, tmp_path / "m.onnx", "m.onnx.data")
    assert model.SerializeToString() == before
    back = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    ext = [t for t in back.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    big = [t for t in ext if int(dict((e.key, e.value) for e in t.external_data)["length"]) >= qio.ALIGN_FROM]
    assert ext and all(int(dict((e.key, e.value) for e in t.external_data)["offset"]) % qio.ALIGN == 0 for t in big)
    assert_same_weights(model, load_model(tmp_path / "m.onnx"))


def test_weight_only_on_an_external_data_model_writes_external_data_beside_the_output_only(tmp_path, monkeypatch):
    """An input whose weights are in external data loads; the >2 GB branches (output with external data, validation
    sessions through files) are taken by lowering the thresholds; nothing is written beside the input."""
    from qpass import runtime

    src = tmp_path / "in"
    src.mkdir()
    path = _tiny_lm(src)
    listing = {p.name: p.stat().st_mtime_ns for p in src.iterdir()}
    assert listing.keys() == {"lm.onnx", "lm.onnx.data"}
    monkeypatch.setattr(qio, "EXTERNAL_DATA_THRESHOLD", 0)  # every model counts as over 2 GB
    monkeypatch.setattr(runtime, "FILE_SESSION_BYTES", 0)
    made = []
    real = runtime.write_external
    monkeypatch.setattr(runtime, "write_external", lambda *a: (made.append(a[1]), real(*a))[1])
    out = tmp_path / "out" / "lm.q.onnx"
    out.parent.mkdir()
    result = qpass.quantize(path, output=out, weight_only="int4", block_size=32, algorithm="rtn", per_layer=False)
    assert {p.name for p in out.parent.iterdir()} == {"lm.q.onnx", "lm.q.onnx.data", "lm.q.report.json",
                                                       "lm.q.report.html"}
    assert {p.name: p.stat().st_mtime_ns for p in src.iterdir()} == listing
    assert len(made) >= 2  # the reference and the quantized model went to onnxruntime through files
    q = onnx.load(str(out), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in q.graph.initializer)
    assert result.report.validation["outputs"][0]["cosine_mean"] > 0.9
    assert result.report.sizes["input_bytes"] == sum(p.stat().st_size for p in src.iterdir())  # .onnx and .data
    import onnxruntime as ort

    ids = {"input_ids": np.arange(8, dtype=np.int64).reshape(1, 8)}
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, ids)[0].ravel()
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, ids)[0].ravel()
    assert got @ want / (np.linalg.norm(got) * np.linalg.norm(want)) > 0.9


def test_external_data_flag_writes_data_beside_a_small_output(tmp_path):
    path = _tiny_lm(tmp_path)
    out = tmp_path / "q.onnx"
    qpass.quantize(path, output=out, weight_only="int4", block_size=32, algorithm="rtn", validate=False,
                   external_data=True)
    assert (tmp_path / "q.onnx.data").is_file()
    qpass.quantize(path, output=tmp_path / "q2.onnx", weight_only="int4", block_size=32, algorithm="rtn",
                   validate=False)
    assert not (tmp_path / "q2.onnx.data").exists()


# ---------------------------------------------------------------------------------------------- model_bytes
def _size_cases() -> list[onnx.ModelProto]:
    """Models whose initializers cover the raw lengths model_bytes counts from shapes (packed 4- and 2-bit types,
    an odd element count, lengths at varint boundaries) and the tensors it sizes whole (strings, float_data,
    external data), with the fields a tensor copy must keep (an empty doc_string set, metadata)."""
    T = onnx.TensorProto
    tensors = [
        numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "f32"),
        numpy_helper.from_array(np.ones(127, dtype=np.uint8), "u8_127"),  # 127 -> 128 bytes: the varint grows
        numpy_helper.from_array(np.ones(16384, dtype=np.int8), "i8_16384"),
        numpy_helper.from_array(np.ones((3, 5), dtype=np.float16), "f16"),
        numpy_helper.from_array(np.ones(0, dtype=np.float32), "empty"),
        helper.make_tensor("i4", T.INT4, [7], [1, -2, 3, -4, 5, -6, 7], raw=False),
        helper.make_tensor("u2", T.UINT2, [5], [0, 1, 2, 3, 1], raw=False),
        helper.make_tensor("fdata", T.FLOAT, [3], [1.0, 2.0, 3.0]),
        helper.make_tensor("s", T.STRING, [2], [b"ab", b"c"]),
    ]
    # 4-bit and 2-bit values as packed raw data (make_tensor's int32_data form is sized whole)
    tensors.append(T(name="i4_raw", data_type=T.INT4, dims=[7], raw_data=bytes([0x21, 0x43, 0x65, 0x07])))
    tensors.append(T(name="u2_raw", data_type=T.UINT2, dims=[5], raw_data=bytes([0xE4, 0x01])))
    doc = numpy_helper.from_array(np.ones(4, dtype=np.float32), "doc")
    doc.doc_string = ""  # set and empty: serialised
    doc.metadata_props.add(key="k", value="v")
    tensors.append(doc)
    ext = T(name="ext", data_type=T.FLOAT, dims=[4], data_location=T.EXTERNAL)
    ext.external_data.add(key="location", value="w.data")
    tensors.append(ext)
    node = helper.make_node("Add", ["x", "f32"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", T.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", T.FLOAT, [2, 3])], initializer=tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], doc_string="d")
    model.metadata_props.add(key="a", value="b")
    big = matmul_model()  # an ordinary model, and one with a weight large enough for a 3-byte graph length
    wide = onnx.ModelProto()
    wide.CopyFrom(model)
    wide.graph.initializer.append(numpy_helper.from_array(np.ones(300_000, dtype=np.float32), "wide"))
    return [model, big, wide, onnx.load(str(DIGITS_MODEL))]


@pytest.mark.parametrize("index", range(4))
def test_model_bytes_counts_the_serialised_size_without_serialising(monkeypatch, index):
    model = _size_cases()[index]
    monkeypatch.setattr(qio, "SIZE_UNSERIALISED_BYTES", 0)  # every model takes the counted path
    assert qio.model_bytes(model) == len(model.SerializeToString())


def test_model_bytes_of_a_large_model_takes_no_copy_of_its_weights():
    """upb's ByteSize serialises the whole message: on a 651 MB model it took 1.2 GB more for an instant."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM to the current RSS
    except OSError:
        pytest.skip("needs Linux's /proc/self/clear_refs")

    def hwm_mb() -> float:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024

    n = qio.SIZE_UNSERIALISED_BYTES // 4 + 1024  # float32 weights just over the threshold (64 MB)
    model = helper.make_model(helper.make_graph([], "g", [], [], initializer=[
        numpy_helper.from_array(np.ones(n, dtype=np.float32), "w")]))
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = hwm_mb()
    size = qio.model_bytes(model)
    grown = hwm_mb() - before
    assert grown < 16, f"model_bytes took {grown:.0f} MB more"
    assert size == len(model.SerializeToString())
