"""One process or one of torchrun's: where this process stands, and the few collectives the
tasks need (sums, maxima, objects to rank 0 or to all). In a single process every collective
is the identity, so task code reads the same either way."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import Tensor

from attnbench.task import TaskError


@dataclasses.dataclass(frozen=True)
class Dist:
    """Where this process stands in a (possibly single-process) run."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def use_cuda(device: str) -> bool:
    """``--device`` resolved: cuda, or auto where CUDA is available."""
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def setup_distributed(device: str) -> Dist:
    """One process, or one of ``torchrun``'s (RANK, WORLD_SIZE, LOCAL_RANK): NCCL on CUDA, gloo on CPU."""
    if device == "cuda" and not torch.cuda.is_available():
        raise TaskError("--device cuda: CUDA is not available on this machine; valid choices here: cpu, auto")
    cuda = use_cuda(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    where = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(where)
    if world > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if cuda else "gloo", timeout=dt.timedelta(minutes=30))
    return Dist(rank, world, local, where)


def teardown_distributed() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def all_reduce(values: Sequence[float], dist: Dist, op: str = "sum") -> list[float]:
    """Sum (or max) of ``values`` over all processes; the values themselves in a single process."""
    if dist.world_size == 1:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=dist.device)
    torch_dist.all_reduce(t, torch_dist.ReduceOp.MAX if op == "max" else torch_dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_tensor(t: Tensor, dist: Dist) -> Tensor:
    """The sum of ``t`` over all processes (a confusion matrix, say), on ``t``'s device."""
    if dist.world_size == 1:
        return t
    total = t.to(dist.device)
    torch_dist.all_reduce(total)
    return total.to(t.device)


def broadcast_object(value: Any, dist: Dist) -> Any:
    """Rank 0's ``value`` on every process (a run folder name, say)."""
    if dist.world_size == 1:
        return value
    box = [value]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(value: Any, dist: Dist) -> list[Any] | None:
    """Every process's ``value``, in rank order, on rank 0; None on the others."""
    if dist.world_size == 1:
        return [value]
    parts: list[Any] | None = [None] * dist.world_size if dist.is_main else None
    torch_dist.gather_object(value, parts, dst=0)
    return parts


def all_gather_lists(values: list[Any], dist: Dist) -> list[Any]:
    """All processes' lists, concatenated in rank order, on every process."""
    if dist.world_size == 1:
        return values
    boxes: list[list[Any]] = [[] for _ in range(dist.world_size)]
    torch_dist.all_gather_object(boxes, values)
    return [v for box in boxes for v in box]


def barrier(dist: Dist) -> None:
    if dist.world_size > 1:
        torch_dist.barrier()
