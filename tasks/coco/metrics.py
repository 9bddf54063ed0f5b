"""COCO evaluation with pycocotools' COCOeval: AP, AP50, AP75, APs/m/l for boxes and for masks.

Predictions of torchvision's Mask R-CNN (boxes x0, y0, x1, y1 in pixels of the original image,
labels 1..K, scores, soft masks (N, 1, H, W)) become COCO result entries: ``bbox`` as
[x, y, width, height], the category id of each label, and the mask thresholded at 0.5 and
encoded as RLE by ``pycocotools.mask``. COCOeval then computes exactly the figures papers
report (AP over IoU 0.50:0.95, AP at 0.50 and 0.75, AP by object size), in percent.

An empty prediction set goes through COCOeval too (as an empty result set), so it scores 0
wherever the ground truth has objects; a size range without ground-truth objects is NaN
(COCOeval's -1).
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # the first six entries of COCOeval.stats


def to_coco_results(image_id: int, output: Mapping[str, Tensor], category_of: Mapping[int, int],
                    mask_threshold: float = 0.5) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(bbox results, segm results) of one image's detections, in COCO's result format."""
    boxes = output["boxes"].detach().cpu().double().numpy()  # (N, 4) x0, y0, x1, y1
    scores = output["scores"].detach().cpu().tolist()
    categories = [category_of[int(k)] for k in output["labels"].cpu().tolist()]
    bbox = [{"image_id": image_id, "category_id": c, "score": s,
             "bbox": [round(float(v), 2) for v in (b[0], b[1], b[2] - b[0], b[3] - b[1])]}
            for b, s, c in zip(boxes, scores, categories, strict=True)]
    segm: list[dict[str, Any]] = []
    if "masks" in output and len(categories):
        soft = output["masks"].detach().cpu()[:, 0]  # (N, H, W) in [0, 1]
        binary = (soft >= mask_threshold).numpy().astype(np.uint8)
        rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
        for rle, s, c in zip(rles, scores, categories, strict=True):
            rle["counts"] = rle["counts"].decode("ascii")  # JSON-able, as in COCO result files
            segm.append({"image_id": image_id, "category_id": c, "score": s, "segmentation": rle})
    return bbox, segm


def ground_truth(data: Mapping[str, Any]) -> COCO:
    """A pycocotools COCO index over an instances file already read (and checked) as a dict."""
    coco = COCO()
    coco.dataset = dict(data)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _results(gt: COCO, results: list[dict[str, Any]]) -> COCO:
    """``gt.loadRes(results)``, and an empty result set where there are none (loadRes refuses [])."""
    if results:
        with contextlib.redirect_stdout(io.StringIO()):
            return gt.loadRes(results)
    empty = COCO()
    empty.dataset = {"images": list(gt.dataset["images"]), "categories": list(gt.dataset["categories"]),
                     "annotations": []}
    with contextlib.redirect_stdout(io.StringIO()):
        empty.createIndex()
    return empty


def evaluate(gt: COCO, results: list[dict[str, Any]], iou_type: str,
             image_ids: Iterable[int] | None = None) -> tuple[dict[str, float], str]:
    """COCOeval of ``results`` ("bbox" or "segm") on ``image_ids`` (default: all of gt's images).

    Returns {AP, AP50, AP75, APs, APm, APl} in percent (NaN where COCOeval has no ground truth)
    and COCOeval's printed summary.
    """
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    dt = _results(gt, results)
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        ev = COCOeval(gt, dt, iou_type)
        if image_ids is not None:
            ev.params.imgIds = sorted(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = {k: float(v) for k, v in zip(METRICS, ev.stats[:6], strict=True)}
    return {k: math.nan if v < 0 else 100 * v for k, v in stats.items()}, text.getvalue()


def evaluate_all(gt: COCO, bbox: list[dict[str, Any]], segm: list[dict[str, Any]],
                 image_ids: Iterable[int] | None = None) -> dict[str, float]:
    """Box and mask metrics: {"box_AP": …, "box_AP50": …, …, "mask_AP": …, …} in percent."""
    ids = None if image_ids is None else sorted(image_ids)
    box, _ = evaluate(gt, bbox, "bbox", ids)
    mask, _ = evaluate(gt, segm, "segm", ids)
    return {**{f"box_{k}": v for k, v in box.items()}, **{f"mask_{k}": v for k, v in mask.items()}}
