"""Metrics on hand-computed cases: per-image, global (micro) and per-case (paper §4.3)."""
import math

import numpy as np
import pytest
import torch

from tmc.metrics import (binarize, confusion, dice_from_counts, global_scores, iou_from_counts,
                         mean_scores, mean_std, per_case_scores, per_image_scores)


def _mask(*pixels, size=4):
    m = np.zeros((size, size), dtype=bool)
    for r, c in pixels:
        m[r, c] = True
    return m


SQUARE = _mask((0, 0), (0, 1), (1, 0), (1, 1))  # 4 pixels
EMPTY = _mask()


@pytest.mark.parametrize("pred,target,tp,fp,fn,dice,iou", [
    (SQUARE, SQUARE, 4, 0, 0, 1.0, 1.0),  # perfect
    (_mask((3, 3), (3, 2)), SQUARE, 0, 2, 4, 0.0, 0.0),  # disjoint
    (_mask((0, 0), (0, 1), (2, 0), (2, 1)), SQUARE, 2, 2, 2, 0.5, 1 / 3),  # half overlap
    (SQUARE, EMPTY, 0, 4, 0, 0.0, 0.0),  # empty target, prediction present
    (EMPTY, SQUARE, 0, 0, 4, 0.0, 0.0),  # lesion missed entirely
])
def test_hand_computed_cases(pred, target, tp, fp, fn, dice, iou):
    counts = confusion(pred, target)
    assert tuple(int(c) for c in counts) == (tp, fp, fn)
    assert float(dice_from_counts(*counts)) == pytest.approx(dice)
    assert float(iou_from_counts(*counts)) == pytest.approx(iou)


def test_empty_vs_empty_follows_the_given_rule():
    counts = confusion(EMPTY, EMPTY)
    assert tuple(int(c) for c in counts) == (0, 0, 0)
    assert math.isnan(float(dice_from_counts(*counts)))  # nnU-Net default
    assert math.isnan(float(iou_from_counts(*counts)))
    assert float(dice_from_counts(*counts, empty=1.0)) == 1.0
    assert float(iou_from_counts(*counts, empty=0.0)) == 0.0


def test_per_image_scores_batch_and_torch_input():
    pred = np.stack([SQUARE, EMPTY, _mask((0, 0), (0, 1), (2, 0), (2, 1))])
    target = np.stack([SQUARE, EMPTY, SQUARE])
    s = per_image_scores(pred, target)
    np.testing.assert_array_equal(s["tp"], [4, 0, 2])
    np.testing.assert_array_equal(s["fp"], [0, 0, 2])
    np.testing.assert_array_equal(s["fn"], [0, 0, 2])
    np.testing.assert_allclose(s["dice"], [1.0, np.nan, 0.5])
    np.testing.assert_allclose(s["iou"], [1.0, np.nan, 1 / 3])
    s_t = per_image_scores(torch.from_numpy(pred), torch.from_numpy(target).long())
    np.testing.assert_allclose(s_t["dice"], s["dice"])
    m = mean_scores(s)  # default empty_score 1.0
    assert m["dice"] == pytest.approx((1 + 1 + 0.5) / 3) and m["n"] == 3
    m = mean_scores(s, empty_score=math.nan)
    assert m["dice"] == pytest.approx(0.75) and m["n"] == 2
    assert mean_scores(s, empty_score=0.0)["iou"] == pytest.approx((1 + 0 + 1 / 3) / 3)


def test_global_and_per_image_differ():
    big = np.zeros((20, 20), dtype=bool)
    big[:10, :10] = True  # 100 pixels, predicted perfectly
    small_gt = np.zeros((20, 20), dtype=bool)
    small_gt[15:17, 15:17] = True  # 4 pixels, missed
    pred = np.stack([big, np.zeros_like(big)])
    target = np.stack([big, small_gt])
    s = per_image_scores(pred, target)
    assert mean_scores(s)["dice"] == pytest.approx(0.5)  # (1 + 0) / 2
    g = global_scores(s["tp"], s["fp"], s["fn"])
    assert g["dice_global"] == pytest.approx(200 / 204)  # 2*100 / (2*100 + 0 + 4)
    assert g["iou_global"] == pytest.approx(100 / 104)
    assert math.isnan(global_scores(0, 0, 0)["dice_global"])


def test_per_case_averages_slices_then_cases():
    # case a: slices with Dice 0.5 and empty-vs-empty; case b: Dice 1.0 and 0.0;
    # case c: a normal scan, every slice empty and correctly predicted empty.
    half = _mask((0, 0), (0, 1), (2, 0), (2, 1))
    pred = np.stack([half, EMPTY, SQUARE, EMPTY, EMPTY, EMPTY])
    target = np.stack([SQUARE, EMPTY, SQUARE, SQUARE, EMPTY, EMPTY])
    cases = ["a", "a", "b", "b", "c", "c"]
    s = per_image_scores(pred, target)

    r = per_case_scores(s, cases)  # default: empty-vs-empty slice = 1.0
    assert r["cases"] == ["a", "b", "c"]
    np.testing.assert_allclose(r["dice"], [0.75, 0.5, 1.0])
    np.testing.assert_allclose(r["iou"], [(1 / 3 + 1) / 2, 0.5, 1.0])
    np.testing.assert_array_equal(r["n_slices"], [2, 2, 2])
    assert r["mean_dice"] == pytest.approx((0.75 + 0.5 + 1.0) / 3)

    r = per_case_scores(s, cases, empty_score=math.nan)  # nnU-Net: exclude; c has no score
    np.testing.assert_allclose(r["dice"], [0.5, 0.5, np.nan])
    assert r["mean_dice"] == pytest.approx(0.5)

    r = per_case_scores(s, cases, empty_score=0.0)  # LViT-style
    np.testing.assert_allclose(r["dice"], [0.25, 0.5, 0.0])

    # The rule comes from the counts, not from how `scores` was built.
    s1 = per_image_scores(pred, target, empty=1.0)
    np.testing.assert_allclose(per_case_scores(s1, cases, empty_score=0.0)["dice"], [0.25, 0.5, 0.0])


def test_per_case_with_interleaved_and_integer_ids():
    pred = np.stack([SQUARE, EMPTY, SQUARE])
    target = np.stack([SQUARE, SQUARE, SQUARE])
    r = per_case_scores(per_image_scores(pred, target), [7, 3, 7])
    assert r["cases"] == [7, 3]
    np.testing.assert_allclose(r["dice"], [1.0, 0.0])
    np.testing.assert_array_equal(r["n_slices"], [2, 1])


def test_binarize_threshold():
    p = np.array([[0.2, 0.5], [0.5001, 0.9]])
    np.testing.assert_array_equal(binarize(p), [[False, False], [True, True]])
    np.testing.assert_array_equal(binarize(torch.tensor(p)), binarize(p))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="binarize"):
        confusion(np.full((4, 4), 0.3), SQUARE)  # probabilities, not a mask
    with pytest.raises(ValueError):
        confusion(SQUARE, np.zeros((3, 3), dtype=bool))
    with pytest.raises(ValueError, match="case ids"):
        per_case_scores(per_image_scores(SQUARE[None], SQUARE[None]), ["a", "b"])


def test_mean_std_over_runs_is_the_sample_std():
    import statistics

    values = [0.81, 0.78, 0.86, 0.79]
    mean, std = mean_std(values)
    assert mean == pytest.approx(statistics.fmean(values), abs=1e-15)
    assert std == pytest.approx(statistics.stdev(values), abs=1e-15)  # ddof=1, not the population std
    assert mean_std([0.7]) == (0.7, 0.0)  # one run: no spread, not NaN
