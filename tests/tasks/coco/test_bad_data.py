"""Bad data in the COCO layout: ids of the wrong type and garbage compressed RLE are one line
naming the file and the annotation; an image that cannot be decoded (a bomb too) is skipped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from attnbench import TaskError
from tasks.coco import data as coco_data
from tests.tasks.bad_files import bomb_png
from tests.tasks.coco.tiny import H, W, make_tiny_coco, rect_mask, rle_of, tiny_run_args


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_coco(tmp_path_factory.mktemp("tiny-coco"))


def with_annotation(tiny: Path, tmp_path: Path, index: int, **values: Any) -> Path:
    """A copy of the tiny set whose train annotation #``index`` has ``values``."""
    root = tmp_path / "broken"
    shutil.copytree(tiny, root)
    path = root / "annotations" / "instances_train2017.json"
    data = json.loads(path.read_text())
    data["annotations"][index].update(values)
    path.write_text(json.dumps(data))
    return root


@pytest.mark.parametrize("index, values, message", [
    (0, dict(image_id=[1]), "annotation 1: image_id [1] is not among the images"),
    (0, dict(category_id=[1]), "annotation 1: category_id [1] is not among the categories"),
    (0, dict(iscrowd=[0]), "annotation 1: iscrowd is [0], not 0 or 1"),
    (2, dict(segmentation={"size": [H, W], "counts": "garbage!!"}),
     "annotation 3: its compressed RLE counts 'garbage!!' are not a run-length code of 48×64 pixels"),
    (2, dict(segmentation={"size": [H, W], "counts": ""}),
     "annotation 3: its compressed RLE counts '' are not a run-length code of 48×64 pixels"),
    (2, dict(segmentation={"size": [H, W], "counts": rle_of(rect_mask(0, 0, 8, 8)[:24])["counts"]}),
     "are not a run-length code of 48×64 pixels"),  # a valid code, of 24×64 pixels
])
def test_malformed_ids_and_rle_codes_are_one_line_naming_the_file(index, values, message, tiny, tmp_path):
    root = with_annotation(tiny, tmp_path, index, **values)
    with pytest.raises(TaskError) as exc:
        coco_data.read_layout(root, "tiny")
    text = str(exc.value)
    assert message in text and text.startswith(str(root / "annotations" / "instances_train2017.json"))
    assert "\n" not in text


def test_the_compressed_counts_of_real_masks_are_read_back_exactly():
    for mask in (rect_mask(30, 10, 50, 40), rect_mask(0, 0, W, H), rect_mask(0, 0, 0, 0)):
        counts = coco_data.compressed_counts(rle_of(mask)["counts"])
        assert sum(counts) == H * W and sum(counts[1::2]) == mask.sum()


def test_an_undecodable_image_a_bomb_included_is_skipped_and_counted(tiny, tmp_path, capfd):
    root = tmp_path / "bombed"
    shutil.copytree(tiny, root)
    bomb = bomb_png(root / "train2017" / f"{2:012d}.jpg")  # the name the annotations give it
    train, _ = coco_data.read_layout(root, "tiny")
    data = coco_data.CocoInstances(train, train=True)
    images, targets, skipped = coco_data.collate([data[0], data[1]])
    assert (len(images), len(targets), skipped) == (1, 1, 1)
    err = capfd.readouterr().err
    assert f"skipping undecodable image {bomb}: Image size (400000000 pixels) exceeds limit" in err


@pytest.mark.parametrize("workers", ["0", "1"])
def test_an_image_that_contradicts_its_annotation_is_one_line_whatever_the_workers(workers, tiny, tmp_path,
                                                                                   cli_error):
    """Raised in a loader worker, the error is the dataset's own line, not PyTorch's wrapped traceback."""
    root = tmp_path / "resized"
    shutil.copytree(tiny, root)
    for split in ("train2017", "val2017"):  # every image: whichever the first batch holds
        for image in (root / split).glob("*.jpg"):
            Image.new("RGB", (32, 32)).save(image)
    line = cli_error(tiny_run_args(root, tmp_path, "--max-steps", "1", "--workers", workers))
    annotations = root / "annotations" / "instances_train2017.json"
    assert line.startswith(f"attnbench run: error: {annotations}: image ")
    assert line.endswith("is 32×32 but the file says 64×48 (width×height)")
