"""Bad images in the ADE20K layout are one line naming the file, a decompression bomb included
(in an image or in an annotation, found when the headers are checked or when a pair is read)."""

from __future__ import annotations

import pytest

from attnbench import TaskError
from tasks.ade20k import data
from tests.tasks.ade20k.tiny import make_tiny_ade, tiny_run_args
from tests.tasks.bad_files import BOMB_WARNING_SIDE, bomb_png


@pytest.mark.parametrize("file", ["images/training/ADE_train_00000002.jpg",
                                  "annotations/training/ADE_train_00000002.png"])
def test_a_bomb_is_one_line_naming_it_before_any_training(file, tmp_path, cli_error):
    root = make_tiny_ade(tmp_path / "ade", train=3, val=1)
    bomb_png(root / file, BOMB_WARNING_SIDE)
    line = cli_error(tiny_run_args(root, tmp_path, "--mechanism-init", "random"))
    assert line.startswith(f"attnbench run: error: --data {root}: cannot read {file}: Image size (100000000 "
                           "pixels) exceeds limit of")


def test_a_bomb_met_when_a_pair_is_read_is_the_same_one_line(tmp_path):
    root = make_tiny_ade(tmp_path / "ade", train=3, val=1)
    bomb = bomb_png(root / "images" / "training" / "ADE_train_00000001.jpg")
    split = data.ADE20KSegmentation(root, "training", data.EvalTransform(32), check=False)
    image, labels, error = split[0]
    assert image is None and labels is None
    assert error.startswith(f"--data {root}: cannot decode {bomb}: Image size (400000000 pixels)")
    with pytest.raises(TaskError, match="could be decompression bomb"):
        list(data.raise_errors([data.collate([split[0], split[1]])]))
