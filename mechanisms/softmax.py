"""Softmax dot-product attention (DPSA) written as plain math: the reference of the suite.

Attention(Q, K, V) = softmax(Q Kᵀ / √d) V per head (Vaswani et al., 2017). The causal form masks
the future out of the dense (N, N) scores: it computes every score and discards the masked half.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from attnbench.mechanism import Flops, Grid, Mechanism, merge_heads, projection_flops
from attnbench.registry import register_mechanism


@dataclasses.dataclass(frozen=True)
class SoftmaxOptions:
    qkv_bias: bool = True  # bias on the query/key/value projection


@register_mechanism
class SoftmaxAttention(Mechanism):
    name = "softmax"
    summary = "dot-product softmax attention, plain matmuls (the reference)"
    Options = SoftmaxOptions
    complexity = "quadratic"
    flops_formula = ("8·B·N·C² (projections) + 4·B·N²·C (QKᵀ, AV); elementwise 5·B·H·N²; "
                     "causal: the same (every score is computed, the future half masked)")
    masking = "native"

    def __init__(self, dim: int, num_heads: int, options: SoftmaxOptions | None = None) -> None:
        super().__init__(dim, num_heads, options)
        self.qkv = nn.Linear(dim, 3 * dim, bias=self.options.qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Project (B, N, C) to q, k, v of shape (B, H, N, d) each."""
        b, n, _ = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        """softmax(q kᵀ / √d) v on (B, H, N, d) tensors; padding keys (mask (B, N) False) get no weight."""
        scores = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)  # (B, H, N, N)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        return torch.softmax(scores, dim=-1) @ v

    def attend_causal(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """softmax(q kᵀ / √d) v on (B, H, N, d) tensors, key j > query i masked out."""
        n = q.shape[-2]
        future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)  # (N, N): j > i
        scores = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)  # (B, H, N, N)
        return torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1) @ v

    def mix(self, x: Tensor, grid: Grid | None) -> Tensor:
        q, k, v = self.qkv_heads(x)
        return self.proj(merge_heads(self.attend(q, k, v)))

    def mix_causal(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv_heads(x)
        return self.proj(merge_heads(self.attend_causal(q, k, v)))

    def mix_padded(self, x: Tensor, mask: Tensor) -> Tensor:
        q, k, v = self.qkv_heads(x)
        return self.proj(merge_heads(self.attend(q, k, v, mask)))

    def score_pairs(self, n: int, causal: bool) -> int:
        """Query-key pairs whose score the kernel computes, per sequence and head: all N², causal
        or not, for the dense form."""
        return n * n

    def flops(self, batch: int, n: int, grid: Grid | None = None, causal: bool = False) -> Flops:
        pairs = batch * self.score_pairs(n, causal)
        core = 2 * 2 * pairs * self.dim  # QKᵀ and AV over all heads
        return Flops(matmul=projection_flops(batch, n, self.dim, 4) + core,
                     elementwise=5 * self.num_heads * pairs)
