"""Linear attention (Katharopoulos et al., 2020, "Transformers are RNNs"), non-causal form.

The softmax kernel exp(q·k) is replaced by φ(q)·φ(k) with φ(x) = elu(x) + 1 > 0, so the sums
over keys can be taken first and the cost per head is O(N·d²) instead of O(N²·d):

    out_i = φ(q_i)ᵀ (Σ_j φ(k_j) v_jᵀ) / (φ(q_i)ᵀ Σ_j φ(k_j) + eps)

No 1/√d scaling, as in the paper. Same parameters as ``softmax``, so weights load across.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

from attnbench.decoding import StateCache, check_token, prompt_lengths, zero_padding
from attnbench.mechanism import Flops, Grid, merge_heads, option, projection_flops
from attnbench.registry import register_mechanism
from mechanisms.softmax import SoftmaxAttention, SoftmaxOptions


@dataclasses.dataclass(frozen=True)
class LinearOptions(SoftmaxOptions):
    # added to the normaliser φ(q)·Σφ(k); the authors' fast-transformers code uses 1e-6
    eps: float = option(1e-6, 0, 1e-2)


def feature_map(x: Tensor) -> Tensor:
    """φ(x) = elu(x) + 1: positive, so the kernel φ(q)·φ(k) is a valid attention weight."""
    return F.elu(x) + 1


@register_mechanism
class LinearAttention(SoftmaxAttention):
    name = "linear"
    summary = "linear attention, φ(x) = elu(x)+1 kernel (Katharopoulos et al. 2020)"
    Options = LinearOptions
    complexity = "linear"
    flops_formula = ("8·B·N·C² (projections) + 4·B·N·C·d (φ(K)ᵀV, φ(Q)·KV; d = C/H); "
                     "elementwise ≈ 10·B·N·C (feature maps, key sum, normaliser, division)")

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        """φ(q)(φ(k)ᵀv) / (φ(q)·Σφ(k) + eps) on (B, H, N, d) tensors, keys summed first;
        padding keys (mask (B, N) False) get φ = 0, so they drop out of both sums."""
        phi_q, phi_k = feature_map(q), feature_map(k)  # (B, H, N, d)
        if mask is not None:
            phi_k = phi_k * mask[:, None, :, None]
        kv = phi_k.transpose(-2, -1) @ v  # (B, H, d, d): Σ_j φ(k_j) v_jᵀ
        norm = (phi_q * phi_k.sum(-2, keepdim=True)).sum(-1, keepdim=True)  # (B, H, N, 1)
        return (phi_q @ kv) / (norm + self.options.eps)

    def weights(self, q: Tensor, k: Tensor) -> Tensor:
        """The implied (B, H, N, N) attention matrix, for analysis and tests (quadratic memory)."""
        scores = feature_map(q) @ feature_map(k).transpose(-2, -1)  # (B, H, N, N), all > 0
        return scores / (scores.sum(-1, keepdim=True) + self.options.eps)

    def flops(self, batch: int, n: int, grid: Grid | None = None) -> Flops:
        core = 2 * 2 * batch * n * self.dim * self.head_dim  # two (N×d)·(d×d)-sized products per head
        return Flops(matmul=projection_flops(batch, n, self.dim, 4) + core,
                     elementwise=10 * batch * n * self.dim)

    # ---- incremental decoding: the recurrent state S = Σ φ(k) vᵀ, z = Σ φ(k) --------------------
    def prefill(self, x: Tensor, capacity: int, mask: Tensor | None = None,
                outputs: bool = True) -> tuple[Tensor | None, StateCache]:
        lengths = prompt_lengths(self, x, capacity, mask)
        q, k, v = self.qkv_heads(x)  # (B, H, N, d) each
        phi_k = feature_map(k)
        if mask is not None:  # padding adds nothing to the state
            phi_k = phi_k * mask[:, None, :, None]
        # S (B, H, d, d) and z (B, H, d)
        cache = StateCache(lengths, kv=phi_k.transpose(-2, -1) @ v, k_sum=phi_k.sum(-2))
        out = None
        if outputs:  # right padding comes after every real query: the causal form never reads it
            out = zero_padding(self.proj(merge_heads(self.attend_causal(q, k, v))), mask)
        return out, cache

    def step(self, x: Tensor, cache: StateCache) -> Tensor:
        """S += φ(k) vᵀ, z += φ(k) in place; out = φ(q)ᵀ S / (φ(q)·z + eps): O(H·d²) whatever the context."""
        check_token(self, x, cache)
        q, k, v = self.qkv_heads(x)  # (B, H, 1, d) each
        phi_q, phi_k = feature_map(q), feature_map(k)
        cache["kv"].add_(phi_k.transpose(-2, -1) @ v)  # (B, H, d, d)
        cache["k_sum"].add_(phi_k[:, :, 0])  # (B, H, d)
        norm = (phi_q[:, :, 0] * cache["k_sum"]).sum(-1)[..., None, None]  # (B, H, 1, 1)
        cache.positions.advance()
        return self.proj(merge_heads((phi_q @ cache["kv"]) / (norm + self.options.eps)))

    def cache_bytes(self, batch: int, n: int, dtype: torch.dtype) -> int:
        """S and z: B·H·(d² + d) elements, whatever n."""
        return batch * self.num_heads * (self.head_dim**2 + self.head_dim) * dtype.itemsize
