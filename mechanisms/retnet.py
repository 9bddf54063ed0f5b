"""RetNet's multi-scale retention (Sun et al., 2023), as flash-linear-attention's MultiScaleRetention.

Per head h a fixed decay γ_h = 1 − 2^(−5−h) and a (dk × dv) state:

    S_t = γ_h S_{t-1} + k_t v_tᵀ,   o_t = S_tᵀ q_t / √dk
    q, k = RoPE(x W_q), RoPE(x W_k)    (rotary positions, as fla's layer; the paper used xPos)
    out  = W_o [RMSNorm_head(o) ⊙ SiLU(x W_g)]

q, k have C·expand_k channels, v and the output gate C·expand_v. fla's layer defaults to
expand_k=1, expand_v=2 (8·C² weights); here 0.5 and 1 (4·C², softmax's count) keep LRA's
parameter rule. No short convolution by default (``conv=0``, as fla's default); with ``conv`` > 0,
q, k and v each get one before the rotary positions. Kernels: fla's ``chunk_retention`` on CUDA, the
chunked scalar-decay form of ``mechanisms.chunked`` elsewhere.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from attnbench.mechanism import Flops, Grid, option, require
from attnbench.registry import register_mechanism
from mechanisms import chunked, fla_kernels
from mechanisms.recurrent import QKVMixer, Recurrence, RecurrentOptions


@dataclasses.dataclass(frozen=True)
class RetNetOptions(RecurrentOptions):
    expand_k: float = option(0.5, 0.0625, 8)  # query/key channels per model channel (fla: 1)
    expand_v: float = option(1.0, 0.0625, 8)  # value and output-gate channels per model channel (fla: 2)
    conv: int = option(0, 0, 16)  # taps of the short convolutions on q, k, v; 0: none (fla's default)
    eps: float = option(1e-5, 0, 1e-2)  # of the per-head RMSNorm


def log_decays(num_heads: int, device: torch.device | None = None) -> Tensor:
    """log γ_h = log(1 − 2^(−5−h)) for h = 0..H−1: RetNet's fixed per-head decays, (H,)."""
    return torch.log1p(-torch.exp2(-5.0 - torch.arange(num_heads, dtype=torch.float64, device=device)))


def rotary(x: Tensor, start: int | Tensor = 0) -> Tensor:
    """Rotary positions start..start+N−1 on (B, N, H, d), d even: the two halves of the channels
    rotated by angles t·10000^(−2i/d) (fla's RotaryEmbedding, not interleaved). ``start``: an int, or
    (B,) per sequence (a decoding step)."""
    n, d = x.shape[1], x.shape[-1]
    inv_freq = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64, device=x.device) / d)  # (d/2,)
    positions = torch.arange(n, dtype=torch.float64, device=x.device)  # (N,)
    if isinstance(start, Tensor):
        positions = positions + start.to(positions)[:, None]  # (B, N)
    elif start:
        positions = positions + start
    angles = positions[..., None] * inv_freq  # (N, d/2) or (B, N, d/2)
    cos, sin = (f(angles).to(x.dtype).unsqueeze(-2) for f in (torch.cos, torch.sin))  # (…, N, 1, d/2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


@register_mechanism
class RetNet(QKVMixer):
    name = "retnet"
    summary = "RetNet retention: fixed per-head decay, rotary q/k, gated RMSNorm (fla's layer)"
    Options = RetNetOptions
    fla_kernel = "retention"
    projections = ("q", "k", "v", "gate")
    torch_form = "scalar-decay form of mechanisms/chunked.py, a loop over chunks"
    flops_formula = ("2·B·N·C²·(2·ek + 3·ev) (projections) + s·B·H·N'·2·(c·dk + c·dv + 2·dk·dv) "
                     "(chunked retention; s = 2 scans when bidirectional, N' = N padded to the chunk c); "
                     "elementwise ≈ s·(B·N·C·(6·ek + 8·ev) + B·H·N'·(3c + 4dk + 2dv))")

    def __init__(self, dim: int, num_heads: int, options: RetNetOptions | None = None) -> None:
        super().__init__(dim, num_heads, options)
        require(self.dk % 2 == 0,
                f"{self.name}: the rotary positions need an even key width per head; expand_k="
                f"{self.options.expand_k:g} gives {self.dk} (dim={dim}, num_heads={num_heads})")

    def project(self, x: Tensor) -> tuple[Tensor, ...]:
        return self.q_proj(x), self.k_proj(x), self.v_proj(x), self.g_proj(x)

    def inputs(self, q: Tensor, k: Tensor, v: Tensor, gate: Tensor,
               start: int | Tensor = 0) -> tuple[Recurrence, tuple[Tensor, ...]]:
        q, k = rotary(self.split_heads(q), start), rotary(self.split_heads(k), start)
        g = log_decays(self.num_heads, q.device).to(q.dtype).expand(q.shape[:3])  # (B, N, H)
        return Recurrence(q, k, self.split_heads(v), g, scale=self.dk**-0.5), (gate,)

    def fla_recur(self, rec: Recurrence, final_state: bool) -> tuple[Tensor, Tensor | None]:
        # fla's retention kernel applies the same fixed decays γ_h itself
        return fla_kernels.kernel("retention")(rec.q, rec.k, rec.v, scale=rec.scale,
                                               output_final_state=final_state)

    def flops(self, batch: int, n: int, grid: Grid | None = None, causal: bool = False) -> Flops:
        o, k, v = self.options, self.key_dim, self.value_dim
        scan = chunked.decay_attention_flops(n, self.dk, self.dv, o.chunk)
        return self.call_flops(batch, n, causal, scan, weights=self.dim * (2 * k + 3 * v),
                               convolved=o.conv * (2 * k + v), per_token=8 * v + 6 * k)
