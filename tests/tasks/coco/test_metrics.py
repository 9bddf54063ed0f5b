"""COCOeval through metrics.py on known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tasks.coco import data as coco_data
from tasks.coco import metrics

# ---- the evaluator -------------------------------------------------------------------------------


def _truth_as_predictions(split: coco_data.CocoSplit) -> tuple[list[dict], list[dict]]:
    """Every ground-truth object of ``split`` as a detection with score 1, box and mask exact."""
    data = coco_data.CocoInstances(split, train=True)
    category_of = {label: cid for cid, label in data.label_of.items()}
    bbox, segm = [], []
    for i in range(len(data)):
        _, t = data[i]
        output = {"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(len(t["labels"])),
                  "masks": t["masks"][:, None].float()}
        b, s = metrics.to_coco_results(t["image_id"], output, category_of)
        bbox += b
        segm += s
    return bbox, segm


def test_perfect_predictions_score_ap_100_and_none_score_0(tiny):
    _, val = coco_data.read_layout(tiny, "tiny")
    gt = metrics.ground_truth(val.data)
    bbox, segm = _truth_as_predictions(val)
    assert len(bbox) == len(segm) == 3
    perfect = metrics.evaluate_all(gt, bbox, segm)
    for kind in ("box", "mask"):
        assert [perfect[f"{kind}_{m}"] for m in ("AP", "AP50", "AP75")] == [100.0] * 3
    empty = metrics.evaluate_all(gt, [], [])
    for kind in ("box", "mask"):
        assert [empty[f"{kind}_{m}"] for m in ("AP", "AP50", "AP75")] == [0.0] * 3
    assert np.isnan(empty["box_APl"])  # no large object in the ground truth: COCOeval's -1


def test_half_the_objects_found_scores_51_of_101_recall_points(tiny):
    """Two squares (category 1) in val; one found exactly: precision 1 up to recall 0.5, nothing beyond,
    so AP = 51/101 over COCO's 101 recall points; the other category is perfect (AP 100)."""
    _, val = coco_data.read_layout(tiny, "tiny")
    gt = metrics.ground_truth(val.data)
    bbox, segm = _truth_as_predictions(val)
    keep = [i for i, b in enumerate(bbox) if not (b["image_id"] == 11 and b["category_id"] == 1)]
    result = metrics.evaluate_all(gt, [bbox[i] for i in keep], [segm[i] for i in keep])
    expected = (100 * 51 / 101 + 100) / 2  # the mean over the two categories
    assert result["box_AP"] == pytest.approx(expected) and result["mask_AP"] == pytest.approx(expected)


def test_a_box_shifted_by_half_its_width_is_a_miss(tiny):
    _, val = coco_data.read_layout(tiny, "tiny")
    gt = metrics.ground_truth(val.data)
    bbox, _ = _truth_as_predictions(val)
    for b in bbox:
        b["bbox"][0] += b["bbox"][2] / 2  # IoU 1/3: below every threshold of 0.50:0.95
    box, _ = metrics.evaluate(gt, bbox, "bbox")
    assert box["AP"] == 0.0 and box["AP50"] == 0.0
