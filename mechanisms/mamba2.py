"""Mamba2's mixer (Dao and Gu, 2024, "Transformers are SSMs"): the SSD scalar-decay state space,
with its in-projection, short convolution, skip and gated norm, on flash-linear-attention's
``simple_gla`` kernel.

    z, x, B, C, dt = x W_in                      (E·C, E·C, N, N, H channels; one group: B, C shared by heads)
    x, B, C = SiLU(conv(x, B, C))                (causal depthwise, 4 taps, with bias)
    Δ_t = softplus(dt_t + dt_bias),  a_t = −exp(A_log) · Δ_t      (one scalar decay per head)
    S_t = exp(a_t) S_{t-1} + B_t (Δ_t x_t)ᵀ,    y_t = S_tᵀ C_t + D ⊙ x_t    (per head: state N × E·C/H)
    out = W_out RMSNorm(y ⊙ SiLU(z))             (norm after the gate, over all E·C channels)

The recurrence is exactly simple GLA's (fla's ``chunk_simple_gla``) with q = C, k = B, v = Δ·x,
g = a and scale 1, which is how this mechanism runs it: fla's kernel on CUDA, the chunked
scalar-decay form of ``mechanisms.chunked`` elsewhere.

What is Mamba2's here: the whole mixer of Mamba2's layer (``mamba_ssm``'s Mamba2 with ngroups = 1,
D per head, no dt limit, A uniform in (1, 16) and softplus(dt_bias) log-uniform in [0.001, 0.1] at
the start, as fla's Mamba2 layer). What is not: its kernels (``mamba_ssm``'s fused SSD and
conv kernels are replaced by fla's simple-GLA kernel and PyTorch's conv1d); its sizes (Mamba2
defaults to expand 2 and state 128, about 6·C² weights; here expand 1 and state 32, under softmax's
4·C² for LRA's parameter rule); and its block: a Mamba2 model stacks norm → mixer → residual with
no MLP, while attnbench puts this mixer where attention goes, in the task's own layer (norms,
residuals and its feed-forward network). The heads come from ``num_heads`` (head width E·C/H).
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
    Recurrence,
    RecurrentMixer,
    RecurrentOptions,
    expanded,
    mamba_time_steps,
    rms_norm,
)


@dataclasses.dataclass(frozen=True)
class Mamba2Options(RecurrentOptions):
    expand: float = option(1.0, 0.0625, 8)  # inner channels E·C per model channel (Mamba2: 2)
    state: int = option(32, 1, 1024)  # state size N, shared by the heads (Mamba2: 128)
    conv: int = option(4, 1, 16)  # taps of the causal convolution over x, B, C (Mamba2: 4)
    eps: float = option(1e-5, 0, 1e-2)  # of the gated RMSNorm


@register_mechanism
class Mamba2(RecurrentMixer):
    name = "mamba2"
    summary = "Mamba2's SSD mixer: scalar data-dependent decay, conv, gated norm (fla's simple_gla)"
    Options = Mamba2Options
    fla_kernel = "simple_gla"
    projections = ("z", "xbc", "dt")
    torch_form = "scalar-decay form of mechanisms/chunked.py, a loop over chunks"
    flops_formula = ("2·B·N·C·(3·E·C + 2·S + H) (projections; S = state) + s·2·B·N·taps·(E·C + 2·S) "
                     "(conv) + s·B·H·N'·2·(c·S + c·P + 2·S·P) (chunked SSD, P = E·C/H; s = 2 scans when "
                     "bidirectional, N' = N padded to the chunk c); elementwise ≈ s·(12·B·N·E·C + "
                     "B·H·N'·(3c + 4S + 2P))")

    def __init__(self, dim: int, num_heads: int, options: Mamba2Options | None = None) -> None:
        super().__init__(dim, num_heads, options)
        o = self.options
        self.inner = expanded(dim, o.expand, num_heads, self.name, "expand")
        self.head_width = self.inner // num_heads  # P
        self.splits = (self.inner, self.inner + 2 * o.state, num_heads)  # z | x, B, C | dt
        self.in_proj = nn.Linear(dim, sum(self.splits), bias=False)
        conv_width = self.inner + 2 * o.state
        self.conv = nn.Conv1d(conv_width, conv_width, o.conv, groups=conv_width, bias=True)
        self.dt_bias = nn.Parameter(mamba_time_steps(num_heads))
        self.A_log = nn.Parameter(torch.empty(num_heads).uniform_(1, 16).log())
        self.D = nn.Parameter(torch.ones(num_heads))
        self.norm_weight = nn.Parameter(torch.ones(self.inner))
        self.o_proj = nn.Linear(self.inner, dim, bias=False)

    def project(self, x: Tensor) -> tuple[Tensor, ...]:
        return self.in_proj(x).split(self.splits, dim=-1)

    def short_convs(self) -> dict[str, nn.Conv1d]:
        return {"xbc": self.conv}

    def inputs(self, z: Tensor, xbc: Tensor, dt: Tensor,
               start: int | Tensor = 0) -> tuple[Recurrence, tuple[Tensor, ...]]:
        s = self.options.state
        x, state_in, state_out = xbc.split((self.inner, s, s), dim=-1)  # after the convolution
        x = self.split_heads(x)  # (B, N, H, P)
        step = F.softplus(dt + self.dt_bias)  # Δ (B, N, H)
        log_decay = -self.A_log.exp() * step  # (B, N, H), ≤ 0
        v = x * step.unsqueeze(-1)  # Δ·x
        k = state_in.unsqueeze(2).expand(-1, -1, self.num_heads, -1)  # B, shared by the heads
        q = state_out.unsqueeze(2).expand(-1, -1, self.num_heads, -1)  # C
        return Recurrence(q, k, v, log_decay, scale=1.0), (x, z)

    def read_out(self, y: Tensor, x: Tensor, z: Tensor) -> Tensor:
        y = (y + self.D[:, None] * x).flatten(2) * F.silu(z)  # (B, N, E·C): skip, then the gate
        return rms_norm(y, self.norm_weight, self.options.eps)

    def state_size(self) -> tuple[int, int]:
        return self.options.state, self.head_width

    def fla_recur(self, rec: Recurrence, final_state: bool) -> tuple[Tensor, Tensor | None]:
        return fla_kernels.kernel("simple_gla")(rec.q.contiguous(), rec.k.contiguous(), rec.v, rec.g,
                                                scale=rec.scale, output_final_state=final_state)

    def flops(self, batch: int, n: int, grid: Grid | None = None, causal: bool = False) -> Flops:
        o = self.options
        scan = chunked.decay_attention_flops(n, o.state, self.head_width, o.chunk)
        return self.call_flops(batch, n, causal, scan, weights=self.dim * (sum(self.splits) + self.inner),
                               convolved=o.conv * (self.inner + 2 * o.state), per_token=12 * self.inner)
