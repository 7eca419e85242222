"""A large model's validation reference waits on disk (qpass.api._spill_reference): same validation, folder removed."""
from __future__ import annotations

import tempfile

import qpass
from qpass import api
from qpass.runtime import ModelFile
from tests import builders


def test_spilled_reference_validates_like_the_in_memory_one(monkeypatch):
    kept = qpass.quantize(builders.DIGITS_MODEL, builders.DIGITS_CALIB).report.validation
    folders, files = [], []
    real_dir, real_write = tempfile.TemporaryDirectory, ModelFile.write

    def spy_dir(*a, **k):
        folders.append(real_dir(*a, **k))
        return folders[-1]

    monkeypatch.setattr(api, "FILE_SESSION_BYTES", 0)  # every model counts as large
    monkeypatch.setattr(api.tempfile, "TemporaryDirectory", spy_dir)
    monkeypatch.setattr(ModelFile, "write", classmethod(lambda cls, m, f: files.append(real_write(m, f)) or files[-1]))
    spilled = qpass.quantize(builders.DIGITS_MODEL, builders.DIGITS_CALIB).report.validation
    assert len(files) == 1 and files[0].path.name == "model.onnx"
    assert not files[0].path.exists()  # the folder went once validation was done
    got = {o["output"]: o for o in spilled["outputs"]}
    for out in kept["outputs"]:
        assert got[out["output"]]["sqnr_db"] == out["sqnr_db"]
    assert spilled["per_layer"]  # (findings may differ: a latency finding depends on the timing)
    assert [r["node"] for r in spilled["per_layer"]][:3] == [r["node"] for r in kept["per_layer"]][:3]
