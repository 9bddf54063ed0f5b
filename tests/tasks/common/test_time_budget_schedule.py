"""The learning-rate schedule: warm-up then cosine, a pure function of progress; progress counts
optimiser steps, or under ``--time-budget`` training seconds, so a run stopped by its budget ends
decayed. No clock is read here: the training time is given."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tasks.common.distributed import Dist
from tasks.common.trainer import WARMUP_START, Recipe, Trainer, scheduled_lr

PEAK, FLOOR = 1e-3, 1e-5


def recipe(epochs: int, warmup_epochs: float) -> Recipe:
    return Recipe(epochs=epochs, batch_size=4, lr=PEAK, weight_decay=0.05, warmup_epochs=warmup_epochs,
                  min_lr=FLOOR, label_smoothing=0.0, clip_grad=0.0, ema=0.0, amp="off", seed=0, workers=0)


def trainer(epochs: int, steps_per_epoch: int, warmup_epochs: float, budget: float | None = None) -> Trainer:
    dist = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    return Trainer(nn.Linear(2, 2), recipe(epochs, warmup_epochs), dist, steps_per_epoch, budget)


def test_the_schedule_ramps_up_then_decays_to_its_floor():
    warmup = 0.2
    assert scheduled_lr(0.0, PEAK, FLOOR, warmup) == pytest.approx(PEAK * WARMUP_START)
    assert scheduled_lr(0.1, PEAK, FLOOR, warmup) == pytest.approx(PEAK * (WARMUP_START + 1) / 2)
    assert scheduled_lr(warmup, PEAK, FLOOR, warmup) == pytest.approx(PEAK)
    assert scheduled_lr(0.6, PEAK, FLOOR, warmup) == pytest.approx((PEAK + FLOOR) / 2)  # half-way down
    assert scheduled_lr(1.0, PEAK, FLOOR, warmup) == pytest.approx(FLOOR)
    assert scheduled_lr(1.5, PEAK, FLOOR, warmup) == pytest.approx(FLOOR)  # past the end: stays there
    assert scheduled_lr(0.0, PEAK, FLOOR, 0.0) == pytest.approx(PEAK)  # no warm-up: the peak at once
    lrs = [scheduled_lr(p / 100, PEAK, FLOOR, warmup) for p in range(101)]
    assert lrs.index(max(lrs)) == 20
    assert all(a < b for a, b in zip(lrs[:20], lrs[1:21], strict=True))
    assert all(a > b for a, b in zip(lrs[20:-1], lrs[21:], strict=True))


def torch_schedule(epochs: int, steps_per_epoch: int, warmup_epochs: float) -> list[float]:
    """The learning rate after each step from torch's own LinearLR then CosineAnnealingLR, planned
    over the steps: what the trainer scheduled before the time budget could steer it."""
    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=PEAK)
    total = epochs * steps_per_epoch
    warmup = min(total - 1, round(warmup_epochs * steps_per_epoch))
    schedulers = torch.optim.lr_scheduler
    cosine = schedulers.CosineAnnealingLR(optimizer, T_max=max(1, total - warmup), eta_min=FLOOR)
    scheduler: schedulers.LRScheduler = cosine
    if warmup > 0:
        ramp = schedulers.LinearLR(optimizer, start_factor=WARMUP_START, total_iters=warmup)
        scheduler = schedulers.SequentialLR(optimizer, [ramp, cosine], [warmup])
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(total):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


@pytest.mark.parametrize(("epochs", "steps_per_epoch", "warmup_epochs"),
                         [(3, 7, 1.0), (2, 10, 0.25), (4, 5, 0.0), (1, 4, 5.0)])
def test_without_a_budget_the_schedule_counts_steps_as_before(epochs, steps_per_epoch, warmup_epochs):
    t = trainer(epochs, steps_per_epoch, warmup_epochs)
    ours = []
    for step in range(epochs * steps_per_epoch + 1):
        t.steps = step
        t.set_lr(t.schedule_progress(trained_s=1e9))  # the time does not count without a budget
        ours.append(t.lr())
    assert ours == pytest.approx(torch_schedule(epochs, steps_per_epoch, warmup_epochs), rel=1e-9, abs=1e-15)


def test_under_a_budget_the_schedule_follows_the_training_time():
    t = trainer(epochs=100, steps_per_epoch=10, warmup_epochs=10, budget=60.0)  # warm-up: a tenth
    t.steps = 3  # a sliver of the 1000 steps planned: the time leads
    assert t.schedule_progress(trained_s=30.0) == pytest.approx(0.5)
    t.set_lr(t.schedule_progress(trained_s=3.0))
    assert t.lr() == pytest.approx(PEAK * (WARMUP_START + 1) / 2)  # half the warm-up's 6 s
    t.set_lr(t.schedule_progress(trained_s=6.0 + 27.0))
    assert t.lr() == pytest.approx((PEAK + FLOOR) / 2)  # half-way through the decay
    t.set_lr(t.schedule_progress(trained_s=60.0))
    assert t.lr() == pytest.approx(FLOOR)  # the budget spent: fully decayed though few steps were taken
    t.steps = 1000  # the epochs done before the budget: decayed all the same
    assert t.schedule_progress(trained_s=10.0) == 1.0


def test_a_resumed_run_under_a_budget_picks_up_the_schedule_at_its_training_time():
    first = trainer(epochs=100, steps_per_epoch=10, warmup_epochs=0, budget=60.0)
    first.steps, first.epoch = 20, 2
    first.history = [{"epoch": 1, "train_s": 10.0}, {"epoch": 2, "train_s": 20.0}]
    resumed = trainer(epochs=100, steps_per_epoch=10, warmup_epochs=0, budget=60.0)
    resumed.load(first.state_dict({}))
    assert resumed.trained_s == 30.0
    assert resumed.lr() == pytest.approx(FLOOR + (PEAK - FLOOR) * (1 + math.cos(math.pi * 0.5)) / 2)
