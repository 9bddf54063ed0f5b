"""COCO detection and instance segmentation: Mask R-CNN with an FPN on the SeTformer backbone.

``attnbench run --mechanism set --task coco`` trains and evaluates; ``--data DIR`` reads the
official COCO 2017 layout (``annotations/instances_{train,val}2017.json``, ``train2017/``,
``val2017/``), and without it a small set of real objects on real photos is written once into
that layout in the cache and read the same way (``tasks/_coco_data.py``). The detector is
torchvision's Mask R-CNN with the backbone's four stage maps through an FPN
(``tasks/detection.py``); the mechanism mixes the tokens of every stage on its 2-D grid, so the
input side sets the number of tokens. Boxes and masks are scored by pycocotools' COCOeval
(``tasks/_coco_eval.py``): AP, AP50, AP75 and AP by size, in percent.

Two presets: ``coco`` (with --data: SeTformer-Mini at 800 px, torchvision's Mask R-CNN, AdamW
lr 1e-4 per 16 images, 12 epochs) and ``embedded`` (SeTformer-Micro at 128 px, a light
detector, minutes on a CPU). Any flag overrides its preset.

Evaluation: each process runs the model on its share of the val images; the predictions are
gathered on rank 0, which runs COCOeval and shares the figures. Each run appends one row to
``results/coco.csv``, redraws the AP plots next to it, and keeps ``meta.json``, ``history.csv``
and ``checkpoint.pt`` in its run folder under ``results/runs/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.distributed as torch_dist
from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN

from attnbench import get_mechanism
from attnbench.results import append_row, run_context, write_meta
from attnbench.tasks import Task, TaskError, register_task
from tasks import _coco_data, _coco_eval, _training
from tasks._training import Dist, Trainer, log
from tasks.backbone import SIZES, count_parameters, describe_init, init_mechanisms_from_data, measure_flops
from tasks.detection import DETECTORS, backbone_of, build_detector, make_train_step
from tasks.imagenet import check_model

# Hyper-parameters of the two presets; the command line overrides any of them.
PRESETS: dict[str, dict[str, Any]] = {
    # COCO 2017 from --data: the Swin/NAT Mask R-CNN 1x recipe (AdamW lr 1e-4 for 16 images a step,
    # weight decay 0.05, 12 epochs, ~500 warm-up steps of 7,330), single scale 800 px, flips;
    # the harness decays by a cosine to 1 % instead of the 1x steps at epochs 8 and 11
    "coco": dict(size="mini", min_size=800, max_size=1333, detector="standard", epochs=12, batch_size=2,
                 lr=None, weight_decay=0.05, warmup_epochs=0.07, min_lr=None, label_smoothing=0.0,
                 clip_grad=0.0, ema=0.0, workers=min(4, os.cpu_count() or 1), hflip=0.5, eval_every=1),
    # the embedded composites: a model and schedule that train in minutes on a 2-core CPU
    "embedded": dict(size="micro", min_size=128, max_size=128, detector="light", epochs=6, batch_size=4,
                     lr=1e-3, weight_decay=0.05, warmup_epochs=0.5, min_lr=None, label_smoothing=0.0,
                     clip_grad=5.0, ema=0.0, workers=1, hflip=0.5, eval_every=0),
}
IMAGES_FOR_INIT = 16  # training images whose tokens initialise SeT's anchors and references

METRIC_COLUMNS = [f"{kind}_{m}" for kind in ("box", "mask") for m in _coco_eval.METRICS]
COLUMNS = ["task", "mechanism", "size", "detector", "dataset", "num_classes", "img_size", "max_size",
           "tokens_stage1", "epochs", "seed", *METRIC_COLUMNS, "params", "backbone_params", "backbone_gflops",
           "train_img_s", "eval_img_s", "peak_mem_mib", "train_mem_mib", "wall_s", "batch_size", "world_size",
           "device", "threads", "amp", "options", "mechanism_init", "backend", "skipped_images",
           "train_images", "val_images", "status", "run_dir", "date", "git_commit", "torch", "cpu", "gpu"]
LOSSES = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")


@register_task
class Coco(Task):
    name = "coco"
    summary = "detection and instance segmentation, Mask R-CNN on the SeTformer backbone (COCO layout)"
    train_side = PRESETS["embedded"]["min_size"]

    @classmethod
    def train_step(cls, mechanism: str, side: int, size: str, options: dict[str, Any],
                   device: str) -> tuple[Any, int]:
        """The resolution probe's step: ``detection.make_train_step`` (2 synthetic images, the
        embedded set's 3 categories and its light detector at every side, so that only the
        backbone's tokens change with the side)."""
        return make_train_step(mechanism, side, size, options, num_classes=3, detector="light",
                               device=device), 2

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("coco (defaults: preset `coco` with --data, else `embedded`)")
        g.add_argument("--data", type=Path, metavar="DIR",
                       help="COCO 2017 layout: annotations/instances_{train,val}2017.json, train2017/*.jpg, "
                            "val2017/*.jpg (default: the embedded composites of real objects on real photos, "
                            "written once under $ATTNBENCH_CACHE, else ~/.cache/attnbench)")
        g.add_argument("--size", choices=list(SIZES), help="backbone size (default: mini with --data, micro "
                                                           "without)")
        g.add_argument("--min-size", type=int,
                       help="short side the images are resized to (default: 800 with --data, 128 without)")
        g.add_argument("--max-size", type=int,
                       help="longest side after resizing (default: 1333 with --data, 128 without)")
        g.add_argument("--detector", choices=list(DETECTORS),
                       help="Mask R-CNN configuration: standard = torchvision's (FPN 256, 2000 proposals), "
                            "light = reduced for small images on a CPU (default: standard with --data, light "
                            "without)")
        g.add_argument("--drop-path", type=float,
                       help="stochastic depth of the last block (default: the size's)")
        g.add_argument("--hflip", type=float, help="horizontal-flip probability in training (default 0.5)")
        g.add_argument("--eval-every", type=int,
                       help="evaluate every N epochs; the last epoch always (default: 1 with --data, "
                            "0 = the last only, without)")
        g.add_argument("--mechanism-init", choices=("data", "random"), default="data",
                       help="data: mechanisms with init_from_data (SeT: k-means anchors and references) "
                            f"start from the tokens of {IMAGES_FOR_INIT} training images (default)")
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
    min_size: int
    max_size: int
    detector: str
    options: dict[str, str]
    recipe: _training.Recipe
    hflip: float
    eval_every: int
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
    options = getattr(args, "mechanism_options", None)
    if options is None:  # called without the CLI, which parses and validates --opt
        options = parse_mechanism_options(args.opt)
    others = sorted(set(options) - {args.mechanism})
    if others:
        raise TaskError(f"--opt {others[0]}.…: options of {', '.join(others)} do not apply to "
                        f"--mechanism {args.mechanism}")
    preset_name = "coco" if args.data is not None else "embedded"
    preset = dict(PRESETS[preset_name])
    if args.threads is not None and args.threads < 1:
        raise TaskError(f"--threads must be >= 1, got {args.threads}")
    if args.lr is None and preset["lr"] is None:  # linear scaling: 1e-4 per 16 images a step
        world = int(os.environ.get("WORLD_SIZE", "1"))
        preset["lr"] = 1e-4 * (args.batch_size or preset["batch_size"]) * world / 16
    if preset["min_lr"] is None:  # the cosine ends at 1 % of the peak
        preset["min_lr"] = (args.lr or preset["lr"]) / 100
    recipe = _training.resolve_recipe(args, preset)
    _training.amp_dtype(recipe.amp, torch.device(device))  # --amp fp16 on a CPU fails here, not later
    pick = lambda key: getattr(args, key) if getattr(args, key) is not None else preset[key]
    min_size, max_size = pick("min_size"), pick("max_size")
    if min_size < 32:
        raise TaskError(f"--min-size must be >= 32 (the backbone downsamples by 32), got {min_size}")
    if max_size < min_size:
        raise TaskError(f"--max-size must be >= --min-size ({min_size}), got {max_size}")
    hflip, eval_every = pick("hflip"), pick("eval_every")
    if not 0 <= hflip <= 1:
        raise TaskError(f"--hflip must be a probability in [0, 1], got {hflip}")
    if eval_every < 0:
        raise TaskError(f"--eval-every must be >= 0 (0: after the last epoch only), got {eval_every}")
    if args.drop_path is not None and not 0 <= args.drop_path < 1:
        raise TaskError(f"--drop-path must be in [0, 1), got {args.drop_path}")
    size = pick("size")
    check_model(size, args.mechanism, options.get(args.mechanism, {}), True, device)
    return Plan(args, preset_name, size, min_size, max_size, pick("detector"),
                options.get(args.mechanism, {}), recipe, hflip, eval_every, args.drop_path)


# ---- data ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Data:
    name: str  # what the results rows call it
    root: Path
    train: _coco_data.CocoSplit
    val: _coco_data.CocoSplit
    train_set: _coco_data.CocoInstances
    val_set: _coco_data.CocoInstances


def load_data(plan: Plan) -> Data:
    """The checked splits of --data, or of the embedded set (written on first use)."""
    if plan.args.data is None:
        root, name = _coco_data.embedded_dataset(), _coco_data.EMBEDDED_DATASET
        label = f"the embedded data set {root}"
    else:
        root = plan.args.data.expanduser()
        name, label = f"coco-layout:{root.resolve().name}", f"--data {root}"
    train, val = _coco_data.read_layout(root, label)
    train_set = _coco_data.CocoInstances(train, train=True, hflip=plan.hflip)
    if len(train_set) == 0:
        raise TaskError(f"{label}: no training image has an annotation that trains (not a crowd, box "
                        "at least a pixel wide and high)")
    return Data(name, root, train, val, train_set, _coco_data.CocoInstances(val, train=False))


# ---- evaluation ----------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: MaskRCNN, loader: Any, data: Data, trainer: Trainer) -> dict[str, float]:
    """COCOeval of boxes and masks over every val image: each process predicts its share, rank 0
    evaluates what all gathered, and every process gets the figures."""
    model.eval()
    dist = trainer.dist
    category_of = {label: cid for cid, label in data.val_set.label_of.items()}
    bbox: list[dict[str, Any]] = []
    segm: list[dict[str, Any]] = []
    ids: list[int] = []
    skipped = 0
    start = time.perf_counter()
    for images, targets, bad in loader:
        skipped += bad
        if not images:
            continue
        with trainer.autocast():
            outputs = model([im.to(dist.device, non_blocking=True) for im in images])
        for target, output in zip(targets, outputs, strict=True):
            b, s = _coco_eval.to_coco_results(target["image_id"], output, category_of)
            bbox += b
            segm += s
            ids.append(target["image_id"])
    seconds = time.perf_counter() - start
    (seconds,) = _training.all_reduce([seconds], dist, op="max")
    (skipped,) = _training.all_reduce([skipped], dist)
    if dist.world_size > 1:  # predictions of every process to rank 0
        parts: list[Any] | None = [None] * dist.world_size if dist.is_main else None
        torch_dist.gather_object((bbox, segm, ids), parts, dst=0)
        if dist.is_main:
            bbox, segm, ids = ([x for part in parts for x in part[k]] for k in range(3))
    metrics: dict[str, float] = {}
    if dist.is_main:
        if not ids:
            raise TaskError(f"no validation image could be decoded ({int(skipped)} skipped)")
        scoring = time.perf_counter()
        metrics = _coco_eval.evaluate_all(_coco_eval.ground_truth(data.val.data), bbox, segm, ids)
        metrics.update(images=len(ids), seconds=seconds, img_s=len(ids) / seconds,
                       cocoeval_s=time.perf_counter() - scoring, skipped=int(skipped), detections=len(bbox))
    return _training.broadcast_object(metrics, dist)


# ---- the run -------------------------------------------------------------------------------------


@dataclasses.dataclass
class Setup:
    """The model, data and trainer of one run, and the facts recorded about them."""

    run_dir: Path
    data: Data
    trainer: Trainer
    train_loader: Any
    val_loader: Any
    params: int
    backbone_params: int
    backbone_gflops: float
    config: dict[str, Any]  # what a resumed run must share with its checkpoint
    mechanism_init: str
    previous_wall: float  # seconds spent before a --resume


def set_up(plan: Plan, dist: Dist) -> Setup:
    """Data, model (counted, then initialised from data where the mechanism can be), trainer, resume."""
    args, recipe = plan.args, plan.recipe
    name = f"coco-{plan.args.mechanism}-{plan.size}"
    run_dir, resumed = _training.run_dir(plan.args.out, name, dist), None
    if args.resume is not None:
        run_dir, resumed = _training.load_checkpoint(args.resume)
    _training.seed_everything(recipe.seed)
    data = load_data(plan)
    classes = len(data.train.categories)
    model = build_detector(plan.size, args.mechanism, classes, plan.options, min_size=plan.min_size,
                           max_size=plan.max_size, detector=plan.detector, drop_path=plan.drop_path)
    backbone = backbone_of(model)
    flops = measure_flops(backbone, plan.min_size)
    config = {"task": "coco", "mechanism": args.mechanism, "size": plan.size, "options": plan.options,
              "dataset": data.name, "num_classes": classes, "min_size": plan.min_size,
              "max_size": plan.max_size, "detector": plan.detector}
    if resumed is not None:
        _training.check_resumable(resumed, config, args.resume)
    init = "random"
    if args.mechanism_init == "data" and any(hasattr(m, "init_from_data") for m in backbone.mechanisms()):
        init = "data"  # rank 0 alone: DistributedDataParallel copies its weights to the others
        if resumed is None and dist.is_main:
            records = init_mechanisms_from_data(backbone, _init_images(model, data, recipe.seed))
            init = describe_init(records)
    workers, batch = recipe.workers, recipe.batch_size
    loaders = (_training.train_loader(data.train_set, batch, workers, dist, recipe.seed, _coco_data.collate),
               _training.eval_loader(data.val_set, batch, workers, dist, _coco_data.collate))
    trainer = Trainer(model, recipe, dist, len(loaders[0]))
    torch.manual_seed(recipe.seed * 7919 + dist.rank)  # RoI sampling and stochastic depth differ per rank
    previous_wall = 0.0
    if resumed is not None:
        trainer.load(resumed)  # weights, optimiser, schedule, RNG, history
        previous_wall, init = resumed.get("wall_s", 0.0), resumed.get("mechanism_init", init)
        log(f"resuming {run_dir} after epoch {trainer.epoch}/{recipe.epochs}", dist)
    return Setup(run_dir, data, trainer, *loaders, count_parameters(model), count_parameters(backbone),
                 flops.total / 1e9, config, init, previous_wall)


def _init_images(model: MaskRCNN, data: Data, seed: int) -> Tensor:
    """A seeded sample of training images as the backbone sees them (normalised, resized, padded to
    a multiple of 32 by the detector's own transform): (B, 3, H, W)."""
    plain = _coco_data.CocoInstances(data.train, train=False)
    pick = torch.randperm(len(plain), generator=torch.Generator().manual_seed(seed)).tolist()
    images = []
    for i in pick:
        sample = plain[i]
        if sample is not None:
            images.append(sample[0])
        if len(images) == IMAGES_FOR_INIT:
            break
    was_training = model.training
    model.transform.eval()  # the fixed test-time size, not a random training one
    try:
        batch, _ = model.transform(images)
    finally:
        model.transform.train(was_training)
    return batch.tensors


def write_run_meta(plan: Plan, s: Setup, dist: Dist) -> None:
    """meta.json: the run's context (device, versions, commit, command) plus its facts."""
    if not dist.is_main:
        return
    s.run_dir.mkdir(parents=True, exist_ok=True)
    meta = run_context(str(dist.device), torch.get_num_threads(), ["attnbench", *sys.argv[1:]])
    path = str(s.data.root.resolve())
    meta.update(task="coco", preset=plan.preset, config=s.config, recipe=dataclasses.asdict(plan.recipe),
                detector=dataclasses.asdict(DETECTORS[plan.detector]), hflip=plan.hflip,
                eval_every=plan.eval_every, world_size=dist.world_size, data_path=path,
                data_description=_coco_data.EMBEDDED_DESCRIPTION if plan.args.data is None else path,
                categories=[c["name"] for c in s.data.train.categories],
                train_images=len(s.data.train_set), val_images=len(s.data.val_set), params=s.params,
                backbone_params=s.backbone_params, backbone_gflops=s.backbone_gflops,
                mechanism_init=s.mechanism_init, evaluation="predictions gathered on rank 0, COCOeval there",
                backend=get_mechanism(plan.args.mechanism).backend(str(dist.device)))
    write_meta(s.run_dir / "meta.json", meta)


def detection_loss(device: torch.device) -> tuple[Any, dict[str, float]]:
    """``compute_loss(net, batch)`` for the trainer (the sum of Mask R-CNN's five losses), and the
    running sums of each loss on this process, for the history."""
    sums: dict[str, float] = defaultdict(float)

    def compute_loss(net: nn.Module,
                     batch: tuple[list[Tensor], list[dict[str, Any]], int]) -> tuple[Tensor, int]:
        images, targets, _ = batch  # images: B × (3, H, W); targets: boxes, labels, masks
        if not images:
            return torch.zeros(()), 0
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in t.items()}
                   for t in targets]
        losses = net(images, targets)
        for k, v in losses.items():
            sums[k] += v.item() * len(images)
        sums["images"] += len(images)
        return sum(losses.values()), len(images)

    return compute_loss, sums


def train_and_evaluate(plan: Plan, dist: Dist) -> int:
    """Train ``plan`` to its last epoch (from its checkpoint when resuming), evaluate, record."""
    started = time.perf_counter()
    args, recipe = plan.args, plan.recipe
    if args.threads:
        torch.set_num_threads(args.threads)
    s = set_up(plan, dist)
    trainer = s.trainer
    write_run_meta(plan, s, dist)
    log(f"coco: {args.mechanism} in Mask R-CNN ({plan.detector}) on SeTformer-{plan.size} "
        f"({s.params / 1e6:.2f}M parameters, backbone {s.backbone_gflops:.3g} GFLOPs at {plan.min_size}²), "
        f"{s.data.name}: {len(s.data.train_set)} train / {len(s.data.val_set)} val images, "
        f"{s.config['num_classes']} categories; {recipe.epochs} epochs of {len(s.train_loader)} steps × "
        f"{recipe.batch_size} × {dist.world_size} process(es) on {dist.device} -> {s.run_dir}", dist)
    compute_loss, sums = detection_loss(dist.device)
    _training.reset_peak_memory(dist.device)
    before = _training.current_memory_mib(dist.device)  # model, data index, loaders: not the training's
    result: dict[str, float] = {}
    for epoch in range(trainer.epoch, recipe.epochs):
        _training.set_epoch(s.train_loader, epoch, recipe.seed, dist)
        sums.clear()
        stats = trainer.train_epoch(s.train_loader, compute_loss, f"epoch {epoch + 1}/{recipe.epochs}")
        last = epoch + 1 == recipe.epochs
        due = last or (plan.eval_every > 0 and (epoch + 1) % plan.eval_every == 0)
        result = evaluate(trainer.model, s.val_loader, s.data, trainer) if due else {}
        peak = _training.peak_memory_mib(dist.device)
        peak, above = _training.all_reduce([peak, peak - before], dist, op="max")
        trainer.epoch = epoch + 1
        entry = {"epoch": epoch + 1, "train_loss": stats.loss, "lr": stats.lr,
                 "train_img_s": stats.items_per_s, "train_s": stats.seconds,
                 **{k: sums[k] / max(1.0, sums["images"]) for k in LOSSES},
                 **{k: result.get(k, math.nan) for k in METRIC_COLUMNS},
                 "eval_img_s": result.get("img_s", math.nan),
                 "cocoeval_s": result.get("cocoeval_s", math.nan),
                 "peak_mem_mib": peak, "train_mem_mib": above,
                 "skipped_images": stats.skipped + result.get("skipped", 0)}
        trainer.history.append(entry)
        wall = s.previous_wall + time.perf_counter() - started
        trainer.save(s.run_dir / "checkpoint.pt",
                     {"config": s.config, "wall_s": wall, "mechanism_init": s.mechanism_init})
        if dist.is_main:
            append_row(s.run_dir / "history.csv", entry, list(entry))
        scored = (f" | AP box {result['box_AP']:.1f}, mask {result['mask_AP']:.1f} "
                  f"({result['seconds'] + result['cocoeval_s']:.0f} s)" if result else "")
        log(f"epoch {epoch + 1}/{recipe.epochs}: train loss {stats.loss:.4f} "
            f"(mask {entry['loss_mask']:.3f}), {stats.items_per_s:.1f} img/s, {stats.seconds:.0f} s{scored}",
            dist)
    if not result:  # resumed a finished run: evaluate its weights once more
        result = evaluate(trainer.model, s.val_loader, s.data, trainer)
    row = result_row(plan, s, dist, result, s.previous_wall + time.perf_counter() - started)
    table = Path(args.results) if args.results is not None else Path("results") / "coco.csv"
    if dist.is_main:
        written = append_row(table, row, COLUMNS)
        plot_results(written, table.parent)
        print(summary(row, s, table))
    _training.barrier(dist)
    return 0


def summary(row: dict[str, Any], s: Setup, table: Path) -> str:
    """The one line a run prints on stdout."""
    r = row
    return (f"coco | {r['mechanism']} | SeTformer-{r['size']} Mask R-CNN ({r['detector']}) | {r['dataset']} "
            f"at {r['img_size']} px: AP box {r['box_AP']:.1f} (AP50 {r['box_AP50']:.1f}), AP mask "
            f"{r['mask_AP']:.1f} (AP50 {r['mask_AP50']:.1f}) after {r['epochs']} epochs | "
            f"{r['params'] / 1e6:.2f}M params | train {r['train_img_s']:.1f} img/s, eval "
            f"{r['eval_img_s']:.1f} img/s | peak {r['peak_mem_mib']:.0f} MiB | {r['wall_s']:.0f} s "
            f"-> {table}, {s.run_dir}")


def result_row(plan: Plan, s: Setup, dist: Dist, result: dict[str, float], wall: float) -> dict[str, Any]:
    """One tidy row: what ran, on what, how well, how fast, with the run's context."""
    history = s.trainer.history
    median = lambda key: _training.steady_median(history, key)
    return {
        "task": "coco", "mechanism": plan.args.mechanism, "size": plan.size, "detector": plan.detector,
        "dataset": s.data.name, "num_classes": s.config["num_classes"], "img_size": plan.min_size,
        "max_size": plan.max_size, "tokens_stage1": math.ceil(plan.min_size / 32) ** 2 * 64,
        "epochs": s.trainer.epoch, "seed": plan.recipe.seed,
        **{k: round(result[k], 2) for k in METRIC_COLUMNS},
        "params": s.params, "backbone_params": s.backbone_params,
        "backbone_gflops": round(s.backbone_gflops, 4),
        "train_img_s": round(median("train_img_s"), 2), "eval_img_s": round(result["img_s"], 2),
        "mechanism_init": s.mechanism_init, "skipped_images": history[-1]["skipped_images"] if history else 0,
        "train_images": len(s.data.train_set), "val_images": len(s.data.val_set),
        **_training.shared_columns(plan.recipe, plan.args.mechanism, plan.options, dist, history, wall,
                                   s.run_dir)}


# ---- plots ---------------------------------------------------------------------------------------


def plot_results(table: pd.DataFrame, out: Path) -> list[Path]:
    """Per (data set, image size): AP^box and AP^mask bars per mechanism (the latest run of each
    mechanism and size), and training throughput against peak memory; PNG and SVG in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from attnbench.plots import colour

    written: list[Path] = []
    ok = table[table["status"] == "ok"]
    for (dataset, img), rows in ok.groupby(["dataset", "img_size"]):
        latest = rows.groupby(["mechanism", "size"]).tail(1).reset_index(drop=True)
        fig, (bars, cost) = plt.subplots(1, 2, figsize=(11, 4.2))
        for i, r in latest.iterrows():
            c = colour(r["mechanism"])
            bars.bar(i - 0.2, r["box_AP"], 0.38, color=c, edgecolor="black")
            bars.bar(i + 0.2, r["mask_AP"], 0.38, color=c, edgecolor="black", hatch="//", alpha=0.7)
            for dx, v in ((-0.2, r["box_AP"]), (0.2, r["mask_AP"])):
                bars.annotate(f"{v:.1f}", (i + dx, v), ha="center", va="bottom", fontsize=8)
            cost.scatter(r["peak_mem_mib"], r["train_img_s"], s=80, color=c, edgecolor="black")
            cost.annotate(f"  {r['mechanism']} ({r['size']})", (r["peak_mem_mib"], r["train_img_s"]),
                          fontsize=8, va="center")
        bars.set_xticks(range(len(latest)), [f"{m}\n{s}" for m, s in zip(latest["mechanism"], latest["size"],
                                                                          strict=True)])
        bars.set_ylabel("COCO AP (%, IoU 0.50:0.95)")
        bars.legend(handles=[plt.Rectangle((0, 0), 1, 1, fc="0.7", ec="black", label="box"),
                             plt.Rectangle((0, 0), 1, 1, fc="0.7", ec="black", hatch="//", label="mask")],
                    fontsize=8)
        cost.set_xlim(0, 1.3 * latest["peak_mem_mib"].max())  # room for the labels
        cost.set_ylim(0, 1.15 * latest["train_img_s"].max())
        cost.set_xlabel("peak memory in training (MiB)")
        cost.set_ylabel("training images / s")
        for ax in (bars, cost):
            ax.grid(True, axis="y", alpha=0.3)
        fig.suptitle(f"coco: Mask R-CNN on {dataset} at {img} px (latest run per mechanism)", fontsize=10)
        fig.tight_layout()
        stem = f"coco_ap_{dataset}_{img}".replace(":", "-").replace("/", "-").replace(" ", "_")
        stem = stem.replace("(", "").replace(")", "")
        for suffix in (".png", ".svg"):
            path = out / f"{stem}{suffix}"
            fig.savefig(path, dpi=150 if suffix == ".png" else None, bbox_inches="tight")
            written.append(path)
        plt.close(fig)
    return written
