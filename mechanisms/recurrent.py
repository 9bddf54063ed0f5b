"""What the five gated linear recurrences share (``retnet``, ``gla``, ``gated_deltanet``, ``mamba2``,
``based``): their options, both directions, the choice of kernel, and the layer pieces
flash-linear-attention's layers build them from (short convolution, gated RMSNorm). A module of
shared helpers; it registers no mechanism.

A mechanism here is three steps: ``project`` (token-wise linear maps, order-free), ``scan`` (what
depends on the order) and ``o_proj``. Causal by nature, ``mix_causal`` is ``o_proj(scan(project(x)))``.
The scan is written once, here, from a mechanism's pieces: its short convolutions (``short_convs``,
causal, SiLU after), ``inputs`` (token-wise: positions, gates, feature maps -> the ``Recurrence``'s
q, k, v, log-decays g and delta-rule β), the recurrence itself (fla's kernel or the chunked PyTorch
form) and ``read_out`` (token-wise: norms, gates, skips, normalisers). The plain (non-causal) call
follows ``direction``:

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

Decoding (``prefill``, ``step``): the cache holds, per sequence, each head's state S (dk × dv, in at
least float32: it sums the whole context) and the last taps − 1 inputs of each short convolution,
a fixed size whatever the context. ``prefill`` runs the causal scan whatever ``direction`` says
(decoding is causal), on the kernel the forward runs, and keeps the state after the prompt (fla's
kernels and the chunked form return it; a right-padded batch: each group of equally long prompts on
its real tokens alone); ``step`` convolves the new token with the kept
inputs and advances the state by one recurrence step, in place, in PyTorch on every device.

Kernels (``kernel`` option): ``auto`` runs flash-linear-attention's chunked Triton kernel where it
can (a CUDA GPU, float32/16/bfloat16, fla-core installed and importable), else the chunked PyTorch
form of ``mechanisms.chunked``; ``fla`` requires fla's kernel (a one-line error naming why not);
``torch`` always runs the PyTorch form. Projections, convolutions and norms are PyTorch on both.

``QKVMixer``: the layer around the recurrence that fla's retention, GLA and gated DeltaNet share (q,
k, v and output-gate projections, short convolutions, per-head gated RMSNorm, output projection), so
that their files hold only their decays, inputs and kernels.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnbench.decoding import StateCache, check_token, prompt_lengths
from attnbench.mechanism import Flops, Grid, Mechanism, option, require
from mechanisms import chunked, fla_kernels

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
        return causal_conv(self.conv, x)


def causal_conv(conv: nn.Conv1d, x: Tensor) -> Tensor:
    """SiLU of the depthwise ``conv`` over the tokens of x (B, N, D), zeros before the start: token t
    sees t−taps+1..t. (B, N, D)."""
    x = F.pad(x.transpose(1, 2), (conv.kernel_size[0] - 1, 0))  # (B, D, taps-1 + N)
    return F.silu(conv(x)).transpose(1, 2)


def conv_tail(x: Tensor, taps: int) -> Tensor:
    """The last ``taps − 1`` tokens of x (B, N, D), zeros before the start: what the next token's
    convolution reads besides itself. (B, taps − 1, D)."""
    return F.pad(x, (0, 0, taps - 1, 0))[:, x.shape[1]:]


def conv_step(conv: nn.Conv1d, x: Tensor, tail: Tensor) -> Tensor:
    """``causal_conv`` for one new token x (B, 1, D) after the ``tail`` (B, taps − 1, D) of the tokens
    before it, which then moves on by one token, in place. (B, 1, D)."""
    window = torch.cat([tail, x], 1)  # (B, taps, D), oldest first, as the convolution's taps
    y = torch.einsum("btd,dt->bd", window, conv.weight[:, 0])
    if conv.bias is not None:
        y = y + conv.bias
    tail.copy_(window[:, 1:])
    return F.silu(y).unsqueeze(1)


@dataclasses.dataclass
class Recurrence:
    """What one scan feeds the state, heads last as fla's kernels take them: q, k (B, N, H, dk),
    v (B, N, H, dv); g: log-decays (≤ 0), None, (B, N, H) per head or (B, N, H, dk) per key channel;
    beta (B, N, H): the delta rule's writing strength (None: the decay form); o_t = S_tᵀ(scale·q_t)."""

    q: Tensor
    k: Tensor
    v: Tensor
    g: Tensor | None = None
    beta: Tensor | None = None
    scale: float = 1.0

    def tensors(self) -> tuple[Tensor | None, ...]:
        return self.q, self.k, self.v, self.g, self.beta

    def heads_first(self) -> tuple[Tensor | None, ...]:
        """q, k, v, g, beta as (B, H, N, ·) views, as the chunked PyTorch form takes them."""
        return tuple(None if x is None else x.transpose(1, 2) for x in self.tensors())

    def token(self, t: int) -> tuple[Tensor | None, ...]:
        """Token t of q, k, v, g, beta, (B, H, ·)."""
        return tuple(None if x is None else x[:, t] for x in self.tensors())


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
    """Base of the gated linear recurrences: subclasses write ``project``, ``short_convs``, ``inputs``,
    ``read_out``, ``state_size``, ``fla_recur`` and ``o_proj``; the scan, both directions and
    decoding are written here once."""

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

    # ---- the pieces, written by each mechanism -----------------------------------------------
    # names of what ``project`` returns, in order (the short convolutions' tails are named after them)
    projections: ClassVar[tuple[str, ...]]
    o_proj: nn.Linear

    def project(self, x: Tensor) -> tuple[Tensor, ...]:
        """Token-wise maps of x (B, N, C): tensors (B, N, ·) that ``scan`` takes."""
        raise NotImplementedError

    def short_convs(self) -> dict[str, nn.Conv1d]:
        """The causal depthwise convolutions (SiLU after) on projections, by the projection's name."""
        return {}

    def inputs(self, *convolved: Tensor, start: int | Tensor = 0) -> tuple[Recurrence, tuple[Tensor, ...]]:
        """Token-wise: the projections after their convolutions (B, N, ·) -> the recurrence's inputs
        and what ``read_out`` needs besides its output. ``start``: the position of the first token
        (an int, or (B,) per sequence), for mechanisms with positions."""
        raise NotImplementedError

    def read_out(self, o: Tensor, *rest: Tensor) -> Tensor:
        """Token-wise: the recurrence's output o (B, N, H, dv) -> (B, N, value width), before ``o_proj``."""
        raise NotImplementedError

    def state_size(self) -> tuple[int, int]:
        """(dk, dv) of each head's state."""
        raise NotImplementedError

    def fla_recur(self, rec: Recurrence, final_state: bool) -> tuple[Tensor, Tensor | None]:
        """fla's kernel on ``rec``: o (B, N, H, dv) and, with ``final_state``, S_N (B, H, dk, dv)."""
        raise NotImplementedError

    def chunked_options(self) -> dict[str, int]:
        """The chunk sizes the PyTorch form takes."""
        return {"chunk": self.options.chunk}

    def split_heads(self, x: Tensor) -> Tensor:
        """(B, N, H·d) -> (B, N, H, d), a view."""
        return x.unflatten(-1, (self.num_heads, -1))

    # ---- the scan ---------------------------------------------------------------------------------
    def convolve(self, projected: tuple[Tensor, ...]) -> list[Tensor]:
        """Each projection through its short convolution, if it has one."""
        convs = self.short_convs()
        return [causal_conv(convs[name], p) if name in convs else p
                for name, p in zip(self.projections, projected, strict=True)]

    def recur(self, rec: Recurrence, final_state: bool = False) -> tuple[Tensor, Tensor | None]:
        """The recurrence over all tokens, fla's kernel or the chunked PyTorch form: o (B, N, H, dv)
        and, with ``final_state``, the state after the last token (B, H, dk, dv)."""
        if self.use_fla(rec.q):
            return self.fla_recur(rec, final_state)
        q, k, v, g, beta = rec.heads_first()
        if beta is None:
            done = chunked.decay_attention(q, k, v, g, scale=rec.scale, final_state=final_state,
                                           **self.chunked_options())
        else:
            done = chunked.delta_rule(q, k, v, beta, g, scale=rec.scale, final_state=final_state,
                                      **self.chunked_options())
        o, state = done if final_state else (done, None)
        return o.transpose(1, 2), state

    def scan(self, *projected: Tensor) -> Tensor:
        """The order-dependent part, causal in the token order given: (B, N, ·)… -> (B, N, value width)."""
        rec, rest = self.inputs(*self.convolve(projected))
        return self.read_out(self.recur(rec)[0], *rest)

    def scan_to_state(self, *convolved: Tensor) -> tuple[Tensor, Tensor]:
        """``scan`` after the convolutions, and the state after the last token (B, H, dk, dv)."""
        rec, rest = self.inputs(*convolved)
        o, state = self.recur(rec, final_state=True)
        return self.read_out(o, *rest), state

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

    # ---- incremental decoding: the state, and the tails of the short convolutions ----------------
    def prefill(self, x: Tensor, capacity: int, mask: Tensor | None = None,
                outputs: bool = True) -> tuple[Tensor | None, StateCache]:
        """The causal scan over the prompt (whatever ``direction`` says) and the cache: each head's
        state after the prompt and the last inputs of each short convolution. A right-padded batch
        runs each group of equally long prompts on their real tokens alone."""
        lengths = prompt_lengths(self, x, capacity, mask)
        cache = self.empty_cache(x, lengths)
        out = x.new_zeros(x.shape) if outputs else None
        for length in sorted(set(lengths)):
            if len(set(lengths)) == 1:
                rows: slice | Tensor = slice(None)
            else:
                rows = torch.tensor([r for r, n in enumerate(lengths) if n == length], device=x.device)
            mixed = self._prefill_rows(x[rows, :length], cache, rows)  # right padding: the real tokens
            if outputs:
                out[rows, :length] = self.o_proj(mixed)
        return out, cache

    def _prefill_rows(self, x: Tensor, cache: StateCache, rows: slice | Tensor) -> Tensor:
        """Prompts ``x`` (R, L, C) without padding into the cache's ``rows``; their scan (R, L, ·)."""
        projected = self.project(x)
        named = dict(zip(self.projections, projected, strict=True))
        for name, conv in self.short_convs().items():
            cache[f"{name}_tail"][rows] = conv_tail(named[name], conv.kernel_size[0])
        mixed, state = self.scan_to_state(*self.convolve(projected))
        cache["state"][rows] = state
        return mixed

    def empty_cache(self, x: Tensor, lengths: list[int]) -> StateCache:
        """Zeros: each head's state (B, H, dk, dv) in at least float32 (its sums run over the whole
        context), and the tail (B, taps − 1, D) of each short convolution in x's dtype."""
        b = x.shape[0]
        work = torch.promote_types(x.dtype, torch.float32)
        tensors = {"state": x.new_zeros(b, self.num_heads, *self.state_size(), dtype=work)}
        for name, conv in self.short_convs().items():
            tensors[f"{name}_tail"] = x.new_zeros(b, conv.kernel_size[0] - 1, conv.in_channels)
        return StateCache(lengths, **tensors)

    def step(self, x: Tensor, cache: StateCache) -> Tensor:
        """One token: its projections, each convolution over its tail, one recurrence step of the
        state in place; O(H·dk·dv) whatever the context."""
        check_token(self, x, cache)
        convs = self.short_convs()
        convolved = [conv_step(convs[name], p, cache[f"{name}_tail"]) if name in convs else p
                     for name, p in zip(self.projections, self.project(x), strict=True)]
        rec, rest = self.inputs(*convolved, start=cache.positions.device_lengths)
        o = chunked.recurrence_step(cache["state"], *rec.token(0), scale=rec.scale)  # (B, H, dv)
        cache.positions.advance()
        return self.o_proj(self.read_out(o.unsqueeze(1), *rest))

    def cache_bytes(self, batch: int, n: int, dtype: torch.dtype) -> int:
        """B·H·dk·dv state elements in at least float32, and B·(taps − 1)·D per short convolution in
        ``dtype``, whatever n."""
        dk, dv = self.state_size()
        state = self.num_heads * dk * dv * torch.promote_types(dtype, torch.float32).itemsize
        tails = sum((conv.kernel_size[0] - 1) * conv.in_channels for conv in self.short_convs().values())
        return batch * (state + tails * dtype.itemsize)

    def call_flops(self, batch: int, n: int, causal: bool, scan: tuple[int, int], weights: int,
                   convolved: int = 0, per_token: int = 0) -> Flops:
        """A call's FLOPs from its parts: 2·B·N·``weights`` for the token-wise projections, then per
        scan (2 for a bidirectional plain call, 1 for a causal one) 2·B·N·``convolved`` for the short
        convolutions (taps × channels), B·H times the chunked recurrence's ``scan`` (matmul,
        elementwise) and B·N·``per_token`` elementwise (norms, gates, feature maps)."""
        scans = 1 if causal or self.options.direction == "causal" else 2
        matmul, elementwise = scan
        return Flops(matmul=2 * batch * n * weights + scans * (2 * batch * n * convolved
                                                               + batch * self.num_heads * matmul),
                     elementwise=scans * (batch * self.num_heads * elementwise + batch * n * per_token))

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


class QKVMixer(RecurrentMixer):
    """The layer fla's retention, GLA and gated DeltaNet share: q, k (C·expand_k channels), v and an
    output gate (C·expand_v) projected from x, short convolutions on q, k and v when ``conv`` > 0, and
    out = W_o [RMSNorm_head(o) ⊙ SiLU(x W_g)]. A subclass adds its decay (its own layers after these),
    ``project``, ``inputs`` and fla's kernel; its options hold expand_k, expand_v, conv and eps."""

    def __init__(self, dim: int, num_heads: int, options: Any = None) -> None:
        super().__init__(dim, num_heads, options)
        o = self.options
        self.key_dim = expanded(dim, o.expand_k, num_heads, self.name, "expand_k")
        self.value_dim = expanded(dim, o.expand_v, num_heads, self.name, "expand_v")
        self.dk, self.dv = self.key_dim // num_heads, self.value_dim // num_heads
        self.q_proj = nn.Linear(dim, self.key_dim, bias=False)
        self.k_proj = nn.Linear(dim, self.key_dim, bias=False)
        self.v_proj = nn.Linear(dim, self.value_dim, bias=False)
        self.g_proj = nn.Linear(dim, self.value_dim, bias=False)  # the output gate
        widths = (self.key_dim, self.key_dim, self.value_dim)
        self.convs = nn.ModuleList(ShortConv(width, o.conv) for width in widths) if o.conv else None
        self.norm = GatedRMSNorm(self.dv, o.eps)
        self.o_proj = nn.Linear(self.value_dim, dim, bias=False)

    def short_convs(self) -> dict[str, nn.Conv1d]:
        return {} if self.convs is None else {name: c.conv for name, c in zip("qkv", self.convs, strict=True)}

    def read_out(self, o: Tensor, gate: Tensor) -> Tensor:
        return self.norm(o, self.split_heads(gate)).flatten(2)

    def state_size(self) -> tuple[int, int]:
        return self.dk, self.dv
