"""Mechanisms that start from data: SeT's anchors and references from k-means on real tokens.

Any model, any inputs: the mechanisms of ``model`` that have ``init_from_data(tokens)`` are set
block by block, each on its real input tokens once the blocks before it are set. The harness
calls it for every task (``--mechanism-init data``, the default) on rank 0 before training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from attnbench import Mechanism, TaskError


class _Captured(Exception):
    """Raised by a pre-hook to stop the forward pass once a mechanism's input is in hand."""


@torch.no_grad()
def init_mechanisms_from_data(model: nn.Module, *inputs: Tensor) -> list[dict[str, Any]]:
    """Call ``init_from_data(tokens)`` of every mechanism of ``model`` that has one (SeT: k-means
    anchors and references), block by block, each on its real input tokens after the blocks before
    it are set; ``model(*inputs)`` is the forward pass (images, or a text batch with its mask,
    whose padding is left out of the tokens)."""
    records = []
    was_training = model.training
    model.eval()
    try:
        for mech in (m for m in model.modules() if isinstance(m, Mechanism)):
            init = getattr(mech, "init_from_data", None)
            if init is None:
                continue
            captured: list[Tensor] = []

            def grab(module: nn.Module, args: tuple, kwargs: dict, box: list[Tensor] = captured) -> None:
                tokens, mask = args[0], kwargs.get("mask")  # the block's normalised tokens (B, N, C)
                box.append(tokens if mask is None else tokens[mask].unsqueeze(0))  # (1, real, C)
                raise _Captured

            hook = mech.register_forward_pre_hook(grab, with_kwargs=True)
            try:
                model(*inputs)
            except _Captured:
                pass
            finally:
                hook.remove()
            try:
                records.append(dict(init(captured[0])))
            except ValueError as exc:  # too few tokens for k-means: the random init stays
                records.append({"method": "random", "why": str(exc)})
    finally:
        model.train(was_training)
    return records


def readable_samples(dataset: Dataset, count: int, seed: int, where: Path | str) -> list[Any]:
    """Up to ``count`` items of ``dataset`` in a seeded random order, leaving out those that fail
    to load (None); a TaskError when not one loads (every training image in ``where`` unreadable)."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    found = []
    for i in order:
        if len(found) == count:
            break
        item = dataset[i]
        if item is not None:
            found.append(item)
    if not found:
        raise TaskError(f"no readable training image in {where}")
    return found


def describe_init(records: list[dict[str, Any]]) -> str:
    """What initialised the mechanisms, for a results table: "kmeans (torch)", say."""
    return ", ".join(sorted({str(r.get("method", "?")) for r in records})) or "random"

