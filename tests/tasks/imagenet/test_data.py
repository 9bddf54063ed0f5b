"""ImageNet's data: the embedded MNIST-5k in the ImageNet layout, and bad folders' one-line errors."""

from __future__ import annotations

import pytest

from tasks.common import image_folder
from tasks.imagenet import data
from tests.tasks.imagenet.tiny import make_tiny_imagenet, tiny_run_args


def test_embedded_data_is_written_once_in_the_imagenet_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNBENCH_CACHE", str(tmp_path))
    root = data.embedded_dataset()
    assert root == tmp_path / data.EMBEDDED_NAME
    plain = image_folder.eval_transform(32)
    train, val = image_folder.image_folders(root, plain, plain)
    assert (len(train), len(val), len(train.classes)) == (4000, 1000, 10)
    image, label = val[0]
    assert image.shape == (3, 32, 32) and label == 0
    stamp = (root / "val" / "digit0").stat().st_mtime_ns
    assert data.embedded_dataset() == root and (root / "val" / "digit0").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("layout, message", [
    ("missing", "no such folder"),
    ("empty", "the folder is empty"),
    ("no-val", "no val/ folder in it"),
    ("no-classes", "train/ couldn't find any class folder"),
    ("stray-val-class", "val/ has classes that train/ lacks: n99999999"),
])
def test_bad_data_folders_get_one_clear_line(layout, message, tmp_path, cli_error):
    data = tmp_path / "data"
    if layout != "missing":
        data.mkdir()
    if layout in ("no-val", "no-classes", "stray-val-class"):
        (data / "train").mkdir()
    if layout == "no-classes":
        (data / "val").mkdir()
    if layout == "stray-val-class":
        make_tiny_imagenet(tmp_path / "good", 2, 1, corrupt=False)
        data = tmp_path / "good"
        (data / "val" / "n99999999").mkdir()
    assert message in cli_error(tiny_run_args(data, tmp_path))
