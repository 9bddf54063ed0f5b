"""Gated linear attention (Yang et al., 2024, "Gated Linear Attention Transformers with
Hardware-Efficient Training"), as flash-linear-attention's GatedLinearAttention layer.

Per head a (dk × dv) state with a data-dependent decay for each key channel:

    α_t = exp(logsigmoid(x_t W_α1 W_α2 + b_α) / 16)        (a rank-16 gate, fla's normaliser 16)
    S_t = diag(α_t) S_{t-1} + k_t v_tᵀ,   o_t = S_tᵀ q_t / √dk
    out = W_o [RMSNorm_head(o) ⊙ SiLU(x W_g)]

q, k have C·expand_k channels, v and the output gate C·expand_v: fla's defaults (0.5, 1), about
softmax's 4·C² weights. No short convolution by default (``conv=0``, as fla's default). Kernels:
fla's ``chunk_gla`` on CUDA, the chunked per-channel-decay form of ``mechanisms.chunked``
(sub-chunks of ``sub_chunk`` tokens inside each chunk) elsewhere.
"""

from __future__ import annotations

import dataclasses

import torch.nn.functional as F
from torch import Tensor, nn

from attnbench.mechanism import Flops, Grid, option, require
from attnbench.registry import register_mechanism
from mechanisms import chunked, fla_kernels
from mechanisms.recurrent import QKVMixer, Recurrence, RecurrentOptions


@dataclasses.dataclass(frozen=True)
class GLAOptions(RecurrentOptions):
    expand_k: float = option(0.5, 0.0625, 8)  # query/key (and gate) channels per model channel
    expand_v: float = option(1.0, 0.0625, 8)  # value and output-gate channels per model channel
    gate_rank: int = option(16, 1, 1024)  # rank of the decay gate's projection (fla: 16)
    gate_normalizer: float = option(16, 1, 1024)  # the log-gate is logsigmoid(·) / this (fla: 16)
    sub_chunk: int = option(16, 1, 4096)  # tokens per sub-chunk of the PyTorch form: divides chunk, or ≥ it
    conv: int = option(0, 0, 16)  # taps of the short convolutions on q, k, v; 0: none (fla's default)
    eps: float = option(1e-5, 0, 1e-2)  # of the per-head RMSNorm


@register_mechanism
class GatedLinearAttention(QKVMixer):
    name = "gla"
    summary = "gated linear attention: data-dependent per-channel decay, gated RMSNorm (fla's layer)"
    Options = GLAOptions
    fla_kernel = "gla"
    projections = ("q", "k", "v", "gk", "gate")
    torch_form = "per-channel-decay form of mechanisms/chunked.py, a loop over chunks"
    flops_formula = ("2·B·N·C·(C·(2·ek + 3·ev) + r·(1 + ek)) (projections, rank-r gate) + "
                     "s·B·H·N'·2·(c·dk + c·dv + 2·dk·dv) (chunked GLA; s = 2 scans when bidirectional, "
                     "N' = N padded to the chunk c); elementwise ≈ s·(B·N·C·(6·ek + 8·ev) + "
                     "B·H·N'·(3c + 4dk + 2dv + 4·sub·dk + 3c·dk))")

    def __init__(self, dim: int, num_heads: int, options: GLAOptions | None = None) -> None:
        super().__init__(dim, num_heads, options)
        o = self.options
        require(o.chunk % min(o.sub_chunk, o.chunk) == 0,
                f"{self.name}: sub_chunk={o.sub_chunk} must divide chunk={o.chunk} (or be at least chunk)")
        self.gk_proj = nn.Sequential(nn.Linear(dim, o.gate_rank, bias=False),
                                     nn.Linear(o.gate_rank, self.key_dim, bias=True))

    def project(self, x: Tensor) -> tuple[Tensor, ...]:
        return self.q_proj(x), self.k_proj(x), self.v_proj(x), self.gk_proj(x), self.g_proj(x)

    def inputs(self, q: Tensor, k: Tensor, v: Tensor, gk: Tensor, gate: Tensor,
               start: int | Tensor = 0) -> tuple[Recurrence, tuple[Tensor, ...]]:
        log_decay = self.split_heads(F.logsigmoid(gk) / self.options.gate_normalizer)  # (B, N, H, dk), ≤ 0
        return Recurrence(self.split_heads(q), self.split_heads(k), self.split_heads(v), log_decay,
                          scale=self.dk**-0.5), (gate,)

    def chunked_options(self) -> dict[str, int]:
        return {"chunk": self.options.chunk, "sub_chunk": self.options.sub_chunk}

    def fla_recur(self, rec: Recurrence, final_state: bool) -> tuple[Tensor, Tensor | None]:
        return fla_kernels.kernel("gla")(rec.q, rec.k, rec.v, rec.g, scale=rec.scale,
                                         output_final_state=final_state)

    def flops(self, batch: int, n: int, grid: Grid | None = None, causal: bool = False) -> Flops:
        o, c, k, v = self.options, self.dim, self.key_dim, self.value_dim
        scan = chunked.decay_attention_flops(n, self.dk, self.dv, o.chunk, per_channel=True,
                                             sub_chunk=o.sub_chunk)
        return self.call_flops(batch, n, causal, scan, weights=c * (2 * k + 3 * v) + o.gate_rank * (c + k),
                               convolved=o.conv * (2 * k + v), per_token=8 * v + 6 * k)
