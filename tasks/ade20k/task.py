"""ADE20K semantic segmentation: UperNet on the SeTformer backbone, any mechanism as token mixer.

``attnbench run --mechanism set --task ade20k`` trains and evaluates; ``--data DIR`` reads the
official ADEChallengeData2016 layout (150 classes, 0 = other, ignored; ``data.py``), and without
it a small real data set in that very layout is composited once into the cache from images that
scikit-image, scikit-learn and matplotlib ship (``embedded.py``), and read through the same code.

Two presets: ``ade20k`` (with --data: SeTformer-Mini, 512² crops, mmseg's Swin/NAT UperNet
recipe of 160k iterations at batch 16 expressed in epochs) and ``embedded`` (SeTformer-Micro,
96² crops, a narrow head without the auxiliary one: minutes on a laptop CPU). Any flag overrides
its preset.

Evaluation is single-scale, whole-image: each validation image is resized (aspect kept) to fit
crop × 4·crop, segmented in one pass, and its logits upsampled to the annotation's full size,
where mIoU, pixel accuracy (aAcc) and mean accuracy come from one confusion matrix summed over
the split and all processes (``metrics.py``). Each run appends one row to
``results/local/ade20k.csv`` and redraws the mIoU plot beside it (``plots.py``).
"""

from __future__ import annotations

import argparse
import functools
import os
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnbench import TaskError, register_task
from attnbench.validate import existing_path, float_in, int_in
from tasks.ade20k import data, embedded
from tasks.ade20k.metrics import confusion_matrix, segmentation_scores
from tasks.ade20k.model import HEAD_CHANNELS, Segmenter, build_segmenter, make_train_step, segmentation_loss
from tasks.ade20k.plots import plot_results
from tasks.common.backbone import SIZES, add_backbone_arguments, check_drop_path, measure_flops
from tasks.common.distributed import all_reduce, all_reduce_tensor
from tasks.common.harness import CONTEXT_COLUMNS, COST_COLUMNS, Data, TrainingTask
from tasks.common.trainer import Loss, load_checkpoint

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
EVAL_MODE = "whole image, single scale"

COLUMNS = ["task", "mechanism", "size", "dataset", "num_classes", "crop_size", "eval_mode", "epochs", "iters",
           "seed", "miou", "aacc", "macc", "classes_present", "params", "gflops", "train_img_s", "eval_img_s",
           *COST_COLUMNS, "options", "mechanism_init", "backbone_weights", "backend", "head", "head_channels",
           "aux_weight", "train_images", "val_images", *CONTEXT_COLUMNS]


@register_task
class ADE20K(TrainingTask):
    name = "ade20k"
    summary = ("semantic segmentation, UperNet on the SeTformer backbone (ADEChallengeData2016 layout, or "
               "embedded skimage composites)")
    presets, columns, sizes = PRESETS, COLUMNS, list(SIZES)
    config_columns = ("train_images", "val_images", "num_classes", "crop_size", "iters", "eval_mode", "head",
                      "head_channels", "aux_weight", "backbone_weights")
    metrics, headline, unit = ("miou", "aacc", "macc"), "miou", "img"
    counted = ("train_images", "val_images")
    data_help = ("ADEChallengeData2016 folder: images/{training,validation}/*.jpg and "
                 "annotations/{training,validation}/*.png")
    init_samples, init_unit = 32, "crops"
    # the resolution probe: side² crops, ADE20K's 150 classes, UperNet with the size's channels
    train_side = PRESETS["embedded"]["crop_size"]
    probe_step = functools.partial(make_train_step, num_classes=150)

    @classmethod
    def add_task_arguments(cls, g: argparse._ArgumentGroup) -> None:
        g.add_argument("--crop-size", type=int_in(32, 4096),
                       help="training crop side; evaluation resizes to fit crop × 4·crop "
                            "(default: 512 with --data, 96 without)")
        g.add_argument("--channels", type=int_in(1, 4096),
                       help="UperNet channels (default: 512 for mini and larger, 64 for micro)")
        g.add_argument("--aux-weight", type=float_in(0, 100),
                       help="weight of the auxiliary FCN head's loss on stage 3 (default: 0.4 with --data, "
                            "0 = no auxiliary head without)")
        add_backbone_arguments(g)
        g.add_argument("--backbone-weights", type=existing_path, metavar="RUN_DIR|CHECKPOINT",
                       help="start the backbone from an `attnbench run --task imagenet` checkpoint of the "
                            "same mechanism and size (the paper fine-tunes ImageNet-trained backbones)")

    # ---- what to run ----------------------------------------------------------------------------

    def configure(self, args: argparse.Namespace) -> None:
        self.crop = self.pick("crop_size")
        self.aux_weight = self.pick("aux_weight")
        channels = self.pick("channels")
        self.channels = HEAD_CHANNELS[self.size] if channels is None else channels
        if self.crop < 32:
            raise TaskError(f"--crop-size must be >= 32 (the backbone downsamples by 32), got {self.crop}")
        if self.channels < 1:
            raise TaskError(f"--channels must be >= 1, got {self.channels}")
        if self.aux_weight < 0:
            raise TaskError(f"--aux-weight must be >= 0 (0: no auxiliary head), got {self.aux_weight}")
        check_drop_path(args.drop_path)
        self.backbone_state = None if args.backbone_weights is None else self.read_backbone_weights()

    def read_backbone_weights(self) -> dict[str, Any]:
        """--backbone-weights, read and checked before any data: an imagenet checkpoint of this
        mechanism and size."""
        path, mechanism, size = self.args.backbone_weights, self.mechanism, self.size
        _, state = load_checkpoint(path, "--backbone-weights")
        config = state.get("config", {})
        found = (config.get("task"), config.get("mechanism"), config.get("size"))
        if found != ("imagenet", mechanism, size):
            raise TaskError(f"--backbone-weights {path}: a checkpoint of task {found[0]!r}, mechanism "
                            f"{found[1]!r}, size {found[2]!r}; expected an imagenet run of --mechanism "
                            f"{mechanism} --size {size}")
        return state

    def check_model(self) -> None:
        self.try_model(lambda size: build_segmenter(size, self.mechanism, data.NUM_CLASSES, self.options,
                                                    channels=8),
                       [torch.zeros(1, 3, 64, 64)], "segment an image")

    # ---- data, model, loss ----------------------------------------------------------------------

    def load_data(self) -> Data:
        """Train and val splits of --data, or of the embedded set, both checked."""
        if self.args.data is None:
            root, name, description = (embedded.embedded_dataset(), embedded.EMBEDDED_DATASET,
                                       embedded.EMBEDDED_DESCRIPTION)
        else:
            root = self.args.data.expanduser()
            name, description = f"ade20k:{root.resolve().name}", ""
        train = data.ADE20KSegmentation(root, "training", data.TrainTransform(self.crop))
        val = data.ADE20KSegmentation(root, "validation", data.EvalTransform(self.crop))
        return Data(name, train, val, data.collate, root, description)

    def build_model(self) -> nn.Module:
        aux_channels = self.channels // 2 if self.aux_weight > 0 else 0
        model = build_segmenter(self.size, self.mechanism, data.NUM_CLASSES, self.options, self.channels,
                                aux_channels, self.args.drop_path)
        self.gflops = measure_flops(model, self.crop).total / 1e9  # type: ignore[arg-type]
        if self.dist.world_size > 1 and self.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # mmseg's SyncBN: 2 images per GPU
        return model

    def config(self) -> dict[str, Any]:
        return {"crop_size": self.crop, "channels": self.channels, "aux_weight": self.aux_weight}

    def initialise(self, model: Segmenter) -> None:
        """The backbone of an imagenet checkpoint where --backbone-weights names one, else
        mechanisms from data."""
        self.facts["backbone_weights"] = "none"
        if self.args.backbone_weights is None:
            super().initialise(model)
            return
        path, state = self.args.backbone_weights, self.backbone_state
        config = state.get("config", {})
        model.backbone.load_state_dict({k: v for k, v in state["model"].items()
                                        if not k.startswith(("head.", "norm."))})
        self.facts.update(backbone_weights=f"{path} ({config.get('dataset')}, {state.get('epoch')} epochs)",
                          mechanism_init="backbone weights")

    def init_inputs(self, model: Segmenter) -> tuple[nn.Module, tuple[Tensor]]:
        """A seeded sample of training images, resized and centre-cropped to crop²: (B, 3, crop, crop)."""
        train, c = self.data.train, self.crop
        pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.recipe.seed))
        resize = data.EvalTransform(c)
        images = []
        for i in pick[:self.init_samples].tolist():
            image, labels = data.read_pair(*train.pairs[i])
            image, _ = resize(image, labels)  # short side = crop
            top, left = max(0, (image.shape[1] - c) // 2), max(0, (image.shape[2] - c) // 2)
            image = image[:, top:top + c, left:left + c]
            images.append(F.pad(image, (0, c - image.shape[2], 0, c - image.shape[1])))
        return model.backbone, (torch.stack(images),)

    def loss(self, net: nn.Module, batch: tuple[Tensor, Tensor, str]) -> Loss:
        """Cross-entropy over labelled pixels (255 ignored) + aux_weight × the auxiliary head's."""
        images, labels, error = batch  # (B, 3, crop, crop), (B, crop, crop)
        if error:  # a file failed to load in a loader worker: one line, here in the main process
            raise TaskError(error)
        outputs = net(images)
        return segmentation_loss(outputs, labels, self.aux_weight, self.recipe.label_smoothing), len(images)

    def eval_batch_size(self) -> int:
        return 1  # whole images of different sizes

    # ---- evaluation and the record --------------------------------------------------------------

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """mIoU, aAcc, mAcc (%) over the whole val split (all processes), single scale, whole image."""
        confusion = torch.zeros(data.NUM_CLASSES, data.NUM_CLASSES, dtype=torch.int64)
        images = 0
        for image, labels, _ in data.raise_errors(self.val_loader):  # (1, 3, h, w), (1, H, W) at full size
            with self.autocast():
                logits = model(self.to_device(image))["out"].float()  # (1, classes, h, w)
            logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
            confusion += confusion_matrix(logits.argmax(1).cpu(), labels, data.NUM_CLASSES)
            images += len(labels)
        confusion = all_reduce_tensor(confusion, self.dist)  # one matrix: every process saw a disjoint shard
        (images,) = all_reduce([images], self.dist)
        scores = segmentation_scores(confusion)
        return {"miou": 100 * scores["miou"], "aacc": 100 * scores["aacc"], "macc": 100 * scores["macc"],
                "classes_present": scores["classes_present"], "iou": scores["iou"], "items": int(images)}

    def row(self, scores: dict[str, Any]) -> dict[str, Any]:
        return {"num_classes": data.NUM_CLASSES, "crop_size": self.crop, "eval_mode": EVAL_MODE,
                "iters": self.trainer.steps, **{k: round(scores[k], 3) for k in self.metrics},
                "classes_present": scores["classes_present"], "gflops": round(self.gflops, 4),
                "backbone_weights": self.facts.get("backbone_weights", "none"),
                "head": "upernet+fcn-aux" if self.aux_weight > 0 else "upernet",
                "head_channels": self.channels, "aux_weight": self.aux_weight}

    def describe_model(self) -> str:
        return (f"SeTformer-{self.size} + UperNet({self.channels}) ({self.gflops:.3g} GFLOPs at "
                f"{self.crop}²)")

    def meta(self) -> dict[str, Any]:
        return {"eval_mode": EVAL_MODE, "gflops": self.gflops}

    def plot(self, table: pd.DataFrame, out: Path) -> list[Path]:
        return plot_results(table, out)
