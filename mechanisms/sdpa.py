"""Softmax attention through ``torch.nn.functional.scaled_dot_product_attention``.

The same function as ``softmax`` (same parameters, so weights load across), but PyTorch picks
a fused kernel (flash / memory-efficient / cuDNN / math) for the device and dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend
from torch.utils.flop_counter import register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

from attnbench.registry import register_mechanism
from mechanisms.softmax import SoftmaxAttention


@register_mechanism
class SDPAttention(SoftmaxAttention):
    name = "sdpa"
    summary = "softmax attention via F.scaled_dot_product_attention (fused kernels)"

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        """q (B, H, N, d), k and v (B, H_kv, N, d): PyTorch shares each key/value head over its group."""
        keys = None if mask is None else mask[:, None, None, :]  # bool: True = may be attended
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keys, enable_gqa=k.shape[1] != q.shape[1])

    @classmethod
    def backend(cls, device: str = "cpu", dtype: torch.dtype = torch.float32) -> str:
        """The kernel PyTorch's dispatcher picks for a (1, 2, 64, 32) problem of this dtype."""
        if cls.unavailable_reason(device):
            return "sdpa: device unavailable"
        q = torch.zeros(1, 2, 64, 32, device=device, dtype=dtype)
        choice = SDPBackend(torch._fused_sdp_choice(q, q, q))
        return f"sdpa: {choice.name.lower()}"


# FlopCounterMode has no formula for the CPU flash kernel; without one it would count 0.
_aten = torch.ops.aten


@register_flop_formula(_aten._scaled_dot_product_flash_attention_for_cpu)
def _cpu_flash_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


@register_flop_formula(_aten._scaled_dot_product_flash_attention_for_cpu_backward)
def _cpu_flash_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args,
                             out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)
