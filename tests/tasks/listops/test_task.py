"""The ListOps task end to end: a tiny generated run and a tiny run on LRA's files, each ending
with its results row; the generated set as written; the sweep presets; clear errors."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from attnbench import get_mechanism
from attnbench.cli import main
from tasks.common.trainer import AMP_CHOICES
from tasks.listops.data import read_lra
from tasks.listops.generator import check_limits, length_band, to_text
from tasks.listops.task import ListOps
from tests.tasks.listops.tiny import TRAIN, stack_value, write_lra


def run_args(tmp_path, *extra: str) -> list[str]:
    return ["run", "--task", "listops", "--mechanism", "softmax", "--batch-size", "4", "--max-steps", "2",
            "--out", str(tmp_path / "run"), "--results", str(tmp_path / "listops.csv"), *extra]


def test_a_generated_run_writes_the_set_once_and_ends_with_a_row(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNBENCH_CACHE", str(tmp_path / "cache"))
    assert main(run_args(tmp_path, "--seq-len", "32", "--train-size", "24", "--test-size", "8",
                         "--val-size", "6")) == 0
    row = pd.read_csv(tmp_path / "listops.csv").iloc[0]
    assert (row["task"], row["mechanism"], row["seq_len"], row["max_depth"], row["max_args"]) == (
        "listops", "softmax", 32, 10, 10)
    assert row["dataset"] == "generated:depth10-args10-seed0" and row["truncated"] == 0
    assert (row["train_examples"], row["test_examples"], row["val_examples"], row["steps"]) == (24, 8, 6, 2)
    assert 0 <= row["val_accuracy"] <= 100
    assert (row["vocab_size"], row["num_classes"], bool(row["limited"])) == (16, 10, True)
    assert 0 <= row["accuracy"] <= 100 and row["accuracy"] == row["best_accuracy"]
    # the set as written: in band, each label its expression's value, no test expression in training
    (folder,) = (tmp_path / "cache").glob("listops-n32-*")
    splits, cut = read_lra(folder, 32)
    low, high = length_band(32)
    assert cut == 0 and all(low <= n <= high for s in splits.values() for n in s.lengths)
    texts = {}
    for split, part in splits.items():
        texts[split] = {to_text(ids) for ids in part.tokens}
        assert all(stack_value(to_text(ids)) == y for ids, y in zip(part.tokens, part.labels, strict=True))
    assert not texts["train"] & texts["test"] and not texts["val"] & (texts["train"] | texts["test"])
    assert len(splits["val"]) == 6
    majority = pd.Series(splits["train"].labels).value_counts().idxmax()
    assert row["chance"] == pytest.approx(100 * (splits["test"].labels == majority).mean(), abs=1e-3)


def test_a_run_on_lras_files(tmp_path):
    lines = TRAIN.splitlines()
    root = write_lra(tmp_path / "lra", train="\n".join([lines[0], *lines[1:] * 4]) + "\n")
    assert main(run_args(tmp_path, "--data", str(root), "--seq-len", "16", "--size", "tiny")) == 0
    row = pd.read_csv(tmp_path / "listops.csv").iloc[0]
    assert (row["dataset"], row["seq_len"], row["size"]) == ("lra:lra", 16, "tiny")
    assert (row["train_examples"], row["test_examples"], row["val_examples"]) == (8, 1, 1)  # basic_val.tsv
    assert math.isnan(row["max_depth"]) and row["truncated"] == 0


def test_the_sweep_presets_name_mechanisms_and_lengths_that_exist():
    for kind, preset in ListOps.sweep_presets.items():
        assert set(preset) == {"seq", "mechanisms", "seeds", "args"}, kind
        for name in preset["mechanisms"]:
            get_mechanism(name)
        for n in preset["seq"]:
            check_limits(n, ListOps.presets["embedded"]["max_depth"], ListOps.presets["embedded"]["max_args"])
    cpu, cuda = ListOps.sweep_presets["cpu"], ListOps.sweep_presets["cuda"]
    assert "set" in cpu["mechanisms"] and "softmax" in cpu["mechanisms"] and max(cpu["seq"]) <= 512
    amp = cuda["args"][cuda["args"].index("--amp") + 1]
    assert amp == "bf16" and amp in AMP_CHOICES and cuda["seq"] == [2048]


@pytest.mark.parametrize("extra, needle", [
    (["--seq-len", "8"], "--seq-len must be >= 16"),
    (["--seq-len", "2048", "--max-depth", "3"], "hold at most 122 tokens"),
    (["--train-size", "0"], "argument --train-size: invalid value '0'; valid: an int in [1, 1000000]"),
    (["--data", "DATA", "--max-args", "4"], "--max-args sets the generated expressions"),
    (["--data", "EMPTY"], "basic_train.tsv: not found; --data expects the Long Range Arena ListOps files"),
])
def test_mistakes_are_one_clear_line(tmp_path, cli_error, extra, needle):
    write_lra(tmp_path / "DATA")
    (tmp_path / "EMPTY").mkdir()
    extra = [str(tmp_path / e) if e in ("DATA", "EMPTY") else e for e in extra]
    assert needle in cli_error(run_args(tmp_path, *extra))
