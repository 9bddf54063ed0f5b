"""A toy training task for the harness's resume and failure tests: seconds per run."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from attnbench import build_mechanism
from attnbench.task import TASKS, register_task
from tasks.common.harness import Data, TrainingTask


class Toy(TrainingTask):
    """Is the mean of the tokens positive?"""

    name, summary = "toy-record", "a toy for the resume and failure tests"
    metrics, headline = ("accuracy",), "accuracy"
    presets = {"embedded": dict(epochs=2, batch_size=16, lr=3e-3)}
    examples = 128  # each of 8 tokens of 4 features; the same set trains and evaluates

    def load_data(self) -> Data:
        x = torch.randn(self.examples, 8, 4, generator=torch.Generator().manual_seed(0))
        pairs = torch.utils.data.TensorDataset(x, (x.mean((1, 2)) > 0).long())
        return Data("toy tokens", train=pairs, val=pairs)

    def build_model(self) -> nn.Module:
        mixer = build_mechanism(self.mechanism, 4, 1, **self.options)
        return nn.Sequential(mixer, nn.Flatten(), nn.Linear(32, 2))

    def loss(self, net, batch):
        x, y = batch
        return nn.functional.cross_entropy(net(x), y), len(y)

    def evaluate(self, model):
        hits = n = 0
        for batch in self.val_loader:
            x, y = self.to_device(batch)
            hits, n = hits + (model(x).argmax(1) == y).sum().item(), n + len(y)
        hits, n = self.reduce(hits, n)
        return {"accuracy": 100 * hits / n, "items": n}


@pytest.fixture
def toy() -> Iterator[type[Toy]]:
    register_task(Toy)
    yield Toy
    TASKS.unregister(Toy.name)
