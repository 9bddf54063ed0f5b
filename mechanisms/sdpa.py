"""Softmax attention through ``torch.nn.functional.scaled_dot_product_attention``.

The same function as ``softmax`` (same parameters, so weights load across), but PyTorch picks
a fused kernel (flash / memory-efficient / cuDNN / math) for the device and dtype. The causal
form passes ``is_causal=True``: the fused kernels then skip the key blocks that lie wholly in
the future, the math path computes every score and masks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend
from torch.utils.flop_counter import register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

from attnbench.registry import register_mechanism
from mechanisms.softmax import SoftmaxAttention


def cpu_flash_blocks(n: int) -> tuple[int, int]:
    """(query block, key block) of PyTorch's CPU flash kernel for ``n`` queries, forward and
    backward alike (ATen's FlashAttentionKernel.cpp: 32, 64 or 256 queries by length, 512 keys)."""
    return (256 if n >= 768 else 64 if n >= 192 else 32), 512


def causal_block_pairs(n_q: int, n_k: int, q_block: int = 1, kv_block: int = 1) -> int:
    """Query-key scores a block kernel computes under a causal mask (query i sees keys 0..i): each
    block of queries against every key block up to the one holding its last query's key.
    Blocks of 1 give the exact causal count, N(N+1)/2 for N queries and keys."""
    if q_block == kv_block == 1:
        m = min(n_q, n_k)  # queries past the last key see every key
        return m * (m + 1) // 2 + (n_q - m) * n_k
    total = 0
    for start in range(0, n_q, q_block):
        rows = min(q_block, n_q - start)
        keys = min(n_k, -(-(start + rows) // kv_block) * kv_block)  # key blocks up to the last query
        total += rows * keys
    return total


@register_mechanism
class SDPAttention(SoftmaxAttention):
    name = "sdpa"
    summary = "softmax attention via F.scaled_dot_product_attention (fused kernels)"
    flops_formula = ("8·B·N·C² (projections) + 4·B·P·C (QKᵀ, AV over P query-key pairs per head); "
                     "elementwise 5·B·H·P. P = N², and causal: the CPU flash kernel skips key blocks "
                     "(512) wholly above the diagonal (P = Σ over query blocks of rows × keys up to "
                     "the block's end, N² below N = 512, → N²/2 for large N); CUDA's fused kernels "
                     "skip the tiles above it (P = N(N+1)/2, the masked part of diagonal tiles not "
                     "counted); the math path computes all, P = N²")

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        """q (B, H, N, d), k and v (B, H_kv, N, d): PyTorch shares each key/value head over its group."""
        keys = None if mask is None else mask[:, None, None, :]  # bool: True = may be attended
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keys, enable_gqa=k.shape[1] != q.shape[1])

    def attend_causal(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])

    def causal_blocks(self, n: int) -> tuple[int, int] | None:
        """(query, key) blocks of the kernel that runs ``is_causal`` here for this module's device
        and dtype, skipping blocks wholly in the future; None where it computes every score (math)."""
        weight = self.proj.weight
        probe = torch.zeros(1, self.num_heads, 64, self.head_dim, device=weight.device, dtype=weight.dtype)
        if SDPBackend(torch._fused_sdp_choice(probe, probe, probe, is_causal=True)) == SDPBackend.MATH:
            return None
        return cpu_flash_blocks(n) if weight.device.type == "cpu" else (1, 1)

    def score_pairs(self, n: int, causal: bool) -> int:
        blocks = self.causal_blocks(n) if causal else None
        return n * n if blocks is None else causal_block_pairs(n, n, *blocks)

    @classmethod
    def backend(cls, device: str = "cpu", dtype: torch.dtype = torch.float32) -> str:
        """The kernel PyTorch's dispatcher picks for a (1, 2, 64, 32) problem of this dtype."""
        if cls.unavailable_reason(device):
            return "sdpa: device unavailable"
        q = torch.zeros(1, 2, 64, 32, device=device, dtype=dtype)
        choice = SDPBackend(torch._fused_sdp_choice(q, q, q))
        return f"sdpa: {choice.name.lower()}"


# FlopCounterMode has no formula for the CPU flash kernel; without one it would count 0. Under
# is_causal the kernel skips key blocks above the diagonal, and the count says so (PyTorch's own
# formulas for the CUDA kernels count every score: an upper bound there).
_aten = torch.ops.aten


def _causal_share(full: int, query_shape, key_shape, is_causal: bool) -> int:
    """``full`` scaled to the scores the CPU flash kernel computes (all of them unless causal)."""
    n_q, n_k = query_shape[-2], key_shape[-2]
    if not is_causal:
        return full
    return full * causal_block_pairs(n_q, n_k, *cpu_flash_blocks(n_q)) // (n_q * n_k)


@register_flop_formula(_aten._scaled_dot_product_flash_attention_for_cpu)
def _cpu_flash_flop(query_shape, key_shape, value_shape, dropout_p=0.0, is_causal=False, *args,
                    out_shape=None, **kwargs) -> int:
    full = sdpa_flop_count(query_shape, key_shape, value_shape)
    return _causal_share(full, query_shape, key_shape, is_causal)


@register_flop_formula(_aten._scaled_dot_product_flash_attention_for_cpu_backward)
def _cpu_flash_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, out, logsumexp,
                             dropout_p=0.0, is_causal=False, *args, out_shape=None, **kwargs) -> int:
    full = sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)
    return _causal_share(full, query_shape, key_shape, is_causal)
