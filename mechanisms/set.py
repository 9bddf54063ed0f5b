"""SeT: Self-optimal Transport attention (SeTformer, Shamsolmoali et al., AAAI 2024).

Softmax attention replaced by entropic optimal transport between kernel-embedded tokens and
m learned references, linear in the number of tokens n. Per head, following
``shared/docs/set-attention.md`` step by step:

    U, V = X W_u, X W_v                                  (n, d) each
    ψ(u) = κ(Z, Z)^(-1/2) κ(Z, u)                         Nyström embedding, k anchors Z
    S = ψ(U) Yᵀ                                          (n, m) scores against references Y
    G = S / ε + log M                                    M: linear positional prior (τ)
    T = Sinkhorn(G), rows 1/n, columns 1/m               log domain, L iterations
    R = m Tᵀ V                                           (m, d) references gather values
    O = n T R                                            (n, d) tokens read them back

The implied attention A = n m T Tᵀ (n × n) is non-negative and never built. Cost per head
O(n·m·(k + d)·L); training memory stays O(n·m) because the Sinkhorn backward recomputes
its iterations instead of storing them (``backward="recompute"``).

Padded sequences (``mask``) are masked natively: n is each sequence's count of real tokens,
padding rows get marginal 0 (potential f = −∞, so T is 0 there), and the 1-D prior places
real tokens by their rank among real tokens, so padding changes nothing at real tokens.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnbench.mechanism import Flops, Grid, Mechanism, merge_heads, projection_flops, require, split_heads
from attnbench.registry import register_mechanism


@dataclasses.dataclass(frozen=True)
class SeTOptions:
    m: int = 64  # references ("alignment units"); the paper's per-task knob
    anchors: int = 32  # k, Nyström anchors of the Gaussian-kernel embedding
    eps: float = 0.5  # ε, entropic regularisation of the transport
    iters: int = 10  # L, Sinkhorn iterations (an upper bound when tol > 0)
    tol: float = 0.0  # stop early once the column-marginal error is below tol (0: never)
    tau: float = 0.1  # τ, width of the positional prior
    kernel_sigma: float = 0.5  # σ of the Gaussian kernel on the sphere, α = 1/σ²
    # auto: 2-D prior for image grids when m is a perfect square, 1-D otherwise
    positional: Literal["auto", "none", "1d", "2d"] = "auto"
    # roundtrip: O = n T R (choice, spec step 8); asymmetric: queries get a plan of their own
    readout: Literal["roundtrip", "asymmetric"] = "roundtrip"
    # recompute: Sinkhorn backward recomputes each iteration, O(n·m) memory;
    # unroll: plain autograd through every iteration, O(L·n·m) memory
    backward: Literal["recompute", "unroll"] = "recompute"
    qkv_bias: bool = True

    def __post_init__(self) -> None:
        require(self.m >= 1, f"set.m must be >= 1, got {self.m}")
        require(self.anchors >= 1, f"set.anchors must be >= 1, got {self.anchors}")
        require(self.eps > 0, f"set.eps must be > 0, got {self.eps}")
        require(self.iters >= 1, f"set.iters must be >= 1, got {self.iters}")
        require(self.tol >= 0, f"set.tol must be >= 0 (0 disables early stopping), got {self.tol}")
        require(self.tau > 0, f"set.tau must be > 0, got {self.tau}")
        require(self.kernel_sigma > 0, f"set.kernel_sigma must be > 0, got {self.kernel_sigma}")
        require(self.positional in ("auto", "none", "1d", "2d"),
                f"set.positional must be one of auto, none, 1d, 2d; got {self.positional!r}")
        require(self.readout in ("roundtrip", "asymmetric"),
                f"set.readout must be roundtrip or asymmetric; got {self.readout!r}")
        require(self.backward in ("recompute", "unroll"),
                f"set.backward must be recompute or unroll; got {self.backward!r}")
        require(self.positional != "2d" or math.isqrt(self.m) ** 2 == self.m,
                f"set.positional=2d puts the references on a √m × √m grid: m must be a perfect "
                f"square, got m={self.m}")


# ---- Nyström embedding --------------------------------------------------------------------


class _InverseSqrtPSD(torch.autograd.Function):
    """K ↦ K^(-1/2) for symmetric PSD K (…, k, k), regularised as OTKE: 1 / (√λ₊ + c).

    The backward uses the Daleckii–Krein formula with closed-form divided differences, which
    stays finite when eigenvalues (nearly) coincide, unlike differentiating through eigh.
    """

    @staticmethod
    def forward(ctx: Any, kernel: Tensor, c: float) -> Tensor:
        lam, vec = torch.linalg.eigh(kernel)
        root = lam.clamp(min=0).sqrt()
        ctx.save_for_backward(root, vec)
        ctx.c = c
        return (vec / (root + c).unsqueeze(-2)) @ vec.transpose(-2, -1)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        root, vec = ctx.saved_tensors
        c = ctx.c
        # f(λ) = 1/(√λ + c): (f(a) - f(b)) / (a - b) = -1 / ((√a + √b)(√a + c)(√b + c))
        ra, rb = root.unsqueeze(-1), root.unsqueeze(-2)
        diff = -1.0 / ((ra + rb).clamp(min=1e-6) * (ra + c) * (rb + c))
        g = vec.transpose(-2, -1) @ grad @ vec
        g = (g + g.transpose(-2, -1)) / 2  # the input is symmetric: so is its gradient
        return vec @ (diff * g) @ vec.transpose(-2, -1), None


def gaussian_sphere_kernel(a: Tensor, b: Tensor, alpha: float) -> Tensor:
    """κ(a, b) = exp(α(⟨a, b⟩ − 1)) for unit vectors: (…, p, d), (…, q, d) -> (…, p, q)."""
    return torch.exp(alpha * (a @ b.transpose(-2, -1) - 1))


# ---- Sinkhorn -----------------------------------------------------------------------------


def _exp_shifted(logits: Tensor, potential: Tensor, dim: int, out: Tensor) -> Tensor:
    """out = exp(logits + potential − max) along ``dim``, in place; returns the max (keepdim).

    ``potential`` is broadcast along the other dimension. One buffer, no temporaries: this is
    where SeT spends its time, so it avoids the allocations of torch.logsumexp.
    """
    torch.add(logits, potential.unsqueeze(-1 if dim == -2 else -2), out=out)
    top = out.amax(dim, keepdim=True)
    out.sub_(top).exp_()
    return top


def _logsumexp_into(logits: Tensor, potential: Tensor, dim: int, buf: Tensor) -> Tensor:
    """logsumexp over ``dim`` of logits + potential (broadcast along the other dim), via ``buf``."""
    top = _exp_shifted(logits, potential, dim, buf)
    return buf.sum(dim).log_().add_(top.squeeze(dim))


class _Shifted:
    """Logits with their maximum along ``dim`` taken out once, for fast logsumexps.

    logsumexp_dim(G + p) = shift + max(p) + log Σ exp((G − shift) + (p − max(p))): every
    exponent is <= 0 without a max pass per iteration. Should the sum underflow (potentials
    pushing a row far below the shift), that call is recomputed with its own exact max.
    """

    def __init__(self, logits: Tensor, dim: int) -> None:
        self.logits, self.dim = logits, dim
        self.shift = logits.amax(dim, keepdim=True)
        self.shifted = logits - self.shift

    def logsumexp(self, potential: Tensor, buf: Tensor) -> Tensor:
        """logsumexp over ``dim`` of logits + potential (broadcast along the other dim)."""
        top = potential.amax(-1, keepdim=True)  # (…, 1)
        torch.add(self.shifted, (potential - top).unsqueeze(-1 if self.dim == -2 else -2), out=buf)
        total = buf.exp_().sum(self.dim)
        if bool((total < 1e-30).any()):
            return _logsumexp_into(self.logits, potential, self.dim, buf)
        return total.log_().add_(self.shift.squeeze(self.dim)).add_(top)


def _row_marginals(logits: Tensor, mask: Tensor | None) -> tuple[Tensor | float, Tensor]:
    """log a and the starting potential f_0 for logits (B, H, n, m): rows 1/n and f_0 = 0, or
    with padding (mask (B, n) False) rows 1/(real tokens) and a = 0, f_0 = −∞ at padding."""
    n = logits.shape[-2]
    if mask is None:
        return -math.log(n), logits.new_zeros(logits.shape[:-1])
    inf = torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device)
    real = mask[:, None, :]  # (B, 1, n)
    log_a = torch.where(real, -mask.sum(-1, keepdim=True).to(logits.dtype).log()[:, None], inf)
    return log_a, torch.where(real, 0.0, inf).to(logits.dtype).expand(logits.shape[:-1])


def _sinkhorn_loop(logits: Tensor, iters: int, tol: float, differentiable: bool = False,
                   mask: Tensor | None = None) -> tuple[list[Tensor], list[Tensor]]:
    """Log-domain Sinkhorn on logits (…, n, m): potentials f (rows, 1/n) and g (columns, 1/m).

    Each iteration updates g then f, so the rows of T = exp(logits + f + g) are exact.
    Returns the histories [f_0 … f_L] and [g_1 … g_L] (f_0 = 0), which the backward needs.
    ``differentiable`` keeps every step on the autograd tape (``backward="unroll"``).
    ``mask`` (B, n), False at padding: those rows get marginal 0 and f = −∞ throughout.
    """
    m = logits.shape[-1]
    log_a, f0 = _row_marginals(logits, mask)
    log_b = -math.log(m)
    if not differentiable:
        buf = torch.empty_like(logits)
        by_row = _Shifted(logits, -1)  # for the f updates (logsumexp over columns j)
        by_col = _Shifted(logits, -2)  # for the g updates (logsumexp over rows i)
    fs = [f0]
    gs: list[Tensor] = []
    for _ in range(iters):
        if differentiable:
            g = log_b - torch.logsumexp(logits + fs[-1].unsqueeze(-1), dim=-2)
            f = log_a - torch.logsumexp(logits + g.unsqueeze(-2), dim=-1)
        else:
            g = log_b - by_col.logsumexp(fs[-1], buf)
            f = log_a - by_row.logsumexp(g, buf)
        # column sums of the previous plan are b·exp(g_prev − g): stop once they are b
        done = tol > 0 and len(gs) > 0 and bool(torch.expm1(gs[-1] - g).abs().max() < tol)
        gs.append(g)
        fs.append(f)
        if done:
            break
    return fs, gs


class _SinkhornRecompute(torch.autograd.Function):
    """Sinkhorn potentials whose backward recomputes each iteration's softmax instead of
    keeping them: memory O(n·m + L·(n + m)) rather than O(L·n·m), same gradient."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, iters: int, tol: float,
                mask: Tensor | None) -> tuple[Tensor, Tensor]:
        fs, gs = _sinkhorn_loop(logits, iters, tol, mask=mask)
        ctx.save_for_backward(logits, *fs[:-1], *gs)
        ctx.steps = len(gs)
        return fs[-1], gs[-1]

    @staticmethod
    def backward(ctx: Any, grad_f: Tensor, grad_g: Tensor) -> tuple[Tensor, None, None, None]:
        logits, *saved = ctx.saved_tensors
        fs, gs = saved[: ctx.steps], saved[ctx.steps:]
        grad_logits = torch.zeros_like(logits)
        buf = torch.empty_like(logits)
        grad_f = torch.zeros_like(fs[0]) if grad_f is None else grad_f
        grad_g = torch.zeros_like(gs[0]) if grad_g is None else grad_g
        for t in reversed(range(ctx.steps)):
            # f_t = log a − LSE_j(G + g_t): ∂f_i/∂G_ij = ∂f_i/∂g_j = −P_ij (row softmax)
            _exp_shifted(logits, gs[t], -1, buf)
            buf.mul_((grad_f / buf.sum(-1)).unsqueeze(-1))  # P_ij · f̄_i
            grad_logits.sub_(buf)
            grad_g = grad_g - buf.sum(-2)
            # g_t = log b − LSE_i(G + f_{t−1}): ∂g_j/∂G_ij = ∂g_j/∂f_i = −Q_ij (column softmax)
            _exp_shifted(logits, fs[t], -2, buf)
            buf.mul_((grad_g / buf.sum(-2)).unsqueeze(-2))  # Q_ij · ḡ_j
            grad_logits.sub_(buf)
            grad_f = -buf.sum(-1)
            grad_g = torch.zeros_like(grad_g)
        return grad_logits, None, None, None


def sinkhorn_log_plan(logits: Tensor, iters: int, tol: float = 0.0, recompute: bool = True,
                      mask: Tensor | None = None) -> Tensor:
    """log T for the entropic OT plan with uniform marginals (rows 1/n, columns 1/m); with
    ``mask`` (B, n), rows 1/(real tokens) and log T = −∞ on padding rows."""
    if recompute and torch.is_grad_enabled() and logits.requires_grad:
        f, g = _SinkhornRecompute.apply(logits, iters, tol, mask)
    else:
        fs, gs = _sinkhorn_loop(logits, iters, tol, differentiable=torch.is_grad_enabled(), mask=mask)
        f, g = fs[-1], gs[-1]
    return logits + f.unsqueeze(-1) + g.unsqueeze(-2)


# ---- positional prior ---------------------------------------------------------------------


def positional_log_prior(n: int, m: int, tau: float, grid: Grid | None, like: Tensor,
                         mask: Tensor | None = None) -> Tensor:
    """log M (n, m): −(α_i − β_j)² / τ², α_i = i/n, β_j = j/m; separable on a 2-D grid.

    For a grid (H, W) the references sit on a √m × √m grid and the squared distances of the
    row and column coordinates add (M is the product of a row term and a column term). With a
    padding ``mask`` (B, n) a real token's α is its rank among real tokens over their count,
    and log M is (B, 1, n, m).
    """
    def gaps(a: Tensor, refs: int) -> Tensor:  # (…, count, refs) squared position gaps
        b = torch.arange(refs, device=like.device, dtype=like.dtype) / refs
        return (a.unsqueeze(-1) - b).square()

    def axis(count: int, refs: int) -> Tensor:  # (count, refs)
        return gaps(torch.arange(count, device=like.device, dtype=like.dtype) / count, refs)

    if grid is None and mask is not None:
        rank = (mask.cumsum(-1) - 1).to(like.dtype)  # (B, n): place among the real tokens
        return -gaps(rank / mask.sum(-1, keepdim=True), m)[:, None] / tau**2
    if grid is None:
        return -axis(n, m) / tau**2
    side = math.isqrt(m)
    rows, cols = axis(grid[0], side), axis(grid[1], side)  # (H, s), (W, s)
    dist = rows[:, None, :, None] + cols[None, :, None, :]  # (H, W, s, s)
    return -dist.reshape(n, m) / tau**2


# ---- the mechanism ------------------------------------------------------------------------


@register_mechanism
class SeTAttention(Mechanism):
    name = "set"
    summary = "Self-optimal Transport: entropic OT to m learned references (SeTformer)"
    Options = SeTOptions
    complexity = "linear"
    masking = "native"
    flops_formula = ("B·N·C²·(6 | 8 asym.) projections + per head 2·B·N·(k·d + k² + k·m + 2·m·d) "
                     "embedding, scores, aggregation, read-out (×2 embedding+scores asym.); "
                     "elementwise ≈ 10·L·B·H·N·m Sinkhorn")

    def __init__(self, dim: int, num_heads: int, options: SeTOptions | None = None) -> None:
        super().__init__(dim, num_heads, options)
        o: SeTOptions = self.options
        n_proj = 3 if o.readout == "asymmetric" else 2
        self.in_proj = nn.Linear(dim, n_proj * dim, bias=o.qkv_bias)  # U, V (and Q)
        self.anchors = nn.Parameter(torch.randn(num_heads, o.anchors, self.head_dim))  # Z
        self.references = nn.Parameter(torch.randn(num_heads, o.m, o.anchors) / math.sqrt(o.anchors))
        self.proj = nn.Linear(dim, dim)
        self.init_record: dict[str, Any] = {"method": "random"}

    # -- pieces, each (B, H, n, ·) ------------------------------------------------------
    def whitening(self, dtype: torch.dtype) -> Tensor:
        """κ(Z, Z)^(-1/2) (H, k, k) of the unit-norm anchors: once per forward pass."""
        alpha = 1.0 / self.options.kernel_sigma**2
        z = F.normalize(self.anchors.to(dtype), dim=-1)  # (H, k, d)
        return _InverseSqrtPSD.apply(gaussian_sphere_kernel(z, z, alpha), 1e-2)

    def embed(self, u: Tensor, whitening: Tensor | None = None) -> Tensor:
        """Nyström features ψ(u): (B, H, n, d) -> (B, H, n, k)."""
        alpha = 1.0 / self.options.kernel_sigma**2
        z = F.normalize(self.anchors.to(u.dtype), dim=-1)  # (H, k, d)
        whitening = self.whitening(u.dtype) if whitening is None else whitening
        return gaussian_sphere_kernel(F.normalize(u, dim=-1), z, alpha) @ whitening

    def log_plans(self, features: list[Tensor], grid: Grid | None,
                  mask: Tensor | None = None) -> list[Tensor]:
        """log T (B, H, n, m) for each set of alignment features (B, H, n, d); the anchor
        whitening and the positional prior are shared by all of them. ``mask`` (B, n): padding."""
        o: SeTOptions = self.options
        dtype, n = features[0].dtype, features[0].shape[-2]
        whitening = self.whitening(dtype)
        refs = self.references.to(dtype).transpose(-2, -1)  # (H, k, m)
        prior_grid = self._prior_grid(grid)
        prior = None if prior_grid == "none" else positional_log_prior(n, o.m, o.tau, prior_grid,
                                                                       features[0], mask)
        plans = []
        for feat in features:
            logits = self.embed(feat, whitening) @ refs / o.eps
            if prior is not None:
                logits = logits + prior
            plans.append(sinkhorn_log_plan(logits, o.iters, o.tol, o.backward == "recompute", mask))
        return plans

    def _prior_grid(self, grid: Grid | None) -> Grid | None | Literal["none"]:
        """Which prior applies: 'none', None (1-D) or the grid (2-D)."""
        mode = self.options.positional
        if mode == "none":
            return "none"
        if mode == "2d":
            if grid is None:
                raise ValueError("set: positional='2d' needs a 2-D grid=(H, W); got grid=None "
                                 "(use positional='1d' or 'auto' for sequences)")
            return grid
        if mode == "auto" and grid is not None and math.isqrt(self.options.m) ** 2 == self.options.m:
            return grid
        return None

    def _heads(self, x: Tensor) -> list[Tensor]:
        """U, V (and Q) as (B, H, n, d), in float32 or wider for the transport."""
        work = torch.promote_types(x.dtype, torch.float32)
        parts = self.in_proj(x).chunk(3 if self.options.readout == "asymmetric" else 2, dim=-1)
        return [split_heads(p.to(work), self.num_heads) for p in parts]

    def mix(self, x: Tensor, grid: Grid | None) -> Tensor:
        return self.transport(x, grid, None)

    def mix_padded(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.transport(x, None, mask)

    def transport(self, x: Tensor, grid: Grid | None, mask: Tensor | None) -> Tensor:
        """Aggregate the tokens onto the references and read them back; ``mask`` (B, n): padding."""
        heads = self._heads(x)
        m = self.options.m
        # tokens per sequence: n, or each sequence's real tokens (B, 1, 1, 1)
        n = x.shape[1] if mask is None else mask.sum(-1).to(heads[0].dtype)[:, None, None, None]
        # the transport runs in float32 even under fp16/bf16 autocast: exp/log need the range
        with torch.autocast(x.device.type, enabled=False):
            asym = self.options.readout == "asymmetric"
            log_plans = self.log_plans([heads[0], heads[2]] if asym else [heads[0]], grid, mask)
            plan = log_plans[0].exp()  # (B, H, n, m)
            refs = m * plan.transpose(-2, -1) @ heads[1]  # (B, H, m, d)
            if asym:
                plan = log_plans[1].exp()
            out = n * plan @ refs  # (B, H, n, d)
        return self.proj(merge_heads(out).to(x.dtype))

    # -- looking inside -------------------------------------------------------------------
    @torch.no_grad()
    def transport_plan(self, x: Tensor, grid: Grid | None = None) -> Tensor:
        """The plan T (B, H, n, m) that aggregates tokens onto references."""
        return self.log_plans([self._heads(x)[0]], grid)[0].exp()

    @torch.no_grad()
    def attention_matrix(self, x: Tensor, grid: Grid | None = None, max_tokens: int = 4096) -> Tensor:
        """The implied dense attention A = n·m·T·Tᵀ (B, H, n, n); only for small n."""
        n = x.shape[1]
        if n > max_tokens:
            raise ValueError(f"set: attention_matrix builds an n × n matrix; n={n} > max_tokens="
                             f"{max_tokens} (SeT itself never does)")
        plan = self.transport_plan(x, grid)
        return n * self.options.m * plan @ plan.transpose(-2, -1)

    # -- cost -------------------------------------------------------------------------------
    def flops(self, batch: int, n: int, grid: Grid | None = None) -> Flops:
        o: SeTOptions = self.options
        h, d, k, m = self.num_heads, self.head_dim, o.anchors, o.m
        plans = 2 if o.readout == "asymmetric" else 1
        per_plan = 2 * batch * h * n * (k * d + k * k + k * m)
        whitening = 2 * h * (k * k * d + k**3)  # κ(Z, Z) and its inverse square root, once
        transport = 2 * 2 * batch * h * n * m * d  # Tᵀ V and T R
        proj = projection_flops(batch, n, self.dim, (3 if plans == 2 else 2) + 1)
        sinkhorn = 10 * o.iters * batch * h * n * m * plans
        return Flops(matmul=proj + whitening + plans * per_plan + transport,
                     elementwise=sinkhorn + batch * h * n * k * plans)

    # -- data-driven initialisation ----------------------------------------------------------
    @torch.no_grad()
    def init_from_data(self, batches: Tensor | Iterable[Tensor], max_tokens: int = 16384,
                       backend: Literal["torch", "sklearn"] = "torch", kmeans_iters: int = 25,
                       seed: int = 0) -> dict[str, Any]:
        """Set anchors and references to k-means centroids of features of real inputs.

        ``batches``: token tensors (B, N, C) (one or an iterable). Anchors Z are the spherical
        k-means centroids of the normalised alignment features U, per head; references Y the
        k-means centroids of the embedded features ψ(U). Returns (and keeps, in the state dict)
        a record of what was done.
        """
        require(backend in ("torch", "sklearn"), f"set.init_from_data: backend must be torch or "
                                                  f"sklearn, got {backend!r}")
        start = time.perf_counter()
        if isinstance(batches, Tensor):
            batches = [batches]
        feats = torch.cat([self._heads(x)[0].transpose(0, 1).flatten(1, 2) for x in batches], dim=1)
        gen = torch.Generator().manual_seed(seed)
        if feats.shape[1] > max_tokens:  # (H, tokens, d): subsample tokens
            feats = feats[:, torch.randperm(feats.shape[1], generator=gen)[:max_tokens]]
        tokens = feats.shape[1]
        k, m = self.options.anchors, self.options.m
        require(tokens >= max(k, m), f"set.init_from_data: need at least max(anchors, m)="
                                      f"{max(k, m)} tokens, got {tokens}")
        unit = F.normalize(feats.float(), dim=-1)
        for h in range(self.num_heads):
            centres = kmeans(unit[h], k, kmeans_iters, backend, seed + h, spherical=True)
            self.anchors[h] = centres.to(self.anchors.dtype)
        psi = self.embed(feats.unsqueeze(0).to(self.anchors.dtype))[0]  # (H, tokens, k)
        for h in range(self.num_heads):
            self.references[h] = kmeans(psi[h].float(), m, kmeans_iters, backend, seed + h).to(
                self.references.dtype)
        self.init_record = {"method": f"kmeans ({backend})", "tokens": tokens,
                            "seconds": round(time.perf_counter() - start, 3)}
        return self.init_record

    def get_extra_state(self) -> dict[str, Any]:
        return {"init": self.init_record}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.init_record = dict(state.get("init", {"method": "unknown"}))


def kmeans(points: Tensor, clusters: int, iters: int, backend: str, seed: int,
           spherical: bool = False) -> Tensor:
    """k-means centroids (clusters, d) of points (p, d); unit-norm centroids if spherical."""
    if backend == "sklearn":
        from sklearn.cluster import KMeans

        fit = KMeans(clusters, n_init=1, max_iter=iters, random_state=seed).fit(points.cpu().numpy())
        centres = torch.from_numpy(fit.cluster_centers_).to(points)
    else:
        centres = _torch_kmeans(points, clusters, iters, torch.Generator().manual_seed(seed))
    return F.normalize(centres, dim=-1) if spherical else centres


def _torch_kmeans(points: Tensor, clusters: int, iters: int, gen: torch.Generator) -> Tensor:
    """Lloyd's algorithm with k-means++ seeding, in torch (CPU or GPU)."""
    first = torch.randint(len(points), (1,), generator=gen).item()
    centres = points[first:first + 1]
    dist = torch.cdist(points, centres).squeeze(1).square()
    for _ in range(1, clusters):  # k-means++: next centre drawn ∝ squared distance
        weights = dist.cpu() if dist.sum() > 0 else torch.ones(len(points))
        nxt = torch.multinomial(weights, 1, generator=gen).item()
        centres = torch.cat([centres, points[nxt:nxt + 1]])
        dist = torch.minimum(dist, (points - points[nxt]).square().sum(-1))
    for _ in range(iters):
        assign = torch.cdist(points, centres).argmin(1)
        sums = torch.zeros_like(centres).index_add_(0, assign, points)
        counts = torch.bincount(assign, minlength=clusters).unsqueeze(1)
        centres = torch.where(counts > 0, sums / counts.clamp(min=1), centres)  # keep empty ones
    return centres
