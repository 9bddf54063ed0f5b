"""Neighbourhood attention (NAT, Hassani et al., 2023; dilated: DiNAT, 2022) through ``natten``.

Each query attends to the ``kernel`` nearest keys per axis (spaced ``dilation`` apart), the
window centred on the query except at the borders, where it is shifted inward so that every
query sees exactly kernel^d keys. Sequences use ``natten.na1d``, grids ``natten.na2d``.

Design choices, each a line:

* No relative position bias: natten 0.21's ``na1d``/``na2d`` take no ``rpb`` (earlier natten
  had one), so this is NA without it.
* Small inputs (natten needs kernel·dilation <= size along every axis): per axis, dilation is
  lowered to ⌊size / kernel⌋ (at least 1), then the kernel is clamped to the axis length, where
  attention along that axis becomes global; axes of length 1 are dropped.
* natten's only CPU backend is PyTorch's Flex Attention run eagerly: unfused, it materialises
  the dense N×N scores (memory O(N²)); it runs float32/16 and bfloat16 only, so float64 is
  attended in float32 and cast back; and PyTorch has no Flex backward on the CPU. When
  gradients are needed on the CPU, the same neighbourhoods run as a dense masked
  ``scaled_dot_product_attention`` instead (also O(N²) memory, any float dtype).
* Causal (sequences): natten's causal neighbourhoods (``na1d(is_causal=True)``): query i sees
  itself and the kernel − 1 keys before it in its dilation group (fewer near the start; the window
  is not shifted into the future). The small-input clamping above depends on N, as it does
  without causal. A kernel as long as the sequence is plain causal attention, which natten hands
  to its FMHA, whose Flex backend has no causal mask: that case runs as causal SDPA instead.
* Decoding keeps the last (kernel − 1)·dilation + 1 keys and values in a ring: a new token's
  neighbours are itself and the kernel − 1 before it in its dilation group. It is the causal form
  of every sequence that reaches kernel·dilation tokens (always, with dilation 1): below that the
  forward lowers the dilation, which a token cannot know before the sequence ends.
* Head dims: natten's Flex backend (the CPU's only path without gradients) takes a power of two
  from 8 to 512, so any other head dim is refused when the mechanism is built, on every device:
  a model that trains (masked SDPA) must also evaluate.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnbench.decoding import WindowCache, check_token, prompt_lengths, zero_padding
from attnbench.mechanism import Flops, Grid, Mechanism, option, projection_flops, require
from attnbench.registry import register_mechanism

try:
    import natten
    from natten.backends import choose_backend
    from natten.backends.configs.checks import can_run_flex_attention
except Exception as exc:  # a broken install must not take the registry down
    natten = None
    _IMPORT_ERROR: str | None = f"natten cannot be imported ({type(exc).__name__}: {exc})"
else:
    _IMPORT_ERROR = None

# What runs behind each natten backend name.
_BACKENDS = {
    "flex-fna": "eager Flex Attention, unfused: dense N×N scores, memory O(N²)",
    "cutlass-fna": "fused CUTLASS kernel",
    "hopper-fna": "fused Hopper kernel",
    "blackwell-fna": "fused Blackwell kernel",
}
_CPU_GRAD = "; with autograd: dense masked SDPA (no Flex backward on CPU)"
HEAD_DIMS = tuple(2**k for k in range(3, 10))  # 8 … 512: what natten's Flex backend runs


@dataclasses.dataclass(frozen=True)
class NATOptions:
    kernel: int = option(7, 3, 127)  # neighbourhood size per axis (odd)
    dilation: int = option(1, 1, 64)  # spacing between neighbours (DiNAT); 1 is plain NAT
    qkv_bias: bool = True  # bias on the query/key/value projection

    def __post_init__(self) -> None:
        require(isinstance(self.kernel, int) and not isinstance(self.kernel, bool)
                and self.kernel >= 3 and self.kernel % 2 == 1,
                f"nat.kernel must be an odd int >= 3, got {self.kernel!r}")
        require(isinstance(self.qkv_bias, bool), f"nat.qkv_bias must be True or False, got {self.qkv_bias!r}")


def neighbourhood_mask(size: int, kernel: int, dilation: int, device: torch.device,
                       causal: bool = False) -> Tensor:
    """(size, size) bool along one axis: is key j one of query i's ``kernel`` neighbours?

    Neighbours share i's dilation group (position mod dilation); within the group the window
    is centred on i and shifted inward at the borders, as natten does; ``causal``: the window
    ends at i (the ``kernel`` ranks up to i's, fewer at the start), as natten's is_causal does.
    """
    pos = torch.arange(size, device=device)
    group, rank = pos % dilation, pos // dilation  # dilation group, and place within it
    if causal:
        start = rank - kernel + 1  # (size,): may be negative at the start of a group
        inside = (rank[None, :] >= start[:, None]) & (rank[None, :] <= rank[:, None])
    else:
        group_size = (size - 1 - group) // dilation + 1
        start = torch.minimum((rank - kernel // 2).clamp(min=0), group_size - kernel)  # (size,)
        inside = (rank[None, :] >= start[:, None]) & (rank[None, :] < start[:, None] + kernel)
    return inside & (group[:, None] == group[None, :])


def causal_pairs(size: int, kernel: int, dilation: int) -> int:
    """Query-key pairs of the causal neighbourhoods along one axis: Σ min(rank + 1, kernel)."""
    total = 0
    for group in range(min(dilation, size)):
        g = (size - 1 - group) // dilation + 1  # tokens in this dilation group
        full = max(0, g - kernel)  # ranks that see a whole kernel
        total += full * kernel + (g - full) * (g - full + 1) // 2
    return total


@register_mechanism
class NeighbourhoodAttention(Mechanism):
    name = "nat"
    summary = "neighbourhood attention (NAT/DiNAT) via natten na1d/na2d; head dims 8-512, powers of two"
    Options = NATOptions
    complexity = "local"
    dtypes = (torch.float32, torch.float16, torch.bfloat16)  # what natten runs natively
    flops_formula = ("8·B·N·C² (projections) + 4·B·N·K·C (QKᵀ, AV over K = kernel^d neighbours); "
                     "elementwise 5·B·H·N·K; causal: the pairs of the causal neighbourhoods instead of "
                     "N·K (min(rank + 1, kernel) keys per query)")
    # FlopCounterMode cannot see natten's fused CUDA kernels, and the CPU Flex path fails inside
    # it (torch 2.14) or would count the dense N² product: the formula above is the count.
    flops_countable = False

    def __init__(self, dim: int, num_heads: int, options: NATOptions | None = None) -> None:
        super().__init__(dim, num_heads, options)
        require(self.head_dim in HEAD_DIMS,
                f"nat: head dim {self.head_dim} (dim {dim} / {num_heads} heads) cannot run in every mode "
                f"(natten's inference path on the CPU needs a power of two); valid head dims: "
                f"{', '.join(map(str, HEAD_DIMS))}")
        self.qkv = nn.Linear(dim, 3 * dim, bias=self.options.qkv_bias)
        self.proj = nn.Linear(dim, dim)

    @classmethod
    def unavailable_reason(cls, device: str = "cpu") -> str | None:
        if _IMPORT_ERROR is not None:
            return _IMPORT_ERROR
        reason = super().unavailable_reason(device)
        if reason is None:
            try:
                cls._choose(device, torch.float32)
            except NotImplementedError as exc:
                return f"natten has no backend here: {exc}"
        return reason

    @staticmethod
    def _choose(device: str, dtype: torch.dtype) -> str:
        """The backend natten picks for a (1, 16, 2, 32) neighbourhood problem of this dtype."""
        probe = torch.zeros(1, 16, 2, 32, device=device, dtype=dtype)  # (B, N, heads, d)
        return choose_backend(probe, probe, probe, torch_compile=False)

    @classmethod
    def backend(cls, device: str = "cpu", dtype: torch.dtype = torch.float32) -> str:
        """natten's backend choice for ``device`` and what it means for speed and memory."""
        reason = cls.unavailable_reason(device)
        if reason:
            return f"natten: {reason}"
        choice = cls._choose(device, torch.float32 if dtype == torch.float64 else dtype)
        note = f"natten {natten.__version__} {choice}: {_BACKENDS.get(choice, 'see natten docs')}"
        if dtype == torch.float64:
            note += "; float64 runs in float32"
        return note + (_CPU_GRAD if torch.device(device).type == "cpu" else "")

    def layout(self, grid: Grid | None, n: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """Token layout without length-1 axes, and the kernel and dilation per axis, clamped."""
        shape = tuple(s for s in (grid if grid is not None else (n,)) if s > 1)
        kernel = tuple(min(self.options.kernel, s) for s in shape)
        dilation = tuple(max(1, min(self.options.dilation, s // self.options.kernel)) for s in shape)
        return shape, kernel, dilation

    def mix(self, x: Tensor, grid: Grid | None) -> Tensor:
        return self._attention(x, grid, causal=False)

    def mix_causal(self, x: Tensor) -> Tensor:
        return self._attention(x, None, causal=True)

    def _attention(self, x: Tensor, grid: Grid | None, causal: bool) -> Tensor:
        b, n, c = x.shape
        shape, kernel, dilation = self.layout(grid, n)
        qkv = self.qkv(x).view(b, *shape, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(-3)  # each (B, *shape, H, d): natten's heads-last layout
        if not shape:
            out = v  # a single token attends to itself alone
        elif causal and kernel == shape:  # the whole prefix: causal attention (see the notes)
            heads_first = [t.transpose(1, 2) for t in (q, k, v)]  # (B, H, N, d)
            out = F.scaled_dot_product_attention(*heads_first, is_causal=True).transpose(1, 2)
        elif q.requires_grad and q.device.type == "cpu":
            out = self.masked_attention(q, k, v, kernel, dilation, causal)
        else:
            out = self.natten_attention(q, k, v, kernel, dilation, causal)
        return self.proj(out.reshape(b, n, c))

    def natten_attention(self, q: Tensor, k: Tensor, v: Tensor, kernel: tuple[int, ...],
                         dilation: tuple[int, ...], causal: bool = False) -> Tensor:
        """natten.na1d / na2d on (B, *shape, H, d); float64 goes through float32."""
        dtype = q.dtype
        work = torch.float32 if dtype == torch.float64 else dtype
        q, k, v = q.to(work), k.to(work), v.to(work)
        na = natten.na1d if len(kernel) == 1 else natten.na2d
        with warnings.catch_warnings():  # the unfused-Flex warning: backend() records that instead
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            warnings.filterwarnings("ignore", message="return_lse is deprecated")
            try:
                out = na(q, k, v, kernel_size=kernel, dilation=dilation, is_causal=causal)
            except NotImplementedError as exc:  # natten only says "no suitable backend"
                can_run_flex_attention(q, k, v, torch_compile=False, raise_error=True)  # raises the why
                raise ValueError(f"{self.name}: natten cannot run this input: {exc}") from exc
        return out.to(dtype)

    @staticmethod
    def masked_attention(q: Tensor, k: Tensor, v: Tensor, kernel: tuple[int, ...],
                         dilation: tuple[int, ...], causal: bool = False) -> Tensor:
        """The same neighbourhoods as dense masked SDPA, for autograd on the CPU."""
        b, *shape, h, d = q.shape
        axes = zip(shape, kernel, dilation, strict=True)
        masks = [neighbourhood_mask(size, kk, dd, q.device, causal) for size, kk, dd in axes]  # (size, size)
        mask = masks[0] if len(masks) == 1 else (masks[0][:, None, :, None] & masks[1][None, :, None, :])
        mask = mask.reshape(math.prod(shape), math.prod(shape))  # (N, N)
        q, k, v = (t.reshape(b, -1, h, d).transpose(1, 2) for t in (q, k, v))  # (B, H, N, d)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2)  # (B, N, H, d)

    def flops(self, batch: int, n: int, grid: Grid | None = None, causal: bool = False) -> Flops:
        shape, kernel, dilation = self.layout(grid, n)
        if causal and shape:  # a sequence: one axis
            window = batch * causal_pairs(shape[0], kernel[0], dilation[0])
        else:
            window = batch * n * math.prod(kernel)  # per head: query-neighbour pairs
        return Flops(matmul=projection_flops(batch, n, self.dim, 4) + 4 * window * self.dim,
                     elementwise=5 * self.num_heads * window)

    # ---- incremental decoding: a rolling window of the last (kernel − 1)·dilation + 1 tokens ----
    def window(self) -> int:
        """Tokens the cache keeps: the oldest neighbour a new token has is (kernel − 1)·dilation back."""
        return (self.options.kernel - 1) * self.options.dilation + 1

    def prefill(self, x: Tensor, capacity: int, mask: Tensor | None = None,
                outputs: bool = True) -> tuple[Tensor | None, WindowCache]:
        """The causal neighbourhoods of ``kernel`` and ``dilation`` as given (the causal form's, for
        prompts of kernel·dilation tokens or more, or any prompt when dilation = 1: shorter ones the
        forward attends with a lowered dilation), and the window after each sequence's real tokens."""
        lengths = prompt_lengths(self, x, capacity, mask)
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).unbind(2)  # (B, N, H, d) each
        out = None
        if outputs:  # right padding comes after every real query: the causal form never reads it
            kernel, dilation = self.options.kernel, self.options.dilation
            if n <= kernel and dilation == 1:  # the whole prefix of every token (see the notes)
                heads_first = [t.transpose(1, 2) for t in (q, k, v)]  # (B, H, N, d)
                attended = F.scaled_dot_product_attention(*heads_first, is_causal=True).transpose(1, 2)
            elif n >= kernel * dilation and not (q.requires_grad and q.device.type == "cpu"):
                attended = self.natten_attention(q, k, v, (kernel,), (dilation,), causal=True)
            else:  # natten needs kernel·dilation <= N; the dense mask takes the dilation as given
                attended = self.masked_attention(q, k, v, (kernel,), (dilation,), causal=True)
            out = zero_padding(self.proj(attended.reshape(b, n, c)), mask)
        return out, WindowCache(k.transpose(1, 2), v.transpose(1, 2), lengths, self.window())

    def step(self, x: Tensor, cache: WindowCache) -> Tensor:
        """The new token t against its causal neighbours t, t − dilation, …, (kernel of them, >= 0)."""
        check_token(self, x, cache)
        b, _, c = x.shape
        qkv = self.qkv(x).view(b, 1, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, H, 1, d) each
        cache.append(k, v)
        back = torch.arange(self.options.kernel, device=x.device) * self.options.dilation
        keys, values, held = cache.gather(back, torch.zeros(b, dtype=torch.long, device=x.device))
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=held[:, None, None, :])
        return self.proj(out.transpose(1, 2).reshape(b, 1, c))

    def cache_bytes(self, batch: int, n: int, dtype: torch.dtype) -> int:
        """Keys and values of the window: 2·B·H·((kernel − 1)·dilation + 1)·d elements, whatever n."""
        return 2 * batch * self.num_heads * self.window() * self.head_dim * dtype.itemsize
