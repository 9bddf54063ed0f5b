"""Mechanisms initialised from data: SeT's k-means on real tokens, padding left out."""

from __future__ import annotations

import torch
from torch import nn

from attnbench import build_mechanism
from tasks.common.backbone import SIZES, build_backbone
from tasks.common.init_from_data import describe_init, init_mechanisms_from_data


def test_set_references_start_from_kmeans_of_real_tokens():
    model = build_backbone("micro", "set", 10)
    records = init_mechanisms_from_data(model, torch.randn(64, 3, 32, 32))
    assert len(records) == sum(SIZES["micro"].depths)
    assert all(r["method"].startswith("kmeans") for r in records)
    assert model.training  # the mode is restored
    assert init_mechanisms_from_data(build_backbone("micro", "softmax", 10), torch.randn(4, 3, 32, 32)) == []


def test_init_from_data_leaves_padding_out_of_the_tokens():
    """A padded text batch: SeT's k-means sees the real tokens only."""
    class Text(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mixer = build_mechanism("set", 16, 2, m=4, anchors=3)

        def forward(self, x, mask):
            return self.mixer(x, None, mask=mask)

    model = Text()
    seen = []
    model.mixer.init_from_data = lambda tokens: seen.append(tokens) or {"method": "probe"}
    x, mask = torch.randn(2, 9, 16), torch.arange(9)[None, :] < torch.tensor([[9], [5]])
    assert describe_init(init_mechanisms_from_data(model, x, mask)) == "probe"
    assert seen[0].shape == (1, 14, 16)  # 9 + 5 real tokens, padding dropped
    torch.testing.assert_close(seen[0][0], x[mask])
