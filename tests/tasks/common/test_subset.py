"""Smoke-run limits (``--limit-train``, ``--limit-val``) keep a seeded sample, stratified by class
where the data say each example's class: never the first N, which in a class-sorted layout are one
class (issue #29: top-1 100 % after two steps)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import TensorDataset

from attnbench.cli import main
from attnbench.task import TASKS, register_task
from tasks.common.harness import Data
from tasks.common.subset import RANDOM, STRATIFIED, class_labels, smoke_subset, stratified_indices
from tests.tasks.common.toy import Toy


class Labelled(TensorDataset):
    """(x, y) pairs that say their classes, as ``ImageFolder.targets`` does."""

    @property
    def targets(self) -> torch.Tensor:
        return self.tensors[1]


def sorted_by_class(classes: int = 10, per_class: int = 400) -> Labelled:
    """Every example of class 0, then of class 1, …: the layout of an image folder."""
    y = torch.arange(classes).repeat_interleave(per_class)
    return Labelled(torch.arange(len(y)), y)


def test_a_stratified_sample_keeps_each_class_its_share():
    labels = sorted_by_class().targets.numpy()
    picked = stratified_indices(labels, 128, np.random.default_rng(0))
    counts = np.bincount(labels[picked], minlength=10)
    assert len(picked) == 128 == len(set(picked.tolist())) and set(counts) == {12, 13}
    few = stratified_indices(labels, 5, np.random.default_rng(0))
    assert len(set(labels[few])) == 5  # fewer than the classes: each pick another class
    skewed = np.array([0] * 900 + [1] * 100)
    assert np.bincount(skewed[stratified_indices(skewed, 50, np.random.default_rng(1))]).tolist() == [45, 5]


def test_the_sample_is_drawn_from_the_seed_and_the_split_alone():
    data = sorted_by_class()
    first, rule = smoke_subset(data, 64, seed=0, split="train")
    again, _ = smoke_subset(data, 64, seed=0, split="train")  # another process, or a resume
    assert rule == STRATIFIED and first.indices == again.indices and first.indices != list(range(64))
    assert smoke_subset(data, 64, seed=1, split="train")[0].indices != first.indices
    assert smoke_subset(data, 64, seed=0, split="val")[0].indices != first.indices
    assert smoke_subset(data, None, 0, "train") == (data, "")
    assert smoke_subset(data, 4000, 0, "val") == (data, "")  # not below its size: all of it


def test_data_without_classes_get_a_seeded_random_sample():
    per_token = Labelled(torch.zeros(100, 3), torch.zeros(100, 8, dtype=torch.long))  # MQAR's targets
    scores = Labelled(torch.zeros(100, 3), torch.rand(100))  # a regression
    for data in (per_token, scores, TensorDataset(torch.zeros(100, 3))):
        assert class_labels(data) is None
        subset, rule = smoke_subset(data, 10, seed=0, split="train")
        assert rule == RANDOM and len(subset) == 10 and subset.indices != list(range(10))


class SortedToy(Toy):
    """The toy task with its examples sorted by class; it counts the classes it trains and evaluates on."""

    name = "toy-sorted"
    metrics = ("accuracy", "val_classes")
    trained_on: ClassVar[set[int]] = set()

    def load_data(self) -> Data:
        data = Toy.load_data(self).train
        x, y = data.tensors
        order = torch.argsort(y, stable=True)
        pairs = Labelled(x[order], y[order])
        return Data("sorted toy tokens", train=pairs, val=pairs)

    def loss(self, net, batch):
        SortedToy.trained_on |= set(batch[1].tolist())
        return super().loss(net, batch)

    def evaluate(self, model):
        seen = set()
        for batch in self.val_loader:
            seen |= set(batch[1].tolist())
        return {**super().evaluate(model), "val_classes": len(seen)}


@pytest.fixture
def sorted_toy():
    register_task(SortedToy)
    SortedToy.trained_on = set()
    yield
    TASKS.unregister(SortedToy.name)


def test_a_smoke_run_on_class_sorted_data_sees_every_class_and_says_how(sorted_toy, tmp_path):
    argv = ["run", "--task", SortedToy.name, "--mechanism", "softmax", "--max-steps", "2", "--limit-train",
            "32", "--limit-val", "10", "--out", str(tmp_path / "run"), "--results", str(tmp_path / "toy.csv")]
    assert main(argv) == 0
    row = pd.read_csv(tmp_path / "toy.csv").iloc[-1]
    assert row["subset"] == STRATIFIED and row["limited"] and row["val_examples"] == 10
    assert row["val_classes"] == 2 and SortedToy.trained_on == {0, 1}  # the first 32, or 10: class 0 alone
    assert main(["run", "--task", SortedToy.name, "--mechanism", "softmax", "--max-steps", "2", "--out",
                 str(tmp_path / "full"), "--results", str(tmp_path / "toy.csv")]) == 0
    assert pd.isna(pd.read_csv(tmp_path / "toy.csv").iloc[-1]["subset"])  # nothing cut: no rule
