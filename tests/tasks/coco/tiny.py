"""A tiny COCO-layout set made by hand (known boxes and masks) and the arguments of a tiny run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

W, H = 64, 48  # every hand-made image is 64 wide, 48 high


def rect_mask(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def rle_of(mask: np.ndarray, compressed: bool = True) -> dict[str, Any]:
    if compressed:
        rle = mask_utils.encode(np.asfortranarray(mask))
        return {"size": [H, W], "counts": rle["counts"].decode("ascii")}
    flat = mask.flatten(order="F")  # column-major runs, starting with zeros
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [2]])) != 0)
    counts = np.diff(np.concatenate([[0], changes])).tolist()
    return {"size": [H, W], "counts": counts if flat[0] == 0 else [0, *counts]}


def annotation(ann_id: int, image_id: int, category: int, segmentation: Any,
               crowd: int = 0) -> dict[str, Any]:
    h_, w_ = H, W
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, h_, w_))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, h_, w_)
    else:
        rle = segmentation
    return {"id": ann_id, "image_id": image_id, "category_id": category, "segmentation": segmentation,
            "area": float(mask_utils.area(rle)), "bbox": [float(v) for v in mask_utils.toBbox(rle)],
            "iscrowd": crowd}


def make_tiny_coco(root: Path) -> Path:
    """The official layout with two categories (ids 1 and 7), polygon, compressed and uncompressed
    RLE masks, a crowd region and a train image without annotations."""
    rng = np.random.default_rng(0)
    images = {"train2017": [1, 2, 3], "val2017": [10, 11]}
    square = [[8.0, 8.0, 24.0, 8.0, 24.0, 24.0, 8.0, 24.0]]  # a 16×16 polygon
    anns = {"train2017": [annotation(1, 1, 1, square),
                          annotation(2, 1, 7, rle_of(rect_mask(40, 30, 60, 44), compressed=False), crowd=1),
                          annotation(3, 2, 7, rle_of(rect_mask(30, 10, 50, 40)))],
            "val2017": [annotation(4, 10, 1, square), annotation(5, 11, 7, rle_of(rect_mask(30, 10, 50, 40))),
                        annotation(6, 11, 1, [[2.0, 2.0, 14.0, 2.0, 14.0, 14.0, 2.0, 14.0]])]}
    (root / "annotations").mkdir(parents=True)
    for split, ids in images.items():
        (root / split).mkdir()
        for i in ids:
            pixels = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / split / f"{i:012d}.jpg")
        data = {"images": [{"id": i, "file_name": f"{i:012d}.jpg", "width": W, "height": H} for i in ids],
                "annotations": anns[split],
                "categories": [{"id": 1, "name": "square"}, {"id": 7, "name": "block"}]}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return root


def tiny_run_args(data: Path, out: Path, *extra: str, mechanism: str = "softmax") -> list[str]:
    return ["run", "--mechanism", mechanism, "--task", "coco", "--data", str(data), "--size", "micro",
            "--min-size", "64", "--max-size", "64", "--detector", "light", "--epochs", "1",
            "--batch-size", "2", "--workers", "0", "--threads", "1", "--out", str(out / "run"),
            "--results", str(out / "coco.csv"), *extra]
