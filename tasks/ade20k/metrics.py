"""Semantic segmentation metrics from a confusion matrix accumulated over a whole split.

The standard (mmseg's ``IoUMetric``) definitions, on labelled pixels only (the ignore index
never counts, predicted or not):

* IoU of class c = |pred = c and gt = c| / |pred = c or gt = c|; a class with neither ground
  truth nor prediction anywhere in the split is NaN and left out of the mean (mIoU);
* pixel accuracy (aAcc) = correctly labelled pixels / labelled pixels;
* mean accuracy (mAcc) = mean over classes present in the ground truth of correct / present.

Per-image sums are not averaged: the matrix is summed over the split (and over processes) first.
"""

from __future__ import annotations

import torch
from torch import Tensor


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """(classes, classes) int64 counts, rows = ground truth, columns = prediction.

    pred, target: integer tensors of the same shape (any); target pixels equal to
    ``ignore_index`` (or outside [0, classes)) are left out.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    keep = (target != ignore_index) & (target >= 0) & (target < num_classes)
    t, p = target[keep].long(), pred[keep].long()
    return torch.bincount(t * num_classes + p, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def segmentation_scores(confusion: Tensor) -> dict[str, float | Tensor]:
    """mIoU, aAcc, mAcc (fractions in [0, 1]; NaN when nothing is labelled) and per-class IoU
    (NaN for absent classes) from a confusion matrix (rows ground truth, columns prediction)."""
    conf = confusion.double()
    hit = conf.diagonal()
    gt, predicted = conf.sum(1), conf.sum(0)
    union = gt + predicted - hit
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    iou = torch.where(union > 0, hit / union.clamp(min=1), nan)
    acc = torch.where(gt > 0, hit / gt.clamp(min=1), nan)
    total = gt.sum()
    return {"miou": _nanmean(iou), "aacc": (hit.sum() / total).item() if total > 0 else float("nan"),
            "macc": _nanmean(acc), "iou": iou, "classes_present": int((union > 0).sum())}


def _nanmean(x: Tensor) -> float:
    valid = x[~x.isnan()]
    return valid.mean().item() if len(valid) else float("nan")
