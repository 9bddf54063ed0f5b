"""The GLUE task end to end on tiny folders (pairs, regression, resume), and its clear errors."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from attnbench.cli import main
from tasks.common.trainer import Trainer
from tasks.glue.task import Glue
from tests.tasks.glue.tiny import FILES, needs_minilm, run_args, write_glue


@needs_minilm
def test_init_minilm_sets_up_minilms_size_vocabulary_weights_and_recipe(sentiment, tmp_path):
    """The wiring of ``--init minilm`` up to the first step (training itself is the same loop as any run)."""
    from attnbench.cli import build_parser
    from tasks.common.distributed import setup_distributed

    argv = ["run", "--mechanism", "linear", "--task", "glue", "--data", str(sentiment), "--init", "minilm",
            "--max-len", "16", "--batch-size", "8", "--out", str(tmp_path / "run")]
    task = Glue()
    task.plan(build_parser("glue").parse_args(argv))
    assert (task.size, task.preset_name, task.recipe.lr, task.recipe.epochs) == ("minilm", "minilm", 5e-5, 3)
    task.dist = setup_distributed("cpu")
    task.set_up()
    assert task.weights == "minilm (attention projections from BERT's)"
    assert task.run_config["init"] == "minilm"
    assert task.tokenizer.get_vocab_size() == 30522 and task.tokenizer_name.startswith("all-MiniLM-L6-v2")
    assert (tmp_path / "run" / "tokenizer.json").is_file()


def test_a_run_trains_evaluates_and_records_a_tidy_row(sentiment, tmp_path):
    assert main(run_args(sentiment, tmp_path, mechanism="set")) == 0
    row = pd.read_csv(tmp_path / "glue.csv").iloc[0]
    assert (row["task"], row["glue_task"], row["mechanism"], row["size"], row["epochs"]) == (
        "glue", "sst2", "set", "tiny", 1)
    assert row["dataset"] == f"glue:{sentiment.name}" and row["max_len"] == 16
    assert 0 <= row["accuracy"] <= 100 and row["score"] == row["accuracy"] and math.isnan(row["f1"])
    assert (row["train_examples"], row["dev_examples"], row["skipped_rows"]) == (40, 8, 0)
    assert row["params"] > 0 and row["gflops"] > 0 and row["train_seq_s"] > 0 and row["wall_s"] > 0
    assert row["mechanism_init"].startswith("kmeans") and row["tokenizer"].startswith("wordpiece-200")
    run = tmp_path / "run"
    meta = json.loads((run / "meta.json").read_text())
    assert meta["preset"] == "glue" and meta["glue_task"] == "sst2" and meta["git_commit"]
    assert len(pd.read_csv(run / "history.csv")) == 1 and row["init"] == "random"
    assert (run / "checkpoint.pt").is_file() and (run / "tokenizer.json").is_file()
    assert list(tmp_path.glob("accuracy_glue_sst2_*_tiny.png"))


@pytest.mark.parametrize("task, mechanism", [("mnli", "linear"), ("stsb", "nystromformer")])
def test_pair_tasks_and_regression_run(task, mechanism, tmp_path):
    """Tiny copies of MNLI (three classes, two dev sets) and STS-B (a regression head, MSE)."""
    root = tmp_path / "glue"
    folder = "MNLI" if task == "mnli" else "STS-B"
    head, rows = FILES[folder]["train.tsv"].split("\n", 1)
    files = dict(FILES[folder], **{"train.tsv": head + "\n" + rows * 8})
    write_glue(root, {folder: files})
    assert main(run_args(root, tmp_path, "--batch-size", "4", "--vocab-size", "100", mechanism=mechanism,
                         task=task)) == 0
    row = pd.read_csv(tmp_path / "glue.csv").iloc[0]
    if task == "mnli":
        assert 0 <= row["accuracy"] <= 100 and 0 <= row["accuracy_mm"] <= 100 and row["dev_examples"] == 2
    else:  # one dev pair: correlations are undefined, and the row says so (NaN) rather than inventing one
        assert math.isnan(row["pearson"]) and math.isnan(row["accuracy"]) and row["train_examples"] == 16


def test_resume_continues_exactly_where_the_run_stopped(sentiment, tmp_path, monkeypatch):
    """Two epochs in one go, and one epoch then --resume, end with the same weights."""
    save = Trainer.save

    def keep_each_epoch(self, path, extra):
        save(self, path, extra)
        path.with_name(f"epoch{self.epoch}.pt").write_bytes(path.read_bytes())

    monkeypatch.setattr(Trainer, "save", keep_each_epoch)
    assert main(run_args(sentiment, tmp_path / "a", "--epochs", "2")) == 0
    stopped = tmp_path / "b" / "run"
    stopped.mkdir(parents=True)
    for name in ("tokenizer.json",):
        (stopped / name).write_bytes((tmp_path / "a" / "run" / name).read_bytes())
    (stopped / "checkpoint.pt").write_bytes((tmp_path / "a" / "run" / "epoch1.pt").read_bytes())
    assert main(run_args(sentiment, tmp_path / "b", "--epochs", "2", "--resume", str(stopped))) == 0
    whole = torch.load(tmp_path / "a" / "run" / "checkpoint.pt", weights_only=True)
    resumed = torch.load(stopped / "checkpoint.pt", weights_only=True)
    assert resumed["epoch"] == whole["epoch"] == 2
    for key, value in whole["model"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, resumed["model"][key]), key


@pytest.mark.parametrize("extra, message", [
    (["--glue-task", "sst3"], "--glue-task: invalid choice: 'sst3' (choose from 'cola', 'sst2', 'mrpc'"),
    (["--size", "huge"], "argument --size: invalid choice: 'huge'"),
    (["--max-len", "2"], "argument --max-len: invalid value '2'; valid: an int in [4, 4096]"),
    (["--batch-size", "64"], "fewer than one batch of 64 per process"),
    (["--opt", "set.m=16"], "options of set do not apply to --mechanism softmax"),
    (["--tokenizer", "/nonexistent/vocab.txt"], "argument --tokenizer: /nonexistent/vocab.txt: no such file"),
    (["--glue-task", "rte"], "no RTE/ folder in it for --glue-task rte (it holds SST-2)"),
    (["--glue-task", "stsb", "--label-smoothing", "0.1"], "GLUE STS-B is a regression"),
    (["--init", "minilm"], "--init minilm fixes the encoder (size minilm) and the tokenizer"),
])
def test_bad_options_get_one_clear_line(extra, message, sentiment, tmp_path, cli_error):
    assert message in cli_error(run_args(sentiment, tmp_path, *extra))


def test_other_tasks_need_the_glue_data(tmp_path, cli_error):
    argv = ["run", "--mechanism", "softmax", "--task", "glue", "--glue-task", "cola"]
    assert "--glue-task cola needs --data DIR" in cli_error(argv)


def test_options_that_need_a_grid_refuse_sequences_before_any_data_is_read(tmp_path, cli_error):
    (tmp_path / "never-read").mkdir()  # an empty folder: reading it would fail
    argv = run_args(tmp_path / "never-read", tmp_path, "--opt", "set.positional=2d", mechanism="set")
    assert "cannot mix 1-D padded sequences" in cli_error(argv)
