"""Linear attention (Katharopoulos et al., 2020, "Transformers are RNNs").

The softmax kernel exp(q·k) is replaced by φ(q)·φ(k) with φ(x) = elu(x) + 1 > 0, so the sums
over keys can be taken first and the cost per head is O(N·d²) instead of O(N²·d):

    out_i = φ(q_i)ᵀ (Σ_j φ(k_j) v_jᵀ) / (φ(q_i)ᵀ Σ_j φ(k_j) + eps)

No 1/√d scaling, as in the paper. Same parameters as ``softmax``, so weights load across.

Causal form: the same sums over j <= i (the paper's RNN view), computed chunk by chunk: the
state Σ φ(k_j) v_jᵀ of the earlier chunks (prefix sums over chunks) plus a masked (L, L) block
within the chunk, so memory is O(N·d²/L + N·L) per head and never an N × N mask.
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
    chunk: int = option(64, 1, 4096)  # causal form: tokens per chunk L (state between chunks, a mask within)


def feature_map(x: Tensor) -> Tensor:
    """φ(x) = elu(x) + 1: positive, so the kernel φ(q)·φ(k) is a valid attention weight."""
    return F.elu(x) + 1


def chunk_length(n: int, chunk: int) -> tuple[int, int]:
    """(L, padded N): chunks of ``chunk`` tokens, or one chunk of N when that is shorter."""
    length = min(chunk, n)
    return length, n + -n % length


def causal_linear_attention(phi_q: Tensor, phi_k: Tensor, v: Tensor, chunk: int, eps: float) -> Tensor:
    """Σ_{j<=i} (φq_i·φk_j) v_j / (Σ_{j<=i} φq_i·φk_j + eps) for features (B, H, N, r) and values
    (B, H, N, d), in chunks of L tokens: earlier chunks through their summed states, the chunk
    itself through a masked (L, L) block."""
    b, h, n, r = phi_q.shape
    length, padded = chunk_length(n, chunk)
    # tokens appended at the end, seen by no real query; queries padded with φ = 1 so that their
    # (discarded) normaliser is positive even with eps = 0, and no 0/0 reaches the backward pass
    pad, chunks = (0, 0, 0, padded - n), (b, h, padded // length, length, -1)
    fq = F.pad(phi_q, pad, value=1.0).view(chunks)
    fk, vv = F.pad(phi_k, pad).view(chunks), F.pad(v, pad).view(chunks)
    states = fk.transpose(-2, -1) @ vv  # (B, H, C, r, d): Σ φk vᵀ of each chunk
    states = F.pad(states.cumsum(2), (0, 0, 0, 0, 1, 0))[:, :, :-1]  # of the chunks before each one
    sums = F.pad(fk.sum(-2).cumsum(2), (0, 0, 1, 0))[:, :, :-1]  # (B, H, C, r): Σ φk likewise
    future = torch.ones(length, length, dtype=torch.bool, device=v.device).triu(1)
    scores = (fq @ fk.transpose(-2, -1)).masked_fill(future, 0)  # (B, H, C, L, L): j <= i within
    numerator = fq @ states + scores @ vv  # (B, H, C, L, d)
    norm = (fq * sums[:, :, :, None, :]).sum(-1) + scores.sum(-1)  # (B, H, C, L)
    out = numerator / (norm + eps)[..., None]
    return out.view(b, h, padded, -1)[:, :, :n]


@register_mechanism
class LinearAttention(SoftmaxAttention):
    name = "linear"
    summary = "linear attention, φ(x) = elu(x)+1 kernel (Katharopoulos et al. 2020)"
    Options = LinearOptions
    complexity = "linear"
    flops_formula = ("8·B·N·C² (projections) + 4·B·N·C·d (φ(K)ᵀV, φ(Q)·KV; d = C/H); "
                     "elementwise ≈ 10·B·N·C (feature maps, key sum, normaliser, division); "
                     "causal, chunks of L (N padded to Np, a multiple of L): 4·B·Np·C·d (chunk states, "
                     "φ(Q)·state) + 4·B·Np·L·C (the masked (L, L) blocks, computed whole); "
                     "elementwise + 2·B·H·Np·L")

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        """φ(q)(φ(k)ᵀv) / (φ(q)·Σφ(k) + eps) on (B, H, N, d) tensors, keys summed first;
        padding keys (mask (B, N) False) get φ = 0, so they drop out of both sums."""
        phi_q, phi_k = feature_map(q), feature_map(k)  # (B, H, N, d)
        if mask is not None:
            phi_k = phi_k * mask[:, None, :, None]
        kv = phi_k.transpose(-2, -1) @ v  # (B, H, d, d): Σ_j φ(k_j) v_jᵀ
        norm = (phi_q * phi_k.sum(-2, keepdim=True)).sum(-1, keepdim=True)  # (B, H, N, 1)
        return (phi_q @ kv) / (norm + self.options.eps)

    def attend_causal(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """The sums over keys j <= i, chunk by chunk (``causal_linear_attention``)."""
        options = self.options
        return causal_linear_attention(feature_map(q), feature_map(k), v, options.chunk, options.eps)

    def weights(self, q: Tensor, k: Tensor, causal: bool = False) -> Tensor:
        """The implied (B, H, N, N) attention matrix, for analysis and tests (quadratic memory)."""
        scores = feature_map(q) @ feature_map(k).transpose(-2, -1)  # (B, H, N, N), all > 0
        if causal:
            scores = scores.tril()
        return scores / (scores.sum(-1, keepdim=True) + self.options.eps)

    def flops(self, batch: int, n: int, grid: Grid | None = None, causal: bool = False) -> Flops:
        projections = projection_flops(batch, n, self.dim, 4)
        if not causal:
            core = 2 * 2 * batch * n * self.dim * self.head_dim  # two (N×d)·(d×d)-sized products per head
            return Flops(matmul=projections + core, elementwise=10 * batch * n * self.dim)
        length, padded = chunk_length(n, self.options.chunk)
        states = 2 * 2 * batch * padded * self.dim * self.head_dim  # φ(K)ᵀV per chunk, φ(Q)·state
        blocks = 2 * 2 * batch * padded * length * self.dim  # φ(Q)φ(K)ᵀ and its product with V, per chunk
        return Flops(matmul=projections + states + blocks,
                     elementwise=10 * batch * n * self.dim + 2 * batch * self.num_heads * padded * length)

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
