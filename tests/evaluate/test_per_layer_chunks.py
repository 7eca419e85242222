"""per_layer_error measures its tensors in chunks of a bounded size: the ranking does not depend on the chunking."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import qpass
from qpass.evaluate import validate as validate_module
from qpass.evaluate.validate import per_layer_error
from tests import builders


def test_chunked_per_layer_equals_one_chunk(monkeypatch):
    original = onnx.load(str(builders.DIGITS_MODEL))
    quantized = qpass.quantize(builders.DIGITS_MODEL, builders.DIGITS_CALIB, validate=False).model
    x = np.load(builders.DIGITS_TEST)
    samples = [({"input": x["input"][i:i + 1]}, None) for i in range(3)]
    whole = per_layer_error(original, quantized, samples, "CPUExecutionProvider")
    sessions = []
    real = validate_module._session
    monkeypatch.setattr(validate_module, "_session", lambda *a, **k: sessions.append(k["outputs"]) or real(*a, **k))
    monkeypatch.setattr(validate_module, "PER_LAYER_RUN_BYTES", 1)  # one tensor a chunk
    chunked = per_layer_error(original, quantized, samples, "CPUExecutionProvider")
    asked = len(sessions) // 2
    assert len(whole) > 3 and asked > 3  # the digits CNN has more than 3 measured tensors: several chunks ran
    assert all(len(s) == 1 for s in sessions)
    assert [r["node"] for r in chunked] == [r["node"] for r in whole]
    # onnxruntime fuses differently when fewer intermediates are graph outputs: the values agree to rounding
    for a, b in zip(chunked, whole):
        assert a["sqnr_db"] == pytest.approx(b["sqnr_db"], abs=0.05)
        assert a["added_noise_db"] == pytest.approx(b["added_noise_db"], abs=0.05)


def test_sizes_bind_symbolic_dims_to_the_feed():
    f32, i64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
    types = {"ids": i64, "h": f32, "att": f32, "odd": f32}
    shapes = {"ids": ["batch", "seq"], "h": ["batch", "seq", 576], "att": [1, 9, "seq", "seq"], "odd": ["n", 4]}
    sizes = validate_module._sizes(types, shapes, ["ids"], {"ids": np.zeros((2, 256), np.int64)})
    assert sizes == {"ids": 2 * 256 * 8, "h": 2 * 256 * 576 * 4, "att": 9 * 256 * 256 * 4}  # "n" is not bound


def test_one_session_at_a_time_gives_the_same_values(monkeypatch):
    """The default: the original's session is gone (its chunk outputs on disk) before the quantized model's is made;
    the values are those of the two sessions side by side, exactly."""
    import weakref

    original = onnx.load(str(builders.DIGITS_MODEL))
    quantized = qpass.quantize(builders.DIGITS_MODEL, builders.DIGITS_CALIB, validate=False).model
    x = np.load(builders.DIGITS_TEST)
    samples = [({"input": x["input"][i:i + 1]}, None) for i in range(3)]
    monkeypatch.setattr(validate_module, "PER_LAYER_RUN_BYTES", 1)  # one tensor a chunk: many sessions
    real = validate_module._session
    alive: list = []
    others: dict[bool, list[int]] = {True: [], False: []}  # sessions alive when another is made, by mode
    for mode in (False, True):
        def spy(*a, mode=mode, **k):
            alive[:] = [r for r in alive if r() is not None]
            others[mode].append(len(alive))
            s = real(*a, **k)
            alive.append(weakref.ref(s))
            return s
        monkeypatch.setattr(validate_module, "_session", spy)
        got = per_layer_error(original, quantized, samples, "CPUExecutionProvider", one_at_a_time=mode)
        if mode:
            one = got
        else:
            pair = got
    assert len(others[True]) > 8 and max(others[True]) == 0
    assert max(others[False]) == 1  # side by side: the original's session is alive when the quantized one is made
    assert len(one) > 3 and one == pair
