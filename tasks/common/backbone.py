"""The SeTformer backbone: a Swin-like hierarchy whose token mixer is any registered mechanism.

From the project's SeT specification, ``docs/set-attention.md`` ("The SeTformer backbone"),
top to bottom:

    image (B, 3, H, W)
    stem: conv 3×3 s2 (3 → C/2), GELU, conv 3×3 s2 (C/2 → C), LayerNorm        1/4 resolution
    stage i = 1..4: depth_i blocks on tokens (B, H_i·W_i, C_i), grid=(H_i, W_i)
        block: x + DropPath(mechanism(LN(x), grid)); x + DropPath(MLP(LN(x)))
    between stages: conv 3×3 s2 (C_i → 2·C_i), LayerNorm                        halves H, W
    head: LayerNorm, mean over tokens, Linear → classes

Choices the paper does not state, each a line:

* The GELU between the two stem convolutions (NAT's tokenizer has none; without it the two
  convolutions are one linear map).
* Sizes follow the Swin/NAT family (depths, stage-1 width doubling per stage, heads of 32
  channels); ``mini`` is chosen to land near the seed's 16M parameters, ``micro`` is ours, for
  CPU runs on small images (see ``SIZES``).
* Mechanisms with a ``shift`` option (Swin) alternate it within each stage (False, True, …) as
  Swin does, unless the user sets it; every other option is passed through unchanged.
* Linear and convolution weights start from a truncated normal (std 0.02, as Swin/NAT); the
  mechanisms' own parameters (SeT's anchors and references, Swin's bias table) keep their init.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.ops import StochasticDepth

from attnbench import Mechanism, TaskError, build_mechanism, get_mechanism
from attnbench.validate import float_in


@dataclasses.dataclass(frozen=True)
class BackboneSize:
    """Depths, stage-1 width and heads of the four stages; the MLP ratio and stochastic depth."""

    depths: tuple[int, int, int, int]
    dim: int  # channels of stage 1; stage i has dim · 2^(i-1)
    heads: tuple[int, int, int, int]
    mlp_ratio: float
    drop_path: float  # stochastic-depth rate of the last block (linear from 0 at the first)

    def widths(self) -> tuple[int, ...]:
        return tuple(self.dim * 2**i for i in range(4))


SIZES: dict[str, BackboneSize] = {
    # ours: a few hundred thousand parameters, trains in minutes on a CPU at 32×32
    "micro": BackboneSize((1, 1, 2, 1), 32, (1, 2, 4, 8), 2.0, 0.0),
    # NAT-Mini's width, Swin's layout with 10 blocks in stage 3: lands near SeTformer-Mini's 16M
    # parameters with SeT (see `attnbench models`)
    "mini": BackboneSize((2, 2, 10, 2), 64, (2, 4, 8, 16), 4.0, 0.1),
    "tiny": BackboneSize((2, 2, 6, 2), 96, (3, 6, 12, 24), 4.0, 0.2),  # Swin-T
    "small": BackboneSize((2, 2, 18, 2), 96, (3, 6, 12, 24), 4.0, 0.3),  # Swin-S
    "base": BackboneSize((2, 2, 18, 2), 128, (4, 8, 16, 32), 4.0, 0.5),  # Swin-B
}


class ChannelsLastNorm(nn.LayerNorm):
    """LayerNorm over the channels of a feature map (B, C, H, W)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Stem(nn.Sequential):
    """Two 3×3 stride-2 convolutions: (B, 3, H, W) -> (B, C, H/4, W/4)."""

    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__(nn.Conv2d(in_chans, dim // 2, 3, 2, 1), nn.GELU(),
                         nn.Conv2d(dim // 2, dim, 3, 2, 1), ChannelsLastNorm(dim))


class Downsample(nn.Sequential):
    """3×3 stride-2 convolution doubling the channels: (B, C, H, W) -> (B, 2C, H/2, W/2)."""

    def __init__(self, dim: int) -> None:
        super().__init__(nn.Conv2d(dim, 2 * dim, 3, 2, 1, bias=False), ChannelsLastNorm(2 * dim))


class Block(nn.Module):
    """Pre-norm transformer block with the mechanism as token mixer, on tokens (B, N, C)."""

    def __init__(self, dim: int, mixer: nn.Module, mlp_ratio: float, drop_path: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.mixer = mixer
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = StochasticDepth(drop_path, "row")  # identity at eval or p = 0

    def forward(self, x: Tensor, grid: tuple[int, int] | None) -> Tensor:
        x = x + self.drop_path(self.mixer(self.norm1(x), grid))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Stage(nn.Module):
    """``depth`` blocks on a feature map (B, C, H, W), tokens row-major in between."""

    def __init__(self, blocks: Sequence[Block], use_grid: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.use_grid = use_grid

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, H·W, C)
        grid = (h, w) if self.use_grid else None
        for block in self.blocks:
            tokens = block(tokens, grid)
        return tokens.transpose(1, 2).reshape(b, c, h, w)


def mixer_options(mechanism: str, options: Mapping[str, Any], index: int) -> dict[str, Any]:
    """The options of the ``index``-th block of a stage: shift alternates unless set by the user."""
    fields = {f.name for f in dataclasses.fields(get_mechanism(mechanism).Options)}
    if "shift" in fields and "shift" not in options:
        return {**options, "shift": index % 2 == 1}
    return dict(options)


class Backbone(nn.Module):
    """The SeTformer hierarchy with ``mechanism`` in every block, and a classification head."""

    def __init__(self, size: BackboneSize, mechanism: str, num_classes: int,
                 options: Mapping[str, Any] | None = None, drop_path: float | None = None,
                 use_grid: bool = True, in_chans: int = 3) -> None:
        super().__init__()
        options = dict(options or {})
        widths = size.widths()
        rate = size.drop_path if drop_path is None else drop_path
        total = sum(size.depths)
        rates = [rate * i / max(1, total - 1) for i in range(total)]  # linear 0 → rate over blocks
        self.mechanism, self.size, self.widths = mechanism, size, widths
        self.stem = Stem(in_chans, widths[0])
        self.stages = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        for i, (depth, width, heads) in enumerate(zip(size.depths, widths, size.heads, strict=True)):
            start = sum(size.depths[:i])
            mixers = [build_mechanism(mechanism, width, heads, **mixer_options(mechanism, options, j))
                      for j in range(depth)]
            blocks = [Block(width, mixer, size.mlp_ratio, rates[start + j]) for j, mixer in enumerate(mixers)]
            self.stages.append(Stage(blocks, use_grid))
            if i < 3:
                self.downsamples.append(Downsample(width))
        self.norm = nn.LayerNorm(widths[-1])
        self.head = nn.Linear(widths[-1], num_classes)
        self.apply(_init_weights)

    def forward_features(self, images: Tensor) -> list[Tensor]:
        """Feature maps of the four stages, (B, C_i, H/2^(i+1), W/2^(i+1)), for dense heads."""
        x = self.stem(images)
        maps = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            maps.append(x)
            if i < 3:
                x = self.downsamples[i](x)
        return maps

    def forward(self, images: Tensor) -> Tensor:
        """Class logits (B, classes) of images (B, 3, H, W)."""
        last = self.forward_features(images)[-1]  # (B, C_4, H/32, W/32)
        return self.head(self.norm(last.flatten(2).mean(-1)))

    def mechanisms(self) -> Iterator[Mechanism]:
        return (m for m in self.modules() if isinstance(m, Mechanism))


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, Mechanism):
        return  # visited too: its own parameters keep the mechanism's init; its Linears are below
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def build_backbone(size: str, mechanism: str, num_classes: int, options: Mapping[str, Any] | None = None,
                   drop_path: float | None = None, use_grid: bool = True) -> Backbone:
    """The named size with ``mechanism`` as token mixer; unknown names raise KeyError/OptionError."""
    if size not in SIZES:
        raise KeyError(f"unknown model size {size!r}; valid choices: {', '.join(SIZES)}")
    return Backbone(SIZES[size], mechanism, num_classes, options, drop_path, use_grid)


def add_backbone_arguments(group: Any) -> None:
    """The backbone's own option of ``attnbench run``, for the tasks built on it."""
    group.add_argument("--drop-path", type=float_in(0, 1, hi_open=True),
                       help="stochastic depth of the last block (default: the size's)")


def check_drop_path(drop_path: float | None) -> None:
    if drop_path is not None and not 0 <= drop_path < 1:
        raise TaskError(f"--drop-path must be in [0, 1), got {drop_path}")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- FLOPs, measured ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelFlops:
    """Forward FLOPs of one image (a multiply-add counts 2): counted, plus formulas where blind."""

    counted: int  # matmuls and convolutions FlopCounterMode saw
    substituted: int  # mechanisms' analytic matmul FLOPs where the counter cannot see (natten, xformers)
    attention_elementwise: int  # the mechanisms' analytic elementwise FLOPs (exp, Sinkhorn), all blocks

    @property
    def total(self) -> int:
        """Matmul and convolution FLOPs of the whole model (the figure papers report, ×2 for MACs)."""
        return self.counted + self.substituted


@contextmanager
def _stand_ins(model: Backbone, calls: list[tuple[Mechanism, int, int, Any]]) -> Iterator[None]:
    """Record each mechanism call's (batch, n, grid); replace those the counter cannot see."""
    hidden = [m for m in model.mechanisms() if not m.flops_countable]

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        x, grid = args[0], (args[1] if len(args) > 1 else kwargs.get("grid"))
        calls.append((module, x.shape[0], x.shape[1], grid))

    hooks = [m.register_forward_pre_hook(record, with_kwargs=True) for m in model.mechanisms()]
    for m in hidden:  # tokens pass through unmixed; the formula stands for the work
        m.forward = lambda x, grid=None: torch.zeros_like(x)
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        for m in hidden:
            del m.forward


@torch.no_grad()
def measure_flops(model: Backbone, img_size: int, in_chans: int = 3) -> ModelFlops:
    """Forward FLOPs of ``model`` on one ``img_size``² image, run once under FlopCounterMode."""
    calls: list[tuple[Mechanism, int, int, Any]] = []
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with _stand_ins(model, calls), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, in_chans, img_size, img_size, device=device))
    finally:
        model.train(was_training)
    substituted = sum(m.flops(b, n, g).matmul for m, b, n, g in calls if not m.flops_countable)
    elementwise = sum(m.flops(b, n, g).elementwise for m, b, n, g in calls)
    return ModelFlops(counter.get_total_flops(), substituted, elementwise)


def _measured(size: str, mechanism: str, num_classes: int, img_size: int) -> tuple[Backbone, ModelFlops]:
    """Count on the meta device (shapes only, instant); on the CPU for ops without a meta kernel."""
    try:
        with torch.device("meta"):
            model = build_backbone(size, mechanism, num_classes)
        return model, measure_flops(model, img_size)
    except (NotImplementedError, RuntimeError):
        torch.manual_seed(0)
        model = build_backbone(size, mechanism, num_classes)
        return model, measure_flops(model, img_size)


def model_table(sizes: Sequence[str], mechanisms: Sequence[str], img_size: int = 224,
                num_classes: int = 1000) -> list[dict[str, Any]]:
    """Parameters and forward FLOPs per (size, mechanism), each measured on a built model."""
    rows = []
    for size in sizes:
        for mech in mechanisms:
            row: dict[str, Any] = {"size": size, "mechanism": mech}
            try:
                model, flops = _measured(size, mech, num_classes, img_size)
            except Exception as exc:  # one mechanism that cannot run here must not hide the rest
                row.update(params=math.nan, gflops=math.nan, gmacs=math.nan, attn_elementwise_gflops=math.nan,
                           note=f"{type(exc).__name__}: {exc}".splitlines()[0])
            else:
                row.update(params=count_parameters(model), gflops=flops.total / 1e9,
                           gmacs=flops.total / 2e9, attn_elementwise_gflops=flops.attention_elementwise / 1e9,
                           note="formula for the mechanism's matmuls" if flops.substituted else "")
            rows.append(row)
    return rows
