"""The base of the sequence tasks: the per-token encoder under every mechanism and padding, the
results row every sequence task must write (the accuracy sweep reads it), and ``--time-budget``."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from attnbench.cli import main
from attnbench.task import TASKS, register_task
from tasks.common import sequence
from tasks.common.harness import Data
from tasks.common.sequence import IGNORE, SequenceSet, SequenceTask, padded
from tasks.common.text_encoder import build_encoder
from tests.conftest import mechanism_params

# the columns `attnbench scale --task T` reads from every sequence task's row
CONTRACT = ["task", "mechanism", "options", "seq_len", "seed", "accuracy", "best_accuracy", "chance", "steps",
            "step_ms", "tokens_s", "peak_mem_mib", "params", "softmax_params", "flops_per_step",
            "time_budget", "status", "limited", "wall_s", "device"]


@pytest.mark.parametrize("mechanism", mechanism_params())
def test_per_token_outputs_at_real_tokens_do_not_depend_on_padding(mechanism):
    model = build_encoder("tiny", mechanism, 50, 7, 32, per_token=True).eval()
    short, long = torch.randint(2, 50, (1, 9)), torch.randint(2, 50, (1, 32))
    ids, mask = padded([short[0].tolist(), long[0].tolist()], 32)
    segments = torch.zeros_like(ids)
    with torch.no_grad():
        both = model(ids, segments, mask)  # (2, 32, 7)
        alone = model(short, segments[:1, :9], mask[:1, :9])
        unpadded = model(long, segments[1:], mask[1:])
        at = mask & (torch.rand(ids.shape) < 0.5)
        picked = model(ids, segments, mask, at)  # (P, 7)
    assert both.shape == (2, 32, 7)
    torch.testing.assert_close(both[0, :9], alone[0], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(both[1], unpadded[0], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(picked, both[at], atol=2e-5, rtol=1e-5)
    assert not torch.allclose(both[0, :9], both[1, :9])


def test_padded_right_pads_and_refuses_what_does_not_fit():
    ids, mask = padded([[5, 6, 7], [8]], 4, pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert mask.tolist() == [[True, True, True, False], [True, False, False, False]]
    with pytest.raises(ValueError, match="5 tokens does not fit in 4"):
        padded([[1] * 5], 4)


def test_sequence_sets_hand_out_long_ids_and_a_full_mask_when_none_is_kept():
    ids = torch.arange(6, dtype=torch.int32).reshape(2, 3)
    item = SequenceSet(ids, None, torch.tensor([[1, -100, 2], [0, 0, -100]], dtype=torch.int16))[1]
    assert [t.dtype for t in item] == [torch.long, torch.bool, torch.long]
    assert item[0].tolist() == [3, 4, 5] and item[1].all() and item[2].tolist() == [0, 0, -100]
    with pytest.raises(ValueError, match="ids and mask must both be"):
        SequenceSet(ids, torch.ones(2, 4, dtype=torch.bool), torch.zeros(2))


def test_sequence_data_builds_both_splits_from_arrays_or_tensors():
    ids = np.arange(6, dtype=np.int32).reshape(2, 3)
    targets = torch.tensor([1, 2])
    test = (torch.from_numpy(ids[:1]), ids[:1] > 0, targets[:1])
    data = Toy().sequence_data("toy", (ids, None, targets), test, description="two and one")
    assert (data.name, len(data.train), len(data.val), data.description) == ("toy", 2, 1, "two and one")
    assert data.train[1][0].tolist() == [3, 4, 5] and data.train[1][1].all()
    assert data.val[0][1].tolist() == [False, True, True] and data.val[0][2].item() == 1
    ids[1, 0] = 9  # a numpy split is shared, not copied
    assert data.train[1][0].tolist() == [9, 4, 5]


class Toy(SequenceTask):
    """Three classes: the first token mod 3 (per sequence), or each token's mod 3 where it is even
    (per token); sequences of 4 to seq_len tokens, padded."""

    name, summary = "toy-sequence", "a toy for the sequence-base tests"
    presets = {"embedded": dict(size="tiny", seq_len=16, epochs=2, batch_size=8, lr=1e-3)}
    vocab_size, num_classes = 12, 3

    def load_data(self) -> Data:
        g = torch.Generator().manual_seed(self.recipe.seed)
        lengths = torch.randint(4, self.seq_len + 1, (48,), generator=g).tolist()
        ids, mask = padded([torch.randint(1, 12, (n,), generator=g).tolist() for n in lengths], self.seq_len)
        if self.per_token:
            targets = torch.where(mask & (ids % 2 == 0), ids % 3, IGNORE)
        else:
            targets = ids[:, 0] % 3
        split = SequenceSet(ids, mask, targets)
        return Data("toy", split, split)


class ToyPerToken(Toy):
    name, per_token = "toy-sequence-per-token", True


@pytest.fixture
def toys():
    for cls in (Toy, ToyPerToken):
        register_task(cls)
    yield
    for cls in (Toy, ToyPerToken):
        TASKS.unregister(cls.name)


def run(tmp_path, task: str, *extra: str, mechanism: str = "softmax") -> pd.Series:
    argv = ["run", "--task", task, "--mechanism", mechanism, "--out", str(tmp_path / "run"),
            "--results", str(tmp_path / "table.csv"), "--mechanism-init", "random", *extra]
    assert main(argv) == 0
    return pd.read_csv(tmp_path / "table.csv").iloc[-1]


def test_softmax_params_counts_the_same_model_with_softmax(toys, tmp_path):
    """Another mechanism's row records what the softmax model of the same task and size holds."""
    softmax = run(tmp_path / "a", Toy.name, "--max-steps", "1", "--seq-len", "12")
    other = run(tmp_path / "b", Toy.name, "--max-steps", "1", "--seq-len", "12", mechanism="set")
    assert other["softmax_params"] == softmax["params"] != other["params"]


@pytest.mark.parametrize("task", [Toy.name, ToyPerToken.name])
def test_a_run_writes_every_contract_column(toys, task, tmp_path):
    row = run(tmp_path, task, "--max-steps", "3", "--seq-len", "12")
    assert all(column in row.index for column in CONTRACT), [c for c in CONTRACT if c not in row.index]
    assert (row["task"], row["seq_len"], row["steps"], row["seed"], row["status"]) == (task, 12, 3, 0, "ok")
    assert 0 <= row["accuracy"] <= row["best_accuracy"] <= 100
    assert row["chance"] == pytest.approx(100 / 3, abs=1e-3)
    assert row["params"] > 0 and row["flops_per_step"] > 0
    assert row["step_ms"] > 0 and row["tokens_s"] > 0 and row["peak_mem_mib"] > 0
    assert row["limited"] and math.isnan(row["time_budget"])


def test_best_accuracy_is_the_best_of_the_evaluations(toys, tmp_path):
    row = run(tmp_path, Toy.name, "--epochs", "3", "--lr", "3e-3")
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert row["best_accuracy"] == pytest.approx(history["accuracy"].max(), abs=1e-3)
    assert row["accuracy"] == pytest.approx(history["accuracy"].iloc[-1], abs=1e-3)
    assert row["steps"] == 18 and not row["limited"]  # 48 sequences, batches of 8, 3 epochs


def test_a_time_budget_stops_training_without_marking_the_run_limited(toys, tmp_path, capsys):
    row = run(tmp_path, Toy.name, "--epochs", "3", "--time-budget", "1e-9", mechanism="linear")
    assert (row["steps"], row["epochs"], row["time_budget"]) == (1, 1, 1e-9)  # one step, then out of time
    assert not row["limited"] and 0 <= row["accuracy"] <= 100
    assert "stopped after 1 optimiser steps (--time-budget 1e-09 s)" in capsys.readouterr().err
    row = run(tmp_path / "ample", Toy.name, "--time-budget", "1e5")
    assert (row["steps"], row["epochs"], row["time_budget"]) == (12, 2, 1e5) and not row["limited"]


def test_more_parameters_than_softmax_are_warned_about(toys, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sequence, "PARAMS_TOLERANCE", -0.5)  # any model then has "too many"
    run(tmp_path, Toy.name, "--max-steps", "1", mechanism="linear")
    assert "warning: linear's model has" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--seq-len", "1"], "argument --seq-len: invalid value '1'"),
    (["--dropout", "1"], "argument --dropout: invalid value '1'"),
    (["--time-budget", "0"], "--time-budget: invalid value '0'"),
])
def test_bad_options_get_one_clear_line(toys, extra, message, tmp_path, cli_error):
    argv = ["run", "--task", Toy.name, "--mechanism", "softmax", "--out", str(tmp_path / "run"), *extra]
    assert message in cli_error(argv)


def test_an_empty_split_is_a_task_error_before_training():
    """(MQAR's test split can lose every sequence to the train/test de-duplication at tiny settings.)"""
    from types import SimpleNamespace

    from attnbench import TaskError

    full = (torch.ones(4, 6, dtype=torch.long), None, torch.zeros(4, dtype=torch.long))
    empty = (torch.ones(0, 6, dtype=torch.long), None, torch.zeros(0, dtype=torch.long))
    with pytest.raises(TaskError, match="the test split of tiny holds no sequences"):
        sequence.SequenceTask.sequence_data(SimpleNamespace(name="toy"), "tiny", full, empty)
