"""Semantic segmentation on the SeTformer backbone: a UperNet head, as the paper and NAT use.

    image (B, 3, H, W)
    backbone.forward_features -> 4 maps (B, C_i, H/2^(i+1), W/2^(i+1)), i = 1..4, strides 4..32;
        the mechanism gets grid=(H_i, W_i) in every block; the classification head is dropped
    UperNet (Xiao et al. 2018, the decode head of mmseg's Swin/NAT ADE20K recipes):
        PPM on stage 4: average pools to 1², 2², 3², 6², 1×1 conv each, upsampled, concatenated
            with stage 4, 3×3 conv -> D channels
        FPN: 1×1 laterals on stages 1..3, top-down sums, a 3×3 conv on each level
        fusion: the 4 levels upsampled to stride 4, concatenated, 3×3 conv -> D, dropout 0.1,
            1×1 conv -> classes, bilinear upsampling to (H, W)
    auxiliary FCN head on stage 3 (mmseg's recipes: loss weight 0.4), training only

Convolutions of the head are conv–BatchNorm–ReLU as in mmseg (SyncBatchNorm under DDP on CUDA).
``make_train_step`` gives one optimiser step at any resolution for memory and throughput probes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnbench import Mechanism
from tasks.common.backbone import Backbone, build_backbone

IGNORE_INDEX = 255
POOL_SCALES = (1, 2, 3, 6)
# decode-head channels per backbone size: mmseg's 512 for the paper-scale sizes, narrow for micro
HEAD_CHANNELS = {"micro": 64, "mini": 512, "tiny": 512, "small": 512, "base": 512}


class ConvBNReLU(nn.Sequential):
    """k×k convolution (no bias), BatchNorm, ReLU: (B, C_in, H, W) -> (B, C_out, H, W)."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 1) -> None:
        super().__init__(nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling on the last map: (B, C, h, w) -> (B, D, h, w)."""

    def __init__(self, c_in: int, channels: int, scales: Sequence[int] = POOL_SCALES) -> None:
        super().__init__()
        self.scales = tuple(scales)
        self.branches = nn.ModuleList(ConvBNReLU(c_in, channels) for _ in self.scales)
        self.bottleneck = ConvBNReLU(c_in + len(self.scales) * channels, channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        pooled = [_resize(branch(F.adaptive_avg_pool2d(x, s)), size)
                  for s, branch in zip(self.scales, self.branches, strict=True)]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))


class UperHead(nn.Module):
    """UperNet decode head: PPM + FPN over the 4 maps, fused at stride 4 -> (B, classes, H/4, W/4)."""

    def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.ppm = PyramidPooling(in_channels[-1], channels)
        self.laterals = nn.ModuleList(ConvBNReLU(c, channels) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvBNReLU(channels, channels, 3) for _ in in_channels[:-1])
        self.fuse = ConvBNReLU(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, maps: Sequence[Tensor]) -> Tensor:
        levels = [lateral(x) for lateral, x in zip(self.laterals, maps[:-1], strict=True)]
        levels.append(self.ppm(maps[-1]))
        for i in range(len(levels) - 1, 0, -1):  # top-down: coarse into fine
            levels[i - 1] = levels[i - 1] + _resize(levels[i], levels[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, levels[:-1], strict=True)] + [levels[-1]]
        size = outs[0].shape[-2:]  # stride 4
        fused = self.fuse(torch.cat([outs[0], *(_resize(x, size) for x in outs[1:])], dim=1))
        return self.classifier(self.dropout(fused))


class FCNHead(nn.Module):
    """The auxiliary head: 3×3 conv, dropout, 1×1 conv -> (B, classes, h, w) on one map."""

    def __init__(self, c_in: int, channels: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.conv = ConvBNReLU(c_in, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.conv(x)))


class Segmenter(nn.Module):
    """SeTformer backbone + UperNet (+ auxiliary FCN on stage 3 while training).

    ``forward(images)`` returns ``{"out": (B, classes, H, W)}``, plus ``"aux"`` of the same shape
    in training mode when the auxiliary head exists (torchvision's segmentation convention).
    """

    def __init__(self, backbone: Backbone, num_classes: int, channels: int, aux_channels: int = 0) -> None:
        super().__init__()
        backbone.norm, backbone.head = nn.Identity(), nn.Identity()  # unused: DDP needs every param used
        self.backbone = backbone
        self.decode = UperHead(backbone.widths, channels, num_classes)
        self.aux = FCNHead(backbone.widths[2], aux_channels, num_classes) if aux_channels > 0 else None
        self.num_classes = num_classes
        for module in (self.decode, self.aux):
            if module is not None:
                module.apply(_init_head)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        size = images.shape[-2:]
        maps = self.backbone.forward_features(images)  # 4 × (B, C_i, H/2^(i+1), W/2^(i+1))
        result = {"out": _resize(self.decode(maps), size)}
        if self.training and self.aux is not None:
            result["aux"] = _resize(self.aux(maps[2]), size)
        return result

    def mechanisms(self) -> Iterator[Mechanism]:
        """The backbone's mechanisms (what ``measure_flops`` and data initialisation look for)."""
        return self.backbone.mechanisms()


def _init_head(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def build_segmenter(size: str, mechanism: str, num_classes: int = 150,
                    options: Mapping[str, Any] | None = None, channels: int | None = None,
                    aux_channels: int | None = None,
                    drop_path: float | None = None, use_grid: bool = True) -> Segmenter:
    """The segmenter of ``size`` with ``mechanism`` as token mixer; channels default to the size's
    (``HEAD_CHANNELS``), the auxiliary head to half of them (0: none)."""
    backbone = build_backbone(size, mechanism, 1, options, drop_path, use_grid)
    channels = HEAD_CHANNELS[size] if channels is None else channels
    aux_channels = channels // 2 if aux_channels is None else aux_channels
    return Segmenter(backbone, num_classes, channels, aux_channels)


def segmentation_loss(outputs: Mapping[str, Tensor], labels: Tensor, aux_weight: float = 0.4,
                      label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy over labelled pixels (255 ignored), + ``aux_weight`` × the auxiliary head's.

    outputs: {"out": (B, K, H, W), "aux": (B, K, H, W)?}; labels: (B, H, W) int64.
    """
    ce = lambda logits: F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX,
                                        label_smoothing=label_smoothing)
    loss = ce(outputs["out"])
    if "aux" in outputs and aux_weight > 0:
        loss = loss + aux_weight * ce(outputs["aux"])
    return loss


def make_train_step(mechanism: str, side: int, size: str = "micro", options: dict | None = None,
                    num_classes: int = 150, device: str | torch.device = "cpu") -> Callable[[], None]:
    """One training step of the segmenter at ``side``², for memory/throughput/largest-side probes.

    Builds the model (head channels of ``size``), AdamW, and one synthetic batch of 2 images
    (B=2, 3, side, side) with labels (2, side, side) in [0, classes) and a tenth ignored; the
    closure runs forward, the UperNet + auxiliary loss, backward and the optimiser step.
    """
    if side < 32:
        raise ValueError(f"side must be >= 32 (the backbone downsamples by 32), got {side}")
    device = torch.device(device)
    model = build_segmenter(size, mechanism, num_classes, options or {}).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, side, side, generator=gen).to(device)
    labels = torch.randint(0, num_classes, (2, side, side), generator=gen)
    labels[torch.rand(2, side, side, generator=gen) < 0.1] = IGNORE_INDEX
    labels = labels.to(device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        segmentation_loss(model(images), labels).backward()
        optimizer.step()

    return step
