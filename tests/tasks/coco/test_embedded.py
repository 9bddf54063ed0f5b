"""The embedded COCO set: written once, in the official layout, train and val disjoint."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from tasks.coco import data as coco_data
from tasks.coco import embedded

# ---- the embedded data set -----------------------------------------------------------------------


def test_the_embedded_set_is_written_once_in_the_official_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNBENCH_CACHE", str(tmp_path))
    monkeypatch.setattr(embedded, "EMBEDDED_IMAGES", {"train2017": 12, "val2017": 6})
    root = embedded.embedded_dataset()
    assert root == tmp_path / embedded.EMBEDDED_NAME
    train, val = coco_data.read_layout(root, "embedded")  # every check of a --data folder passes
    assert (len(train.images), len(val.images)) == (12, 6)
    assert [c["name"] for c in train.categories] == ["coin", "horse", "gift"]
    side = embedded.EMBEDDED_SIDE
    for split in (train, val):
        for image_id, anns in split.annotations.items():
            assert anns, f"image {image_id} has no object"
            for a in anns:
                mask = coco_data.annotation_mask(a["segmentation"], side, side)
                rle = mask_utils.encode(np.asfortranarray(mask))
                assert a["area"] == mask.sum() > 0
                assert a["bbox"] == pytest.approx(mask_utils.toBbox(rle).tolist())
    pixels = lambda s, i: np.asarray(Image.open(s.image_dir / s.images[i]["file_name"]))
    assert pixels(train, min(train.images)).shape == (side, side, 3)
    train_pixels = {pixels(train, i).tobytes() for i in train.images}
    assert not any(pixels(val, i).tobytes() in train_pixels for i in val.images)
    assert not set(train.images) & set(val.images)
    stamp = (root / "annotations" / "instances_val2017.json").stat().st_mtime_ns
    assert embedded.embedded_dataset() == root
    assert (root / "annotations" / "instances_val2017.json").stat().st_mtime_ns == stamp
