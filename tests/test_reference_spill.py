"""A large model's validation reference (qpass.api._spill_reference) and its quantized result (qpass.api._spilled_result)
wait on disk during validation: same validation, same result model, folders removed."""
from __future__ import annotations

import tempfile

import qpass
from qpass import api
from qpass.runtime import ModelFile
from tests import builders


def test_spilled_reference_validates_like_the_in_memory_one(monkeypatch):
    in_memory = qpass.quantize(builders.DIGITS_MODEL, builders.DIGITS_CALIB)
    kept = in_memory.report.validation
    folders, files = [], []
    real_dir, real_write = tempfile.TemporaryDirectory, ModelFile.write

    def spy_dir(*a, **k):
        folders.append(real_dir(*a, **k))
        return folders[-1]

    monkeypatch.setattr(api, "FILE_SESSION_BYTES", 0)  # every model counts as large
    monkeypatch.setattr(api.tempfile, "TemporaryDirectory", spy_dir)
    monkeypatch.setattr(ModelFile, "write", classmethod(lambda cls, m, f: files.append(real_write(m, f)) or files[-1]))
    result = qpass.quantize(builders.DIGITS_MODEL, builders.DIGITS_CALIB)
    spilled = result.report.validation
    assert [f.path.parent.name.split("-")[1] for f in files] == ["reference", "result"]
    assert all(f.path.name == "model.onnx" and not f.path.exists() for f in files)  # the folders went after validation
    # the result, dropped while it was validated, comes back from its file byte for byte
    assert result.model.SerializeToString() == in_memory.model.SerializeToString()
    assert result.model.graph.initializer and all(t.data_location == 0 and not t.external_data
                                                  for t in result.model.graph.initializer)
    got = {o["output"]: o for o in spilled["outputs"]}
    for out in kept["outputs"]:
        assert got[out["output"]]["sqnr_db"] == out["sqnr_db"]
    assert spilled["per_layer"]  # (findings may differ: a latency finding depends on the timing)
    assert [r["node"] for r in spilled["per_layer"]][:3] == [r["node"] for r in kept["per_layer"]][:3]
