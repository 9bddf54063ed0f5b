"""ADE20K semantic segmentation: UperNet on the SeTformer backbone, any mechanism as token mixer.

``attnbench run --mechanism set --task ade20k`` trains and evaluates; ``--data DIR`` reads the
official ADEChallengeData2016 layout (150 classes, 0 = other, ignored), and without it a small
real data set in that very layout is composited once into the cache from images that
scikit-image, scikit-learn and matplotlib ship, and read through the same code.

Two presets: ``ade20k`` (with --data: SeTformer-Mini, 512² crops, mmseg's Swin/NAT UperNet
recipe of 160k iterations at batch 16 expressed in epochs) and ``embedded`` (SeTformer-Micro,
96² crops, a narrow head without the auxiliary one: minutes on a laptop CPU). Any flag overrides
its preset.

Evaluation is single-scale, whole-image: each validation image is resized (aspect kept) to fit
crop × 4·crop, segmented in one pass, and its logits upsampled to the annotation's full size,
where mIoU, pixel accuracy (aAcc) and mean accuracy come from one confusion matrix summed over
the split and all processes. Each run appends one row to ``results/ade20k.csv`` and redraws the
mIoU plot beside it; ``meta.json``, ``history.csv`` and ``checkpoint.pt`` stay in the run folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import Tensor, nn

from attnbench import get_mechanism
from attnbench.results import append_row, run_context, write_meta
from attnbench.tasks import Task, TaskError, register_task
from tasks import _ade20k_data as data
from tasks import _training
from tasks._seg_metrics import confusion_matrix, segmentation_scores
from tasks._training import Dist, Trainer, log
from tasks.backbone import SIZES, count_parameters, describe_init, init_mechanisms_from_data, measure_flops
from tasks.segmentation import HEAD_CHANNELS, Segmenter, build_segmenter, make_train_step, segmentation_loss

ADE20K_TRAIN_IMAGES = 20_210  # ADEChallengeData2016 training split

PRESETS: dict[str, dict[str, Any]] = {
    # ADE20K from --data: mmseg's UperNet recipe for Swin/NAT (AdamW lr 6e-5, weight decay 0.01,
    # 1,500 warm-up iterations, 160k iterations at 16 images) in epochs: 160k × 16 / 20,210 ≈ 127
    "ade20k": dict(size="mini", crop_size=512, epochs=127, batch_size=16, lr=6e-5, weight_decay=0.01,
                   warmup_epochs=round(1500 * 16 / ADE20K_TRAIN_IMAGES, 2), min_lr=0.0, label_smoothing=0.0,
                   clip_grad=0.0, ema=0.0, workers=min(8, os.cpu_count() or 1), channels=None, aux_weight=0.4,
                   eval_every=16),
    # the embedded composites: a micro backbone and a narrow head that learn them in minutes on a CPU;
    # no auxiliary head (at 150 classes its full-resolution logits cost as much as the main head's)
    "embedded": dict(size="micro", crop_size=96, epochs=3, batch_size=8, lr=2e-3, weight_decay=0.01,
                     warmup_epochs=0.5, min_lr=2e-5, label_smoothing=0.0, clip_grad=1.0, ema=0.0, workers=1,
                     channels=64, aux_weight=0.0, eval_every=3),
}
IMAGES_FOR_INIT = 32  # training crops whose tokens initialise SeT's anchors and references
EVAL_MODE = "whole image, single scale"

COLUMNS = ["task", "mechanism", "size", "dataset", "num_classes", "crop_size", "eval_mode", "epochs", "iters",
           "seed", "miou", "aacc", "macc", "classes_present", "params", "gflops", "train_img_s", "eval_img_s",
           "peak_mem_mib", "train_mem_mib", "wall_s", "batch_size", "world_size", "device", "threads", "amp",
           "options", "mechanism_init", "backbone_weights", "backend", "head", "head_channels", "aux_weight",
           "train_images", "val_images", "status", "run_dir", "date", "git_commit", "torch", "cpu", "gpu"]


@register_task
class ADE20K(Task):
    name = "ade20k"
    summary = ("semantic segmentation, UperNet on the SeTformer backbone (ADEChallengeData2016 layout, or "
               "embedded skimage composites)")
    train_side = PRESETS["embedded"]["crop_size"]

    @classmethod
    def train_step(cls, mechanism: str, side: int, size: str, options: dict[str, Any],
                   device: str) -> tuple[Any, int]:
        """The resolution probe's step: ``segmentation.make_train_step`` (2 synthetic side² crops,
        ADE20K's 150 classes, UperNet with the size's channels)."""
        return make_train_step(mechanism, side, size, options, num_classes=150, device=device), 2

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("ade20k (defaults: preset `ade20k` with --data, else `embedded`)")
        g.add_argument("--data", type=Path, metavar="DIR",
                       help="ADEChallengeData2016 folder: images/{training,validation}/*.jpg and "
                            "annotations/{training,validation}/*.png (default: the embedded composites, "
                            "written once under $ATTNBENCH_CACHE, else ~/.cache/attnbench)")
        g.add_argument("--size", choices=list(SIZES), help="backbone size (default: mini with --data, micro "
                                                           "without)")
        g.add_argument("--crop-size", type=int,
                       help="training crop side; evaluation resizes to fit crop × 4·crop (default: 512 with "
                            "--data, 96 without)")
        g.add_argument("--channels", type=int,
                       help="UperNet channels (default: 512 for mini and larger, 64 for micro)")
        g.add_argument("--aux-weight", type=float,
                       help="weight of the auxiliary FCN head's loss on stage 3 (default: 0.4 with "
                            "--data, 0 = no auxiliary head without)")
        g.add_argument("--drop-path", type=float,
                       help="stochastic depth of the last block (default: the size's)")
        g.add_argument("--eval-every", type=int,
                       help="evaluate every N epochs, and after the last (default: 16 with --data, 3 "
                            "without: only after the last)")
        g.add_argument("--mechanism-init", choices=("data", "random"), default="data",
                       help="data: mechanisms with init_from_data (SeT: k-means anchors and references) "
                            f"start from the tokens of {IMAGES_FOR_INIT} training crops (default)")
        g.add_argument("--backbone-weights", type=Path, metavar="RUN_DIR|CHECKPOINT",
                       help="start the backbone from an `attnbench run --task imagenet` checkpoint of the "
                            "same mechanism and size (the paper fine-tunes ImageNet-trained backbones)")
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
    crop_size: int
    channels: int
    aux_weight: float
    eval_every: int
    drop_path: float | None
    options: dict[str, str]
    recipe: _training.Recipe


def plan_run(args: argparse.Namespace) -> Plan:
    """Presets filled in, user mistakes turned into TaskErrors with one clear line each."""
    from attnbench.cli import parse_mechanism_options

    mech = get_mechanism(args.mechanism)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = "cuda" if cuda else "cpu"
    reason = mech.unavailable_reason(device)
    if reason:
        raise TaskError(f"mechanism {args.mechanism!r} cannot run on {device} here: {reason}")
    options = getattr(args, "mechanism_options", None)
    if options is None:  # called without the CLI, which parses and validates --opt
        options = parse_mechanism_options(args.opt)
    others = sorted(set(options) - {args.mechanism})
    if others:
        raise TaskError(f"--opt {others[0]}.…: options of {', '.join(others)} do not apply to "
                        f"--mechanism {args.mechanism}")
    if args.threads is not None and args.threads < 1:
        raise TaskError(f"--threads must be >= 1, got {args.threads}")
    preset_name = "ade20k" if args.data is not None else "embedded"
    preset = PRESETS[preset_name]
    recipe = _training.resolve_recipe(args, preset)
    _training.amp_dtype(recipe.amp, torch.device(device))  # --amp fp16 on a CPU fails here, not later
    pick = lambda key: getattr(args, key) if getattr(args, key) is not None else preset[key]
    size, crop = pick("size"), pick("crop_size")
    aux_weight, eval_every = pick("aux_weight"), pick("eval_every")
    channels = pick("channels") or HEAD_CHANNELS[size]
    if crop < 32:
        raise TaskError(f"--crop-size must be >= 32 (the backbone downsamples by 32), got {crop}")
    if channels < 1:
        raise TaskError(f"--channels must be >= 1, got {channels}")
    if aux_weight < 0:
        raise TaskError(f"--aux-weight must be >= 0 (0: no auxiliary head), got {aux_weight}")
    if eval_every < 1:
        raise TaskError(f"--eval-every must be >= 1, got {eval_every}")
    if args.drop_path is not None and not 0 <= args.drop_path < 1:
        raise TaskError(f"--drop-path must be in [0, 1), got {args.drop_path}")
    weights = args.backbone_weights
    if weights is not None and not (weights / "checkpoint.pt" if weights.is_dir() else weights).is_file():
        raise TaskError(f"--backbone-weights {weights}: no checkpoint there (expected the run folder of an "
                        "`attnbench run --task imagenet`, holding checkpoint.pt)")
    check_model(size, args.mechanism, options.get(args.mechanism, {}), device)
    return Plan(args, preset_name, size, crop, channels, aux_weight, eval_every, args.drop_path,
                options.get(args.mechanism, {}), recipe)


def check_model(size: str, mechanism: str, options: dict[str, str], device: str) -> None:
    """Bad options fail here, once, before any data is read: the size is built on the meta
    device (no memory), and a micro segmenter with the same mechanism segments one image."""
    with torch.device("meta"):
        build_segmenter(size, mechanism, data.NUM_CLASSES, options)
    probe = build_segmenter("micro", mechanism, data.NUM_CLASSES, options, channels=8).eval().to(device)
    try:
        with torch.no_grad():
            probe(torch.zeros(1, 3, 64, 64, device=device))
    except ValueError as exc:  # the mechanism refuses this input
        raise TaskError(f"--mechanism {mechanism} with these options cannot segment an image: "
                        f"{exc}") from None


# ---- data ----------------------------------------------------------------------------------------


def load_data(plan: Plan) -> tuple[str, Path, data.ADE20KSegmentation, data.ADE20KSegmentation]:
    """(data set name, its folder, train split, val split), both checked."""
    if plan.args.data is None:
        root, name = data.embedded_dataset(), data.EMBEDDED_DATASET
    else:
        root = plan.args.data.expanduser()
        name = f"ade20k:{root.resolve().name}"
    train = data.ADE20KSegmentation(root, "training", data.TrainTransform(plan.crop_size))
    val = data.ADE20KSegmentation(root, "validation", data.EvalTransform(plan.crop_size))
    return name, root, train, val


def _init_images(train: data.ADE20KSegmentation, plan: Plan, seed: int) -> Tensor:
    """A seeded sample of training images, resized and centre-cropped to crop²: (B, 3, crop, crop)."""
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:IMAGES_FOR_INIT]
    resize, c = data.EvalTransform(plan.crop_size), plan.crop_size
    images = []
    for i in pick.tolist():
        image, labels = data.read_pair(*train.pairs[i])
        image, _ = resize(image, labels)  # short side = crop
        top, left = max(0, (image.shape[1] - c) // 2), max(0, (image.shape[2] - c) // 2)
        image = image[:, top:top + c, left:left + c]
        images.append(F.pad(image, (0, c - image.shape[2], 0, c - image.shape[1])))
    return torch.stack(images)


# ---- evaluation ----------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, trainer: Trainer, num_classes: int) -> dict[str, Any]:
    """mIoU, aAcc, mAcc (%) over the whole val split (all processes), single scale, whole image."""
    model.eval()
    dist = trainer.dist
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    images = 0
    start = time.perf_counter()
    for image, labels, _ in data.raise_errors(loader):  # (1, 3, h, w), (1, H, W) at full size
        image = image.to(dist.device, non_blocking=True)
        with trainer.autocast():
            logits = model(image)["out"].float()  # (1, classes, h, w)
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        confusion += confusion_matrix(logits.argmax(1).cpu(), labels, num_classes)
        images += len(labels)
    seconds = time.perf_counter() - start
    if dist.world_size > 1:  # one matrix for the split: every process saw a disjoint shard
        confusion = confusion.to(dist.device)
        torch_dist.all_reduce(confusion)
        confusion = confusion.cpu()
    (images,) = _training.all_reduce([images], dist)
    (seconds,) = _training.all_reduce([seconds], dist, op="max")
    scores = segmentation_scores(confusion)
    return {"miou": 100 * scores["miou"], "aacc": 100 * scores["aacc"], "macc": 100 * scores["macc"],
            "classes_present": scores["classes_present"], "iou": scores["iou"], "images": int(images),
            "seconds": seconds, "img_s": images / seconds if seconds > 0 else math.nan}


# ---- the run -------------------------------------------------------------------------------------


@dataclasses.dataclass
class Setup:
    """The model, data and trainer of one run, and the facts recorded about them."""

    run_dir: Path
    dataset: str
    root: Path
    train_set: data.ADE20KSegmentation
    val_set: data.ADE20KSegmentation
    trainer: Trainer
    train_loader: Any
    val_loader: Any
    params: int
    gflops: float
    config: dict[str, Any]  # what a resumed run must share with its checkpoint
    mechanism_init: str
    backbone_weights: str
    previous_wall: float  # seconds spent before a --resume


def load_backbone_weights(model: Segmenter, path: Path, mechanism: str, size: str) -> str:
    """Copy the backbone of an imagenet checkpoint (same mechanism and size) into ``model``."""
    _, state = _training.load_checkpoint(path)
    config = state.get("config", {})
    found = (config.get("task"), config.get("mechanism"), config.get("size"))
    if found != ("imagenet", mechanism, size):
        raise TaskError(f"--backbone-weights {path}: a checkpoint of task {found[0]!r}, mechanism "
                        f"{found[1]!r}, size {found[2]!r}; expected an imagenet run of --mechanism "
                        f"{mechanism} --size {size}")
    weights = {k: v for k, v in state["model"].items() if not k.startswith(("head.", "norm."))}
    model.backbone.load_state_dict(weights)
    return f"{path} ({config.get('dataset')}, {state.get('epoch')} epochs)"


def set_up(plan: Plan, dist: Dist) -> Setup:
    """Data, model (counted, then initialised from weights or data), trainer, resume."""
    args, recipe = plan.args, plan.recipe
    name = f"ade20k-{plan.args.mechanism}-{plan.size}"
    run_dir, resumed = _training.run_dir(plan.args.out, name, dist), None
    if args.resume is not None:
        run_dir, resumed = _training.load_checkpoint(args.resume)
    _training.seed_everything(recipe.seed)
    dataset, root, train_set, val_set = load_data(plan)
    aux_channels = plan.channels // 2 if plan.aux_weight > 0 else 0
    model = build_segmenter(plan.size, args.mechanism, data.NUM_CLASSES, plan.options, plan.channels,
                            aux_channels, plan.drop_path)
    params, flops = count_parameters(model), measure_flops(model, plan.crop_size)  # type: ignore[arg-type]
    config = {"task": "ade20k", "mechanism": args.mechanism, "size": plan.size, "options": plan.options,
              "dataset": dataset, "crop_size": plan.crop_size, "channels": plan.channels,
              "aux_weight": plan.aux_weight}
    if resumed is not None:
        _training.check_resumable(resumed, config, args.resume)
    weights = "none"
    if args.backbone_weights is not None and resumed is None:
        weights = load_backbone_weights(model, args.backbone_weights, args.mechanism, plan.size)
    init = "random" if weights == "none" else "backbone weights"
    if (args.mechanism_init == "data" and weights == "none"
            and any(hasattr(m, "init_from_data") for m in model.mechanisms())):
        init = "data"  # rank 0 alone: DistributedDataParallel copies its weights to the others
        if resumed is None and dist.is_main:
            records = init_mechanisms_from_data(model.backbone, _init_images(train_set, plan, recipe.seed))
            init = describe_init(records)
    if dist.world_size > 1 and dist.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # mmseg's SyncBN: 2 images per GPU
    loaders = (_training.train_loader(train_set, recipe.batch_size, recipe.workers, dist, recipe.seed,
                                      data.collate),
               _training.eval_loader(val_set, 1, recipe.workers, dist, data.collate))
    trainer = Trainer(model, recipe, dist, len(loaders[0]))
    torch.manual_seed(recipe.seed * 7919 + dist.rank)  # stochastic depth and augmentation differ per rank
    previous_wall = 0.0
    if resumed is not None:
        trainer.load(resumed)  # weights, optimiser, schedule, RNG, history
        previous_wall = resumed.get("wall_s", 0.0)
        init, weights = resumed.get("mechanism_init", init), resumed.get("backbone_weights", weights)
        log(f"resuming {run_dir} after epoch {trainer.epoch}/{recipe.epochs}", dist)
    return Setup(run_dir, dataset, root, train_set, val_set, trainer, *loaders, params, flops.total / 1e9,
                 config, init, weights, previous_wall)


def write_run_meta(plan: Plan, s: Setup, dist: Dist) -> None:
    """meta.json: the context (device, versions, commit, command) plus this run's facts."""
    if not dist.is_main:
        return
    s.run_dir.mkdir(parents=True, exist_ok=True)
    meta = run_context(str(dist.device), torch.get_num_threads(), ["attnbench", *sys.argv[1:]])
    path = str(s.root.resolve())
    meta.update(task="ade20k", preset=plan.preset, config=s.config, recipe=dataclasses.asdict(plan.recipe),
                eval_mode=EVAL_MODE, eval_every=plan.eval_every, world_size=dist.world_size, data_path=path,
                data_description=data.EMBEDDED_DESCRIPTION if plan.args.data is None else path,
                train_images=len(s.train_set), val_images=len(s.val_set), params=s.params, gflops=s.gflops,
                mechanism_init=s.mechanism_init, backbone_weights=s.backbone_weights,
                backend=get_mechanism(plan.args.mechanism).backend(str(dist.device)))
    write_meta(s.run_dir / "meta.json", meta)


def segmentation_objective(plan: Plan, device: torch.device):
    """``compute_loss(net, batch)`` for the trainer: cross-entropy (255 ignored) + aux × 0.4."""
    smoothing = plan.recipe.label_smoothing

    def compute_loss(net: nn.Module, batch: tuple[Tensor, Tensor, int]) -> tuple[Tensor, int]:
        images, labels, _ = batch  # (B, 3, crop, crop), (B, crop, crop)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        return segmentation_loss(net(images), labels, plan.aux_weight, smoothing), len(images)

    return compute_loss


def train_and_evaluate(plan: Plan, dist: Dist) -> int:
    """Train ``plan`` to its last epoch (from its checkpoint when resuming), evaluate, record."""
    started = time.perf_counter()
    args, recipe = plan.args, plan.recipe
    if args.threads:
        torch.set_num_threads(args.threads)
    s = set_up(plan, dist)
    trainer = s.trainer
    write_run_meta(plan, s, dist)
    log(f"ade20k: {args.mechanism} on SeTformer-{plan.size} + UperNet({plan.channels}) "
        f"({s.params / 1e6:.2f}M parameters, {s.gflops:.3g} GFLOPs at {plan.crop_size}²), {s.dataset}: "
        f"{len(s.train_set)} train / {len(s.val_set)} val images; {recipe.epochs} epochs of "
        f"{len(s.train_loader)} steps × {recipe.batch_size} × {dist.world_size} process(es) on {dist.device} "
        f"-> {s.run_dir}", dist)
    compute_loss = segmentation_objective(plan, dist.device)
    _training.reset_peak_memory(dist.device)
    before = _training.current_memory_mib(dist.device)  # model, data index, loaders: not the training's
    result: dict[str, Any] = {}
    for epoch in range(trainer.epoch, recipe.epochs):
        _training.set_epoch(s.train_loader, epoch, recipe.seed, dist)
        stats = trainer.train_epoch(data.raise_errors(s.train_loader), compute_loss,
                                    f"epoch {epoch + 1}/{recipe.epochs}")
        last = epoch + 1 == recipe.epochs
        result = (evaluate(trainer.model, s.val_loader, trainer, data.NUM_CLASSES)
                  if last or (epoch + 1) % plan.eval_every == 0 else {})
        peak = _training.peak_memory_mib(dist.device)
        peak, above = _training.all_reduce([peak, peak - before], dist, op="max")
        trainer.epoch = epoch + 1
        entry = {"epoch": epoch + 1, "train_loss": stats.loss, "lr": stats.lr,
                 "train_img_s": stats.items_per_s, "train_s": stats.seconds,
                 "miou": result.get("miou", math.nan), "aacc": result.get("aacc", math.nan),
                 "macc": result.get("macc", math.nan),
                 "eval_img_s": result.get("img_s", math.nan), "peak_mem_mib": peak, "train_mem_mib": above}
        trainer.history.append(entry)
        wall = s.previous_wall + time.perf_counter() - started
        trainer.save(s.run_dir / "checkpoint.pt", {"config": s.config, "wall_s": wall,
                                                   "mechanism_init": s.mechanism_init,
                                                   "backbone_weights": s.backbone_weights})
        if dist.is_main:
            append_row(s.run_dir / "history.csv", entry, list(entry))
        scores = (f" | mIoU {result['miou']:.2f} %, aAcc {result['aacc']:.2f} %, mAcc {result['macc']:.2f} %"
                  if result else "")
        log(f"epoch {epoch + 1}/{recipe.epochs}: train loss {stats.loss:.4f}, {stats.items_per_s:.1f} img/s"
            f"{scores} | {stats.seconds + result.get('seconds', 0.0):.0f} s", dist)
    if not result:  # resumed a finished run: evaluate its weights once more
        result = evaluate(trainer.model, s.val_loader, trainer, data.NUM_CLASSES)
    row = result_row(plan, s, dist, result, s.previous_wall + time.perf_counter() - started)
    table = Path(args.results) if args.results is not None else Path("results") / "ade20k.csv"
    if dist.is_main:
        written = append_row(table, row, COLUMNS)
        plots = plot_results(written, table.parent)
        print(summary(row, s, table) + (f"; plot {plots[0]}" if plots else ""))
    _training.barrier(dist)
    return 0


def summary(row: dict[str, Any], s: Setup, table: Path) -> str:
    """The one line a run prints on stdout."""
    r = row
    return (f"ade20k | {r['mechanism']} | SeTformer-{r['size']} + UperNet | {r['dataset']}: "
            f"mIoU {r['miou']:.2f} %, aAcc {r['aacc']:.2f} %, mAcc {r['macc']:.2f} % after "
            f"{r['epochs']} epochs | {r['params'] / 1e6:.2f}M params, {r['gflops']:.3g} GFLOPs at "
            f"{r['crop_size']}² | train {r['train_img_s']:.1f} img/s, eval {r['eval_img_s']:.1f} img/s | "
            f"peak {r['peak_mem_mib']:.0f} MiB | {r['wall_s']:.0f} s -> {table}, {s.run_dir}")


def result_row(plan: Plan, s: Setup, dist: Dist, result: dict[str, Any], wall: float) -> dict[str, Any]:
    """One tidy row: what ran, on what, how well, how fast, with the run's context."""
    history = s.trainer.history
    median = lambda key: _training.steady_median(history, key)
    return {
        "task": "ade20k", "mechanism": plan.args.mechanism, "size": plan.size, "dataset": s.dataset,
        "num_classes": data.NUM_CLASSES, "crop_size": plan.crop_size, "eval_mode": EVAL_MODE,
        "epochs": s.trainer.epoch, "iters": s.trainer.epoch * s.trainer.steps_per_epoch,
        "seed": plan.recipe.seed,
        "miou": round(result["miou"], 3), "aacc": round(result["aacc"], 3), "macc": round(result["macc"], 3),
        "classes_present": result["classes_present"], "params": s.params, "gflops": round(s.gflops, 4),
        "train_img_s": round(median("train_img_s"), 2), "eval_img_s": round(result["img_s"], 2),
        "mechanism_init": s.mechanism_init, "backbone_weights": s.backbone_weights,
        "head": "upernet+fcn-aux" if plan.aux_weight > 0 else "upernet", "head_channels": plan.channels,
        "aux_weight": plan.aux_weight, "train_images": len(s.train_set), "val_images": len(s.val_set),
        **_training.shared_columns(plan.recipe, plan.args.mechanism, plan.options, dist, history, wall,
                                   s.run_dir)}


def plot_results(table: pd.DataFrame, out: Path) -> list[Path]:
    """mIoU against forward GFLOPs and against peak memory, one colour per mechanism, one figure per
    (data set, size, crop): ``miou_ade20k_<dataset>_<size>_<crop>.png``; the latest row of each
    mechanism stands for it."""
    from attnbench.plots import colour, plt  # the Agg backend: files, not windows

    written: list[Path] = []
    ok = table[table["status"] == "ok"]
    for (dataset, size, crop), rows in ok.groupby(["dataset", "size", "crop_size"]):
        latest = rows.groupby("mechanism").tail(1)
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
        for ax, column, label in ((axes[0], "gflops", f"forward GFLOPs per {crop}² image (2 per MAC)"),
                                  (axes[1], "peak_mem_mib", "peak training memory (MiB)")):
            for r in latest.itertuples():
                big = r.mechanism == "set"
                ax.plot(getattr(r, column), r.miou, "o", color=colour(r.mechanism), ms=9 if big else 7)
                ax.annotate(f" {r.mechanism}", (getattr(r, column), r.miou), fontsize=8, va="center")
            ax.set_xlabel(label)
            ax.grid(True, alpha=0.3)
        axes[0].set_ylabel("mIoU (%), single scale")
        fig.suptitle(f"ade20k on {dataset}: SeTformer-{size} + UperNet, {crop}² crops", fontsize=10)
        fig.tight_layout()
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(dataset)).strip("-")
        path = out / f"miou_ade20k_{slug}_{size}_{crop}.png"
        fig.savefig(path, dpi=150, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written
