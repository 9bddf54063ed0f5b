"""The optimisation around one model, in the shape of torchvision's reference scripts.

AdamW with weight decay on weight matrices only, linear warm-up then cosine decay (per
step; under a time budget, along the training time: ``scheduled_lr``), gradient clipping, mixed
precision where the device supports it, an optional EMA of the weights, DistributedDataParallel
under ``torchrun``, one training epoch at a time (optionally stopped after a number of optimiser
steps), and checkpoints that hold everything a resumed run needs to continue exactly.
``tasks.common.harness`` runs the epochs around it.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from attnbench.results.tables import replacing
from attnbench.task import TaskError
from tasks.common.distributed import Dist, all_reduce

AMP_CHOICES = ("auto", "off", "bf16", "fp16")

# (loss, items): the loss is one Tensor, or named parts that are summed (each part's epoch mean
# goes into the history: Mask R-CNN's five losses, say); items is how many samples it covers.
Loss = tuple[Tensor | Mapping[str, Tensor], int]


class Diverged(FloatingPointError):
    """The training loss is no longer finite: the run ends, recorded with status ``diverged``."""


@dataclasses.dataclass
class Recipe:
    """Resolved hyper-parameters of one run (what goes into the checkpoint and meta.json)."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_epochs: float
    min_lr: float
    label_smoothing: float
    clip_grad: float
    ema: float
    amp: str
    seed: int
    workers: int

    def validate(self) -> None:
        checks = [(self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
                  (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
                  (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
                  (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
                  (self.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {self.warmup_epochs}"),
                  (0 <= self.min_lr <= self.lr, f"--min-lr must be in [0, lr={self.lr}], got {self.min_lr}"),
                  (0 <= self.label_smoothing < 1,
                   f"--label-smoothing must be in [0, 1), got {self.label_smoothing}"),
                  (self.clip_grad >= 0, f"--clip-grad must be >= 0 (0: off), got {self.clip_grad}"),
                  (0 <= self.ema < 1, f"--ema must be in [0, 1) (0: off), got {self.ema}"),
                  (self.workers >= 0, f"--workers must be >= 0, got {self.workers}")]
        for ok, message in checks:
            if not ok:
                raise TaskError(message)


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``--amp`` on ``device``, or None for full precision."""
    if amp == "auto":
        if device.type != "cuda":
            return None  # bf16 autocast on the CPU is often slower than float32: opt in with --amp bf16
        # bf16 in hardware (Ampere and later); emulated bf16 (V100, T4) is slower than fp16
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if amp == "fp16" and device.type != "cuda":
        raise TaskError("--amp fp16 needs CUDA; on the CPU use --amp bf16 or off")
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def to_device(batch: Any, device: torch.device) -> Any:
    """Every tensor of a batch (tensors, lists, tuples, dicts of them) moved to ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


@dataclasses.dataclass
class EpochStats:
    loss: float  # mean over items, all processes
    items: int  # items trained on, all processes
    seconds: float  # wall time of the epoch (slowest process)
    skipped: int  # samples that failed to load, all processes
    lr: float  # learning rate at the end of the epoch
    parts: dict[str, float]  # mean of each named loss part over items (empty for a single loss)

    @property
    def items_per_s(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else math.nan


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay the weights of Linear and convolution layers only; norms, biases and mechanism
    parameters (SeT's anchors and references, Swin's bias table) are not decayed."""
    decay = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))}
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if id(p) in decay], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) not in decay], "weight_decay": 0.0}]


WARMUP_START = 1e-3  # the warm-up ramps the learning rate up from this fraction of the peak


def scheduled_lr(progress: float, peak: float, floor: float, warmup: float) -> float:
    """The learning rate ``progress`` (0 to 1) through training: a linear ramp from
    ``WARMUP_START`` × ``peak`` over the first ``warmup`` (a fraction) of it, then cosine decay
    from ``peak`` to ``floor`` at the end."""
    progress = min(max(progress, 0.0), 1.0)
    if progress < warmup:
        return peak * (WARMUP_START + (1 - WARMUP_START) * progress / warmup)
    decayed = (progress - warmup) / (1 - warmup) if warmup < 1 else 1.0
    return floor + (peak - floor) * (1 + math.cos(math.pi * decayed)) / 2


class Trainer:
    """Optimiser, schedule, precision, EMA, DDP and checkpoints around one model."""

    def __init__(self, model: nn.Module, recipe: Recipe, dist: Dist, steps_per_epoch: int,
                 time_budget: float | None = None) -> None:
        self.recipe, self.dist = recipe, dist
        self.model = model.to(dist.device)
        self.net: nn.Module = model
        if dist.world_size > 1:
            ids = [dist.device.index] if dist.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, recipe.weight_decay), lr=recipe.lr)
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = max(1, recipe.epochs * steps_per_epoch)  # the steps the schedule is planned for
        warmup_steps = min(self.total_steps - 1, round(recipe.warmup_epochs * steps_per_epoch))
        self.warmup = warmup_steps / self.total_steps  # the share of the schedule that warms up
        self.time_budget = time_budget  # seconds of training; the schedule then follows the time
        self.autocast_dtype = amp_dtype(recipe.amp, dist.device)
        self.scaler = torch.amp.GradScaler(dist.device.type, enabled=self.autocast_dtype == torch.float16)
        self.ema = (AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(recipe.ema), use_buffers=True)
                    if recipe.ema > 0 else None)
        self.epoch = 0  # epochs completed
        self.saved_epoch = 0  # epochs completed in the checkpoint on disk (0: none yet)
        self.steps = 0  # optimiser steps taken
        self.trained_s = 0.0  # training seconds of the epochs done (the slowest process's)
        self.history: list[dict[str, Any]] = []
        self.set_lr(self.schedule_progress(0.0))

    def autocast(self) -> AbstractContextManager:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.dist.device.type, dtype=self.autocast_dtype)

    def train_epoch(self, loader: Iterable, compute_loss: Callable[[nn.Module, Any], Loss], desc: str,
                    max_steps: int | None = None) -> EpochStats:
        """One pass over ``loader`` (batches moved to the device), or up to ``max_steps`` optimiser
        steps in all; ``compute_loss(net, batch)`` -> (loss or named parts, items in the batch).
        A batch of ``batch_size`` samples with fewer items lost the rest to decoding errors."""
        self.net.train()
        total_loss, items, skipped = 0.0, 0, 0
        parts: dict[str, float] = defaultdict(float)
        budget = self.steps_per_epoch
        if max_steps is not None:
            budget = min(budget, max_steps - self.steps)
        bar = progress(budget, desc, self.dist)
        start = time.perf_counter()
        for step, batch in enumerate(loader, start=1):
            if max_steps is not None and self.steps >= max_steps:
                break
            with self.autocast():
                loss, n = compute_loss(self.net, to_device(batch, self.dist.device))
            skipped += self.recipe.batch_size - n
            if n == 0:  # every sample of this batch failed to load
                bar.update()
                continue
            if isinstance(loss, Mapping):
                for k, v in loss.items():
                    parts[k] += v.item() * n
                loss = sum(loss.values())
            if not torch.isfinite(loss):
                raise Diverged(f"the training loss is {loss.item()} at step {step} of {desc}; "
                               "try a lower --lr or --amp off")
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if self.recipe.clip_grad > 0:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.steps += 1
            self.set_lr(self.schedule_progress(self.trained_s + self.elapsed(start)))
            if self.ema is not None:
                self.ema.update_parameters(self.model)
            total_loss += loss.item() * n
            items += n
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{total_loss / items:.3f}", lr=f"{self.lr():.2e}",
                            it_s=f"{items * self.dist.world_size / elapsed:.0f}", refresh=False)
            bar.update()
        bar.close()
        seconds = time.perf_counter() - start
        names = sorted(parts)
        total_loss, items, skipped, *sums = all_reduce([total_loss, items, skipped, *map(parts.get, names)],
                                                       self.dist)
        (seconds,) = all_reduce([seconds], self.dist, op="max")
        self.trained_s += seconds
        if items == 0:
            raise TaskError(f"{desc}: no training sample could be decoded ({int(skipped)} skipped)")
        return EpochStats(total_loss / items, int(items), seconds, int(skipped), self.lr(),
                          {k: v / items for k, v in zip(names, sums, strict=True)})

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def schedule_progress(self, trained_s: float) -> float:
        """How far through its training the run is, as the schedule reads it: the optimiser steps
        over those planned, or under a time budget the training seconds over the budget where that
        is further (so the decay ends as the budget, or the epochs, run out)."""
        done = self.steps / self.total_steps
        if self.time_budget is not None:
            done = max(done, trained_s / self.time_budget)
        return done

    def elapsed(self, start: float) -> float:
        """Seconds since ``start`` this epoch, the slowest process's under a time budget (every
        process then sets the same learning rate: one small all-reduce per step under DDP); 0
        without one (the schedule counts steps)."""
        if self.time_budget is None:
            return 0.0
        (seconds,) = all_reduce([time.perf_counter() - start], self.dist, op="max")
        return seconds

    def set_lr(self, progress: float) -> None:
        lr = scheduled_lr(progress, self.recipe.lr, self.recipe.min_lr, self.warmup)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self, extra: dict[str, Any]) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "epoch": self.epoch, "steps": self.steps, "history": self.history,
                "torch_rng": torch.get_rng_state(), "recipe": dataclasses.asdict(self.recipe), **extra}

    def save(self, path: Path, extra: dict[str, Any]) -> None:
        """Rank 0 writes ``path`` through a temporary file of its own and a rename: never
        half-written, and never a temporary file that another run writes too."""
        if not self.dist.is_main:
            return
        with replacing(path) as tmp:
            torch.save(self.state_dict(extra), tmp)
        self.saved_epoch = self.epoch

    def load(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.epoch, self.history = state["epoch"], list(state["history"])
        self.saved_epoch = self.epoch
        self.steps = state.get("steps", self.epoch * self.steps_per_epoch)  # checkpoints before the count
        self.trained_s = sum(h.get("train_s", 0.0) for h in self.history)
        self.set_lr(self.schedule_progress(self.trained_s))  # the schedule is a function of steps and time
        torch.set_rng_state(state["torch_rng"])


def load_checkpoint(path: Path, flag: str = "--resume") -> tuple[Path, dict[str, Any]]:
    """(run folder, checkpoint) from ``--resume RUN_DIR`` or ``--resume RUN_DIR/checkpoint.pt``;
    ``flag`` is the option that named it, for the error."""
    file = path / "checkpoint.pt" if path.is_dir() else path
    if not file.is_file():
        raise TaskError(f"{flag} {path}: no checkpoint there (expected a run folder holding checkpoint.pt)")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TaskError(f"{flag} {file}: not a readable attnbench checkpoint "
                        f"({type(exc).__name__})") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise TaskError(f"{flag} {file}: not an attnbench checkpoint (no model weights in it)")
    return file.parent, state


def check_resumable(state: dict[str, Any], config: dict[str, Any], recipe: Recipe, path: Path) -> None:
    """The checkpoint must come from the same model, data and recipe as this run (a checkpoint
    from before the CLI restored a run's settings by itself may meet other flags)."""
    saved = state.get("config", {})
    differ = [f"{k}: {saved.get(k)!r} there, {v!r} now" for k, v in config.items() if saved.get(k) != v]
    trained = state.get("recipe", {})
    differ += [f"--{k.replace('_', '-')}: {trained[k]!r} there, {v!r} now"
               for k, v in dataclasses.asdict(recipe).items() if k in trained and trained[k] != v]
    if differ:
        raise TaskError(f"--resume {path}: the checkpoint is of another run ({'; '.join(differ)})")


def progress(total: int, desc: str, dist: Dist) -> tqdm:
    """A progress bar on stderr for rank 0 in a terminal; silent in logs and on other ranks."""
    return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=False,
                disable=not dist.is_main or not sys.stderr.isatty())
