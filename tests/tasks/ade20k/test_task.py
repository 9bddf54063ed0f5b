"""The ADE20K task end to end on the tiny folder, resumed, and its clear errors."""

from __future__ import annotations

import pandas as pd
import pytest

from attnbench.cli import main
from tests.tasks.ade20k.tiny import tiny_run_args

# ---- end to end ------------------------------------------------------------------------------------


def test_a_tiny_run_trains_evaluates_and_records_a_row(tiny, tmp_path):
    assert main(tiny_run_args(tiny, tmp_path, "--epochs", "2", "--aux-weight", "0.4", mechanism="set")) == 0
    table = pd.read_csv(tmp_path / "ade20k.csv")
    assert len(table) == 1
    row = table.iloc[0]
    assert (row["task"], row["mechanism"], row["size"]) == ("ade20k", "set", "micro")
    assert (row["epochs"], row["iters"]) == (2, 4)  # 6 images, batches of 3
    assert row["dataset"] == f"ade20k:{tiny.name}" and row["num_classes"] == 150
    assert 0 <= row["miou"] <= 100 and 0 <= row["aacc"] <= 100 and row["classes_present"] >= 2
    assert row["head"] == "upernet+fcn-aux" and row["mechanism_init"].startswith("kmeans")
    assert row["params"] > 0 and row["gflops"] > 0 and row["train_img_s"] > 0 and row["peak_mem_mib"] > 0
    assert (row["train_images"], row["val_images"], row["status"]) == (6, 2, "ok")
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert len(history) == 2 and (tmp_path / "run" / "checkpoint.pt").is_file()
    assert list(tmp_path.glob("miou_ade20k_*.png"))
    # resuming the finished run (its flags repeated, as they may be) runs nothing and adds no row
    assert main(tiny_run_args(tiny, tmp_path, "--epochs", "2", "--aux-weight", "0.4", "--resume",
                              str(tmp_path / "run"), mechanism="set")) == 0
    assert len(pd.read_csv(tmp_path / "ade20k.csv")) == 1


@pytest.mark.parametrize("extra, message", [
    (["--crop-size", "16"], "argument --crop-size: invalid value '16'; valid: an int in [32, 4096]"),
    (["--aux-weight", "-1"], "argument --aux-weight: invalid value '-1'; valid: a finite number in [0, 100]"),
    (["--opt", "set.m=16"], "options of set do not apply to --mechanism softmax"),
    (["--backbone-weights", "/nonexistent/run"], "argument --backbone-weights: /nonexistent/run: no such"),
])
def test_bad_options_get_one_clear_line(extra, message, tiny, tmp_path, cli_error):
    assert message in cli_error(tiny_run_args(tiny, tmp_path, *extra))
