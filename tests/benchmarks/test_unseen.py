"""benchmarks/unseen.py: its synthetic music and its metrics against hand-computed answers (no download)."""
from __future__ import annotations

import numpy as np

from benchmarks.unseen import metrics, music_windows


def test_music_windows_are_deterministic_bounded_and_not_silent():
    a, b = music_windows(3, 2), music_windows(3, 2)
    assert a.shape == (2, 1, 43844, 1) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert np.abs(a).max() <= 1.0 and float(np.abs(a).mean()) > 1e-3
    assert not np.array_equal(music_windows(4, 2), a)


def test_map_f1_mask_iou_and_ctc_text_agreement_by_hand():
    ref = [[np.array([[0.9, 0.1, 0.5, 0.2]], np.float32)]]
    got = [[np.array([[0.8, 0.4, 0.1, 0.2]], np.float32)]]
    # above 0.3: ref {0, 2}, got {0, 1}: F1 = 2*1 / (2 + 2)
    assert metrics("music", ref, got, ["note"]) == {"F1@0.3 note": 0.5}
    # the same maps as a detector's: intersection 1, union 3
    assert metrics("det", ref, got, ["map"])["mask IoU"] == 1 / 3
    frames = lambda ks: np.eye(4, dtype=np.float32)[ks][None]  # noqa: E731 - one-hot CTC frames [1, T, C]
    r = [[frames([1, 1, 0, 2])], [frames([3, 0, 3, 3])]]
    g = [[frames([1, 0, 0, 2])], [frames([3, 3, 3, 3])]]  # same text "1 2"; "3 3" read as "3"
    m = metrics("rec", r, g, ["probs"])
    assert m["text agreement"] == 0.5 and m["frame agreement"] == 6 / 8
