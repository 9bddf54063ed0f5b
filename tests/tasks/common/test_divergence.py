"""A run that diverges or runs out of memory ends with one line, exit status 1 and a row that
says so (``diverged``, ``oom``), never a traceback; any other error is not hidden."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from attnbench.cli import main
from tests.tasks.common.toy import Toy, toy  # noqa: F401  (the fixture)


def run_toy(tmp_path, capsys) -> tuple[int, str, pd.Series]:
    """(exit status, stderr's last line, the row) of a toy run."""
    status = main(["run", "--task", Toy.name, "--mechanism", "softmax", "--out", str(tmp_path / "run"),
                   "--results", str(tmp_path / "toy.csv")])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return status, err.strip().splitlines()[-1], pd.read_csv(tmp_path / "toy.csv").iloc[-1]


def test_a_loss_that_is_no_longer_finite_ends_the_run_with_a_diverged_row(toy, tmp_path, capsys,  # noqa: F811
                                                                          monkeypatch):
    loss = Toy.loss

    def diverging(self, net, batch):  # finite for the first step, then NaN, as a too high --lr does
        value, n = loss(self, net, batch)
        return (value if self.trainer.steps == 0 else value * math.nan), n

    monkeypatch.setattr(Toy, "loss", diverging)
    status, line, row = run_toy(tmp_path, capsys)
    assert status == 1
    table = tmp_path / "toy.csv"
    assert line == ("attnbench run: error: training diverged: the training loss is nan at step 2 of epoch "
                    f"1/2; try a lower --lr or --amp off (status diverged; its row is in {table})")
    assert (row["status"], row["epochs"], row["mechanism"]) == ("diverged", 0, "softmax")
    assert row["message"].startswith("training diverged: the training loss is nan at step 2")
    assert row["params"] > 0 and row["run_dir"] == str(tmp_path / "run") and "accuracy" not in row


@pytest.mark.parametrize("where, error, doing", [
    ("build_model", MemoryError(), "building the model"),
    ("build_model", torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
     "building the model"),
    ("loss", RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 GB"),
     "training or evaluating"),
])
def test_out_of_memory_building_the_model_or_in_a_step_is_an_oom_row(where, error, doing, toy,  # noqa: F811
                                                                     tmp_path, capsys, monkeypatch):
    def fail(*args):
        raise error

    monkeypatch.setattr(Toy, where, fail)
    status, line, row = run_toy(tmp_path, capsys)
    assert status == 1 and row["status"] == "oom"
    assert line.startswith(f"attnbench run: error: out of memory while {doing}")
    assert line.endswith(f"(status oom; its row is in {tmp_path / 'toy.csv'})")
    assert row["message"].startswith(f"out of memory while {doing}") and row["epochs"] == 0
    assert math.isnan(row["params"]) == (where == "build_model")


def test_any_other_error_is_not_turned_into_a_row(toy, tmp_path, monkeypatch):  # noqa: F811
    def broken(*args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(Toy, "loss", broken)
    with pytest.raises(ZeroDivisionError):
        main(["run", "--task", Toy.name, "--mechanism", "softmax", "--out", str(tmp_path / "run"),
              "--results", str(tmp_path / "toy.csv")])
    assert not (tmp_path / "toy.csv").exists()
