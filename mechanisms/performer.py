"""Performer attention with FAVOR+ (Choromanski et al., 2021, "Rethinking Attention with Performers").

softmax(QKᵀ/√d) is estimated without bias by positive random features: with x scaled by d^-1/4,

    φ(x) = exp(Ωx − ‖x‖²/2) / √r,    E[φ(q)·φ(k)] = exp(q·k/√d),

where the r rows of Ω are orthogonal random features (blocks of d orthonormal rows, rescaled by
chi(d)-distributed norms so each row is marginally Gaussian). Keys are summed first, so the cost
per head is O(N·r·d). As in the paper's code, a constant is subtracted from each exponent before
exp (per query row; one per (sample, head) over all keys), where it cancels in the ratio, and a
small ``eps`` is added to every feature so the normaliser can never vanish.

Causal form: the output at i is the non-causal form applied to keys 0..i, its key stabiliser
the running maximum c_i over those keys (a maximum over all keys would let the future in through
``eps``). Prefix sums over keys, chunk by chunk: the state of the earlier chunks, kept relative to
the running maximum and rescaled as it grows (every exponent stays <= 0), plus a masked (L, L)
block within the chunk; the ``eps`` share of each key feature in closed form (prefix sums of v).
Memory O(N·r·d/L + N·(L + r + d)) per head, never an N × N mask.

Ω is a buffer drawn at construction (so ``torch.manual_seed`` fixes it); ``redraw()`` draws a new
one, and in training mode it is redrawn every ``redraw_every`` forward passes (the paper finds
redrawing helps training); evaluation never redraws. A forward pass counts once, however it is
routed (padded, causal).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from attnbench.decoding import StateCache, check_token, prompt_lengths, zero_padding
from attnbench.mechanism import Flops, Grid, merge_heads, option, projection_flops
from attnbench.registry import register_mechanism
from mechanisms.softmax import SoftmaxAttention, SoftmaxOptions


@dataclasses.dataclass(frozen=True)
class PerformerOptions(SoftmaxOptions):
    features: int = option(256, 1, 16384)  # r random features per head (the paper's usual setting)
    redraw_every: int = option(1000, 0, 10**9)  # training forward passes between redraws of Ω; 0 = never
    eps: float = option(1e-6, 0, 1e-2)  # added to every feature: the numerical stabiliser of the paper's code
    chunk: int = option(64, 1, 4096)  # causal form: tokens per chunk L (state between chunks, a mask within)


def orthogonal_features(rows: int, dim: int) -> Tensor:
    """(rows, dim) Ω: blocks of ``dim`` orthonormal rows (QR of a Gaussian), rows scaled by chi(dim) norms."""
    blocks = []
    for _ in range(-(-rows // dim)):  # ceil(rows / dim) blocks; the last one is cut to size
        q, r = torch.linalg.qr(torch.randn(dim, dim))
        blocks.append((q * torch.sign(torch.diagonal(r))).T)  # sign fix: Haar-distributed rows
    norms = torch.randn(rows, dim).norm(dim=1, keepdim=True)  # as the norms of Gaussian rows
    return norms * torch.cat(blocks)[:rows]


@register_mechanism
class PerformerAttention(SoftmaxAttention):
    name = "performer"
    summary = "Performer FAVOR+: positive orthogonal random features for softmax (Choromanski 2021)"
    Options = PerformerOptions
    complexity = "linear"
    flops_formula = ("8·B·N·C² (projections) + 8·B·N·r·C (Ωq, Ωk, φ(K)ᵀV, φ(Q)·KV); "
                     "elementwise ≈ 8·B·H·N·r + 6·B·N·C (exp and stabiliser, norms, normaliser); "
                     "causal, chunks of L: the same 8·B·N·r·C (Ωq, Ωk, chunk states, φ(Q)·state) + "
                     "2·B·H·P·(r + d) for the masked blocks, computed whole (P = Σ L_c² over chunks); "
                     "elementwise + 4·B·H·P")

    def __init__(self, dim: int, num_heads: int, options: PerformerOptions | None = None) -> None:
        super().__init__(dim, num_heads, options)
        self.register_buffer("projection", orthogonal_features(self.options.features, self.head_dim))
        self.calls_since_redraw = 0  # training forward passes with the current Ω

    @torch.no_grad()
    def redraw(self) -> None:
        """Draw a new Ω from the global RNG (a new tensor, so graphs built on the old one stay valid)."""
        self.projection = orthogonal_features(*self.projection.shape).to(self.projection)
        self.calls_since_redraw = 0

    def exponent(self, x: Tensor) -> Tensor:
        """Ωx − ‖x‖²/2 of (B, H, N, d) tokens scaled by d^-1/4: (B, H, N, r), before the stabiliser."""
        x = x * self.head_dim**-0.25
        return x @ self.projection.T - x.square().sum(-1, keepdim=True) / 2

    def feature_map(self, x: Tensor, is_query: bool, mask: Tensor | None = None) -> Tensor:
        """φ(x) of (B, H, N, d) tokens: (B, H, N, r) positive random features. For keys with
        padding (mask (B, N) False) the stabiliser is taken over real keys and φ(padding) = 0."""
        exponent = self.exponent(x)  # (B, H, N, r)
        # Stabiliser: per query row, or one constant over all (real) keys of a (sample, head).
        dims = (-1,) if is_query else (-2, -1)
        real = None if mask is None else mask[:, None, :, None]
        peak = exponent if real is None else exponent.masked_fill(~real, float("-inf"))
        exponent = exponent - peak.amax(dim=dims, keepdim=True).detach()
        phi = (exponent.exp() + self.options.eps) * self.options.features**-0.5
        return phi if real is None else phi * real

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        """D⁻¹ φ(q)(φ(k)ᵀv), D = diag(φ(q)·Σφ(k)), on (B, H, N, d) tensors."""
        phi_q, phi_k = self.feature_map(q, True), self.feature_map(k, False, mask)  # (B, H, N, r)
        kv = phi_k.transpose(-2, -1) @ v  # (B, H, r, d)
        norm = (phi_q * phi_k.sum(-2, keepdim=True)).sum(-1, keepdim=True)  # (B, H, N, 1)
        return (phi_q @ kv) / norm

    def attend_causal(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Σ_{j<=i} φ(q_i)·φ_i(k_j) v_j / Σ_{j<=i} φ(q_i)·φ_i(k_j) on (B, H, N, d) tensors, where
        φ_i(k) = (exp(Ωk − ‖k‖²/2 − c_i) + eps) / √r takes the running maximum c_i over keys 0..i."""
        eps, n = self.options.eps, q.shape[-2]
        phi_q = self.feature_map(q, True)  # (B, H, N, r), its stabiliser per query row
        e = self.exponent(k)  # (B, H, N, r)
        c = e.detach().amax(-1).cummax(-1).values  # (B, H, N): running maximum over keys 0..i
        # the eps share of every key feature: eps·Σ_r φ(q_i)·Σ_{j<=i} v_j over eps·Σ_r φ(q_i)·(i + 1)
        q_sum = eps * phi_q.sum(-1)  # (B, H, N)
        numerators, denominators = [q_sum[..., None] * v.cumsum(-2)], [q_sum * torch.arange(
            1, n + 1, device=q.device, dtype=q.dtype)]
        # ... and the exp share: √r·Σ_{j<=i} exp(e_j − c_i)(v_j, 1), chunk by chunk
        length = min(self.options.chunk, n)
        future = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
        state = v.new_zeros(*v.shape[:2], e.shape[-1], v.shape[-1])  # (B, H, r, d): Σ exp(e_j − top) v_jᵀ
        total = v.new_zeros(e.shape[:2] + e.shape[-1:])  # (B, H, r): Σ exp(e_j − top) over earlier chunks
        top = c[..., :1]  # (B, H, 1): the reference of state and total, c at the last earlier key
        num_parts, den_parts = [], []
        for start in range(0, n, length):
            fq, ec, cc, vc = (t[:, :, start:start + length] for t in (phi_q, e, c, v))
            size = cc.shape[-1]
            own = (ec - cc[..., None]).exp()  # (B, H, l, r): exp(e_j − c_j) <= 1
            lag = (cc[..., None, :] - cc[..., :, None]).masked_fill(future[:size, :size], float("-inf"))
            scores = (fq @ own.transpose(-2, -1)) * lag.exp()  # (B, H, l, l): φq_i·exp(e_j − c_i), j <= i
            carry = (top - cc).exp()  # (B, H, l): from the state's reference to c_i, <= 1
            num_parts.append(scores @ vc + (fq @ state) * carry[..., None])
            den_parts.append(scores.sum(-1) + (fq * total[:, :, None]).sum(-1) * carry)
            end = cc[..., -1:]  # the new reference: c at this chunk's last key
            fresh = own * (cc - end).exp()[..., None]  # (B, H, l, r): exp(e_j − end)
            state = state * (top - end).exp()[..., None] + fresh.transpose(-2, -1) @ vc
            total = total * (top - end).exp() + fresh.sum(-2)
            top = end
        numerator = numerators[0] + torch.cat(num_parts, -2)  # (B, H, N, d)
        denominator = denominators[0] + torch.cat(den_parts, -1)  # (B, H, N)
        return numerator / denominator[..., None]

    def count_call(self) -> None:
        """One training forward pass: redraw Ω first when ``redraw_every`` passes have used it."""
        every = self.options.redraw_every
        if self.training and every:
            if self.calls_since_redraw >= every:
                self.redraw()
            self.calls_since_redraw += 1

    def forward(self, x: Tensor, grid: Grid | None = None, mask: Tensor | None = None,
                causal: bool = False) -> Tensor:
        self.count_call()  # once per pass, plain, padded or causal, however many lengths it runs
        return super().forward(x, grid, mask, causal)

    def flops(self, batch: int, n: int, grid: Grid | None = None, causal: bool = False) -> Flops:
        r = self.options.features
        core = 4 * 2 * batch * n * r * self.dim  # four (N×d)·(d×r)-sized products per head
        elementwise = 8 * batch * self.num_heads * n * r + 6 * batch * n * self.dim
        if causal:  # plus the masked blocks: φ(Q)·exp(E)ᵀ (r deep) and its product with V (d deep)
            length = min(self.options.chunk, n)
            pairs = batch * self.num_heads * ((n // length) * length**2 + (n % length) ** 2)
            core += 2 * pairs * (r + self.head_dim)
            elementwise += 4 * pairs
        return Flops(matmul=projection_flops(batch, n, self.dim, 4) + core, elementwise=elementwise)

    # ---- incremental decoding: the recurrent state, relative to the running maximum c ----------
    def prefill(self, x: Tensor, capacity: int, mask: Tensor | None = None,
                outputs: bool = True) -> tuple[Tensor | None, StateCache]:
        """The causal form over the prompt, and the state after each sequence's last real key:
        A = Σ exp(e_j − c) v_jᵀ, Z = Σ exp(e_j − c) relative to c = max over the keys of Ωk − ‖k‖²/2,
        and Σ v_j for the ``eps`` share (Ω stays fixed: decoding never redraws it)."""
        lengths = prompt_lengths(self, x, capacity, mask)
        q, k, v = self.qkv_heads(x)  # (B, H, N, d) each
        e = self.exponent(k)  # (B, H, N, r)
        real = None if mask is None else mask[:, None, :, None]
        peak = e if real is None else e.masked_fill(~real, float("-inf"))
        c = peak.amax((-2, -1))  # (B, H): the running maximum at the last real key
        own = (peak - c[..., None, None]).exp()  # (B, H, N, r): exp(e_j − c), 0 at padding
        values = v if real is None else v * real
        cache = StateCache(lengths, kv=own.transpose(-2, -1) @ values, k_sum=own.sum(-2),
                           v_sum=values.sum(-2), top=c)  # (B, H, r, d), (B, H, r), (B, H, d), (B, H)
        out = None
        if outputs:  # right padding comes after every real query: the causal form never reads it
            out = zero_padding(self.proj(merge_heads(self.attend_causal(q, k, v))), mask)
        return out, cache

    def step(self, x: Tensor, cache: StateCache) -> Tensor:
        """Rescale A and Z to the new running maximum and add the token, in place; then the causal
        form's ratio for the new query: O(H·r·d) whatever the context."""
        check_token(self, x, cache)
        q, k, v = self.qkv_heads(x)  # (B, H, 1, d) each
        e = self.exponent(k)[:, :, 0]  # (B, H, r)
        top = torch.maximum(cache["top"], e.amax(-1))  # (B, H)
        scale = (cache["top"] - top).exp()  # <= 1
        own = (e - top[..., None]).exp()  # (B, H, r)
        cache["kv"].mul_(scale[..., None, None]).add_(own[..., None] * v)  # (B, H, r, d)
        cache["k_sum"].mul_(scale[..., None]).add_(own)
        cache["v_sum"].add_(v[:, :, 0])
        cache["top"].copy_(top)
        cache.positions.advance()
        phi_q = self.feature_map(q, True)[:, :, 0]  # (B, H, r)
        q_sum = self.options.eps * phi_q.sum(-1, keepdim=True)  # (B, H, 1): the eps share
        count = cache.positions.device_lengths.to(q.dtype)[:, None, None]  # (B, 1, 1): keys so far
        numerator = q_sum * cache["v_sum"] + (phi_q[:, :, None, :] @ cache["kv"])[:, :, 0]  # (B, H, d)
        denominator = q_sum * count + (phi_q * cache["k_sum"]).sum(-1, keepdim=True)  # (B, H, 1)
        return self.proj(merge_heads((numerator / denominator)[:, :, None]))

    def cache_bytes(self, batch: int, n: int, dtype: torch.dtype) -> int:
        """A, Z, Σ v and c: B·H·(r·d + r + d + 1) elements, whatever n."""
        r, d = self.options.features, self.head_dim
        return batch * self.num_heads * (r * d + r + d + 1) * dtype.itemsize
