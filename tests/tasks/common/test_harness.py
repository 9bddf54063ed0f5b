"""The shared harness on a toy task: smoke-run limits, evaluation cadence, loss parts, the row's
shared columns, and what plots and aggregates leave out."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from torch import nn

from attnbench.cli import main
from attnbench.results.schema import upgrade
from attnbench.task import TASKS, finished_runs, register_task
from tests.tasks.common.toy import Toy as RecordToy


class Toy(RecordToy):
    """The resume tests' toy with twice the examples, and its loss in two named parts."""

    name, summary = "toy-harness", "a toy for the harness tests"
    examples = 256

    def loss(self, net, batch):
        x, y = batch
        logits = net(x)
        return {"ce": nn.functional.cross_entropy(logits, y), "l2": 1e-3 * logits.pow(2).mean()}, len(y)


@pytest.fixture
def toy():
    register_task(Toy)
    yield
    TASKS.unregister(Toy.name)


def run(tmp_path, *extra: str) -> tuple[pd.Series, pd.DataFrame]:
    argv = ["run", "--task", Toy.name, "--mechanism", "softmax", "--out", str(tmp_path / "run"),
            "--results", str(tmp_path / "toy.csv"), *extra]
    assert main(argv) == 0
    return pd.read_csv(tmp_path / "toy.csv").iloc[-1], pd.read_csv(tmp_path / "run" / "history.csv")


def test_max_steps_stops_training_and_the_row_says_it_was_limited(toy, tmp_path, capsys):
    row, history = run(tmp_path, "--epochs", "3", "--max-steps", "5", "--limit-train", "64")
    assert (row["limited"], row["max_steps"], row["limit_train"]) == (True, 5, 64)
    assert math.isnan(row["limit_val"])
    assert row["epochs"] == 2 and list(history["steps"]) == [4, 5]  # 64 examples: 4 steps an epoch
    assert (row["train_examples"], row["val_examples"]) == (64, 256)
    assert not math.isnan(history["accuracy"].iloc[-1])  # evaluated where it stopped
    assert "LIMITED (--max-steps 5, --limit-train 64)" in capsys.readouterr().out


def test_limit_val_evaluates_a_sample_and_a_full_run_is_not_limited(toy, tmp_path):
    row, _ = run(tmp_path, "--limit-val", "10")
    assert row["val_examples"] == 10 and row["limited"] and row["limit_val"] == 10
    row, history = run(tmp_path / "full")
    assert not row["limited"] and math.isnan(row["max_steps"]) and row["val_examples"] == 256
    assert len(history) == 2 and list(history["steps"]) == [16, 32]


def test_eval_every_sets_the_cadence_and_named_loss_parts_reach_the_history(toy, tmp_path):
    row, history = run(tmp_path, "--epochs", "3", "--eval-every", "2", "--ema", "0.9")
    assert [math.isnan(v) for v in history["accuracy"]] == [True, False, False]  # epoch 2, and the last
    assert {"ce", "l2"} <= set(history.columns) and (history["ce"] > history["l2"]).all()
    assert not math.isnan(history["accuracy_ema"].iloc[-1])  # the EMA weights are evaluated too
    assert 0 <= row["accuracy"] <= 100 and row["train_seq_s"] > 0 and row["eval_seq_s"] > 0


@pytest.mark.parametrize("extra, message", [
    (["--max-steps", "0"], "argument --max-steps: invalid value '0'; valid: an int in [1, 1000000000]"),
    (["--limit-val", "-3"], "argument --limit-val: invalid value '-3'"),
    (["--limit-train", "8"], "fewer than one batch of 16 per process"),
    (["--eval-every", "-1"], "argument --eval-every: invalid value '-1'; valid: an int in [0, 10000]"),
])
def test_bad_limits_get_one_clear_line(toy, extra, message, tmp_path, cli_error):
    argv = ["run", "--task", Toy.name, "--mechanism", "softmax", "--out", str(tmp_path / "run"),
            "--results", str(tmp_path / "toy.csv"), *extra]
    assert message in cli_error(argv)


def test_plots_and_aggregates_leave_limited_and_failed_runs_out():
    table = pd.DataFrame({"status": ["ok", "ok", "error", "ok"], "limited": [False, True, False, "True"],
                          "top1": [1, 2, 3, 4]})
    assert list(finished_runs(table)["top1"]) == [1]
    assert list(finished_runs(table, include_limited=True)["top1"]) == [1, 2, 4]
    older = upgrade(pd.DataFrame({"status": ["ok", "ok"], "top1": [1, 2]}), "task")  # from before the column
    assert list(finished_runs(older)["top1"]) == [1, 2]
