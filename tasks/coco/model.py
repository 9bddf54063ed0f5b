"""Mask R-CNN with an FPN on the SeTformer backbone: torchvision's detector, our backbone.

torchvision's ``MaskRCNN`` accepts any backbone that is a module with an ``out_channels``
attribute returning an ``OrderedDict`` of feature maps. ``SeTformerFPN`` is that module: the
backbone's four stage maps (strides 4, 8, 16, 32; the mechanism sees ``grid=(H_i, W_i)`` at
every stage, so a high input resolution means many tokens) through torchvision's
``FeaturePyramidNetwork`` with a max-pooled fifth level (stride 64), as in Mask R-CNN's FPN.
The backbone's classification head is dropped (it would hold unused parameters, which
DistributedDataParallel refuses).

Two detector configurations (``DETECTORS``): ``standard`` is torchvision's Mask R-CNN as
published (256-channel FPN, 2000/1000 proposals, 512 RoIs per image, four 256-channel mask
convolutions), for real COCO at 800 px; ``light`` is a reduced one for small images on a
CPU (64 channels, a few hundred proposals, 64 RoIs per image, anchors 16…256 px).

``make_train_step`` builds a model and a synthetic batch and returns one training step, for
measuring memory and throughput against the input side.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from tasks.common.backbone import Backbone, build_backbone
from tasks.common.image_folder import IMAGENET_MEAN, IMAGENET_STD


@dataclasses.dataclass(frozen=True)
class DetectorConfig:
    """The parts of Mask R-CNN that set its cost: FPN width, anchors, proposals, RoI heads."""

    fpn_channels: int
    anchor_sizes: tuple[int, int, int, int, int]  # one per FPN level, strides 4 … 64
    rpn_pre_nms_train: int
    rpn_post_nms_train: int
    rpn_pre_nms_test: int
    rpn_post_nms_test: int
    rpn_batch_per_image: int  # anchors sampled per image for the RPN loss
    box_batch_per_image: int  # RoIs sampled per image for the box and mask losses
    box_head_dim: int  # width of the two-layer MLP box head
    mask_head_dims: tuple[int, ...]  # the 3×3 convolutions of the mask head
    detections_per_image: int


DETECTORS: dict[str, DetectorConfig] = {
    # torchvision's Mask R-CNN defaults (those of the paper's FPN setting)
    "standard": DetectorConfig(256, (32, 64, 128, 256, 512), 2000, 2000, 1000, 1000, 256, 512, 1024,
                               (256, 256, 256, 256), 100),
    # small images on a CPU: a quarter of the widths, an eighth of the proposals and RoIs
    "light": DetectorConfig(64, (16, 32, 64, 128, 256), 300, 150, 200, 100, 64, 64, 256, (64, 64), 50),
}


class SeTformerFPN(nn.Module):
    """The backbone's four stage maps through an FPN: images (B, 3, H, W) -> OrderedDict of
    (B, out_channels, H/s, W/s) for s = 4, 8, 16, 32 (keys "0"…"3") and 64 ("pool")."""

    def __init__(self, body: Backbone, out_channels: int) -> None:
        super().__init__()
        body.norm, body.head = nn.Identity(), nn.Identity()  # the classifier is not used here
        self.body = body
        self.fpn = FeaturePyramidNetwork(list(body.widths), out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        maps = self.body.forward_features(images)  # 4 × (B, C_i, H/2^(i+1), W/2^(i+1))
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))


def build_detector(size: str, mechanism: str, num_classes: int, options: Mapping[str, Any] | None = None,
                   *, min_size: int = 800, max_size: int = 1333, detector: str = "standard",
                   drop_path: float | None = None) -> MaskRCNN:
    """Mask R-CNN for ``num_classes`` object categories (plus background) on SeTformer-``size``.

    Images go in as a list of (3, H, W) tensors in [0, 1]; torchvision's transform normalises
    them (ImageNet mean and std), resizes the short side to ``min_size`` (long side at most
    ``max_size``) and pads to a multiple of 32, the backbone's total stride.
    """
    if detector not in DETECTORS:
        raise KeyError(f"unknown detector configuration {detector!r}; valid choices: {', '.join(DETECTORS)}")
    cfg = DETECTORS[detector]
    body = build_backbone(size, mechanism, 1, options, drop_path)
    backbone = SeTformerFPN(body, cfg.fpn_channels)
    levels = len(cfg.anchor_sizes)
    anchors = AnchorGenerator(tuple((s,) for s in cfg.anchor_sizes), ((0.5, 1.0, 2.0),) * levels)
    c = cfg.fpn_channels
    return MaskRCNN(
        backbone, min_size=min_size, max_size=max_size, image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD), rpn_anchor_generator=anchors,
        rpn_head=RPNHead(c, anchors.num_anchors_per_location()[0]),
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_train, rpn_post_nms_top_n_train=cfg.rpn_post_nms_train,
        rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_test, rpn_post_nms_top_n_test=cfg.rpn_post_nms_test,
        rpn_batch_size_per_image=cfg.rpn_batch_per_image, box_batch_size_per_image=cfg.box_batch_per_image,
        box_head=TwoMLPHead(c * 7 * 7, cfg.box_head_dim),
        box_predictor=FastRCNNPredictor(cfg.box_head_dim, num_classes + 1),
        mask_head=MaskRCNNHeads(c, list(cfg.mask_head_dims), 1),
        mask_predictor=MaskRCNNPredictor(cfg.mask_head_dims[-1], cfg.mask_head_dims[-1], num_classes + 1),
        box_detections_per_img=cfg.detections_per_image)


def backbone_of(model: MaskRCNN) -> Backbone:
    """The SeTformer backbone inside a detector built by ``build_detector``."""
    return model.backbone.body


def detection_loss(model: nn.Module, images: list[Tensor], targets: list[dict[str, Tensor]]) -> Tensor:
    """The sum of Mask R-CNN's five training losses (RPN objectness and box, classifier, box, mask)."""
    losses = model(images, targets)
    return sum(losses.values())


def synthetic_batch(side: int, num_classes: int, images: int = 2,
                    device: torch.device | str = "cpu") -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """``images`` random side×side images, each with two rectangles (a quarter and a third of
    the side) as boxes and masks: the shapes a training step sees, without any data."""
    gen = torch.Generator().manual_seed(0)
    batch, targets = [], []
    for i in range(images):
        batch.append(torch.rand(3, side, side, generator=gen).to(device))
        boxes, masks = [], torch.zeros(2, side, side, dtype=torch.uint8)
        for j, frac in enumerate((4, 3)):
            w = max(2, side // frac)
            x0 = y0 = (side - w) * (j + 1) // 3
            boxes.append([x0, y0, x0 + w, y0 + w])
            masks[j, y0:y0 + w, x0:x0 + w] = 1
        labels = torch.tensor([1 + (i + j) % num_classes for j in range(2)], dtype=torch.int64)
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32, device=device),
                        "labels": labels.to(device), "masks": masks.to(device)})
    return batch, targets


def make_train_step(mechanism: str, side: int, size: str = "micro", options: dict | None = None,
                    num_classes: int = 3, detector: str | None = None,
                    device: torch.device | str = "cpu") -> Callable[[], None]:
    """A closure running one forward + backward + AdamW step of Mask R-CNN on SeTformer-``size``
    at ``side``×``side`` (two synthetic images with two boxes and masks each).

    The detector configuration defaults to ``light`` below 512 px and ``standard`` from there;
    the image transform keeps the side as it is (min_size = max_size = side).
    """
    if side < 32:
        raise ValueError(f"side must be >= 32 (the backbone's total stride), got {side}")
    detector = detector or ("light" if side < 512 else "standard")
    model = build_detector(size, mechanism, num_classes, options, min_size=side, max_size=side,
                           detector=detector).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images, targets = synthetic_batch(side, num_classes, device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        detection_loss(model, images, targets).backward()
        optimizer.step()

    return step
