"""Bad images in the ImageNet layout: skipped and counted whatever the reason (a decompression bomb
included), and a training folder with no readable image at all is one line."""

from __future__ import annotations

import pandas as pd
import pytest

from attnbench.cli import main
from tasks.common.image_folder import UnreadableImage, read_image
from tests.tasks.bad_files import BOMB_ERROR_SIDE, BOMB_WARNING_SIDE, bomb_png
from tests.tasks.imagenet.tiny import WNIDS, make_tiny_imagenet, tiny_run_args


@pytest.mark.parametrize("side", [BOMB_WARNING_SIDE, BOMB_ERROR_SIDE])
def test_a_decompression_bomb_is_an_unreadable_image_before_it_is_decoded(side, tmp_path):
    """PIL only warns below twice its limit, and would then decode 10⁸ pixels: refused both times."""
    path = bomb_png(tmp_path / "bomb.png", side)
    with pytest.raises(UnreadableImage, match="could be decompression bomb") as exc:
        read_image(path)
    assert str(exc.value).startswith(f"{path}: Image size ({side * side} pixels) exceeds limit")


def test_bombs_in_the_folder_are_skipped_and_counted_in_the_row(tmp_path, capfd):
    root = make_tiny_imagenet(tmp_path / "data", corrupt=False)
    bombs = [bomb_png(root / "val" / WNIDS[0] / f"bomb{side}.png", side)
             for side in (BOMB_WARNING_SIDE, BOMB_ERROR_SIDE)]
    assert main(tiny_run_args(root, tmp_path, "--epochs", "1", "--max-steps", "1",
                              "--mechanism-init", "random")) == 0
    err = capfd.readouterr().err
    assert all(f"skipping undecodable image {bomb}: Image size" in err for bomb in bombs)
    row = pd.read_csv(tmp_path / "imagenet.csv").iloc[0]
    assert row["skipped_images"] == 2 and row["val_images"] == 11 and row["status"] == "ok"


def test_no_readable_training_image_is_one_line_when_mechanisms_start_from_data(tmp_path, cli_error):
    root = make_tiny_imagenet(tmp_path / "data", train_per_class=2)
    for image in (root / "train").rglob("*.JPEG"):
        image.write_bytes(b"\xff\xd8 not a JPEG")
    line = cli_error(tiny_run_args(root, tmp_path, "--batch-size", "2", mechanism="set"))
    assert line == f"attnbench run: error: no readable training image in {root / 'train'}"
