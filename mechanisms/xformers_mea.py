"""Softmax attention through ``xformers.ops.memory_efficient_attention`` (CUDA only).

The same function and parameters as ``softmax`` (weights load across), computed by xformers'
fused kernels on tensors in its (B, N, H, d) layout. It never falls back to another
implementation: where xformers cannot run (no CUDA, xformers missing, or its C++/CUDA extensions
failed to load, e.g. built for another PyTorch) ``unavailable_reason`` says why and ``forward``
raises. xformers is imported lazily, so merely listing mechanisms does not load it.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from attnbench.mechanism import Grid
from attnbench.registry import register_mechanism
from mechanisms.softmax import SoftmaxAttention


@functools.cache
def xformers_problem() -> str | None:
    """Why xformers' fused attention cannot load here, in xformers' own words; None when it can."""
    try:
        import xformers
        from xformers import _cpp_lib
    except ImportError as exc:
        return f"xformers is not installed ({exc})"
    if not xformers._has_cpp_library:
        reason = " ".join(str(_cpp_lib._cpp_library_load_exception).split())  # one line
        return f"xformers {xformers.__version__}: {reason}"
    return None


@register_mechanism
class XFormersAttention(SoftmaxAttention):
    name = "xformers"
    summary = "softmax attention via xformers.ops.memory_efficient_attention (CUDA only)"
    devices = ("cuda",)
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    flops_countable = False  # xformers' custom kernels are invisible to FlopCounterMode
    masking = "per-length"  # no attention bias here: padded batches run per length of real tokens

    @classmethod
    def unavailable_reason(cls, device: str = "cpu") -> str | None:
        kind = torch.device(device).type
        if kind != "cuda":
            return f"xformers.ops.memory_efficient_attention runs on CUDA GPUs only, not on {kind}"
        reasons = [r for r in (super().unavailable_reason(device), xformers_problem()) if r]
        return "; ".join(reasons) or None

    @classmethod
    def backend(cls, device: str = "cpu", dtype: torch.dtype = torch.float32) -> str:
        """The xformers forward op its dispatcher picks for a (1, 64, 2, 32) problem of this dtype."""
        reason = cls.unavailable_reason(device)
        if reason:
            return f"xformers: unavailable ({reason})"
        import xformers
        from xformers.ops import fmha

        q = torch.zeros(1, 64, 2, 32, device=device, dtype=dtype)
        op = fmha._dispatch_fw(fmha.Inputs(query=q, key=q, value=q), needs_gradient=False)
        return f"xformers {xformers.__version__}: {op.NAME}"

    def mix(self, x: Tensor, grid: Grid | None) -> Tensor:
        reason = self.unavailable_reason(x.device.type)
        if reason:
            raise RuntimeError(f"{self.name}: {reason}")
        from xformers.ops import memory_efficient_attention

        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).unbind(2)  # (B, N, H, d)
        out = memory_efficient_attention(q, k, v)  # (B, N, H, d), scale 1/√d
        return self.proj(out.reshape(b, n, c))
