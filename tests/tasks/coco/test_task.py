"""The COCO task end to end on the tiny set, and its clear errors."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from attnbench.cli import main
from tasks.coco import embedded
from tests.tasks.coco.tiny import tiny_run_args


@pytest.mark.parametrize("extra, message", [
    (["--min-size", "16"], "argument --min-size: invalid value '16'; valid: an int in [32, 4096]"),
    (["--max-size", "48"], "--max-size must be >= --min-size (64), got 48"),
    (["--hflip", "2"], "argument --hflip: invalid value '2'; valid: a finite number in [0, 1]"),
    (["--eval-every", "-1"], "argument --eval-every: invalid value '-1'"),
    (["--detector", "huge"], "argument --detector: invalid choice: 'huge'"),
    (["--opt", "set.m=16"], "options of set do not apply to --mechanism softmax"),
    (["--batch-size", "8"], "fewer than one batch of 8 per process"),
])
def test_bad_options_get_one_clear_line(extra, message, tiny, tmp_path, cli_error):
    assert message in cli_error(tiny_run_args(tiny, tmp_path, *extra))


def test_the_task_offers_the_resolution_probe_its_step():
    from attnbench.task import get_task, resolution_tasks

    assert "coco" in resolution_tasks() and get_task("coco").train_side == 128
    step, images = get_task("coco").train_step("set", 64, "micro", {}, "cpu")
    assert images == 2
    step()


def test_a_tiny_run_trains_evaluates_and_records_a_tidy_row(finished, tiny):
    table = pd.read_csv(finished / "coco.csv")
    assert len(table) == 1
    row = table.iloc[0]
    assert (row["task"], row["mechanism"], row["size"], row["detector"]) == ("coco", "set", "micro", "light")
    assert row["dataset"] == f"coco-layout:{tiny.name}" and row["num_classes"] == 2
    assert (row["img_size"], row["tokens_stage1"], row["epochs"]) == (64, 256, 1)
    for column in ("box_AP", "box_AP50", "mask_AP", "mask_AP50"):
        assert 0 <= row[column] <= 100
    assert row["train_images"] == 2 and row["val_images"] == 2 and row["status"] == "ok"
    assert row["params"] > row["backbone_params"] > 0 and row["backbone_gflops"] > 0
    assert row["train_img_s"] > 0 and row["eval_img_s"] > 0 and row["peak_mem_mib"] > 0
    assert row["mechanism_init"].startswith("kmeans")
    run = finished / "run"
    meta = json.loads((run / "meta.json").read_text())
    assert meta["preset"] == "coco" and meta["categories"] == ["square", "block"]
    history = pd.read_csv(run / "history.csv")
    assert len(history) == 1 and history["loss_mask"].iloc[0] > 0
    assert (run / "checkpoint.pt").is_file()
    assert list(finished.glob("coco_ap_*.png"))


def test_resume_refuses_a_checkpoint_of_another_run(finished, tiny, tmp_path, cli_error):
    line = cli_error(tiny_run_args(tiny, tmp_path, "--resume", str(finished / "run")))
    assert "--mechanism softmax given, but the run recorded --mechanism set" in line


def test_without_data_the_embedded_set_is_named_in_the_row(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(embedded, "EMBEDDED_IMAGES", {"train2017": 4, "val2017": 2})
    argv = ["run", "--mechanism", "softmax", "--task", "coco", "--min-size", "64", "--max-size", "64",
            "--epochs", "1", "--batch-size", "2", "--workers", "0", "--threads", "1", "--mechanism-init",
            "random", "--out", str(tmp_path / "run"), "--results", str(tmp_path / "coco.csv")]
    assert main(argv) == 0
    row = pd.read_csv(tmp_path / "coco.csv").iloc[0]
    assert row["dataset"] == embedded.EMBEDDED_DATASET and row["size"] == "micro"
    assert row["detector"] == "light" and row["val_images"] == 2


def test_a_smoke_run_stops_after_its_steps_and_says_so(tiny, tmp_path):
    argv = tiny_run_args(tiny, tmp_path, "--epochs", "3", "--max-steps", "1", "--limit-val", "1",
                         "--mechanism-init", "random")
    assert main(argv) == 0
    row = pd.read_csv(tmp_path / "coco.csv").iloc[0]
    assert (row["limited"], row["max_steps"], row["val_images"], row["epochs"]) == (True, 1, 1, 1)
    assert not list(tmp_path.glob("coco_ap_*.png"))  # plots leave smoke runs out
