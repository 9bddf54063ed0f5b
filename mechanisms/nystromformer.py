"""Nyströmformer attention (Xiong et al., 2021), a Nyström approximation of softmax attention.

With m landmarks Q̃, K̃ (means of m contiguous segments of the queries and keys):

    softmax(QKᵀ/√d) V ≈ softmax(QK̃ᵀ/√d) · pinv(softmax(Q̃K̃ᵀ/√d)) · softmax(Q̃Kᵀ/√d) V,

with pinv the paper's iterative Moore-Penrose inverse (Z₀ = Aᵀ / (‖A‖₁‖A‖∞), taken per matrix
here; the authors' code takes one global maximum over the batch, which couples samples).
Cost per head O(N·m·d + m³).

Sequence lengths: when m does not divide N the segments have ⌊N/m⌋ or ⌈N/m⌉ tokens (every
landmark a mean of real tokens; zero padding, as some ports do, can leave empty landmarks).
When N <= m the approximation has nothing to save, and this computes exact softmax attention,
as the authors' code does for N == m.

Padding is masked natively: each sequence's real tokens move to the front, in order (so holes
close up as if the padding were not there), its landmarks are the means of m segments of its own
L real tokens (the rule above, with L for N), and padded keys get no weight. Sequences with
L <= m take exact softmax over their real keys, so a batch runs as at most two groups (L <= m
and L > m), each cut to its longest sequence, whatever its number of distinct lengths. The
conv residual runs over the compacted tokens with zeros after each sequence's end.

``conv_kernel`` > 0 adds the paper's depthwise convolution over the tokens of V as a residual;
it is off by default so the mechanism is a pure approximation of ``softmax`` with the same
parameters (weights load across, and parameter counts match). The paper used 33 (BERT) and 35 (LRA).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from attnbench.mechanism import Flops, Grid, merge_heads, option, projection_flops, require
from attnbench.registry import register_mechanism
from mechanisms.softmax import SoftmaxAttention, SoftmaxOptions


@dataclasses.dataclass(frozen=True)
class NystromOptions(SoftmaxOptions):
    landmarks: int = option(32, 1, 4096)  # m, the number of segment-mean landmarks (paper: 32 to 256)
    pinv_iters: int = option(6, 1, 1000)  # iterations of the pseudo-inverse (paper: 6)
    conv_kernel: int = option(0, 0, 255)  # depthwise conv residual on V over tokens; 0 = off (paper: 33/35)

    def __post_init__(self) -> None:
        require(isinstance(self.conv_kernel, int) and self.conv_kernel >= 0
                and (self.conv_kernel == 0 or self.conv_kernel % 2 == 1),
                f"nystromformer.conv_kernel={self.conv_kernel!r} must be 0 (off) or an odd int >= 1")


def segment_means(x: Tensor, m: int) -> Tensor:
    """(..., N, d) -> (..., m, d): means of m contiguous segments of ⌊N/m⌋ or ⌈N/m⌉ tokens (N >= m)."""
    n = x.shape[-2]
    if n % m == 0:
        return x.unflatten(-2, (m, n // m)).mean(-2)
    segment = torch.arange(n, device=x.device) * m // n  # token i -> ⌊i·m/N⌋, every segment non-empty
    sums = x.new_zeros(*x.shape[:-2], m, x.shape[-1]).index_add(x.dim() - 2, segment, x)
    return sums / torch.bincount(segment, minlength=m).to(x.dtype).unsqueeze(-1)


def padded_segment_means(x: Tensor, lengths: Tensor, m: int) -> Tensor:
    """(B, H, N, d) -> (B, H, m, d): ``segment_means`` of each sequence's first ``lengths`` (B,)
    tokens (each >= m); the tokens after them are padding and reach no landmark."""
    b, h, n, d = x.shape
    i = torch.arange(n, device=x.device)
    size = lengths[:, None]  # (B, 1)
    segment = torch.where(i < size, i * m // size, m)  # (B, N): token i -> ⌊i·m/L⌋; padding -> bin m
    sums = x.new_zeros(b, h, m + 1, d).scatter_add(2, segment[:, None, :, None].expand(b, h, n, d), x)
    counts = segment.new_zeros(b, m + 1).scatter_add(1, segment, torch.ones_like(segment))
    return sums[:, :, :m] / counts[:, None, :m, None].to(x.dtype)  # bin m (padding) dropped


def iterative_pinv(a: Tensor, iters: int) -> Tensor:
    """Moore-Penrose pseudo-inverse of (..., m, m) matrices by the paper's iteration."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    scale = a.abs().sum(-2).amax(-1) * a.abs().sum(-1).amax(-1)  # ‖A‖₁·‖A‖∞ per matrix
    z = a.transpose(-2, -1) / scale[..., None, None]
    for _ in range(iters):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


@register_mechanism
class NystromAttention(SoftmaxAttention):
    name = "nystromformer"
    no_causal_reason = ("its landmarks are segment means over all tokens, so every output mixes in "
                        "future ones; the paper defines no causal form")
    summary = "Nyström approximation of softmax with segment-mean landmarks (Xiong et al. 2021)"
    Options = NystromOptions
    complexity = "linear"
    masking = "native"
    flops_formula = ("N > m: 8·B·N·C² (projections) + 8·B·N·m·C + 4·B·m²·C + 8·iters·B·H·m³ (pinv) "
                     "+ 2·B·N·C·k (conv, k = conv_kernel); N <= m: softmax's 4·B·N²·C instead of the "
                     "middle terms; elementwise ≈ 5·B·H·(2·N·m + m²) + 4·iters·B·H·m² + 2·B·N·C")

    def __init__(self, dim: int, num_heads: int, options: NystromOptions | None = None) -> None:
        super().__init__(dim, num_heads, options)
        k = self.options.conv_kernel
        self.conv = (nn.Conv2d(num_heads, num_heads, (k, 1), padding=(k // 2, 0), groups=num_heads,
                               bias=False) if k else None)

    def nystrom(self, q: Tensor, k: Tensor, v: Tensor, lengths: Tensor | None = None) -> Tensor:
        """The Nyström approximation on (B, H, N, d) tensors, N >= landmarks (no fallback); with
        ``lengths`` (B,), sequence b is its first lengths[b] > landmarks tokens, the rest padding."""
        m = self.options.landmarks
        q, k = q * self.head_dim**-0.25, k * self.head_dim**-0.25  # so that q·k carries 1/√d
        if lengths is None:
            q_l, k_l = segment_means(q, m), segment_means(k, m)  # (B, H, m, d)
        else:
            q_l, k_l = padded_segment_means(q, lengths, m), padded_segment_means(k, lengths, m)
        f = torch.softmax(q @ k_l.transpose(-2, -1), dim=-1)  # (B, H, N, m)
        a = torch.softmax(q_l @ k_l.transpose(-2, -1), dim=-1)  # (B, H, m, m)
        scores = q_l @ k.transpose(-2, -1)  # (B, H, m, N)
        if lengths is not None:  # padded keys get no weight
            padding = torch.arange(k.shape[-2], device=k.device) >= lengths[:, None]  # (B, N)
            scores = scores.masked_fill(padding[:, None, None, :], float("-inf"))
        b = torch.softmax(scores, dim=-1)
        return f @ (iterative_pinv(a, self.options.pinv_iters) @ (b @ v))  # cheapest order

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        n = q.shape[-2]
        out = self.nystrom(q, k, v) if n > self.options.landmarks else super().attend(q, k, v)
        return out if self.conv is None else out + self.conv(v)  # conv over tokens, per head

    def mix_padded(self, x: Tensor, mask: Tensor) -> Tensor:
        """Each sequence's real tokens, compacted to the front, as one or two batched groups."""
        b, n, c = x.shape
        m = self.options.landmarks
        # real tokens first, in order: compacted token j of sequence b sits at order[b, j] in x
        order = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)  # (B, N)
        where = order[..., None].expand(b, n, c)
        q, k, v = self.qkv_heads(x.gather(1, where))  # (B, H, N, d) each, compacted
        lengths = mask.sum(-1)  # (B,)
        padding = torch.arange(n, device=x.device) >= lengths[:, None]  # (B, N), compacted
        out = torch.zeros_like(q)
        sizes = lengths.tolist()  # the one host sync: which group each sequence joins
        for short in (True, False):  # L <= m: exact softmax; L > m: Nyström
            rows = [row for row, size in enumerate(sizes) if (size <= m) == short]
            if not rows:
                continue
            width = max(sizes[row] for row in rows)  # the group's tokens after this are all padding
            pick = slice(None) if len(rows) == b else torch.tensor(rows, device=x.device)
            qg, kg, vg = (t[pick, :, :width] for t in (q, k, v))
            if short:
                group = super().attend(qg, kg, vg, ~padding[pick, :width])
            else:
                group = self.nystrom(qg, kg, vg, lengths[pick])
            out[pick, :, :width] = group
        if self.conv is not None:  # over the compacted tokens, zeros after each sequence's end
            out = out + self.conv(v.masked_fill(padding[:, None, :, None], 0))
        y = self.proj(merge_heads(out))  # (B, N, C), compacted
        return torch.empty_like(y).scatter(1, where, y)  # each token back in its place

    def flops(self, batch: int, n: int, grid: Grid | None = None, causal: bool = False) -> Flops:
        m, h, c = self.options.landmarks, self.num_heads, self.dim
        conv = 2 * batch * n * c * self.options.conv_kernel
        if n <= m:
            return Flops(matmul=projection_flops(batch, n, c, 4) + 4 * batch * n * n * c + conv,
                         elementwise=5 * batch * h * n * n)
        core = 8 * batch * n * m * c + 4 * batch * m * m * c + 8 * self.options.pinv_iters * batch * h * m**3
        elementwise = (5 * batch * h * (2 * n * m + m * m) + 4 * self.options.pinv_iters * batch * h * m * m
                       + 2 * batch * n * c)
        return Flops(matmul=projection_flops(batch, n, c, 4) + core + conv, elementwise=elementwise)
