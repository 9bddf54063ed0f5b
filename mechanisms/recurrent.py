"""What the five gated linear recurrences share (``retnet``, ``gla``, ``gated_deltanet``, ``mamba2``,
``based``): their options, both directions, the choice of kernel, and the layer pieces
flash-linear-attention's layers build them from (short convolution, gated RMSNorm). A module of
shared helpers; it registers no mechanism.

A mechanism here is three steps: ``project`` (token-wise linear maps, order-free), ``scan`` (what
depends on the order: short convolutions, positions, the recurrence, the gated norm) and
``o_proj``. Causal by nature, ``mix_causal`` is ``o_proj(scan(project(x)))``. The plain
(non-causal) call follows ``direction``:

- ``bidirectional`` (default): Vision Mamba's combination (Zhu et al., 2024, "Vim", its bimamba v2
  with divided output): the projections are computed once, the scan runs over the tokens in order
  and over the tokens reversed (a 2-D grid flattened row-major: raster order and its reverse), the
  reversed outputs are flipped back, and the mean of the two goes through the output projection.
  Unlike Vim, the two directions share every weight (Vim gives the backward scan its own
  convolution and selection parameters): the bidirectional form has exactly the parameters of the
  causal one, so LRA's parameter rule holds for both and a causal task carries no unused weights.
  The identity it obeys: ``mix(x) = ½ (mix_causal(x) + flip(mix_causal(flip(x))))``.
- ``causal``: the plain call runs the causal recurrence (one direction, left to right).

``bidirectional`` is the default because only the non-causal tasks (imagenet, coco, ade20k, glue,
listops, seqimage, bidirectional MQAR) make the plain call; causal tasks call ``forward(causal=True)``,
which runs ``mix_causal`` whatever ``direction`` says.

Kernels (``kernel`` option): ``auto`` runs flash-linear-attention's chunked Triton kernel where it
can (a CUDA GPU, float32/16/bfloat16, fla-core installed and importable), else the chunked PyTorch
form of ``mechanisms.chunked``; ``fla`` requires fla's kernel (a one-line error naming why not);
``torch`` always runs the PyTorch form. Projections, convolutions and norms are PyTorch on both.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnbench.mechanism import Grid, Mechanism, option, require
from mechanisms import fla_kernels

Direction = Literal["bidirectional", "causal"]
Kernel = Literal["auto", "fla", "torch"]


@dataclasses.dataclass(frozen=True)
class RecurrentOptions:
    # the plain (non-causal) call: both directions, Vim's mean of a forward and a reversed scan, or
    # the causal scan alone; forward(causal=True) is always the causal scan
    direction: Direction = "bidirectional"
    chunk: int = option(64, 1, 4096)  # tokens per chunk of the PyTorch form (fla's kernels use their own)
    kernel: Kernel = "auto"  # auto: fla's Triton kernel where it runs, else PyTorch; fla; torch


def expanded(dim: int, ratio: float, num_heads: int, name: str, what: str) -> int:
    """``dim * ratio`` channels, checked to be a whole number divisible by ``num_heads``."""
    width = dim * ratio
    require(abs(width - round(width)) < 1e-9 and round(width) > 0,
            f"{name}: {what}={ratio:g} gives {width:g} channels for dim={dim}; it must give a positive "
            "whole number")
    require(round(width) % num_heads == 0,
            f"{name}: {what}={ratio:g} gives {round(width)} channels, not divisible by num_heads={num_heads}")
    return round(width)


class ShortConv(nn.Module):
    """Causal depthwise convolution of ``size`` taps over the tokens, then SiLU (as fla's
    ShortConvolution): (B, N, D) -> (B, N, D); token t sees t-size+1..t."""

    def __init__(self, channels: int, size: int, bias: bool = False) -> None:
        super().__init__()
        self.size = size
        self.conv = nn.Conv1d(channels, channels, size, groups=channels, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        x = F.pad(x.transpose(1, 2), (self.size - 1, 0))  # (B, D, size-1 + N): zeros before the start
        return F.silu(self.conv(x)).transpose(1, 2)


class GatedRMSNorm(nn.Module):
    """RMSNorm over the last ``width`` channels with a learned scale, times SiLU(gate): fla's
    FusedRMSNormGated (norm before the gate; per head when given (..., H, d)); computed in at least
    float32, as fla's kernel does (a half-precision 1/√mean overflows in the backward pass)."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: Tensor, gate: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps, gate)


def rms_norm(x: Tensor, weight: Tensor, eps: float, gate: Tensor | None = None) -> Tensor:
    """x / √(mean(x²) + eps) · weight over the last axis (times SiLU(gate) when given), in at least
    float32, returned in x's dtype."""
    work = torch.promote_types(x.dtype, torch.float32)
    y = x.to(work) * torch.rsqrt(x.to(work).square().mean(-1, keepdim=True) + eps) * weight.to(work)
    return (y if gate is None else y * F.silu(gate.to(work))).to(x.dtype)


def l2_normalize(x: Tensor, eps: float = 1e-6) -> Tensor:
    """x / sqrt(‖x‖² + eps) over the last axis (fla's l2norm), in at least float32."""
    work = torch.promote_types(x.dtype, torch.float32)
    return (x.to(work) * torch.rsqrt(x.to(work).square().sum(-1, keepdim=True) + eps)).to(x.dtype)


def inverse_softplus(x: Tensor) -> Tensor:
    """y with softplus(y) = x, for x > 0."""
    return x + torch.log(-torch.expm1(-x))


def mamba_time_steps(count: int, low: float = 1e-3, high: float = 0.1, floor: float = 1e-4) -> Tensor:
    """Mamba's time-step bias init: softplus(bias) log-uniform in [low, high], at least ``floor``."""
    steps = torch.exp(torch.rand(count) * (torch.log(torch.tensor(high)) - torch.log(torch.tensor(low)))
                      + torch.log(torch.tensor(low)))
    return inverse_softplus(steps.clamp(min=floor))


class RecurrentMixer(Mechanism):
    """Base of the gated linear recurrences: subclasses write ``project``, ``scan`` and ``o_proj``."""

    Options = RecurrentOptions
    complexity = "linear"
    masking = "per-length"  # padded batches run each group of equal lengths without padding
    no_causal_reason = ""
    # fla's kernel (a key of mechanisms.fla_kernels.KERNELS) and the PyTorch form, for `backend`
    fla_kernel: ClassVar[str]
    torch_form: ClassVar[str]

    def __init__(self, dim: int, num_heads: int, options: Any = None) -> None:
        super().__init__(dim, num_heads, options)
        for field in ("direction", "kernel"):
            valid = typing.get_args(typing.get_type_hints(type(self.options))[field])
            value = getattr(self.options, field)
            require(value in valid, f"{self.name}.{field}={value!r}; valid choices: {', '.join(valid)}")

    # ---- the three steps, written by each mechanism ------------------------------------------
    def project(self, x: Tensor) -> tuple[Tensor, ...]:
        """Token-wise maps of x (B, N, C): tensors (B, N, ·) that ``scan`` takes."""
        raise NotImplementedError

    def scan(self, *projected: Tensor) -> Tensor:
        """The order-dependent part, causal in the token order given: (B, N, ·)… -> (B, N, value width)."""
        raise NotImplementedError

    o_proj: nn.Linear

    # ---- both directions ------------------------------------------------------------------------
    def mix_causal(self, x: Tensor) -> Tensor:
        return self.o_proj(self.scan(*self.project(x)))

    def mix(self, x: Tensor, grid: Grid | None) -> Tensor:
        """``direction=causal``: the causal scan; ``bidirectional``: Vim's mean of the scan in token
        order and the scan over the reversed tokens (flipped back), before the output projection."""
        projected = self.project(x)
        if self.options.direction == "causal":
            return self.o_proj(self.scan(*projected))
        b = x.shape[0]
        both = self.scan(*(torch.cat([p, p.flip(1)]) for p in projected))  # (2B, N, ·): in order, reversed
        return self.o_proj((both[:b] + both[b:].flip(1)) / 2)

    def scans(self, causal: bool = False) -> int:
        """How many scans a call runs (2 for a bidirectional plain call, 1 for a causal one): for the
        FLOP formulas."""
        return 1 if causal or self.options.direction == "causal" else 2

    # ---- kernels ----------------------------------------------------------------------------
    def fla_limit(self) -> str | None:
        """Why fla's kernel cannot take this mechanism's settings (None: it can)."""
        return None

    def use_fla(self, x: Tensor) -> bool:
        """Whether this call runs fla's kernel (``kernel`` option); ``fla`` that cannot run is an error."""
        if self.options.kernel == "torch":
            return False
        why = self.fla_limit() or fla_kernels.fla_problem(self.fla_kernel, x.device, x.dtype)
        if why is not None and self.options.kernel == "fla":
            raise ValueError(f"{self.name}: kernel='fla' cannot run here: {why} "
                             "(use kernel='auto' or 'torch')")
        return why is None

    @classmethod
    def backend(cls, device: str = "cpu", dtype: torch.dtype = torch.float32) -> str:
        """fla's kernel where it runs (kernel=auto), else the chunked PyTorch form and why not fla."""
        why = fla_kernels.fla_problem(cls.fla_kernel, device, dtype)
        if why is None:
            return f"{fla_kernels.describe(cls.fla_kernel)} (projections, convolutions and norms in PyTorch)"
        form = f"chunked PyTorch ({cls.torch_form}; chunks of `chunk` tokens)"
        if torch.device(device).type == "cuda":
            return f"{form}; fla's kernel not used: {why}"
        static = fla_kernels.static_problem()  # what a CUDA machine with this install would also hit
        return f"{form}; on CUDA too: {static}" if static else form
