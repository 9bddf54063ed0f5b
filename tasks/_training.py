"""The training harness every task shares, in the shape of torchvision's reference scripts.

AdamW with weight decay on weight matrices only, linear warm-up then cosine decay (per
step), label smoothing (the task's loss), gradient clipping, mixed precision where the device
supports it, an optional EMA of the weights, deterministic seeding, a checkpoint after every
epoch and ``--resume``, a progress bar with loss and throughput, and DistributedDataParallel
through ``torchrun``'s environment variables (rank-0 logging and checkpointing).

A task supplies the model, the data loaders and ``compute_loss(model, batch) -> (loss, items)``;
the harness does the rest.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from attnbench.measure import MIB, proc_status_mib, reset_cpu_peak
from attnbench.results import run_context
from attnbench.tasks import TaskError

AMP_CHOICES = ("auto", "off", "bf16", "fp16")


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """The harness's options of ``attnbench run``; None means "the task's preset decides"."""
    g = parser.add_argument_group("training (defaults: the task's preset)")
    g.add_argument("--epochs", type=int, help="training epochs")
    g.add_argument("--batch-size", type=int, help="images per process and step")
    g.add_argument("--lr", type=float, help="peak learning rate of AdamW (absolute, not scaled)")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay on weight matrices")
    g.add_argument("--warmup-epochs", type=float, help="linear warm-up before the cosine decay")
    g.add_argument("--min-lr", type=float, help="learning rate at the end of the cosine")
    g.add_argument("--label-smoothing", type=float, help="label smoothing of the cross-entropy")
    g.add_argument("--clip-grad", type=float, help="clip the gradient norm to this (0: off)")
    g.add_argument("--ema", type=float, help="EMA decay of the weights, also evaluated (0: off)")
    g.add_argument("--amp", choices=AMP_CHOICES, default="auto",
                   help="mixed precision: auto = bf16 (or fp16) on CUDA, off on the CPU (default auto)")
    g.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order and augmentation")
    g.add_argument("--workers", type=int, help="data-loading processes per training process")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto = cuda when available, else cpu (default auto)")
    g.add_argument("--threads", type=int, help="CPU threads of torch (default: torch's default here)")
    g.add_argument("--out", type=Path, help="run folder (default: results/runs/<time>-<task>-...)")
    g.add_argument("--results", type=Path, help="results table to append to (default: results/<task>.csv)")
    g.add_argument("--resume", type=Path, metavar="RUN_DIR|CHECKPOINT",
                   help="continue a run from its checkpoint.pt (written after every epoch)")


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


def resolve_recipe(args: argparse.Namespace, preset: dict[str, Any]) -> Recipe:
    """Command-line values where given, the task's preset elsewhere."""
    values = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(Recipe)}
    recipe = Recipe(**{k: preset[k] if v is None else v for k, v in values.items()})
    recipe.validate()
    return recipe


# ---- processes and devices ---------------------------------------------------------------------


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


def setup_distributed(device: str) -> Dist:
    """One process, or one of ``torchrun``'s (RANK, WORLD_SIZE, LOCAL_RANK): NCCL on CUDA, gloo on CPU."""
    if device == "cuda" and not torch.cuda.is_available():
        raise TaskError("--device cuda: CUDA is not available on this machine; valid choices here: cpu, auto")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    where = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(where)
    if world > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if use_cuda else "gloo", timeout=dt.timedelta(minutes=30))
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


def broadcast_object(value: Any, dist: Dist) -> Any:
    """Rank 0's ``value`` on every process (a run folder name, say)."""
    if dist.world_size == 1:
        return value
    box = [value]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(dist: Dist) -> None:
    if dist.world_size > 1:
        torch_dist.barrier()


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch (all devices) from one seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``--amp`` on ``device``, or None for full precision."""
    if amp == "auto":
        if device.type != "cuda":
            return None  # bf16 autocast on the CPU is often slower than float32: opt in with --amp bf16
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "fp16" and device.type != "cuda":
        raise TaskError("--amp fp16 needs CUDA; on the CPU use --amp bf16 or off")
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_cpu_peak()


def current_memory_mib(device: torch.device) -> float:
    """CUDA: tensor memory allocated now. CPU: the process's resident set now (VmRSS). MiB."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / MIB
    return proc_status_mib("VmRSS")


def peak_memory_mib(device: torch.device) -> float:
    """CUDA: peak allocated tensor memory. CPU: the process's peak resident set (VmHWM). MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MIB
    return proc_status_mib("VmHWM")


# ---- data ------------------------------------------------------------------------------------


def train_loader(dataset: Dataset, batch_size: int, workers: int, dist: Dist, seed: int,
                 collate: Callable) -> DataLoader:
    """Shuffled, sharded over processes (DistributedSampler, also for one), last partial batch dropped."""
    sampler = DistributedSampler(dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=True,
                                 seed=seed, drop_last=True)
    if len(sampler) < batch_size:
        raise TaskError(f"the training set has {len(dataset)} images: fewer than one batch of "
                        f"{batch_size} per process; lower --batch-size")
    return DataLoader(dataset, batch_size, sampler=sampler, num_workers=workers, collate_fn=collate,
                      drop_last=True, pin_memory=dist.device.type == "cuda",
                      generator=torch.Generator(), worker_init_fn=_seed_worker)


def eval_loader(dataset: Dataset, batch_size: int, workers: int, dist: Dist, collate: Callable) -> DataLoader:
    """Every image exactly once over all processes (rank r takes r, r + world, …): exact metrics."""
    shard = range(dist.rank, len(dataset), dist.world_size)
    return DataLoader(dataset, batch_size, sampler=shard, num_workers=workers, collate_fn=collate,
                      pin_memory=dist.device.type == "cuda")


def _seed_worker(worker_id: int) -> None:
    """NumPy and ``random`` in a loader worker follow torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def set_epoch(loader: DataLoader, epoch: int, seed: int, dist: Dist) -> None:
    """Data order and augmentation of ``epoch`` depend on (seed, epoch, rank) only: resume repeats them."""
    loader.sampler.set_epoch(epoch)
    loader.generator.manual_seed(seed * 100_003 + epoch * 1009 + dist.rank)


# ---- the loop ----------------------------------------------------------------------------------


@dataclasses.dataclass
class EpochStats:
    loss: float  # mean over items, all processes
    items: int  # items trained on, all processes
    seconds: float  # wall time of the epoch (slowest process)
    skipped: int  # samples that failed to load, all processes
    lr: float  # learning rate at the end of the epoch

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


class Trainer:
    """Optimiser, schedule, precision, EMA, DDP and checkpoints around one model."""

    def __init__(self, model: nn.Module, recipe: Recipe, dist: Dist, steps_per_epoch: int) -> None:
        self.recipe, self.dist = recipe, dist
        self.model = model.to(dist.device)
        self.net: nn.Module = model
        if dist.world_size > 1:
            ids = [dist.device.index] if dist.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, recipe.weight_decay), lr=recipe.lr)
        self.steps_per_epoch = steps_per_epoch
        total = recipe.epochs * steps_per_epoch
        warmup = min(total - 1, round(recipe.warmup_epochs * steps_per_epoch))
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=max(1, total - warmup),
                                                            eta_min=recipe.min_lr)
        if warmup > 0:
            ramp = torch.optim.lr_scheduler.LinearLR(self.optimizer, start_factor=1e-3, total_iters=warmup)
            self.scheduler = torch.optim.lr_scheduler.SequentialLR(self.optimizer, [ramp, cosine], [warmup])
        else:
            self.scheduler = cosine
        self.autocast_dtype = amp_dtype(recipe.amp, dist.device)
        self.scaler = torch.amp.GradScaler(dist.device.type, enabled=self.autocast_dtype == torch.float16)
        self.ema = (AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(recipe.ema), use_buffers=True)
                    if recipe.ema > 0 else None)
        self.epoch = 0  # epochs completed
        self.history: list[dict[str, Any]] = []

    def autocast(self) -> AbstractContextManager:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.dist.device.type, dtype=self.autocast_dtype)

    def train_epoch(self, loader: Iterable, compute_loss: Callable[[nn.Module, Any], tuple[Tensor, int]],
                    desc: str) -> EpochStats:
        """One pass over ``loader``; ``compute_loss(net, batch)`` -> (mean loss, items in the batch)."""
        self.net.train()
        total_loss, items, skipped = 0.0, 0, 0
        bar = progress(self.steps_per_epoch, desc, self.dist)
        start = time.perf_counter()
        for batch in loader:
            skipped += batch[-1]
            with self.autocast():
                loss, n = compute_loss(self.net, batch)
            if n == 0:  # every sample of this batch failed to load
                bar.update()
                continue
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the training loss is {loss.item()} at step {bar.n} of {desc}; "
                                         "try a lower --lr or --amp off")
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if self.recipe.clip_grad > 0:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update_parameters(self.model)
            total_loss += loss.item() * n
            items += n
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{total_loss / items:.3f}", lr=f"{self.lr():.2e}",
                            img_s=f"{items * self.dist.world_size / elapsed:.0f}", refresh=False)
            bar.update()
        bar.close()
        seconds = time.perf_counter() - start
        total_loss, items, skipped = all_reduce([total_loss, items, skipped], self.dist)
        (seconds,) = all_reduce([seconds], self.dist, op="max")
        if items == 0:
            raise TaskError(f"{desc}: no training image could be decoded ({int(skipped)} skipped)")
        return EpochStats(total_loss / items, int(items), seconds, int(skipped), self.lr())

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self, extra: dict[str, Any]) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "epoch": self.epoch, "history": self.history, "torch_rng": torch.get_rng_state(),
                "recipe": dataclasses.asdict(self.recipe), **extra}

    def save(self, path: Path, extra: dict[str, Any]) -> None:
        """Rank 0 writes ``path`` through a temporary file and a rename: never half-written."""
        if not self.dist.is_main:
            return
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(self.state_dict(extra), tmp)
        os.replace(tmp, path)

    def load(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.epoch, self.history = state["epoch"], list(state["history"])
        torch.set_rng_state(state["torch_rng"])


def load_checkpoint(path: Path) -> tuple[Path, dict[str, Any]]:
    """(run folder, checkpoint) from ``--resume RUN_DIR`` or ``--resume RUN_DIR/checkpoint.pt``."""
    file = path / "checkpoint.pt" if path.is_dir() else path
    if not file.is_file():
        raise TaskError(f"--resume {path}: no checkpoint there (expected a run folder holding checkpoint.pt)")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TaskError(f"--resume {file}: not a readable attnbench checkpoint "
                        f"({type(exc).__name__})") from None
    return file.parent, state


def check_resumable(state: dict[str, Any], config: dict[str, Any], path: Path) -> None:
    """The checkpoint must come from the same model and data as this run."""
    saved = state.get("config", {})
    differ = [f"{k}: {saved.get(k)!r} there, {v!r} now" for k, v in config.items() if saved.get(k) != v]
    if differ:
        raise TaskError(f"--resume {path}: the checkpoint is of another run ({'; '.join(differ)})")


def progress(total: int, desc: str, dist: Dist) -> tqdm:
    """A progress bar on stderr for rank 0 in a terminal; silent in logs and on other ranks."""
    return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=False,
                disable=not dist.is_main or not sys.stderr.isatty())


def log(message: str, dist: Dist) -> None:
    """One line on stderr, from rank 0 only."""
    if dist.is_main:
        print(message, file=sys.stderr, flush=True)


# ---- what every task's run shares --------------------------------------------------------------


def launch(train_and_evaluate: Callable[[Any, Dist], int], plan: Any, device: str) -> int:
    """``train_and_evaluate(plan, dist)`` in this process's place in the (torchrun) process group."""
    dist = setup_distributed(device)
    try:
        return train_and_evaluate(plan, dist)
    finally:
        teardown_distributed()


def run_dir(out: Path | None, name: str, dist: Dist) -> Path:
    """``--out``, or ``results/runs/<time>-<name>`` with rank 0's time on every rank."""
    if out is not None:
        return out
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(broadcast_object(str(Path("results") / "runs" / f"{stamp}-{name}"), dist))


def steady_median(history: Sequence[dict[str, Any]], key: str) -> float:
    """Median of ``key`` over the epochs after the first, which pays for warm-up."""
    steady = history[1:] if len(history) > 1 else history
    return float(np.median([h[key] for h in steady])) if steady else math.nan


def shared_columns(recipe: Recipe, mechanism: str, options: dict[str, str], dist: Dist,
                   history: Sequence[dict[str, Any]], wall: float, folder: Path) -> dict[str, Any]:
    """The columns every task's results row has: memory, time, batch and processes, the
    mechanism's options and backend, and the run's context (device, threads, commit, versions)."""
    from attnbench import get_mechanism

    ctx = run_context(str(dist.device), torch.get_num_threads())
    return {
        "peak_mem_mib": round(max((h["peak_mem_mib"] for h in history), default=math.nan), 1),
        "train_mem_mib": round(max((h.get("train_mem_mib", math.nan) for h in history), default=math.nan), 1),
        "wall_s": round(wall, 1), "batch_size": recipe.batch_size, "world_size": dist.world_size,
        "device": str(dist.device), "threads": torch.get_num_threads(), "amp": recipe.amp,
        "options": ";".join(f"{k}={v}" for k, v in sorted(options.items())),
        "backend": get_mechanism(mechanism).backend(str(dist.device)), "status": "ok",
        "run_dir": str(folder), "date": ctx["date"], "git_commit": ctx["git_commit"],
        "torch": ctx["versions"]["torch"], "cpu": ctx["cpu"], "gpu": ctx["gpu"]}
