"""The ADE20K layout: the loader against tiny hand-made files, and each bad input's one-line error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from attnbench import TaskError
from tasks.ade20k import data
from tests.tasks.ade20k.tiny import make_tiny_ade, tiny_run_args

# ---- the loader ------------------------------------------------------------------------------------


def test_the_loader_reads_the_official_layout_and_reduces_the_zero_label(tiny):
    pairs = data.find_pairs(tiny, "training")
    assert [p[0].name for p in pairs][:2] == ["ADE_train_00000001.jpg", "ADE_train_00000002.jpg"]
    assert all(i.stem == a.stem for i, a in pairs)
    raw = np.asarray(Image.open(pairs[0][1]))
    image, labels = data.read_pair(*pairs[0])
    assert image.shape == (3, *raw.shape) and image.dtype == torch.uint8
    assert set(torch.unique(labels).tolist()) == {2, 4, 255}  # 3 -> 2, 5 -> 4, 0 -> 255
    assert torch.equal(labels == 255, torch.from_numpy(raw == 0))
    train = data.ADE20KSegmentation(tiny, "training", data.TrainTransform(32))
    x, y, error = train[0]
    assert error == "" and x.shape == (3, 32, 32) and x.dtype == torch.float32 and y.shape == (32, 32)
    assert set(torch.unique(y).tolist()) <= {2, 4, 255}
    val = data.ADE20KSegmentation(tiny, "validation", data.EvalTransform(32))
    x, y, _ = val[0]
    assert min(x.shape[1:]) == 32  # resized to the crop side, the labels stay at full size
    assert y.shape == np.asarray(Image.open(val.pairs[0][1])).shape


@pytest.mark.parametrize("damage, message", [
    ("missing", "no such folder; expected ADEChallengeData2016 folder: images/{training,validation}/*.jpg"),
    ("no-annotations", "no annotations/validation/ folder in it"),
    ("image-without-annotation", "images/training/ADE_train_00000002.jpg has no annotation in "
                                 "annotations/training/ with the same name"),
    ("annotation-without-image", "annotations/validation/ADE_val_00000009.png has no image in "
                                 "images/validation/"),
    ("wrong-size", "annotations/training/ADE_train_00000001.png is 10×12 but its image is"),
    ("unreadable", "cannot read images/training/ADE_train_00000003.jpg"),
    ("label-above-150", "holds label 151; expected 0 (other, ignored) or 1..150"),
])
def test_bad_data_gets_one_clear_line(damage, message, tmp_path, cli_error):
    root = tmp_path / "ade"
    if damage != "missing":
        make_tiny_ade(root, train=3, val=1)
    if damage == "no-annotations":
        for f in (root / "annotations" / "validation").iterdir():
            f.unlink()
        (root / "annotations" / "validation").rmdir()
    elif damage == "image-without-annotation":
        (root / "annotations" / "training" / "ADE_train_00000002.png").unlink()
    elif damage == "annotation-without-image":
        Image.new("L", (8, 8)).save(root / "annotations" / "validation" / "ADE_val_00000009.png")
    elif damage == "wrong-size":
        Image.new("L", (10, 12)).save(root / "annotations" / "training" / "ADE_train_00000001.png")
    elif damage == "unreadable":
        (root / "images" / "training" / "ADE_train_00000003.jpg").write_bytes(b"not a JPEG at all")
    elif damage == "label-above-150":
        ann = root / "annotations" / "training" / "ADE_train_00000002.png"
        labels = np.asarray(Image.open(ann)).copy()
        labels[5, 5] = 151
        Image.fromarray(labels, mode="L").save(ann)
    line = cli_error(tiny_run_args(root, tmp_path))
    assert message in line, line


def test_an_annotation_with_colour_channels_is_refused(tiny, tmp_path):
    image, ann = data.find_pairs(tiny, "training")[0]
    rgb = tmp_path / "rgb.png"
    Image.open(ann).convert("RGB").save(rgb)
    with pytest.raises(TaskError, match="is a RGB image; expected one channel of class indices"):
        data.read_pair(image, rgb)


def test_a_load_error_in_a_worker_reaches_the_main_process_as_one_task_error(tiny, tmp_path):
    ds = data.ADE20KSegmentation(tiny, "training", data.TrainTransform(32))
    broken = tmp_path / "broken.png"
    broken.write_bytes(Image.open(ds.pairs[0][1]).tobytes()[:20])  # a header-less PNG
    ds.pairs[1] = (ds.pairs[1][0], broken)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=data.collate, num_workers=1)
    with pytest.raises(TaskError, match="broken.png"):
        list(data.raise_errors(loader))
