"""mIoU, aAcc and mAcc from one confusion matrix, against known answers."""

from __future__ import annotations

import math

import pytest
import torch

from tasks.ade20k.metrics import confusion_matrix, segmentation_scores

# ---- the metric ------------------------------------------------------------------------------------


def _scores(pred: list[list[int]], target: list[list[int]], classes: int = 4) -> dict:
    return segmentation_scores(confusion_matrix(torch.tensor(pred), torch.tensor(target), classes))


def test_a_perfect_prediction_scores_one():
    target = [[0, 0, 1, 1], [2, 2, 255, 1]]
    s = _scores([[0, 0, 1, 1], [2, 2, 3, 1]], target)  # the ignored pixel's prediction does not count
    assert s["miou"] == 1.0 and s["aacc"] == 1.0 and s["macc"] == 1.0
    assert s["classes_present"] == 3 and math.isnan(s["iou"][3])  # class 3: no truth, no prediction


def test_an_entirely_wrong_prediction_scores_zero():
    s = _scores([[1, 1, 0, 0], [3, 3, 3, 3]], [[0, 0, 1, 1], [2, 2, 2, 2]])
    assert s["miou"] == 0.0 and s["aacc"] == 0.0 and s["macc"] == 0.0


def test_a_partial_prediction_matches_the_hand_computed_answer():
    s = _scores([[0, 0, 1, 1], [2, 2, 2, 0]], [[0, 0, 0, 1], [1, 2, 2, 255]])
    # (truth, prediction) pairs: (0,0) ×2, (0,1), (1,1), (1,2), (2,2) ×2; the ignored pixel is out
    # class 0: hit 2, truth 3, predicted 2 -> 2/3; class 1: hit 1, truth 2, predicted 2 -> 1/3;
    # class 2: hit 2, truth 2, predicted 3 -> 2/3
    assert s["iou"][:3].tolist() == pytest.approx([2 / 3, 1 / 3, 2 / 3])
    assert s["miou"] == pytest.approx((2 / 3 + 1 / 3 + 2 / 3) / 3)
    assert s["aacc"] == pytest.approx(5 / 7)  # 7 labelled pixels, 5 right
    assert s["macc"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)


def test_ignored_pixels_and_absent_classes_are_left_out():
    all_ignored = _scores([[1, 2]], [[255, 255]])
    assert math.isnan(all_ignored["miou"]) and math.isnan(all_ignored["aacc"])
    # a class predicted but absent from the truth counts as IoU 0 (mmseg); one never seen, not at all
    s = _scores([[0, 3]], [[0, 0]])
    assert s["iou"][0].item() == 0.5 and s["iou"][3].item() == 0.0 and s["miou"] == 0.25
    assert math.isnan(s["iou"][1]) and math.isnan(s["iou"][2])


def test_the_confusion_matrix_sums_over_images():
    a = confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 0]), 2)
    b = confusion_matrix(torch.tensor([1, 1]), torch.tensor([1, 255]), 2)
    assert (a + b).tolist() == [[1, 1], [0, 1]]
