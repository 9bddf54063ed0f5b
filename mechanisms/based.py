"""Based's linear attention (Arora et al., 2024, "Simple linear attention language models balance
the recall-throughput tradeoff"), as flash-linear-attention's BasedLinearAttention layer.

q and k are projected to f = ``feature_dim`` channels per head (16, Based's choice) and mapped by
the second-order Taylor expansion of exp,

    φ(x) = [1, x / f^¼, x_i² / √(2f) (i), x_i x_j / √f (i < j)]     (1 + f + f(f+1)/2 features),
    φ(q)·φ(k) = 1 + q·k/√f + (q·k)² / (2f),

the products x_i x_j taken once per pair, as fla's TaylorFeatureMap (153 features at f = 16, not
the 273 of the full outer product),

then causal linear attention with its normaliser, per head:

    o_t = Σ_{s≤t} (φ(q_t)·φ(k_s)) v_s / (Σ_{s≤t} φ(q_t)·φ(k_s) + 10⁻⁶),    out = W_o o.

v and the output have C channels; no gate, norm or convolution, as fla's layer. The Taylor kernel is
positive (1 + s + s²/2 > 0), so the normaliser never vanishes. Based's sliding-window softmax
attention companion (its small local window layers) is not part of this mechanism: ``based`` is the
linear-attention half alone. Kernels: fla's ``fused_chunk_based`` on CUDA (feature_dim ≤ 16, the
kernel's limit), the chunked no-decay form of ``mechanisms.chunked`` on the Taylor features
elsewhere, with the normaliser as one more value channel.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from attnbench.mechanism import Flops, Grid, option
from attnbench.registry import register_mechanism
from mechanisms import chunked, fla_kernels
from mechanisms.recurrent import Recurrence, RecurrentMixer, RecurrentOptions

EPS = 1e-6  # added to the normaliser, as fla's kernel and reference do
FLA_MAX_FEATURES = 16  # fused_chunk_based's limit on the feature dimension


@dataclasses.dataclass(frozen=True)
class BasedOptions(RecurrentOptions):
    feature_dim: int = option(16, 1, 64)  # f: query/key channels per head before the Taylor map


def feature_count(f: int) -> int:
    """1 + f + f(f+1)/2: the Taylor features of f channels."""
    return 1 + f + f * (f + 1) // 2


def taylor_features(x: Tensor) -> Tensor:
    """φ(x) = [1, x/f^¼, x_i²/√(2f), x_i x_j/√f (i < j)] on (..., f): (..., 1 + f + f(f+1)/2)."""
    f = x.shape[-1]
    rows, cols = torch.triu_indices(f, f, device=x.device)  # each pair i ≤ j once
    weight = torch.full(rows.shape, f**-0.5, dtype=x.dtype, device=x.device)
    weight = weight.masked_fill(rows == cols, (2 * f) ** -0.5)  # x_i² / √(2f), x_i x_j / √f
    second = x[..., rows] * x[..., cols] * weight  # (..., f(f+1)/2)
    return torch.cat([torch.ones_like(x[..., :1]), x * f**-0.25, second], dim=-1)


@register_mechanism
class Based(RecurrentMixer):
    name = "based"
    summary = "Based: 2nd-order Taylor feature map linear attention, normalised (fla's layer)"
    Options = BasedOptions
    fla_kernel = "based"
    projections = ("q", "k", "v")
    torch_form = ("no-decay form of mechanisms/chunked.py on 1 + f + f(f+1)/2 Taylor features, the states "
                  "by a cumulative sum over chunks")
    flops_formula = ("2·B·N·C·(2·H·f + 2·C) (projections) + s·B·H·N'·2·(c·F + c·(d+1) + 2·F·(d+1)) "
                     "(chunked linear attention on F = 1 + f + f(f+1)/2 features, the normaliser as a value "
                     "channel; s = 2 scans when bidirectional, N' = N padded to the chunk c); elementwise "
                     "≈ s·B·H·N'·(3c + 4F + 2d + 6)")

    def __init__(self, dim: int, num_heads: int, options: BasedOptions | None = None) -> None:
        super().__init__(dim, num_heads, options)
        f = self.options.feature_dim
        self.q_proj = nn.Linear(dim, num_heads * f, bias=False)
        self.k_proj = nn.Linear(dim, num_heads * f, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def fla_limit(self) -> str | None:
        f = self.options.feature_dim
        if f > FLA_MAX_FEATURES:
            return f"fla's fused_chunk_based takes feature_dim <= {FLA_MAX_FEATURES}, not {f}"
        return None

    def project(self, x: Tensor) -> tuple[Tensor, ...]:
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def inputs(self, q: Tensor, k: Tensor, v: Tensor,
               start: int | Tensor = 0) -> tuple[Recurrence, tuple[Tensor, ...]]:
        """The Taylor features of q and k (B, N, H, F), and v with a column of ones (B, N, H, d + 1):
        the state's last column is the normaliser's running sum Σ φ(k)."""
        q, k, v = self.split_heads(q), self.split_heads(k), self.split_heads(v)
        ones = torch.ones_like(v[..., :1])
        return Recurrence(taylor_features(q), taylor_features(k), torch.cat([v, ones], -1)), ()

    def read_out(self, sums: Tensor) -> Tensor:
        return (sums[..., :-1] / (sums[..., -1:] + EPS)).flatten(2)  # (B, N, H·d)

    def state_size(self) -> tuple[int, int]:
        return feature_count(self.options.feature_dim), self.head_dim + 1

    def fla_scan(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """fla's based kernel, Taylor features and normaliser inside: (B, N, H·d)."""
        q, k, v = self.split_heads(q), self.split_heads(k), self.split_heads(v)
        scale = self.options.feature_dim**-0.5
        return fla_kernels.kernel("based")(q, k, v, scale=scale, use_norm=True).flatten(2)

    def scan(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return self.fla_scan(q, k, v) if self.use_fla(q) else super().scan(q, k, v)

    def scan_to_state(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Where fla's kernel runs (it returns no state), the state is one product, Σ φ(k) [v, 1]ᵀ."""
        if not self.use_fla(q):
            return super().scan_to_state(q, k, v)
        rec, _ = self.inputs(q, k, v)
        work = torch.promote_types(q.dtype, torch.float32)
        state = rec.k.to(work).permute(0, 2, 3, 1) @ rec.v.to(work).transpose(1, 2)  # (B, H, F, d + 1)
        return self.fla_scan(q, k, v), state

    def flops(self, batch: int, n: int, grid: Grid | None = None, causal: bool = False) -> Flops:
        f, c = self.options.feature_dim, self.dim
        scan = chunked.decay_attention_flops(n, feature_count(f), self.head_dim + 1, self.options.chunk)
        return self.call_flops(batch, n, causal, scan, weights=c * (2 * self.num_heads * f + 2 * c),
                               per_token=6 * self.num_heads)
