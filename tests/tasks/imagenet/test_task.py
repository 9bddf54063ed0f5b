"""The ImageNet task end to end on a tiny ImageNet-layout folder, and its clear errors."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from attnbench import get_mechanism
from attnbench.cli import main
from tasks.common.trainer import Trainer
from tests.tasks.imagenet.tiny import WNIDS, tiny_run_args


def test_a_run_trains_evaluates_and_records_a_tidy_row(finished, tiny):
    table = pd.read_csv(finished / "imagenet.csv")
    assert len(table) == 1
    row = table.iloc[0]
    assert (row["task"], row["mechanism"], row["size"], row["epochs"]) == ("imagenet", "set", "micro", 2)
    assert row["dataset"] == f"imagefolder:{tiny.name}" and row["num_classes"] == 3
    assert 0 <= row["top1"] <= row["top5"] <= 100
    assert row["params"] > 0 and row["gflops"] > 0 and row["train_img_s"] > 0 and row["eval_img_s"] > 0
    assert row["peak_mem_mib"] > row["train_mem_mib"] >= 0 and row["wall_s"] > 0 and row["status"] == "ok"
    assert row["train_images"] == 24 and row["val_images"] == 9
    assert row["skipped_images"] == 2  # the corrupt JPEG of train/ and of val/, skipped and counted
    assert row["mechanism_init"].startswith("kmeans")
    run = finished / "run"
    meta = json.loads((run / "meta.json").read_text())
    assert meta["preset"] == "imagenet" and meta["augment"]["mixup"] == 0.8 and meta["git_commit"]
    assert len(pd.read_csv(run / "history.csv")) == 2
    assert (run / "checkpoint.pt").is_file()


def test_a_smoke_run_takes_a_stratified_sample_of_the_class_folders(tiny, tmp_path):
    """Issue #29: the first images of a class-sorted folder are one class; the limits take each its share."""
    argv = tiny_run_args(tiny, tmp_path, "--epochs", "1", "--max-steps", "1", "--limit-train", "9",
                         "--limit-val", "3", "--mechanism-init", "random")
    assert main(argv) == 0
    row = pd.read_csv(tmp_path / "imagenet.csv").iloc[0]
    assert (row["limited"], row["subset"]) == (True, "stratified")
    assert (row["train_images"], row["val_images"]) == (9, 3)
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["limits"]["subset"] == "stratified"


def test_undecodable_images_are_named_on_stderr_and_ema_and_bf16_run(tiny, tmp_path, capfd):
    assert main(tiny_run_args(tiny, tmp_path, "--epochs", "1", "--ema", "0.9", "--amp", "bf16")) == 0
    err = capfd.readouterr().err
    assert f"skipping undecodable image {tiny / 'train' / WNIDS[-1] / (WNIDS[-1] + '_0.JPEG')}" in err
    row = pd.read_csv(tmp_path / "imagenet.csv").iloc[0]
    assert row["amp"] == "bf16" and 0 <= row["top1_ema"] <= 100


def test_resume_continues_exactly_where_the_run_stopped(tiny, tmp_path, monkeypatch):
    """Two epochs in one go, and one epoch then --resume, end with the same weights."""
    save = Trainer.save

    def keep_each_epoch(self, path, extra):
        save(self, path, extra)
        path.with_name(f"epoch{self.epoch}.pt").write_bytes(path.read_bytes())

    monkeypatch.setattr(Trainer, "save", keep_each_epoch)
    args = ("--mechanism-init", "random",)
    assert main(tiny_run_args(tiny, tmp_path / "a", *args)) == 0
    stopped = tmp_path / "b" / "run"
    stopped.mkdir(parents=True)
    (stopped / "checkpoint.pt").write_bytes((tmp_path / "a" / "run" / "epoch1.pt").read_bytes())
    assert main(tiny_run_args(tiny, tmp_path / "b", *args, "--resume", str(stopped))) == 0
    whole = torch.load(tmp_path / "a" / "run" / "checkpoint.pt", weights_only=True)
    resumed = torch.load(stopped / "checkpoint.pt", weights_only=True)
    assert resumed["epoch"] == whole["epoch"] == 2
    for key, value in whole["model"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, resumed["model"][key]), key
    assert [h["top1"] for h in resumed["history"]] == [h["top1"] for h in whole["history"]]


def test_resume_refuses_a_checkpoint_of_another_run(finished, tiny, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(tiny_run_args(tiny, tmp_path, "--resume", str(finished / "run")))  # softmax now, set there
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--mechanism softmax given, but the run recorded --mechanism set" in err


def test_plot_draws_accuracy_against_flops_and_parameters(finished):
    assert main(["plot", str(finished)]) == 0
    assert list(finished.glob("accuracy_imagenet_*.png")) and list(finished.glob("accuracy_imagenet_*.svg"))


def test_models_prints_parameters_and_flops_per_mechanism(capsys):
    assert main(["models", "--size", "micro", "--mechanism", "softmax,set", "--img-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "GFLOPs" in out and "SeTformer-Mini 16M" in out
    assert sum(line.startswith("micro ") for line in out.splitlines()) == 2


@pytest.mark.parametrize("extra, message", [
    (["--size", "huge"], "argument --size: invalid choice: 'huge'"),
    (["--epochs", "0"], "argument --epochs: invalid value '0'; valid: an int in [1, 10000]"),
    (["--batch-size", "64"], "fewer than one batch of 64 per process"),
    (["--opt", "set.m=16"], "options of set do not apply to --mechanism softmax"),
    (["--opt", "softmax.window=3"], "unknown option(s) window"),
    (["--resume", "/nonexistent/run"], "argument --resume: /nonexistent/run: no such file or folder"),
    (["--img-size", "8"], "argument --img-size: invalid value '8'; valid: an int in [16, 4096]"),
    (["--amp", "fp16", "--device", "cpu"], "--amp fp16 needs CUDA"),
])
def test_bad_options_get_one_clear_line(extra, message, tiny, tmp_path, cli_error):
    assert message in cli_error(tiny_run_args(tiny, tmp_path, *extra))


def test_a_mechanism_that_needs_a_grid_refuses_a_sequence(tiny, tmp_path, cli_error, monkeypatch):
    monkeypatch.setattr(get_mechanism("softmax"), "needs_grid", True)
    err = cli_error(tiny_run_args(tiny, tmp_path, "--tokens", "sequence"))
    assert "mechanism 'softmax' needs a 2-D grid of tokens, and --tokens sequence gives it none" in err


def test_a_mechanism_that_cannot_run_here_says_why(tiny, tmp_path, cli_error):
    reason = get_mechanism("xformers").unavailable_reason("cpu")
    if reason is None:
        pytest.skip("xformers runs on this CPU")
    err = cli_error(tiny_run_args(tiny, tmp_path, "--device", "cpu", mechanism="xformers"))
    assert "mechanism 'xformers' cannot run on cpu here" in err


def test_options_that_need_a_grid_refuse_a_sequence_before_any_data_is_read(tmp_path, cli_error):
    options = ("--opt", "set.positional=2d", "--tokens", "sequence")
    (tmp_path / "never-read").mkdir()  # an empty folder: reading it would fail
    argv = tiny_run_args(tmp_path / "never-read", tmp_path, *options, mechanism="set")
    assert "positional='2d' needs a 2-D grid" in cli_error(argv)


def test_a_smoke_run_is_recorded_as_limited_and_left_out_of_the_plots(tiny, tmp_path):
    argv = tiny_run_args(tiny, tmp_path, "--max-steps", "1", "--limit-val", "4", "--mechanism-init", "random")
    assert main(argv) == 0
    row = pd.read_csv(tmp_path / "imagenet.csv").iloc[0]
    assert (row["limited"], row["max_steps"], row["val_images"], row["epochs"]) == (True, 1, 4, 1)
    assert main(["plot", str(tmp_path)]) == 0
    assert not list(tmp_path.glob("accuracy_imagenet_*.png"))  # the only run is a smoke run
    assert main(["plot", str(tmp_path), "--include-limited"]) == 0
    assert list(tmp_path.glob("accuracy_imagenet_*.png"))
