"""Sinkformer attention (Sander et al., 2022, "Sinkformers: Transformers with Doubly Stochastic Attention").

The row softmax of exp(QKᵀ/√d) is replaced by Sinkhorn's algorithm: ``iters`` normalisations,
alternating between columns and rows and ending on rows, in the log domain. One iteration is
the softmax; as iterations grow the N×N matrix tends to a doubly stochastic one (every row and
column sums to 1). As in the authors' code (which starts on rows and counts single normalisations;
3 in their ViT runs), odd ``iters`` give R, C, R, …, R; even ones start on columns so that
rows always sum to 1. The quadratic optimal-transport peer of SeT.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from attnbench.mechanism import Flops, Grid, option, projection_flops
from attnbench.registry import register_mechanism
from mechanisms.softmax import SoftmaxAttention, SoftmaxOptions


@dataclasses.dataclass(frozen=True)
class SinkformerOptions(SoftmaxOptions):
    iters: int = option(3, 1, 1000)  # Sinkhorn normalisations, the last over rows; 1 = softmax (ViT: 3)


@register_mechanism
class SinkformerAttention(SoftmaxAttention):
    name = "sinkformer"
    no_causal_reason = ("Sinkhorn's doubly-stochastic normalisation scales every key's column over all "
                        "queries, so each output depends on future tokens")
    summary = "Sinkhorn-normalised (doubly stochastic) softmax attention (Sander et al. 2022)"
    Options = SinkformerOptions
    complexity = "quadratic"
    flops_formula = ("8·B·N·C² (projections) + 4·B·N²·C (QKᵀ, AV); "
                     "elementwise ≈ (5·iters + 1)·B·H·N² (log-domain normalisations, final exp)")

    def weights(self, q: Tensor, k: Tensor, mask: Tensor | None = None) -> Tensor:
        """The (B, H, N, N) Sinkhorn-normalised attention matrix; its rows sum to 1.

        With padding (mask (B, N) False), the normalisations run on the real × real block: every
        entry in a padding row or column is pushed to the dtype's minimum before each step.
        """
        log_p = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)  # (B, H, N, N) log-kernel
        outside = None if mask is None else ~(mask[:, None, :, None] & mask[:, None, None, :])
        iters = self.options.iters
        for i in range(iters):
            if outside is not None:  # finite, not -inf: padding rows stay NaN-free
                log_p = log_p.masked_fill(outside, torch.finfo(log_p.dtype).min)
            dim = -1 if (iters - 1 - i) % 2 == 0 else -2  # rows on the last step, alternating back
            log_p = log_p - log_p.logsumexp(dim, keepdim=True)
        return log_p.exp()

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.weights(q, k, mask) @ v

    def flops(self, batch: int, n: int, grid: Grid | None = None, causal: bool = False) -> Flops:
        core = 2 * 2 * batch * n * n * self.dim  # QKᵀ and AV over all heads
        return Flops(matmul=projection_flops(batch, n, self.dim, 4) + core,
                     elementwise=(5 * self.options.iters + 1) * batch * self.num_heads * n * n)
