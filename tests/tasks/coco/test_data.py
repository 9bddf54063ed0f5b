"""The COCO 2017 layout: the reader's Mask R-CNN targets, and every malformed file's one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from attnbench import TaskError
from tasks.coco import data as coco_data
from tests.tasks.coco.tiny import H, W, make_tiny_coco, rect_mask, rle_of, tiny_run_args

# ---- the reader ----------------------------------------------------------------------------------


def test_the_reader_gives_mask_rcnn_targets_without_crowds_or_empty_images(tiny):
    train, val = coco_data.read_layout(tiny, "tiny")
    data = coco_data.CocoInstances(train, train=True)
    assert data.ids == [1, 2]  # image 3 has no annotation: skipped in training
    image, target = data[0]
    assert image.shape == (3, H, W) and 0 <= image.min() and image.max() <= 1
    assert target["labels"].tolist() == [1]  # the crowd region of image 1 is left out
    assert target["boxes"].tolist() == [[8.0, 8.0, 24.0, 24.0]]  # x0, y0, x1, y1
    assert target["masks"].shape == (1, H, W) and target["masks"].sum() == 16 * 16
    _, target = data[1]
    assert target["labels"].tolist() == [2]  # category id 7 is the second category: label 2
    assert torch.equal(target["masks"][0], torch.from_numpy(rect_mask(30, 10, 50, 40)))
    assert target["boxes"].tolist() == [[30.0, 10.0, 50.0, 40.0]]
    evaluation = coco_data.CocoInstances(val, train=False)
    assert evaluation.ids == [10, 11] and evaluation[1][1] == {"image_id": 11}


def test_horizontal_flips_move_boxes_and_masks_together(tiny):
    train, _ = coco_data.read_layout(tiny, "tiny")
    plain = coco_data.CocoInstances(train, train=True)[1]
    image, target = coco_data.CocoInstances(train, train=True, hflip=1.0)[1]
    assert torch.equal(image, plain[0].flip(-1)) and torch.equal(target["masks"], plain[1]["masks"].flip(-1))
    assert target["boxes"].tolist() == [[W - 50.0, 10.0, W - 30.0, 40.0]]


def test_uncompressed_rle_decodes_to_its_mask():
    mask = rect_mask(40, 30, 60, 44)
    assert np.array_equal(coco_data.annotation_mask(rle_of(mask, compressed=False), H, W), mask)


def _broken(tiny: Path, tmp_path: Path, split: str, change) -> Path:
    """A copy of the tiny set whose ``split`` annotation file went through ``change(data)``."""
    import shutil

    root = tmp_path / "broken"
    shutil.copytree(tiny, root)
    path = root / "annotations" / f"instances_{split}.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return root


def _set(key: str, value: Any, index: int = 0, what: str = "annotations"):
    def change(data: dict[str, Any]) -> None:
        data[what][index][key] = value
    return change


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("annotations"), "lacks the list 'annotations'"),
    (lambda d: d["annotations"][0].pop("bbox"), "annotation #0 lacks key 'bbox'"),
    (_set("bbox", [1, 2, -3, 4]), "annotation 1: bbox [1, 2, -3, 4] has a negative width or height"),
    (_set("bbox", [1, 2, 3]), "annotation 1: bbox [1, 2, 3] is not [x, y, width, height]"),
    (_set("bbox", [50, 2, 30, 4]), "bbox [50, 2, 30, 4] reaches outside its image 1 of 64×48"),
    (_set("category_id", 99), "annotation 1: category_id 99 is not among the categories (1 square, 7 block)"),
    (_set("image_id", 42), "annotation 1: image_id 42 is not among the images"),
    (_set("segmentation", {"size": [24, 32], "counts": "abc"}, 2),
     "annotation 3: its RLE mask is 24×32 but its image 2 is 48×64 (height×width)"),
    (_set("segmentation", {"size": [H, W], "counts": [5, 10]}, 1),
     "annotation 2: its uncompressed RLE counts do not add up to 48×64 pixels"),
    (_set("segmentation", [[8.0, 8.0, 124.0, 8.0, 124.0, 24.0]]),
     "annotation 1: polygon point (124, 8) lies outside its image 1 of 64×48 (width×height): a mask of the "
     "wrong size?"),
    (_set("segmentation", [[8.0, 8.0, 24.0]]), "annotation 1: polygon [8.0, 8.0, 24.0] is not a flat list"),
    (_set("file_name", "missing.jpg", what="images"),
     "image 1's file train2017/missing.jpg does not exist (1 of 3 image files missing)"),
    (_set("width", "wide", what="images"), "image #0 needs an integer id, a file_name and positive integer"),
])
def test_malformed_annotations_name_the_problem(change, message, tiny, tmp_path):
    root = _broken(tiny, tmp_path, "train2017", change)
    with pytest.raises(TaskError) as exc:
        coco_data.read_layout(root, "tiny")
    assert message in str(exc.value) and "instances_train2017.json" in str(exc.value)
    assert "\n" not in str(exc.value)


def test_invalid_json_and_an_image_of_another_size_are_errors(tiny, tmp_path):
    root = _broken(tiny, tmp_path, "val2017", lambda d: None)
    (root / "annotations" / "instances_val2017.json").write_text('{"images": [}')
    with pytest.raises(TaskError, match=r"instances_val2017.json: not valid JSON \(line 1 column 13"):
        coco_data.read_layout(root, "tiny")
    make_tiny_coco(tmp_path / "resized")
    Image.new("RGB", (32, 32)).save(tmp_path / "resized" / "train2017" / f"{2:012d}.jpg")
    train, _ = coco_data.read_layout(tmp_path / "resized", "tiny")
    with pytest.raises(TaskError, match="image 2 .* is 32×32 but the file says 64×48"):
        coco_data.CocoInstances(train, train=True)[1]


@pytest.mark.parametrize("layout, message", [
    ("missing", "no such folder; expected COCO 2017 layout: annotations/instances_{train,val}2017.json"),
    ("no-annotations", "no annotations/instances_train2017.json in it; expected"),
    ("no-val-folder", "no val2017/ folder in it; expected"),
])
def test_missing_folders_and_files_say_the_expected_layout(layout, message, tiny, tmp_path, cli_error):
    data = tmp_path / "data"
    if layout != "missing":
        import shutil

        shutil.copytree(tiny, data)
        if layout == "no-annotations":
            (data / "annotations" / "instances_train2017.json").unlink()
        else:
            shutil.rmtree(data / "val2017")
    line = cli_error(tiny_run_args(data, tmp_path))
    assert message in line
    if layout != "missing":  # a missing folder is refused as --data is parsed, with the layout in full
        assert "(the COCO 2017 layout)" in line
