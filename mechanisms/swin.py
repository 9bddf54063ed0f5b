"""Shifted-window attention (Swin Transformer, Liu et al., 2021): softmax attention inside
non-overlapping w×w windows, plus a learned relative position bias.

Design choices, each a line:

* ``shift`` says whether this layer uses the shifted partition, windows displaced by ⌊w/2⌋, done
  as in the paper by a cyclic ``torch.roll`` and a mask that keeps wrapped-around regions
  apart. Swin alternates ``shift=False`` / ``shift=True`` between consecutive blocks; a model
  built from this mechanism should do the same.
* Small inputs, as in Swin: along an axis no longer than the window, the window is clamped to
  the axis and that axis is not shifted (one window covers it).
* Padding: a grid the window does not divide is padded at the bottom and right. Unlike Swin,
  which pads with zeros and lets tokens attend to them, padding tokens are masked out of
  attention here, so no output depends on how much padding there is.
* Sequences (``grid=None``) are a 1×N grid: 1-D windows of ``window`` tokens, biased by the
  2w−1 entries of the table's centre row (relative row offset 0).
* Causal (sequences only): each token attends to itself and the earlier tokens of its own
  window, under the same partition, shift and bias: the causal restriction of the window, so
  nothing crosses a window boundary that did not before and nothing comes from the future. In
  the shifted partition the wrapped-around window's two parts stay apart as before, each in its
  own order; a token at a window's start sees itself alone. Every score of a window is still
  computed (the future ones masked), so the FLOPs are those of the non-causal form.
* Bias between tokens at (r₁, c₁) and (r₂, c₂) of one window, per head:
  ``bias_table[(r₁ − r₂ + w − 1)·(2w − 1) + (c₁ − c₂ + w − 1)]``.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnbench.decoding import WindowCache, check_token, prompt_lengths, zero_padding
from attnbench.mechanism import Flops, Grid, Mechanism, merge_heads, option, projection_flops, require
from attnbench.registry import register_mechanism


@dataclasses.dataclass(frozen=True)
class SwinOptions:
    window: int = option(7, 1, 256)  # window side w: w×w windows on grids, w tokens on sequences
    shift: bool = False  # this layer uses the shifted partition (by w // 2), as Swin's odd blocks do
    qkv_bias: bool = True  # bias on the query/key/value projection

    def __post_init__(self) -> None:
        require(isinstance(self.shift, bool), f"swin.shift must be True or False, got {self.shift!r}")
        require(isinstance(self.qkv_bias, bool),
                f"swin.qkv_bias must be True or False, got {self.qkv_bias!r}")


def partition(x: Tensor, wh: int, ww: int) -> Tensor:
    """(B, Hp, Wp, C) -> (B·nW, wh·ww, C): the non-overlapping windows, each row-major."""
    b, hp, wp, c = x.shape
    x = x.view(b, hp // wh, wh, wp // ww, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh * ww, c)


def unpartition(windows: Tensor, b: int, hp: int, wp: int, wh: int, ww: int) -> Tensor:
    """(B·nW, wh·ww, C) -> (B, Hp, Wp, C): the inverse of ``partition``."""
    x = windows.view(b, hp // wh, wp // ww, wh, ww, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, hp, wp, -1)


def axis_regions(size: int, padded: int, window: int, shift: int, device: torch.device) -> Tensor:
    """Per position of one rolled, padded axis: Swin's region label (0, 1, 2), or -1 for padding.

    After rolling by -shift, the last window holds tokens from both ends of the axis; the
    labels tell them apart (region 2 is the part that wrapped around).
    """
    labels = torch.zeros(padded, dtype=torch.long, device=device)
    if shift:
        labels[padded - window:padded - shift] = 1
        labels[padded - shift:] = 2
    source = (torch.arange(padded, device=device) + shift) % padded  # where each position was before the roll
    return labels.masked_fill(source >= size, -1)


@register_mechanism
class SwinAttention(Mechanism):
    name = "swin"
    summary = "window attention with optional shifted windows and relative position bias (Swin)"
    Options = SwinOptions
    complexity = "local"
    flops_formula = ("8·B·N·C² (projections) + 4·B·Np·T·C (QKᵀ, AV in windows of T = w² tokens, "
                     "Np = tokens after padding); elementwise 5·B·H·Np·T; causal: the same (whole "
                     "windows computed, the future masked)")

    def __init__(self, dim: int, num_heads: int, options: SwinOptions | None = None) -> None:
        super().__init__(dim, num_heads, options)
        self.qkv = nn.Linear(dim, 3 * dim, bias=self.options.qkv_bias)
        self.proj = nn.Linear(dim, dim)
        w = self.options.window
        self.bias_table = nn.Parameter(torch.empty((2 * w - 1) ** 2, num_heads))  # ((2w-1)², heads)
        nn.init.trunc_normal_(self.bias_table, std=0.02)

    def layout(self, grid: Grid | None, n: int) -> tuple[Grid, Grid, Grid, Grid]:
        """Grid (H, W), padded grid (Hp, Wp), window (wh, ww) and shift (sh, sw), clamped as in Swin."""
        h, w = grid if grid is not None else (1, n)
        win, shifted = self.options.window, self.options.shift
        wh, ww = min(win, h), min(win, w)
        sh = win // 2 if shifted and h > win else 0
        sw = win // 2 if shifted and w > win else 0
        return (h, w), (h + -h % wh, w + -w % ww), (wh, ww), (sh, sw)

    def relative_bias(self, wh: int, ww: int) -> Tensor:
        """The learned bias between every pair of tokens in a wh×ww window: (heads, T, T)."""
        span, device = 2 * self.options.window - 1, self.bias_table.device
        rows, cols = torch.meshgrid(torch.arange(wh, device=device), torch.arange(ww, device=device),
                                    indexing="ij")
        coords = torch.stack([rows.flatten(), cols.flatten()])  # (2, T)
        rel = coords[:, :, None] - coords[:, None, :] + self.options.window - 1  # (2, T, T), >= 0
        return self.bias_table[rel[0] * span + rel[1]].permute(2, 0, 1)

    @staticmethod
    def allowed(grid: Grid, padded: Grid, window: Grid, shift: Grid, device: torch.device) -> Tensor:
        """(nW, T, T) bool: query may attend key iff same region of its window and key not padding."""
        rows = axis_regions(grid[0], padded[0], window[0], shift[0], device)
        cols = axis_regions(grid[1], padded[1], window[1], shift[1], device)
        region = (rows[:, None] * 3 + cols[None, :])[None, :, :, None]  # (1, Hp, Wp, 1)
        real = ((rows[:, None] >= 0) & (cols[None, :] >= 0))[None, :, :, None]
        region = partition(region, *window).squeeze(-1)  # (nW, T)
        real = partition(real, *window).squeeze(-1)
        return (region[:, :, None] == region[:, None, :]) & real[:, None, :]

    def mix(self, x: Tensor, grid: Grid | None) -> Tensor:
        return self._windows(x, grid, causal=False)

    def mix_causal(self, x: Tensor) -> Tensor:
        return self._windows(x, None, causal=True)

    def _windows(self, x: Tensor, grid: Grid | None, causal: bool) -> Tensor:
        """Attention within the windows of the (shifted) partition; ``causal`` (a 1×N grid): keys
        after the query within its window masked out."""
        b, n, c = x.shape
        (h, w), (hp, wp), (wh, ww), (sh, sw) = self.layout(grid, n)
        t = wh * ww  # tokens per window
        qkv = F.pad(self.qkv(x).view(b, h, w, 3 * c), (0, 0, 0, wp - w, 0, hp - h))  # (B, Hp, Wp, 3C)
        if sh or sw:
            qkv = torch.roll(qkv, shifts=(-sh, -sw), dims=(1, 2))
        qkv = partition(qkv, wh, ww).view(-1, t, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B·nW, heads, T, d)

        scores = (q * self.head_dim**-0.5) @ k.transpose(-2, -1) + self.relative_bias(wh, ww)
        if sh or sw or (hp, wp) != (h, w) or causal:
            allowed = self.allowed((h, w), (hp, wp), (wh, ww), (sh, sw), x.device)  # (nW, T, T)
            if causal:  # window order is sequence order within each part (one row: wh = 1)
                allowed = allowed & torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            # Fully masked rows (padding queries) become uniform, not NaN; they are cropped below.
            scores = scores.view(b, -1, self.num_heads, t, t).masked_fill(
                ~allowed[:, None], torch.finfo(scores.dtype).min).view(-1, self.num_heads, t, t)
        out = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(-1, t, c)  # (B·nW, T, C)

        out = unpartition(out, b, hp, wp, wh, ww)
        if sh or sw:
            out = torch.roll(out, shifts=(sh, sw), dims=(1, 2))
        return self.proj(out[:, :h, :w].reshape(b, n, c))

    def flops(self, batch: int, n: int, grid: Grid | None = None, causal: bool = False) -> Flops:
        _, (hp, wp), (wh, ww), _ = self.layout(grid, n)
        window_scores = batch * hp * wp * wh * ww  # per head: every token scores every token of its window
        return Flops(matmul=projection_flops(batch, n, self.dim, 4) + 4 * window_scores * self.dim,
                     elementwise=5 * self.num_heads * window_scores)

    # ---- incremental decoding: the current window of a sequence ----------------------------------
    def group_start(self, t: Tensor) -> Tensor:
        """First position of the window that holds position t on a sequence longer than the window:
        windows start at s, s + w, … (s = ⌊w/2⌋ shifted, else 0), and the shifted partition's
        wrapped-around part [0, s) is a window of its own."""
        w = self.options.window
        s = w // 2 if self.options.shift else 0
        return torch.where(t < s, 0, s + torch.div(t - s, w, rounding_mode="floor") * w)

    def causal_windows(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Each token of (B, H, N, d) sequences against the earlier tokens of its window
        (``group_start``), with the relative bias: the sequence padded at the front so that windows
        start at multiples of w."""
        b, h, n, d = q.shape
        w = self.options.window
        s = w // 2 if self.options.shift else 0
        front, back = (w - s) % w, -(n + (w - s) % w) % w
        # (B, H, nW, w, d) each
        q, k, v = (F.pad(t, (0, 0, front, back)).view(b, h, -1, w, d) for t in (q, k, v))
        scores = (q * self.head_dim**-0.5) @ k.transpose(-2, -1) + self.relative_bias(1, w)[:, None]
        real = torch.arange(q.shape[2] * w, device=q.device).view(-1, w) >= front  # (nW, w): not front pad
        allowed = torch.ones(w, w, dtype=torch.bool, device=q.device).tril() & real[:, None, :]
        out = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v
        return out.view(b, h, -1, d)[:, :, front:front + n]

    def prefill(self, x: Tensor, capacity: int, mask: Tensor | None = None,
                outputs: bool = True) -> tuple[Tensor | None, WindowCache]:
        """The causal windows of a sequence longer than the window (the causal form's, on any
        sequence longer than w, or on any sequence unshifted: one of at most w tokens the forward
        attends unshifted), and the window cache after each sequence's real tokens."""
        lengths = prompt_lengths(self, x, capacity, mask)
        b, n, c = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, H, N, d) each
        out = None
        if outputs:  # right padding comes after every real query: the causal form never reads it
            out = zero_padding(self.proj(merge_heads(self.causal_windows(q, k, v))), mask)
        return out, WindowCache(k, v, lengths, self.options.window)

    def step(self, x: Tensor, cache: WindowCache) -> Tensor:
        """The new token t against t and the earlier tokens of its window, biased by their offsets."""
        check_token(self, x, cache)
        b, _, c = x.shape
        w = self.options.window
        qkv = self.qkv(x).view(b, 1, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, H, 1, d) each
        cache.append(k, v)
        back = torch.arange(w, device=x.device)  # offsets 0 … w − 1
        first = self.group_start(cache.positions.device_lengths - 1)  # (B,)
        keys, values, held = cache.gather(back, first)  # (B, H, w, d), (B, w)
        bias = self.bias_table[(w - 1) * (2 * w - 1) + back + w - 1].T  # (H, w): query − key = offset
        scores = (q * self.head_dim**-0.5) @ keys.transpose(-2, -1) + bias[:, None, :]  # (B, H, 1, w)
        out = torch.softmax(scores.masked_fill(~held[:, None, None, :], float("-inf")), dim=-1) @ values
        return self.proj(merge_heads(out))

    def cache_bytes(self, batch: int, n: int, dtype: torch.dtype) -> int:
        """Keys and values of one window: 2·B·H·w·d elements, whatever n."""
        return 2 * batch * self.num_heads * self.options.window * self.head_dim * dtype.itemsize
