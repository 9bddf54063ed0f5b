"""Softmax dot-product attention (DPSA) written as plain math: the reference of the suite.

Attention(Q, K, V) = softmax(Q Kᵀ / √d) V per head (Vaswani et al., 2017). The causal form masks
the future out of the dense (N, N) scores: it computes every score and discards the masked half.
With ``kv_heads`` H_kv < H, keys and values are projected to H_kv heads, each shared by a group of
H / H_kv query heads (grouped-query attention, Ainslie et al., 2023; H_kv = 1 is multi-query,
Shazeer, 2019): query head h reads key/value head h // (H / H_kv). Decoding keeps the keys and
values of the H_kv heads in a cache allocated once (``attnbench.decoding.KVCache``).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from attnbench.decoding import KVCache, check_token, prompt_lengths, zero_padding
from attnbench.mechanism import (
    Flops,
    Grid,
    Mechanism,
    merge_heads,
    require,
    split_heads,
)
from attnbench.registry import register_mechanism


@dataclasses.dataclass(frozen=True)
class SoftmaxOptions:
    qkv_bias: bool = True  # bias on the query/key/value projection


@dataclasses.dataclass(frozen=True)
class GroupedQueryOptions(SoftmaxOptions):
    # key/value heads, each shared by num_heads / kv_heads query heads (1 = multi-query);
    # None = one per query head (multi-head attention)
    kv_heads: int | None = None

    def __post_init__(self) -> None:
        whole = isinstance(self.kv_heads, int) and not isinstance(self.kv_heads, bool)
        require(self.kv_heads is None or (whole and self.kv_heads >= 1),
                f"kv_heads must be a positive int or None, got {self.kv_heads!r}")


@register_mechanism
class SoftmaxAttention(Mechanism):
    name = "softmax"
    summary = "dot-product softmax attention, plain matmuls (the reference)"
    Options = GroupedQueryOptions
    complexity = "quadratic"
    flops_formula = ("(4 + 4·H_kv/H)·B·N·C² (projections; 8·B·N·C² with H_kv = H) + 4·B·N²·C (QKᵀ, AV); "
                     "elementwise 5·B·H·N²; causal: the same (every score is computed, the future half "
                     "masked)")
    masking = "native"

    def __init__(self, dim: int, num_heads: int, options: SoftmaxOptions | None = None) -> None:
        super().__init__(dim, num_heads, options)
        self.kv_heads = getattr(self.options, "kv_heads", None) or num_heads  # options without it: MHA
        require(num_heads % self.kv_heads == 0,
                f"{self.name}: kv_heads={self.kv_heads} does not divide num_heads={num_heads}; valid: "
                f"{', '.join(str(h) for h in range(1, num_heads + 1) if num_heads % h == 0)}")
        # [q: C | k: H_kv·d | v: H_kv·d]; with H_kv = H the (3, H, d) layout, so weights load across
        self.qkv = nn.Linear(dim, dim + 2 * self.kv_heads * self.head_dim, bias=self.options.qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Project (B, N, C) to q (B, H, N, d) and k, v (B, H_kv, N, d)."""
        b, n, c = x.shape
        q, k, v = self.qkv(x).split([c, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim], -1)
        return split_heads(q, self.num_heads), split_heads(k, self.kv_heads), split_heads(v, self.kv_heads)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        """softmax(q kᵀ / √d) v on q (B, H, N, d) and k, v (B, H_kv, N, d), each key/value head
        repeated for its group; padding keys (mask (B, N) False) get no weight."""
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        scores = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)  # (B, H, N, N)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        return torch.softmax(scores, dim=-1) @ v

    def attend_causal(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """softmax(q kᵀ / √d) v on q (B, H, N, d) and k, v (B, H_kv, N, d), key j > query i masked out."""
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
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

    def projection_flops(self, batch: int, n: int) -> int:
        """FLOPs of the q, k, v and output projections (k and v to H_kv heads)."""
        return 2 * batch * n * self.dim * (2 * self.dim + 2 * self.kv_heads * self.head_dim)

    # ---- incremental decoding: a key/value cache of H_kv heads, allocated once ------------------
    def prefill(self, x: Tensor, capacity: int, mask: Tensor | None = None,
                outputs: bool = True) -> tuple[Tensor | None, KVCache]:
        lengths = prompt_lengths(self, x, capacity, mask)
        q, k, v = self.qkv_heads(x)  # q (B, H, N, d); k, v (B, H_kv, N, d)
        out = None
        if outputs:  # right padding comes after every real query: the causal form never reads it
            out = zero_padding(self.proj(merge_heads(self.attend_causal(q, k, v))), mask)
        return out, KVCache(k, v, lengths, capacity)

    def step(self, x: Tensor, cache: KVCache) -> Tensor:
        """The new token attends to every token held (all in its past): ``attend`` against the cache,
        each key/value head read once by its group of query heads (no repeat)."""
        check_token(self, x, cache)
        q, k, v = self.qkv_heads(x)  # q (B, H, 1, d); k, v (B, H_kv, 1, d)
        cache.append(k, v)
        keys, values, held = cache.view()  # (B, H_kv, L, d) each; (B, L) or None
        b, h, _, d = q.shape
        grouped = q.reshape(b, self.kv_heads, h // self.kv_heads, d)  # a group's queries as a sequence
        return self.proj(merge_heads(self.attend(grouped, keys, values, held).reshape(b, h, 1, d)))

    def cache_bytes(self, batch: int, n: int, dtype: torch.dtype) -> int:
        """Keys and values: 2·B·H_kv·n·d elements."""
        return 2 * batch * self.kv_heads * n * self.head_dim * dtype.itemsize

    def score_pairs(self, n: int, causal: bool) -> int:
        """Query-key pairs whose score the kernel computes, per sequence and head: all N², causal
        or not, for the dense form."""
        return n * n

    def flops(self, batch: int, n: int, grid: Grid | None = None, causal: bool = False) -> Flops:
        pairs = batch * self.score_pairs(n, causal)
        core = 2 * 2 * pairs * self.dim  # QKᵀ and AV over all heads
        return Flops(matmul=self.projection_flops(batch, n) + core, elementwise=5 * self.num_heads * pairs)


def repeat_kv(x: Tensor, heads: int) -> Tensor:
    """(B, H_kv, N, d) -> (B, heads, N, d): each key/value head repeated for its group of query heads."""
    b, kv_heads, n, d = x.shape
    if kv_heads == heads:
        return x
    return x[:, :, None].expand(b, kv_heads, heads // kv_heads, n, d).reshape(b, heads, n, d)
