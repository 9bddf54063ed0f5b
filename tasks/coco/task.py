"""COCO detection and instance segmentation: Mask R-CNN with an FPN on the SeTformer backbone.

``attnbench run --mechanism set --task coco`` trains and evaluates; ``--data DIR`` reads the
official COCO 2017 layout (``annotations/instances_{train,val}2017.json``, ``train2017/``,
``val2017/``; ``data.py``), and without it a small set of real objects on real photos is written
once into that layout in the cache and read the same way (``embedded.py``). The detector is
torchvision's Mask R-CNN with the backbone's four stage maps through an FPN (``model.py``); the
mechanism mixes the tokens of every stage on its 2-D grid, so the input side sets the number
of tokens. Boxes and masks are scored by pycocotools' COCOeval (``metrics.py``): AP, AP50, AP75
and AP by size, in percent.

Two presets: ``coco`` (with --data: SeTformer-Mini at 800 px, torchvision's Mask R-CNN, AdamW
lr 1e-4 per 16 images, 12 epochs) and ``embedded`` (SeTformer-Micro at 128 px, a light
detector, minutes on a CPU). Any flag overrides its preset.

Evaluation: each process runs the model on its share of the val images; the predictions are
gathered on rank 0, which runs COCOeval and shares the figures. Each run appends one row to
``results/local/coco.csv`` and redraws the AP plots next to it (``plots.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN

from attnbench import TaskError, register_task
from attnbench.validate import float_in, int_in
from tasks.coco import data, embedded
from tasks.coco.metrics import METRICS, evaluate_all, ground_truth, to_coco_results
from tasks.coco.model import DETECTORS, backbone_of, build_detector, make_train_step
from tasks.coco.plots import plot_results
from tasks.common.backbone import (
    SIZES,
    add_backbone_arguments,
    build_backbone,
    check_drop_path,
    count_parameters,
    measure_flops,
)
from tasks.common.distributed import all_reduce, broadcast_object, gather_objects
from tasks.common.harness import CONTEXT_COLUMNS, COST_COLUMNS, Data, TrainingTask
from tasks.common.init_from_data import readable_samples
from tasks.common.trainer import Loss

# Hyper-parameters of the two presets; the command line overrides any of them.
PRESETS: dict[str, dict[str, Any]] = {
    # COCO 2017 from --data: the Swin/NAT Mask R-CNN 1x recipe (AdamW lr 1e-4 for 16 images a step,
    # weight decay 0.05, 12 epochs, ~500 warm-up steps of 7,330), single scale 800 px, flips;
    # the harness decays by a cosine to 1 % instead of the 1x steps at epochs 8 and 11
    "coco": dict(size="mini", min_size=800, max_size=1333, detector="standard", epochs=12, batch_size=2,
                 lr=None, lr_per_images=(1e-4, 16), weight_decay=0.05, warmup_epochs=0.07, min_lr=None,
                 label_smoothing=0.0, clip_grad=0.0, ema=0.0, workers=min(4, os.cpu_count() or 1), hflip=0.5,
                 eval_every=1),
    # the embedded composites: a model and schedule that train in minutes on a 2-core CPU
    "embedded": dict(size="micro", min_size=128, max_size=128, detector="light", epochs=6, batch_size=4,
                     lr=1e-3, weight_decay=0.05, warmup_epochs=0.5, min_lr=None, label_smoothing=0.0,
                     clip_grad=5.0, ema=0.0, workers=1, hflip=0.5, eval_every=0),
}

METRIC_COLUMNS = [f"{kind}_{m}" for kind in ("box", "mask") for m in METRICS]
COLUMNS = ["task", "mechanism", "size", "detector", "dataset", "num_classes", "img_size", "max_size",
           "tokens_stage1", "epochs", "seed", *METRIC_COLUMNS, "params", "backbone_params", "backbone_gflops",
           "train_img_s", "eval_img_s", *COST_COLUMNS, "options", "mechanism_init", "backend",
           "skipped_images", "train_images", "val_images", *CONTEXT_COLUMNS]


@register_task
class Coco(TrainingTask):
    name = "coco"
    summary = "detection and instance segmentation, Mask R-CNN on the SeTformer backbone (COCO layout)"
    presets, columns, sizes = PRESETS, COLUMNS, list(SIZES)
    config_columns = ("train_images", "val_images", "num_classes", "img_size", "detector", "max_size")
    metrics, headline, unit = (*METRIC_COLUMNS, "cocoeval_s"), "box_AP", "img"
    counted = ("train_images", "val_images")
    data_help = ("COCO 2017 layout: annotations/instances_{train,val}2017.json, train2017/*.jpg, "
                 "val2017/*.jpg (embedded: composites of real objects on real photos)")
    init_samples, init_unit = 16, "images"
    # the resolution probe: the embedded set's 3 categories and its light detector at every side, so
    # that only the backbone's tokens change with the side
    train_side = PRESETS["embedded"]["min_size"]
    probe_step = functools.partial(make_train_step, num_classes=3, detector="light")

    @classmethod
    def add_task_arguments(cls, g: argparse._ArgumentGroup) -> None:
        g.add_argument("--min-size", type=int_in(32, 4096),
                       help="short side the images are resized to (default: 800 with --data, 128 without)")
        g.add_argument("--max-size", type=int_in(32, 8192),
                       help="longest side after resizing (default: 1333 with --data, 128 without)")
        g.add_argument("--detector", choices=list(DETECTORS),
                       help="Mask R-CNN configuration: standard = torchvision's (FPN 256, 2000 proposals), "
                            "light = reduced for small images on a CPU (default: standard with --data, light "
                            "without)")
        add_backbone_arguments(g)
        g.add_argument("--hflip", type=float_in(0, 1),
                       help="horizontal-flip probability in training (default 0.5)")

    # ---- what to run ----------------------------------------------------------------------------

    def configure(self, args: argparse.Namespace) -> None:
        self.min_size, self.max_size = self.pick("min_size"), self.pick("max_size")
        if self.min_size < 32:
            raise TaskError(f"--min-size must be >= 32 (the backbone downsamples by 32), got {self.min_size}")
        if self.max_size < self.min_size:
            raise TaskError(f"--max-size must be >= --min-size ({self.min_size}), got {self.max_size}")
        self.hflip, self.detector = self.pick("hflip"), self.pick("detector")
        if not 0 <= self.hflip <= 1:
            raise TaskError(f"--hflip must be a probability in [0, 1], got {self.hflip}")
        check_drop_path(args.drop_path)

    def check_model(self) -> None:
        self.try_model(lambda size: build_backbone(size, self.mechanism, 2, self.options),
                       [torch.zeros(1, 3, 32, 32)], "mix tokens given as a 2-D grid")

    # ---- data, model, loss ----------------------------------------------------------------------

    def load_data(self) -> Data:
        """The checked splits of --data, or of the embedded set (written on first use)."""
        if self.args.data is None:
            root, name = embedded.embedded_dataset(), embedded.EMBEDDED_DATASET
            label, description = f"the embedded data set {root}", embedded.EMBEDDED_DESCRIPTION
        else:
            root = self.args.data.expanduser()
            name, label, description = f"coco-layout:{root.resolve().name}", f"--data {root}", ""
        self.train_split, self.val_split = data.read_layout(root, label)
        train = data.CocoInstances(self.train_split, train=True, hflip=self.hflip)
        if len(train) == 0:
            raise TaskError(f"{label}: no training image has an annotation that trains (not a crowd, box "
                            "at least a pixel wide and high)")
        self.val_images = data.CocoInstances(self.val_split, train=False)
        self.num_classes = len(self.train_split.categories)
        return Data(name, train, self.val_images, data.collate, root, description)

    def build_model(self) -> nn.Module:
        model = build_detector(self.size, self.mechanism, self.num_classes, self.options,
                               min_size=self.min_size, max_size=self.max_size, detector=self.detector,
                               drop_path=self.args.drop_path)
        self.backbone_params = count_parameters(backbone_of(model))
        self.backbone_gflops = measure_flops(backbone_of(model), self.min_size).total / 1e9
        return model

    def config(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "min_size": self.min_size, "max_size": self.max_size,
                "detector": self.detector}

    def init_inputs(self, model: MaskRCNN) -> tuple[nn.Module, tuple[Tensor]]:
        """A seeded sample of training images as the backbone sees them (normalised, resized, padded
        to a multiple of 32 by the detector's own transform): (B, 3, H, W)."""
        plain = data.CocoInstances(self.train_split, train=False)
        samples = readable_samples(plain, self.init_samples, self.recipe.seed, self.train_split.image_dir)
        images = [image for image, _ in samples]
        was_training = model.training
        model.transform.eval()  # the fixed test-time size, not a random training one
        try:
            batch, _ = model.transform(images)
        finally:
            model.transform.train(was_training)
        return backbone_of(model), (batch.tensors,)

    def loss(self, net: nn.Module, batch: tuple[list[Tensor], list[dict[str, Any]], int]) -> Loss:
        """Mask R-CNN's five losses (RPN objectness and box, classifier, box, mask), summed by the trainer."""
        images, targets, _ = batch  # images: B × (3, H, W); targets: boxes, labels, masks
        if not images:
            return torch.zeros((), device=self.device), 0
        return net(images, targets), len(images)

    def eval_batch_size(self) -> int:
        return self.recipe.batch_size

    # ---- evaluation and the record --------------------------------------------------------------

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """COCOeval of boxes and masks over every val image: each process predicts its share, rank 0
        evaluates what all gathered, and every process gets the figures."""
        category_of = {label: cid for cid, label in self.val_images.label_of.items()}
        bbox: list[dict[str, Any]] = []
        segm: list[dict[str, Any]] = []
        ids: list[int] = []
        skipped = 0
        for images, targets, bad in self.val_loader:
            skipped += bad
            if not images:
                continue
            with self.autocast():
                outputs = model(self.to_device(images))
            for target, output in zip(targets, outputs, strict=True):
                b, s = to_coco_results(target["image_id"], output, category_of)
                bbox += b
                segm += s
                ids.append(target["image_id"])
        (skipped,) = all_reduce([skipped], self.dist)
        parts = gather_objects((bbox, segm, ids), self.dist)  # predictions of every process to rank 0
        scores: dict[str, Any] = {}
        if self.dist.is_main:
            bbox, segm, ids = ([x for part in parts for x in part[k]] for k in range(3))
            if not ids:
                raise TaskError(f"no validation image could be decoded ({int(skipped)} skipped)")
            scoring = time.perf_counter()
            scores = evaluate_all(ground_truth(self.val_split.data), bbox, segm, ids)
            scores.update(items=len(ids), cocoeval_s=time.perf_counter() - scoring, skipped=int(skipped),
                          detections=len(bbox))
        return broadcast_object(scores, self.dist)

    def row(self, scores: dict[str, Any]) -> dict[str, Any]:
        return {"detector": self.detector, "num_classes": self.num_classes, "img_size": self.min_size,
                "max_size": self.max_size, "tokens_stage1": math.ceil(self.min_size / 32) ** 2 * 64,
                **{k: round(scores[k], 2) for k in METRIC_COLUMNS}, "backbone_params": self.backbone_params,
                "backbone_gflops": round(self.backbone_gflops, 4)}

    def format_scores(self, values: dict[str, Any]) -> str:
        return (f"AP box {values['box_AP']:.1f} (AP50 {values['box_AP50']:.1f}), "
                f"AP mask {values['mask_AP']:.1f} (AP50 {values['mask_AP50']:.1f})")

    def describe_model(self) -> str:
        return (f"Mask R-CNN ({self.detector}) on SeTformer-{self.size} (backbone {self.backbone_gflops:.3g} "
                f"GFLOPs at {self.min_size}²)")

    def meta(self) -> dict[str, Any]:
        return {"detector": dataclasses.asdict(DETECTORS[self.detector]), "hflip": self.hflip,
                "categories": [c["name"] for c in self.train_split.categories],
                "backbone_params": self.backbone_params, "backbone_gflops": self.backbone_gflops,
                "evaluation": "predictions gathered on rank 0, COCOeval there"}

    def plot(self, table: pd.DataFrame, out: Path) -> list[Path]:
        return plot_results(table, out)
