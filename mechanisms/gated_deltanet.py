"""Gated DeltaNet (Yang, Kautz and Hatamizadeh, 2025, "Gated Delta Networks: Improving Mamba2 with
Delta Rule"), as flash-linear-attention's GatedDeltaNet layer.

Per head a (dk × dv) state written by the delta rule and decayed by Mamba2's scalar gate:

    q, k, v = SiLU(ShortConv(x W_q)), … (causal depthwise, 4 taps), q and k L2-normalised per head
    β_t = σ(x_t W_β),   g_t = −exp(A_log) · softplus(x_t W_a + dt_bias)     (one each per head)
    S_t = exp(g_t) (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ,   o_t = S_tᵀ q_t / √dk
    out = W_o [RMSNorm_head(o) ⊙ SiLU(x W_g)]

A = exp(A_log) starts uniform in (0, 16) and softplus(dt_bias) log-uniform in [0.001, 0.1], as fla's
layer. fla's layer sizes heads of 256 key channels and values twice as wide (about 6·C² weights);
here q, k have C·expand_k channels and v, the output gate C·expand_v (0.5 and 1: about softmax's
4·C²). Kernels: fla's ``chunk_gated_delta_rule`` on CUDA, the chunked delta rule of
``mechanisms.chunked`` (its WY/UT form) elsewhere.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnbench.mechanism import Flops, Grid, option
from attnbench.registry import register_mechanism
from mechanisms import chunked, fla_kernels
from mechanisms.recurrent import (
    QKVMixer,
    Recurrence,
    RecurrentOptions,
    l2_normalize,
    mamba_time_steps,
)


@dataclasses.dataclass(frozen=True)
class GatedDeltaNetOptions(RecurrentOptions):
    expand_k: float = option(0.5, 0.0625, 8)  # query/key channels per model channel
    expand_v: float = option(1.0, 0.0625, 8)  # value and output-gate channels per model channel
    conv: int = option(4, 0, 16)  # taps of the short convolutions on q, k, v (fla: 4); 0: SiLU only
    eps: float = option(1e-5, 0, 1e-2)  # of the per-head RMSNorm


@register_mechanism
class GatedDeltaNet(QKVMixer):
    name = "gated_deltanet"
    summary = "Gated DeltaNet: the delta rule with Mamba2's decay, short convs, gated RMSNorm (fla's layer)"
    Options = GatedDeltaNetOptions
    fla_kernel = "gated_delta_rule"
    projections = ("q", "k", "v", "a", "b", "gate")
    torch_form = "delta rule in WY/UT form of mechanisms/chunked.py, a loop over chunks"
    flops_formula = ("2·B·N·C·(C·(2·ek + 3·ev) + 2·H) (projections) + s·2·B·N·taps·C·(2·ek + ev) (short "
                     "convs) + s·B·H·N'·(2c·(3·dk + 2·dv) + 6·dk·dv) (chunked delta rule; s = 2 scans when "
                     "bidirectional, N' = N padded to the chunk c); elementwise ≈ s·(B·N·C·(10·ek + 8·ev) "
                     "+ B·H·N'·(c²/3 + 4c + 4dk + 2dv))")

    def __init__(self, dim: int, num_heads: int, options: GatedDeltaNetOptions | None = None) -> None:
        super().__init__(dim, num_heads, options)
        self.a_proj = nn.Linear(dim, num_heads, bias=False)  # the decay's time step
        self.b_proj = nn.Linear(dim, num_heads, bias=False)  # the writing strength β
        self.A_log = nn.Parameter(torch.empty(num_heads).uniform_(0, 16).log())
        self.dt_bias = nn.Parameter(mamba_time_steps(num_heads))

    def project(self, x: Tensor) -> tuple[Tensor, ...]:
        return self.q_proj(x), self.k_proj(x), self.v_proj(x), self.a_proj(x), self.b_proj(x), self.g_proj(x)

    def inputs(self, q: Tensor, k: Tensor, v: Tensor, a: Tensor, b_logit: Tensor, gate: Tensor,
               start: int | Tensor = 0) -> tuple[Recurrence, tuple[Tensor, ...]]:
        if self.convs is None:  # no convolution: its SiLU alone
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
        q, k = l2_normalize(self.split_heads(q)), l2_normalize(self.split_heads(k))
        beta = torch.sigmoid(b_logit)  # (B, N, H)
        log_decay = -self.A_log.exp() * F.softplus(a + self.dt_bias)  # (B, N, H), ≤ 0
        return Recurrence(q, k, self.split_heads(v), log_decay, beta, scale=self.dk**-0.5), (gate,)

    def fla_recur(self, rec: Recurrence, final_state: bool) -> tuple[Tensor, Tensor | None]:
        return fla_kernels.kernel("gated_delta_rule")(rec.q, rec.k, rec.v, rec.g, rec.beta, scale=rec.scale,
                                                      output_final_state=final_state)

    def flops(self, batch: int, n: int, grid: Grid | None = None, causal: bool = False) -> Flops:
        o, h, k, v = self.options, self.num_heads, self.key_dim, self.value_dim
        scan = chunked.delta_rule_flops(n, self.dk, self.dv, o.chunk)
        return self.call_flops(batch, n, causal, scan, weights=self.dim * (2 * k + 3 * v + 2 * h),
                               convolved=o.conv * (2 * k + v), per_token=8 * v + 10 * k)
