"""SeT: Self-optimal Transport attention (SeTformer, Shamsolmoali et al., AAAI 2024).

Softmax attention replaced by entropic optimal transport between kernel-embedded tokens and
m learned references, linear in the number of tokens n. The method follows OTKE (Mialon et
al., ICLR 2021), on which SeT builds; ``docs/set-attention.md`` gives the specification, and
every reading the paper leaves open is an option. Per head:

    U, V = X W_u, X W_v                                  (n, d) each
    E = κ(U, Z)                                          (n, k) Gaussian kernel to k anchors Z
                                                         (⊙ ‖u_i‖ per row, embedding_norm="keep")
    S / ε = E · F,   F = κ(Z, Z)^(-1/2) Yᵀ / ε           (n, m) scores; F (k, m) folded once
    G = M ⊙ S / ε                                        prior="similarity-and-plan" (OTKE)
    K = exp(G − max)                                     the Gibbs kernel, one exponential pass
    u, v = Sinkhorn scalings of K                        rows 1/n, columns 1/m, L iterations
    P = diag(u) K diag(v) ⊙ M                            the plan, M applied again (OTKE)
    R = m Pᵀ V = m · v ⊙ (K ⊙ M)ᵀ (u ⊙ V)                 (m, d) references gather values
    O = n P R  = n · u ⊙ (K ⊙ M) (v ⊙ R)                  (n, d) tokens read them back

M is the linear positional prior exp(−(i/n − j/m)² / τ²) (separable on an image grid), built
once per (n, grid, dtype, device) and cached (``positional_prior``), its entries below the
rounding error set to 0 so that no product runs on subnormal floats. The plan P is never built:
the iterations and the read-out are matrix–vector and matrix–matrix products with the one (n, m)
kernel K (and K ⊙ M, formed once for the read-out). The implied attention A = n m P Pᵀ (n × n)
is non-negative and never built either.

Where the prior acts (``prior``): "similarity-and-plan" multiplies the similarity by M before
the exponential and the plan by M after Sinkhorn, as OTKE's code does; "plan" only multiplies the
plan, as the paper's linear positional encoding does; "kernel" adds log M to the logits, so that
M multiplies the Gibbs kernel inside Sinkhorn ("OT with a prior": exact marginals, but log M
reaches −1/τ² and Sinkhorn then needs far more than 10 iterations to converge).

Embedding norm (``embedding_norm``): κ(u, Z) sees only the direction û = u / ‖u‖. "drop" (the
default) discards ‖u‖, so the scores are bounded by ‖y_j‖ / ε whatever the token; "keep" multiplies
ψ(u) by ‖u‖ as OTKE's kernel layer does (‖x‖ κ(Zᵀx / ‖x‖), before its κ(ZᵀZ)^(-1/2)), which gives
every token its own temperature, as ‖q‖‖k‖ does in softmax attention.

References (``m_cap``): a plan of n < m tokens uses the first m' = n references, m' = min(√m,
⌊√n⌋)² on a 2-D prior (a square grid), with column marginals 1/m' and the prior's β_j = j/m'. With
uniform marginals the implied attention n m' P Pᵀ has rank at most min(n, m'): more references add
no rank, only cost (n·m' > n², above the dense attention). Under padding each sequence uses its
own m' (columns past it carry marginal 0, as padding rows do), so padding changes nothing.
"none" (the default, as every committed result was measured) keeps all m.

Update order (``order``): "rows-then-columns" as OTKE, so the column marginals (the references)
are exact after any L and every reference is an exact convex combination of tokens; or
"columns-then-rows", rows exact.

Marginals (``renormalise``): a post-multiplied prior leaves the plan's row and column sums
below 1/n and 1/m. OTKE keeps them, and so does the default: its code multiplies the plan by
M and aggregates with it as it is, so a reference far from every token of its part of the
sequence carries less mass, a signal the layers after it (projection, normalisation) can use
or absorb. ``renormalise=True`` divides each reference by its column mass and each token's
read-out by its row mass, so both are convex combinations and the implied attention is
row-stochastic (v, then u, cancel out of the two divisions).

Domain: the iterations run in the scaling domain, u = a / (K v), v = b / (Kᵀ u), with K
shifted by its maximum along the side updated first (every row of that side then holds a 1;
the plan is unchanged). Nothing inside the loop looks at the values. After it, one check (the
only host synchronisation, for all plans of the forward at once) confirms that the scalings
stayed finite and positive and that the dynamic range of the one updated second is small
enough for the kernel entries that underflowed to carry less than the rounding error; where
not, that plan is recomputed in the log domain (logsumexp: robust at any ε and scale, the same
iterates). ``tol > 0`` adds a check per iteration, the price of stopping early.

Fused passes (``sinkhorn``): on the CPU, in float32 or float64, the iterations run in C
(``set_sinkhorn.c``, compiled on first use by ``attnbench.native``): one pass over K's rows
computes a row's product with v, its new u and its share of Kᵀu while the row is in cache, so an
iteration reads K once rather than twice (the 2L matrix–vector products are memory-bound). Same
iterates as the PyTorch loop (float64 to 1e-12); "auto" falls back to that loop where the C
kernel cannot be built, on GPUs, in other dtypes, with ``tol > 0``, under autograd with
``backward="unroll"``, and while torch.compile or a torch dispatch mode traces (``traced``).

Backward: ``backward="recompute"`` gives the scaling iterations a custom backward that runs the
reverse iterations as matrix–vector products with the saved K and forms the gradient of K as one
(n, 2L) × (2L, m) product; "unroll" lets autograd record every step. Either way only K is kept
per plan (the read-out recomputes K ⊙ M in its backward), O(n·m + L·(n + m)) memory. The
whitening κ(Z, Z)^(-1/2) has a bounded backward (``_InverseSqrtPSD``).

Fixed cost per call: a forward without autograd reuses the whitening and the fold until the
anchors or references change (``_logit_terms``); the scaling loop works on (b, 1, ·) row vectors,
so each half-step is one product and one division. Short sequences pay per operation, not per
element: at n = 1,024 a forward is about 60 PyTorch operations without autograd.

Cost per head (``flops``): matmuls 2n·(d·k + k·m) for the embedding and the scores,
4L·n·m for the 2L matrix–vector products, 4n·m·d for aggregation and read-out; elementwise a
few passes over the (n, m) kernel (the prior, its maximum, the shift, one exponential, K ⊙ M)
and O(L·(n + m)) for the scalings. The matrix–vector products do 2 FLOPs per element of K they
read: on a CPU they are bound by memory bandwidth (2L reads of K), not by the matmul rate.

Padded sequences (``mask``) are masked natively: n is each sequence's count of real tokens,
padding rows get marginal 0 (u = 0 there, or f = −∞ in the log domain), and the 1-D prior places
real tokens by their rank among real tokens, so padding changes nothing at real tokens.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from attnbench import native
from attnbench.mechanism import (
    Flops,
    Grid,
    Mechanism,
    merge_heads,
    option,
    projection_flops,
    require,
    split_heads,
)
from attnbench.registry import register_mechanism

PRIORS = ("similarity-and-plan", "plan", "kernel")
ORDERS = ("rows-then-columns", "columns-then-rows")


@dataclasses.dataclass(frozen=True)
class SeTOptions:
    m: int = option(64, 1, 4096)  # references ("alignment units"); the paper's per-task knob
    anchors: int = option(32, 1, 4096)  # k, Nyström anchors of the Gaussian-kernel embedding
    eps: float = option(0.5, 1e-6, 1e6)  # ε, entropic regularisation of the transport
    iters: int = option(10, 1, 10_000)  # L, Sinkhorn iterations (an upper bound when tol > 0)
    tol: float = option(0.0, 0, 1)  # stop once the inexact marginal's relative error is below tol (0: never)
    tau: float = option(0.1, 1e-6, 1e6)  # τ, width of the positional prior
    kernel_sigma: float = option(0.5, 1e-3, 1e3)  # σ of the Gaussian kernel on the sphere, α = 1/σ²
    # auto: 2-D prior for image grids when m is a perfect square, 1-D otherwise
    positional: Literal["auto", "none", "1d", "2d"] = "auto"
    # where M acts: similarity-and-plan (OTKE's code: M ⊙ S in the exponent, plan ⊙ M after
    # Sinkhorn), plan (the paper: plan ⊙ M only) or kernel (log M added to the logits, inside Sinkhorn)
    prior: Literal["similarity-and-plan", "plan", "kernel"] = "similarity-and-plan"
    # rows-then-columns (OTKE: columns exact after any L) or columns-then-rows (rows exact)
    order: Literal["rows-then-columns", "columns-then-rows"] = "rows-then-columns"
    # divide references and read-outs by the plan's column and row masses (OTKE does not)
    renormalise: bool = False
    # tokens: a plan of n tokens uses the first min(m, n) references (on a 2-D prior the largest
    # square grid of at most min(m, n)), per sequence under padding; none (default until the
    # ablation decides; the committed results use all m): always all m
    m_cap: Literal["tokens", "none"] = "none"
    # roundtrip: O = n P R (choice, spec step 8); asymmetric: queries get a plan of their own
    readout: Literal["roundtrip", "asymmetric"] = "roundtrip"
    # drop: ψ(u) = κ(Z, Z)^(-1/2) κ(Z, u/‖u‖), the norm discarded (attnbench's choice); keep:
    # ψ(u) = ‖u‖ κ(Z, Z)^(-1/2) κ(Z, u/‖u‖), as OTKE's kernel layer (a per-token temperature)
    embedding_norm: Literal["drop", "keep"] = "drop"
    # recompute: custom backward through the Sinkhorn iterations; unroll: plain autograd
    backward: Literal["recompute", "unroll"] = "recompute"
    # fused: Sinkhorn's iterations as C passes reading K once each (CPU, float32/64, tol = 0; with
    # autograd only under backward=recompute); auto: those where they can run, else torch;
    # torch: PyTorch matrix-vector products, two reads of K each
    sinkhorn: Literal["auto", "fused", "torch"] = "auto"
    qkv_bias: bool = True

    def __post_init__(self) -> None:
        require(self.positional in ("auto", "none", "1d", "2d"),
                f"set.positional must be one of auto, none, 1d, 2d; got {self.positional!r}")
        require(self.prior in PRIORS, f"set.prior must be one of {', '.join(PRIORS)}; got {self.prior!r}")
        require(self.order in ORDERS, f"set.order must be one of {', '.join(ORDERS)}; got {self.order!r}")
        require(isinstance(self.renormalise, bool),
                f"set.renormalise must be true or false; got {self.renormalise!r}")
        require(self.readout in ("roundtrip", "asymmetric"),
                f"set.readout must be roundtrip or asymmetric; got {self.readout!r}")
        require(self.m_cap in ("tokens", "none"), f"set.m_cap must be tokens or none; got {self.m_cap!r}")
        require(self.embedding_norm in ("drop", "keep"),
                f"set.embedding_norm must be drop or keep; got {self.embedding_norm!r}")
        require(self.backward in ("recompute", "unroll"),
                f"set.backward must be recompute or unroll; got {self.backward!r}")
        require(self.sinkhorn in ("auto", "fused", "torch"),
                f"set.sinkhorn must be auto, fused or torch; got {self.sinkhorn!r}")
        require(self.sinkhorn != "fused" or self.tol == 0,
                f"set.sinkhorn=fused runs every iteration (no early stop): it needs tol=0, "
                f"got tol={self.tol}")
        require(self.sinkhorn != "fused" or self.backward == "recompute",
                "set.sinkhorn=fused needs backward=recompute (unroll records every PyTorch step); "
                f"got backward={self.backward!r}")
        require(self.positional != "2d" or math.isqrt(self.m) ** 2 == self.m,
                f"set.positional=2d puts the references on a √m × √m grid: m must be a perfect "
                f"square, got m={self.m}")


# ---- Nyström embedding --------------------------------------------------------------------


class _InverseSqrtPSD(torch.autograd.Function):
    """K ↦ K^(-1/2) for symmetric PSD K (…, k, k), regularised as OTKE: 1 / (√λ₊ + c).

    The backward is the Daleckii–Krein formula V (D ∘ Vᵀ Ḡ V) Vᵀ with the divided differences
    of f(λ) = 1/(√λ + c) in closed form, −1 / ((√a + √b)(√a + c)(√b + c)), and the first factor
    floored at 2c. Where every eigenvalue is at least c² this is the exact gradient; where
    eigenvalues are clamped at 0 or coincide near 0 (duplicated anchors) each entry stays below
    1/(2c³), the bound of OTKE's backward (which adds 2c to that factor everywhere: within 2×
    of it at any eigenvalues), instead of reaching 1/(floor · c²). (That the anchor gradient of
    coinciding anchors is tens of times that of spread-out ones is the forward's own
    sensitivity, the null direction weighted by 1/c: it is the limit of the exact gradients of
    anchors that nearly coincide, the same under OTKE's form.)
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
        ra, rb = root.unsqueeze(-1), root.unsqueeze(-2)
        diff = -1.0 / ((ra + rb).clamp(min=2 * c) * (ra + c) * (rb + c))
        g = vec.transpose(-2, -1) @ grad @ vec
        g = (g + g.transpose(-2, -1)) / 2  # the input is symmetric: so is its gradient
        return vec @ (diff * g) @ vec.transpose(-2, -1), None


def gaussian_sphere_kernel(a: Tensor, b: Tensor, alpha: float) -> Tensor:
    """κ(a, b) = exp(α(⟨a, b⟩ − 1)) for unit vectors: (…, p, d), (…, q, d) -> (…, p, q)."""
    return torch.exp(alpha * (a @ b.transpose(-2, -1) - 1))


# ---- positional prior ---------------------------------------------------------------------


def positional_log_prior(n: int, m: int, tau: float, grid: Grid | None, like: Tensor,
                         mask: Tensor | None = None, refs: Tensor | None = None) -> Tensor:
    """log M (n, m): −(α_i − β_j)² / τ², α_i = i/n, β_j = j/m; separable on a 2-D grid.

    For a grid (H, W) the references sit on a √m × √m grid and the squared distances of the
    row and column coordinates add (M is the product of a row term and a column term). With a
    padding ``mask`` (B, n) a real token's α is its rank among real tokens over their count,
    and log M is (B, 1, n, m); ``refs`` (B,), with a mask, is each sequence's count of the
    references it uses (β_j = j / refs_b; the columns past it are not used).
    """
    def gaps(a: Tensor, count: int) -> Tensor:  # (…, tokens, count) squared position gaps
        b = torch.arange(count, device=like.device, dtype=like.dtype)
        b = b / count if refs is None else b / refs.to(like.dtype)[:, None, None]  # (count,) or (B, 1, count)
        return (a.unsqueeze(-1) - b).square()

    def axis(count: int, side: int) -> Tensor:  # (count, side)
        return gaps(torch.arange(count, device=like.device, dtype=like.dtype) / count, side)

    if grid is None and mask is not None:
        rank = (mask.cumsum(-1) - 1).to(like.dtype)  # (B, n): place among the real tokens
        return -gaps(rank / mask.sum(-1, keepdim=True), m)[:, None] / tau**2
    if grid is None:
        return -axis(n, m) / tau**2
    side = math.isqrt(m)
    rows, cols = axis(grid[0], side), axis(grid[1], side)  # (H, s), (W, s)
    dist = rows[:, None, :, None] + cols[None, :, None, :]  # (H, W, s, s)
    return -dist.reshape(n, m) / tau**2


def prior_from_log(log_m: Tensor, log: bool) -> Tensor:
    """M (or log M) from log M, with the entries below tiny/eps of the dtype set to 0 (log M
    clamped there): they change no plan entry by more than the rounding error, and subnormal
    floats would slow every product with the kernel down many times over on CPUs."""
    info = torch.finfo(log_m.dtype)
    floor = math.log(info.tiny / info.eps)
    if log:
        return log_m.clamp(min=floor)
    return log_m.exp().masked_fill_(log_m < floor, 0.0)


@functools.lru_cache(maxsize=16)
def positional_prior(n: int, m: int, tau: float, grid: Grid | None, dtype: torch.dtype,
                     device: torch.device, log: bool = False) -> Tensor:
    """M (or log M with ``log``) for unpadded inputs, as ``prior_from_log`` gives it, built once
    per key and shared by every layer and call: (n, m), a constant (no autograd history), never
    modified in place."""
    with torch.inference_mode(False), torch.no_grad():  # a normal tensor even if first built
        log_m = positional_log_prior(n, m, tau, grid, torch.empty(0, dtype=dtype, device=device))
        return prior_from_log(log_m, log)


# ---- Sinkhorn, scaling domain -------------------------------------------------------------
#
# The side updated first is the rows of A (A = K for rows-then-columns, A = Kᵀ, a view, for
# columns-then-rows); x scales A's rows to marginal α, y its columns to marginal β:
#     x_t = α / (A y_{t−1}),   y_t = β / (Aᵀ x_t),   y_0 = 1 (0 where β = 0).
# Scalings and marginals are row vectors, (b, 1, r) and (b, 1, c), and both products are row
# vector × matrix, bmm(y, A.mT) and bmm(x, A): on CPUs these are several times faster than
# bmm(A, y[..., None]), and a step is then two operations (a product and a division), with no
# reshaping around them (per-call overhead is what short sequences pay for).


def _marginal_error(prev: Tensor, product: Tensor, marg: Tensor | float) -> Tensor:
    """max relative error of the marginal prev ⊙ product against marg (0 where marg is 0)."""
    if isinstance(marg, Tensor):
        return torch.where(marg > 0, prev * product / marg.clamp(min=1e-38) - 1, 0).abs().max()
    return (prev * product / marg - 1).abs().max()


def _scaling_iterations(first: Tensor, alpha: Tensor | float, beta: Tensor | float, y0: Tensor,
                        iters: int, tol: float) -> tuple[list[Tensor], ...]:
    """Sinkhorn on A = ``first`` (b, r, c), row vectors α, x (b, 1, r) and β, y (b, 1, c): returns
    [x_1…x_L], [y_0…y_L], [A y_0…], [Aᵀ x_1…] (the products as row vectors too).

    No value is read on the host unless ``tol > 0`` (one check per iteration, to stop early).
    """
    def tensor(marg: Tensor | float) -> Tensor:  # a constant as a 0-dim tensor: one division, not two
        if isinstance(marg, Tensor):
            return marg
        return torch.full((), marg, dtype=first.dtype, device=first.device)

    row_marg, col_marg, first_t = tensor(alpha), tensor(beta), first.mT
    xs: list[Tensor] = []
    ys, ps, qs = [y0], [], []
    for _ in range(iters):
        p = torch.bmm(ys[-1], first_t)  # (b, 1, r): A y
        x = row_marg / p
        done = tol > 0 and len(xs) > 0 and bool(_marginal_error(xs[-1], p, alpha) < tol)
        q = torch.bmm(x, first)  # (b, 1, c): Aᵀ x
        xs.append(x)
        ps.append(p)
        qs.append(q)
        ys.append(col_marg / q)
        if done:
            break
    return xs, ys, ps, qs


# ---- Sinkhorn, scaling domain, fused C passes ----------------------------------------------
#
# The same iterates as ``_scaling_iterations``, with each iteration one read of K instead of two:
# set_sinkhorn.c passes over K's rows once, taking each row's dot product with the scaling of the
# other side, the row's new scaling, and its share of the column sums, while the row is in cache.


_SOURCE = Path(__file__).with_name("set_sinkhorn.c")


@functools.cache
def native_sinkhorn() -> ctypes.CDLL:
    """The compiled fused passes (``attnbench.native``), argument types set (the C signature, in
    order); NativeUnavailable if not."""
    lib = native.load(_SOURCE)
    ptr, size, flag = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    for fn, real in ((lib.sinkhorn_f32, ctypes.c_float), (lib.sinkhorn_f64, ctypes.c_double)):
        fn.argtypes = [ptr, size, size, size, flag, ptr, size, real, real, ptr, ptr, size, ptr, ptr, ptr,
                       ptr, flag, ptr, size, ptr, flag]
        fn.restype = None
    return lib


def traced() -> bool:
    """True while torch.compile traces or a torch dispatch mode (a FLOP counter, fake tensors) is
    active: every operation must then go through PyTorch, so the fused passes stand aside."""
    return torch.compiler.is_compiling() or is_in_torch_dispatch_mode()


def native_reason(device: str, dtype: torch.dtype) -> str | None:
    """Why the fused passes cannot run for ``device`` and ``dtype`` (None: they can)."""
    if device != "cpu":
        return f"the fused Sinkhorn runs on the CPU, not {device}"
    if dtype not in (torch.float32, torch.float64):
        return f"the fused Sinkhorn takes float32 or float64, not {dtype}"
    try:
        native_sinkhorn()
    except native.NativeUnavailable as e:
        return str(e)
    return None


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``, without an operation where it already is (each one costs a dispatch)."""
    return t if t.dtype == dtype else t.to(dtype)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The transport's dtype for inputs of ``dtype``: float64 stays, everything else runs in float32
    (torch.promote_types with float32, without its dispatch)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _for_c(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` as C reads it: ``dtype``, contiguous (no copy, and no operation, where it is already)."""
    return t if t.dtype == dtype and t.is_contiguous() else t.to(dtype).contiguous()


def _native_iterations(kernel: Tensor, rows_first: bool, alpha: Tensor | float, beta: Tensor | float,
                       y0: Tensor, iters: int, fold: bool = False, post: Tensor | None = None
                       ) -> tuple[Tensor, ...]:
    """``_scaling_iterations`` on A = K (rows first) or Kᵀ, for K (b, n, m) contiguous on the CPU:
    one call of set_sinkhorn.c, L passes over K's rows (L + 1 for columns first: the first is half).
    With ``fold`` the last pass leaves diag(u) K ⊙ M in ``kernel`` (M = ``post``, (n, m) or
    (B, 1, n, m), if given; u the row scaling). Either marginal is one value or one per row of
    its side, (b, 1, n) or (b, 1, m). The iterates come stacked, x (L, b, 1, ·), y (L + 1, b, 1, ·),
    A y and Aᵀ x (L, b, 1, ·): indexed as the lists of the PyTorch loop, without splitting them."""
    row_marg, col_marg = (alpha, beta) if rows_first else (beta, alpha)
    lib = native_sinkhorn()
    b, n, m = kernel.shape
    run = lib.sinkhorn_f32 if kernel.dtype == torch.float32 else lib.sinkhorn_f64
    threads = torch.get_num_threads()
    # rows first: scales x_1…x_L, cols y_0…y_L; columns first: cols x_1…x_L, scales y_0…y_L (C
    # writes from y_1 on). Shaped as the PyTorch loop's row vectors, (·, b, 1, ·): to C, (·, b, ·)
    dots, scales = kernel.new_empty(iters, b, 1, n), kernel.new_empty(iters + (not rows_first), b, 1, n)
    sums, cols = kernel.new_empty(iters, b, 1, m), kernel.new_empty(iters + rows_first, b, 1, m)
    scratch = kernel.new_empty(threads, b, m)
    y0 = _for_c(y0, kernel.dtype)  # everything C reads: the kernel's dtype, contiguous
    (cols if rows_first else scales)[0] = y0
    if isinstance(row_marg, Tensor):
        row_marg = _for_c(row_marg, kernel.dtype)
        marg: tuple[Any, ...] = (row_marg.data_ptr(), n, 0.0)
    else:
        marg = (None, 0, float(row_marg))
    if isinstance(col_marg, Tensor):
        col_marg = _for_c(col_marg, kernel.dtype)
        marg += (0.0, col_marg.data_ptr())
    else:
        marg += (float(col_marg), None)
    post_heads = 0
    if post is not None:
        post_heads = 0 if post.dim() == 2 else b // post.shape[0]
        post = _for_c(post, kernel.dtype)
    written = scales.data_ptr() + (0 if rows_first else b * n * scales.element_size())
    run(kernel.data_ptr(), b, n, m, int(rows_first), *marg, y0.data_ptr(), iters,
        dots.data_ptr(), written, sums.data_ptr(), cols.data_ptr(), int(fold),
        None if post is None else post.data_ptr(), post_heads, scratch.data_ptr(), threads)
    if rows_first:  # x_t, y_0…y_L, A y, Aᵀ x
        return scales, cols, dots, sums
    return cols, scales, sums, dots


def _can_fuse(kernel: Tensor, tol: float, fused: bool) -> bool:
    """Whether the scaling iterations on K run as the fused C passes: asked for (``fused``), no
    autograd through them, no early stop."""
    recorded = torch.is_grad_enabled() and kernel.requires_grad
    return fused and tol == 0 and kernel.is_contiguous() and not recorded


def _iterations(kernel: Tensor, rows_first: bool, alpha: Tensor | float, beta: Tensor | float,
                y0: Tensor, iters: int, tol: float, fused: bool, fold: bool = False,
                post: Tensor | None = None) -> tuple[tuple[list[Tensor] | Tensor, ...], bool]:
    """The scaling iterations on K (b, n, m): the fused C passes where ``_can_fuse`` (which, with
    ``fold``, leave diag(u) K ⊙ ``post`` in K), else PyTorch's matrix–vector products. Returns the
    iterates (lists, or stacked tensors from C) and whether K was folded."""
    if _can_fuse(kernel, tol, fused):
        return _native_iterations(kernel, rows_first, alpha, beta, y0, iters, fold, post), fold
    return _scaling_iterations(kernel if rows_first else kernel.mT, alpha, beta, y0, iters, tol), False


def _in_range(x: Tensor, ys: list[Tensor] | Tensor, beta: Tensor | float, cols: int) -> Tensor:
    """True (a 0-dim tensor, no host sync) when the scaling iterates can be trusted.

    Every row of A holds a 1 (its maximum, the shift), so A y >= min(y) over the columns with
    β_j > 0 and x_i <= α_i / min(y): an entry A_ij adds at most α_i A_ij ρ to the plan,
    ρ = max(y) / min(y) over those columns. Entries that underflowed (below tiny/eps) then
    move no marginal by more than the rounding error when ρ <= eps² / (cols · tiny). Finite,
    positive y with such a ρ at every iteration also keep every x finite and positive; the last
    x is checked as well. Anything else sends the plan to the log domain. (NaN fails every
    comparison; ρ's bound is capped at the largest float, so an infinite y fails it too.)
    """
    y = ys[1:] if isinstance(ys, Tensor) else torch.stack(ys[1:])  # (L, b, 1, c)
    info = torch.finfo(y.dtype)
    limit = info.eps**2 / (cols * info.tiny)
    if isinstance(beta, Tensor):  # columns with β = 0 (padding, unused references) have y = 0: leave them out
        real = beta > 0
        low, high = torch.where(real, y, torch.inf).amin(-1), torch.where(real, y, 0.0).amax(-1)
    else:
        low, high = torch.aminmax(y, dim=-1)
    return ((low > 0) & (high <= (limit * low).clamp(max=info.max))).all() & torch.isfinite(x).all()


class _ScalingSinkhorn(torch.autograd.Function):
    """The scaling iterations with a backward that reverses them as matrix–vector products
    with the saved K (nothing n × m is stored per iteration) and forms the gradient of K as a
    single product (n, 2L) · (2L, m) of the rank-one terms of the 2L steps."""

    @staticmethod
    def forward(ctx: Any, kernel: Tensor, rows_first: bool, alpha: Tensor | float, beta: Tensor | float,
                y0: Tensor, iters: int, tol: float, fused: bool) -> tuple[Tensor, Tensor, Tensor]:
        (xs, ys, ps, qs), _ = _iterations(kernel, rows_first, alpha, beta, y0, iters, tol, fused)
        ok = _in_range(xs[-1], ys, beta, kernel.shape[-1 if rows_first else -2])
        ctx.save_for_backward(kernel, *xs, *ys, *ps, *qs)
        ctx.rows_first, ctx.steps = rows_first, len(xs)
        ctx.mark_non_differentiable(ok)
        return xs[-1], ys[-1], ok

    @staticmethod
    def backward(ctx: Any, grad_x: Tensor | None, grad_y: Tensor | None, _: Any) -> tuple[Tensor | None, ...]:
        kernel, *saved = ctx.saved_tensors
        steps = ctx.steps
        first = kernel if ctx.rows_first else kernel.mT
        first_t = first.mT
        xs, ys = saved[:steps], saved[steps:2 * steps + 1]
        ps, qs = saved[2 * steps + 1:3 * steps + 1], saved[3 * steps + 1:]
        gy = torch.zeros_like(ys[-1]) if grad_y is None else grad_y
        # Going back through step t: y_{t+1} = β / q_t gives q̄_t = −r_t, r_t = ȳ_{t+1} y_{t+1} / q_t;
        # q_t = Aᵀ x_t gives x̄_t = A q̄_t (+ the incoming gradient of x_L); x_t = α / p_t gives
        # p̄_t = −x̄_t x_t / p_t; p_t = A y_t gives ȳ_t = Aᵀ p̄_t. Ā = Σ_t p̄_tᵀ y_t − Σ_t x_tᵀ r_t.
        rs: list[Tensor] = []
        gps: list[Tensor] = []
        for t in reversed(range(steps)):
            r = gy * ys[t + 1] / qs[t]  # (b, 1, c)
            back = torch.bmm(r, first_t)  # A r = −x̄_t (b, 1, r), but for the incoming gradient
            if t == steps - 1 and grad_x is not None:
                back = back - grad_x
            gp = back * xs[t] / ps[t]  # p̄_t
            gy = torch.bmm(gp, first)  # ȳ_t = Aᵀ p̄_t
            rs.append(r)
            gps.append(gp)
        rs.reverse()
        gps.reverse()
        # (b, L, r) and (b, L, c) stacks of the row vectors, t = 0…L−1
        p_left, p_right = torch.cat(gps, -2), torch.cat(ys[:steps], -2)
        q_left, q_right = torch.cat(xs, -2), torch.cat(rs, -2)
        if ctx.rows_first:
            grad = torch.baddbmm(torch.bmm(p_left.mT, p_right), q_left.mT, q_right, alpha=-1)
        else:  # Ā for A = Kᵀ: the gradient of K is its transpose
            grad = torch.baddbmm(torch.bmm(p_right.mT, p_left), q_right.mT, q_left, alpha=-1)
        return grad, None, None, None, None, None, None, None


# ---- Sinkhorn, log domain (the fallback) ---------------------------------------------------


def _exp_shifted(logits: Tensor, potential: Tensor, dim: int, out: Tensor) -> Tensor:
    """out = exp(logits + potential − max) along ``dim``, in place; returns the max (keepdim).

    ``potential`` is broadcast along the other dimension: the column potential g (…, m) for
    dim = −1, the row potential f (…, n) for dim = −2. One buffer, no temporaries.
    """
    torch.add(logits, potential.unsqueeze(-1 if dim == -2 else -2), out=out)
    top = out.amax(dim, keepdim=True)
    out.sub_(top).exp_()
    return top


def _lse(logits: Tensor, potential: Tensor, dim: int, buf: Tensor | None) -> Tensor:
    """logsumexp over ``dim`` of logits + potential; through ``buf`` when given (no autograd)."""
    if buf is None:
        return torch.logsumexp(logits + potential.unsqueeze(-1 if dim == -2 else -2), dim=dim)
    top = _exp_shifted(logits, potential, dim, buf)
    return buf.sum(dim).log_().add_(top.squeeze(dim))


def _log_sinkhorn_loop(logits: Tensor, rows_first: bool, iters: int, tol: float, mask: Tensor | None,
                       differentiable: bool, refs: Tensor | None = None
                       ) -> tuple[Tensor, Tensor, list[tuple[str, Tensor]]]:
    """Log-domain Sinkhorn on logits (…, n, m): potentials f (rows, 1/n) and g (columns, 1/m),
    the same iterates as the scaling domain (u = e^f, v = e^g). Returns f, g and the half-steps
    (side updated, the other potential it read) that the recompute backward replays.

    ``mask`` (B, n), False at padding: those rows get marginal 0 and f = −∞ throughout.
    ``refs`` (B,): each sequence's count of references; the columns past it get marginal 0 and
    g = −∞ throughout, the others 1/refs.
    """
    n, m = logits.shape[-2:]
    if mask is None:
        log_a: Tensor | float = -math.log(n)
        real = logits.new_zeros(logits.shape[:-1])
    else:
        inf = torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device)
        log_a = torch.where(mask[:, None], -mask.sum(-1, keepdim=True).to(logits.dtype).log()[:, None], inf)
        real = torch.where(mask[:, None], 0.0, inf).to(logits.dtype).expand(logits.shape[:-1])
    log_b: Tensor | float = -math.log(m)
    used = logits.new_zeros(logits.shape[:-2] + (m,))
    if refs is not None:
        live = torch.arange(m, device=logits.device) < refs[:, None]  # (B, m)
        inf = torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device)
        log_b = torch.where(live, -refs.to(logits.dtype).log()[:, None], inf)[:, None]  # (B, 1, m)
        used = torch.where(live[:, None], used, inf)
    pot = {"f": real, "g": used}
    margs = {"f": log_a, "g": log_b}
    order = ("f", "g") if rows_first else ("g", "f")
    buf = None if differentiable else torch.empty_like(logits)
    steps: list[tuple[str, Tensor]] = []
    for _ in range(iters):
        done = False
        for side in order:
            other = pot["g" if side == "f" else "f"]
            new = margs[side] - _lse(logits, other, -1 if side == "f" else -2, buf)
            if side == order[0] and tol > 0 and len(steps) > 0:
                # the first side's marginals of the previous plan are marg · exp(prev − new)
                gap = torch.where(torch.isfinite(new), pot[side] - new, 0)
                done = bool(torch.expm1(gap).abs().max() < tol)
            steps.append((side, other))
            pot[side] = new
        if done:
            break
    return pot["f"], pot["g"], steps


class _LogSinkhornRecompute(torch.autograd.Function):
    """Log-domain potentials whose backward recomputes each half-step's softmax instead of
    keeping them: memory O(n·m + L·(n + m)) rather than O(L·n·m), same gradient."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, rows_first: bool, iters: int, tol: float,
                mask: Tensor | None, refs: Tensor | None) -> tuple[Tensor, Tensor]:
        f, g, steps = _log_sinkhorn_loop(logits, rows_first, iters, tol, mask, differentiable=False,
                                         refs=refs)
        ctx.sides = [side for side, _ in steps]
        ctx.save_for_backward(logits, *[other for _, other in steps])
        return f, g

    @staticmethod
    def backward(ctx: Any, grad_f: Tensor | None, grad_g: Tensor | None) -> tuple[Tensor | None, ...]:
        logits, *others = ctx.saved_tensors
        grad_logits = torch.zeros_like(logits)
        buf = torch.empty_like(logits)
        grads = {"f": torch.zeros(logits.shape[:-1], dtype=logits.dtype, device=logits.device)
                 if grad_f is None else grad_f,
                 "g": torch.zeros(logits.shape[:-2] + logits.shape[-1:], dtype=logits.dtype,
                                  device=logits.device) if grad_g is None else grad_g}
        for side, other in zip(reversed(ctx.sides), reversed(others), strict=True):
            # new = marg − LSE_dim(G + other): ∂new/∂G = ∂new/∂other = −softmax_dim(G + other)
            dim = -1 if side == "f" else -2
            _exp_shifted(logits, other, dim, buf)
            buf.mul_((grads[side] / buf.sum(dim)).unsqueeze(dim))  # softmax ⊙ new̄
            grad_logits.sub_(buf)
            other_side = "g" if side == "f" else "f"
            grads[other_side] = grads[other_side] - buf.sum(-2 if dim == -1 else -1)
            grads[side] = torch.zeros_like(grads[side])
        return grad_logits, None, None, None, None, None


def log_sinkhorn_plan(logits: Tensor, iters: int, tol: float = 0.0, recompute: bool = True,
                      mask: Tensor | None = None, rows_first: bool = True,
                      refs: Tensor | None = None) -> Tensor:
    """The entropic OT plan T = exp(G + f + g) with rows 1/n and columns 1/m (``mask`` (B, n):
    rows 1/(real tokens) and T = 0 on padding rows; ``refs`` (B,): columns 1/refs_b up to refs_b
    and T = 0 past it), computed in the log domain."""
    if recompute and torch.is_grad_enabled() and logits.requires_grad:
        f, g = _LogSinkhornRecompute.apply(logits, rows_first, iters, tol, mask, refs)
    else:
        f, g, _ = _log_sinkhorn_loop(logits, rows_first, iters, tol, mask,
                                     differentiable=torch.is_grad_enabled(), refs=refs)
    return (logits + f.unsqueeze(-1) + g.unsqueeze(-2)).exp()


class _PriorProduct(torch.autograd.Function):
    """(K ⊙ M)ᵀ x or (K ⊙ M) x for the read-out, keeping K (already kept for Sinkhorn) rather
    than K ⊙ M: the backward recomputes K ⊙ M for the gradient of x, once for all the products
    of a plan (``shared``, the plan's own dict), and forms the gradient of K as (x ȳᵀ or ȳ xᵀ)
    ⊙ M, one (n, m) product. ``readout`` is K ⊙ M, computed once for the forward and not kept."""

    @staticmethod
    def forward(ctx: Any, kernel: Tensor, post: Tensor, x: Tensor, transpose: bool, readout: Tensor,
                shared: dict[str, Any]) -> Tensor:
        ctx.save_for_backward(kernel, post, x)
        ctx.transpose, ctx.shared = transpose, shared
        shared["pending"] = shared.get("pending", 0) + 1
        return (readout.mT if transpose else readout) @ x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        kernel, post, x = ctx.saved_tensors
        shared = ctx.shared
        shared["pending"] -= 1
        readout = shared.pop("readout", None)
        if readout is None:
            readout = kernel * post
        if shared["pending"] > 0:  # another product of this plan still to come: keep it for that one
            shared["readout"] = readout
        grad_x = (readout if ctx.transpose else readout.mT) @ grad
        del readout
        grad_kernel = (x @ grad.mT if ctx.transpose else grad @ x.mT).mul_(post)
        return grad_kernel, None, grad_x, None, None, None


# ---- the mechanism ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _References:
    """The references one forward pass uses: the first ``count`` of the m (``m_cap``), and, where
    padding leaves some sequences fewer tokens than that, each sequence's own count ``per_sequence``
    (B,) (the columns past it carry marginal 0 and no mass)."""

    count: int
    per_sequence: Tensor | None = None

    def scale(self) -> Tensor | int:
        """The count as the aggregation's factor m: one int, or (B, 1, 1, 1)."""
        return self.count if self.per_sequence is None else self.per_sequence[:, None, None, None]


@dataclasses.dataclass
class _Plan:
    """One transport plan, never built: P = diag(u) K diag(v), times ``post`` (M) if given."""

    kernel: Tensor  # (B, H, n, m), the Gibbs kernel (shifted) or, after a fallback, the plan
    u: Tensor  # (B, H, n) row scaling (0 at padding)
    v: Tensor  # (B, H, m) column scaling
    ok: Tensor  # 0-dim bool: the scaling iterates are trustworthy
    post: Tensor | None  # M, (n, m) or (B, 1, n, m), when the plan is multiplied by it after Sinkhorn
    logits: Callable[[], Tensor]  # recomputes the logits G, for the log-domain fallback
    folded: bool = False  # ``kernel`` holds diag(u) K (⊙ M): the read-out's kernel, u folded in
    shared: dict[str, Any] = dataclasses.field(default_factory=dict)  # for ``_PriorProduct``


@register_mechanism
class SeTAttention(Mechanism):
    name = "set"
    no_causal_reason = ("SeT's transport plan is computed over all tokens at once; the paper defines "
                        "no causal SeT")
    summary = "Self-optimal Transport: entropic OT to m learned references (SeTformer)"
    Options = SeTOptions
    complexity = "linear"
    masking = "native"
    flops_formula = (
        "m here is the references a plan uses: m, or min(m, N) with m_cap=tokens (a square on a 2-D prior); "
        "matmul: 2·B·N·C²·(3 | 4 asym.) projections + per plan (×2 asym.) 2·B·H·N·(d·k + k·m) "
        "kernel embedding and scores + 4·L·B·H·N·m Sinkhorn (2L matrix–vector products with K, "
        "memory-bound; on the CPU fused in pairs, L passes that each read the (N, m) kernel once) + "
        "4·B·H·N·m·(d | d+1 renormalised) aggregation and read-out + 2·H·(k²·d + k³ + k²·m) "
        "whitening and fold; elementwise, one per "
        "element and pass: per plan B·H·[N·m·(3 + 1 for M ⊙ S or log M + 1 for K ⊙ M): max, shift, "
        "the one exp, the prior + (3 | 4 embedding_norm=keep)·N·k + N·d embedding + 4·L·(N + m) "
        "scalings + 6·L·(m | N) range check] + B·H·N·d·(2 | 4 renormalised) read-out")

    def __init__(self, dim: int, num_heads: int, options: SeTOptions | None = None) -> None:
        super().__init__(dim, num_heads, options)
        o: SeTOptions = self.options
        n_proj = 3 if o.readout == "asymmetric" else 2
        self.in_proj = nn.Linear(dim, n_proj * dim, bias=o.qkv_bias)  # U, V (and Q)
        self.anchors = nn.Parameter(torch.randn(num_heads, o.anchors, self.head_dim))  # Z
        self.references = nn.Parameter(torch.randn(num_heads, o.m, o.anchors) / math.sqrt(o.anchors))
        self.proj = nn.Linear(dim, dim)
        self.init_record: dict[str, Any] = {"method": "random"}
        self._terms: tuple[Any, ...] | None = None  # see ``_logit_terms``

    @classmethod
    def backend(cls, device: str = "cpu", dtype: torch.dtype = torch.float32) -> str:
        why = native_reason(device, torch.promote_types(dtype, torch.float32))
        if why is None:
            return "eager PyTorch, Sinkhorn in fused C passes (scaling domain, log-domain fallback)"
        return f"eager PyTorch (scaling-domain Sinkhorn, log-domain fallback; not fused: {why})"

    def _fused(self, device: str, dtype: torch.dtype) -> bool:
        """Whether the Sinkhorn iterations run as fused C passes (``sinkhorn`` option); while
        tracing (``traced``) never, for "fused" too."""
        if self.options.sinkhorn == "torch" or traced():
            return False
        why = native_reason(device, dtype)
        if why is not None and self.options.sinkhorn == "fused":
            raise ValueError(f"set: sinkhorn='fused' cannot run here: {why} (use sinkhorn='auto' or 'torch')")
        return why is None

    # -- pieces, each (B, H, n, ·) ------------------------------------------------------
    def whitening(self, dtype: torch.dtype, unit: Tensor | None = None) -> Tensor:
        """κ(Z, Z)^(-1/2) (H, k, k) of the unit-norm anchors ``unit`` (H, k, d) (the anchors
        normalised here if not given)."""
        alpha = 1.0 / self.options.kernel_sigma**2
        z = F.normalize(self.anchors.to(dtype), dim=-1) if unit is None else unit
        return _InverseSqrtPSD.apply(gaussian_sphere_kernel(z, z, alpha), 1e-2)

    def _logit_terms(self, dtype: torch.dtype, m: int) -> tuple[Tensor, Tensor]:
        """What the logits need of the parameters: α Ẑᵀ (H, d, k), for κ(U, Z) = exp(U α Ẑᵀ / ‖u‖
        − α), and the fold F = κ(Z, Z)^(-1/2) Y_{1…m}ᵀ / ε (H, k, m), so that G = κ(U, Z) F.

        Without autograd (evaluation, forward timings) they are kept until the anchors or the
        references change: the key holds their storage and version counters (every in-place
        update moves the counter: an optimiser step, load_state_dict, init_from_data), and every
        forward with autograd (a training step's) drops them, which also covers updates that
        bypass the counter (fused optimisers, writes through ``.data``) between training and
        evaluation. Repeated forwards then skip the eigendecomposition and its dozens of small
        operations. Never kept while tracing (``traced``)."""
        o: SeTOptions = self.options
        z, y = self.anchors, self.references
        key = None
        if torch.is_grad_enabled() or traced():
            self._terms = None
        else:
            key = (dtype, m, z.device, z.data_ptr(), z._version, y.data_ptr(), y._version)
            # (anchors, references, key, terms): the parameters are held, so a new one never passes for them
            kept = self._terms
            if kept is not None and kept[0] is z and kept[1] is y and kept[2] == key:
                return kept[3]
        alpha = 1.0 / o.kernel_sigma**2
        kept_here = contextlib.ExitStack()
        if key is not None:  # ordinary tensors even under inference mode (which turns autograd back on)
            kept_here.enter_context(torch.inference_mode(False))
            kept_here.enter_context(torch.no_grad())
        with kept_here:
            unit = F.normalize(_as(z, dtype), dim=-1)  # (H, k, d)
            scaled = (alpha * unit).transpose(-2, -1)  # (H, d, k)
            gram = (unit @ scaled).sub_(alpha).exp_()  # κ(Z, Z) (H, k, k)
            refs = _as(y if m == y.shape[1] else y[:, :m], dtype).transpose(-2, -1)  # (H, k, m)
            terms = (scaled, _InverseSqrtPSD.apply(gram, 1e-2) @ refs / o.eps)
        if key is not None:
            self._terms = (z, y, key, terms)
        return terms

    def kernel_features(self, u: Tensor, mask: Tensor | None = None, scaled: Tensor | None = None) -> Tensor:
        """κ(u, Z) = exp(α(⟨û, z⟩ − 1)) to the unit-norm anchors, times ‖u‖ with
        ``embedding_norm=keep``: (B, H, n, d) -> (B, H, n, k). ``mask`` (B, n): with keep, padding
        rows get norm 0 (their junk cannot reach the kernel's range). ``scaled``: α Ẑᵀ (H, d, k),
        made from the anchors if not given."""
        alpha = 1.0 / self.options.kernel_sigma**2
        if scaled is None:
            scaled = (alpha * F.normalize(self.anchors.to(u.dtype), dim=-1)).transpose(-2, -1)
        dots = u @ scaled  # α⟨u, z⟩ (B, H, n, k); û = u / max(|u|, 1e-12)
        norm = torch.linalg.vector_norm(u, dim=-1, keepdim=True).clamp(min=1e-12)
        grad = torch.is_grad_enabled()
        dots = dots / norm if grad else dots.div_(norm)
        feats = dots.sub_(alpha).exp_()
        if self.options.embedding_norm == "drop":
            return feats
        if mask is not None:
            norm = norm * mask[:, None, :, None]
        return feats * norm if grad else feats.mul_(norm)

    def embed(self, u: Tensor, whitening: Tensor | None = None) -> Tensor:
        """Nyström features ψ(u) = κ(u, Z) κ(Z, Z)^(-1/2): (B, H, n, d) -> (B, H, n, k)."""
        whitening = self.whitening(u.dtype) if whitening is None else whitening
        return self.kernel_features(u) @ whitening

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

    def references_used(self, n: int, grid: Grid | None = None) -> int:
        """How many references a plan of n tokens uses (``m_cap``): m, or with "tokens" at most n,
        and on a 2-D prior the largest square grid of at most min(m, n), min(√m, ⌊√n⌋)²."""
        o: SeTOptions = self.options
        if o.m_cap == "none" or n >= o.m:
            return o.m
        square = math.isqrt(o.m) ** 2 == o.m
        if o.positional == "2d" or (o.positional == "auto" and grid is not None and square):
            return min(math.isqrt(o.m), math.isqrt(n)) ** 2
        return n

    def _references(self, n: int, grid: Grid | None, mask: Tensor | None) -> _References:
        """The references of a forward pass on n tokens (``mask`` (B, n): each sequence's real
        tokens count; one host read of the shortest and longest)."""
        if mask is None or self.options.m_cap == "none":
            return _References(self.references_used(n, grid))
        lengths = mask.sum(-1)
        shortest, longest = torch.stack([lengths.min(), lengths.max()]).tolist()
        count = self.references_used(longest)
        if self.references_used(shortest) == count:
            return _References(count)
        return _References(count, lengths.clamp(max=count))

    def _prior(self, n: int, grid: Grid | None, dtype: torch.dtype, device: torch.device, mask: Tensor | None,
               refs: _References) -> tuple[Tensor | None, Tensor | None]:
        """(what the logits get, what the plan is multiplied by): M or log M per ``prior``."""
        o: SeTOptions = self.options
        prior_grid = self._prior_grid(grid)
        if prior_grid == "none":
            return None, None
        log = o.prior == "kernel"
        if mask is None:
            value = positional_prior(n, refs.count, o.tau, prior_grid, dtype, device, log)
        else:  # (B, 1, n, m): real tokens placed by their rank among real tokens
            like = torch.empty(0, dtype=dtype, device=device)
            value = prior_from_log(positional_log_prior(n, refs.count, o.tau, None, like, mask,
                                                        refs.per_sequence), log)
        if o.prior == "kernel":
            return value, None
        return (value if o.prior == "similarity-and-plan" else None), value

    def _sinkhorn(self, x: Tensor, parts: list[int], grid: Grid | None, mask: Tensor | None,
                  cast: tuple[bool, torch.dtype], refs: _References, fold_readout: bool = False
                  ) -> list[_Plan]:
        """The transport plan of the alignment features of each of ``parts`` (``_project``), in
        the scaling domain, with one host check for all of them and a log-domain recomputation
        of any whose scalings left the floating-point range. ``mask`` (B, n): padding; ``refs``:
        the references used. Only the kernel K of each plan is kept: features and embedding are
        released once used. Without autograd, ``fold_readout`` lets the fused passes leave
        diag(u) K ⊙ M in K for the read-out."""
        o: SeTOptions = self.options
        dtype = _work_dtype(x.dtype)
        (b, n), h, m = x.shape[:2], self.num_heads, refs.count
        # α Ẑᵀ and κ(Z, Z)^(-1/2) Yᵀ / ε (H, k, m), so that the logits are one product κ(U, Z) · fold
        scaled, fold = self._logit_terms(dtype, m)
        pre, post = self._prior(n, grid, dtype, x.device, mask, refs)
        rows_first = o.order == "rows-then-columns"
        fused = self._fused(x.device.type, dtype)
        if mask is None:
            a: Tensor | float = 1.0 / n
        else:  # rows 1/(real tokens), 0 at padding: (B·H, 1, n)
            a = (mask / mask.sum(-1, keepdim=True)).to(dtype)[:, None].expand(b, h, n).reshape(b * h, 1, n)
        unused = None  # (B, 1, 1, m): the columns past a sequence's own count of references
        if refs.per_sequence is None:
            col: Tensor | float = 1.0 / m
        else:  # columns 1/(its references), 0 past them: (B·H, 1, m)
            unused = (torch.arange(m, device=x.device) >= refs.per_sequence[:, None])[:, None, None]
            col = torch.where(unused[:, 0, 0], 0.0, 1.0 / refs.per_sequence.to(dtype)[:, None]).to(dtype)
            col = col[:, None].expand(b, h, m).reshape(b * h, 1, m)
        alpha, beta = (a, col) if rows_first else (col, a)
        # y_0, the scaling updated second: ones, 0 where its marginal is 0 (padding, unused columns)
        y0 = torch.ones(b * h, 1, m if rows_first else n, dtype=dtype, device=x.device)
        if isinstance(beta, Tensor):
            y0 = (beta > 0).to(dtype)

        plans = []
        for part in parts:
            def logits(part: int = part) -> Tensor:  # G = κ(U, Z) · fold (⊙ M), a fresh (B, H, n, m)
                g = self.kernel_features(self._project(x, part, cast), mask, scaled) @ fold
                if pre is not None:
                    g = g.mul_(pre) if o.prior == "similarity-and-plan" else g.add_(pre)
                return g

            g = logits()
            with torch.no_grad():  # the shift cancels out of the plan: no gradient through it
                if rows_first:  # every row of K holds a 1, at a column in use
                    shift = (g if unused is None else g.masked_fill(unused, -torch.inf)).amax(
                        -1, keepdim=True)
                else:  # every column holds a 1, at a real token
                    shift = (g if mask is None else g.masked_fill(~mask[:, None, :, None], -torch.inf)).amax(
                        -2, keepdim=True)
            g = g.sub_(shift)
            if unused is not None and rows_first:  # K = 1 at unused columns: finite, and y = 0 there
                g = g.masked_fill_(unused, 0.0)
            kernel = g.exp_()
            flat = kernel.view(b * h, n, m)
            folded = False
            if o.backward == "recompute" and torch.is_grad_enabled() and kernel.requires_grad:
                sx, sy, ok = _ScalingSinkhorn.apply(flat, rows_first, alpha, beta, y0, o.iters, o.tol, fused)
            else:  # no autograd (the fused passes may fold u ⊙ M into K), or autograd through every step
                (xs, ys, _, _), folded = _iterations(flat, rows_first, alpha, beta, y0, o.iters, o.tol, fused,
                                                     fold_readout, post)
                sx, sy, ok = xs[-1], ys[-1], _in_range(xs[-1], ys, beta, m if rows_first else n)
            u, v = (sx, sy) if rows_first else (sy, sx)  # the scalings of the side first, second
            plans.append(_Plan(kernel, u.view(b, h, n), v.view(b, h, m), ok, post, logits, folded))

        ok = plans[0].ok if len(plans) == 1 else torch.stack([p.ok for p in plans]).all()
        if not bool(ok):  # the forward's one host sync
            for p in plans:
                if not bool(p.ok):
                    p.kernel = log_sinkhorn_plan(p.logits(), o.iters, o.tol, o.backward == "recompute",
                                                 mask, rows_first, refs.per_sequence)
                    p.u, p.v = torch.ones_like(p.u), torch.ones_like(p.v)
                    p.folded = False
        return plans

    @staticmethod
    def _readout_kernel(plan: _Plan) -> Tensor:
        """K ⊙ M when the plan is multiplied by the prior after Sinkhorn, else K. Without
        autograd it overwrites K (nothing needs K any more); with autograd it is a temporary
        that the backward recomputes (``_PriorProduct``), so only K is kept."""
        if plan.post is None or plan.folded:
            return plan.kernel
        if not torch.is_grad_enabled():
            return plan.kernel.mul_(plan.post)
        with torch.no_grad():
            return plan.kernel * plan.post

    @staticmethod
    def _product(plan: _Plan, readout: Tensor, x: Tensor, transpose: bool) -> Tensor:
        """(K ⊙ M)ᵀ x (transpose) or (K ⊙ M) x for x (B, H, n or m, ·), ``readout`` = K ⊙ M."""
        if plan.post is None or not torch.is_grad_enabled():
            return (readout.mT if transpose else readout) @ x
        return _PriorProduct.apply(plan.kernel, plan.post, x, transpose, readout, plan.shared)

    def _project(self, x: Tensor, part: int, cast: tuple[bool, torch.dtype]) -> Tensor:
        """U (``part`` 0), V (1) or Q (2) as (B, H, n, d), in float32 or wider for the transport,
        under the caller's autocast state ``cast`` (enabled, dtype). Each is its own product of
        the rows of ``in_proj``, so that each is released as soon as it has been used."""
        rows = slice(part * self.dim, (part + 1) * self.dim)
        bias = None if self.in_proj.bias is None else self.in_proj.bias[rows]
        with torch.autocast(x.device.type, dtype=cast[1], enabled=cast[0]):
            y = F.linear(x, self.in_proj.weight[rows], bias)
        return split_heads(_as(y, _work_dtype(x.dtype)), self.num_heads)

    @staticmethod
    def _autocast_state(x: Tensor) -> tuple[bool, torch.dtype]:
        kind = x.device.type
        return torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)

    def mix(self, x: Tensor, grid: Grid | None) -> Tensor:
        return self.transport(x, grid, None)

    def mix_padded(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.transport(x, None, mask)

    def transport(self, x: Tensor, grid: Grid | None, mask: Tensor | None) -> Tensor:
        """Aggregate the tokens onto the references and read them back; ``mask`` (B, n): padding."""
        return self.proj(self._transport(x, grid, mask).to(x.dtype))

    def _transport(self, x: Tensor, grid: Grid | None, mask: Tensor | None) -> Tensor:
        """The heads' outputs, merged (B, n, H·d); every (n, m) tensor is released on return."""
        d = self.head_dim
        refs = self._references(x.shape[1], grid, mask)
        m = refs.scale()
        cast = self._autocast_state(x)
        # tokens per sequence: n, or each sequence's real tokens (B, 1, 1, 1)
        work = _work_dtype(x.dtype)
        n = x.shape[1] if mask is None else mask.sum(-1).to(work)[:, None, None, None]
        grad = torch.is_grad_enabled()
        # the transport runs in float32 even under fp16/bf16 autocast: exp needs the range
        with torch.autocast(x.device.type, enabled=False):
            asym = self.options.readout == "asymmetric"
            # without autograd the fused passes fold u (and M) into K: P' = diag(u) K ⊙ M
            plans = self._sinkhorn(x, [0, 2] if asym else [0], grid, mask, cast, refs,
                                   fold_readout=not (grad or self.options.renormalise))
            agg, read = plans[0], plans[-1]
            kernel = self._readout_kernel(agg)
            tiny = torch.finfo(kernel.dtype).tiny
            u, v = agg.u.unsqueeze(-1), agg.v.unsqueeze(-1)
            values = self._project(x, 1, cast)  # V (B, H, n, d)
            if self.options.renormalise:  # R_j = Σ_i P_ij V_i / Σ_i P_ij: v cancels
                sums = self._product(agg, kernel, torch.cat([u * values, u], -1), True)  # (B, H, m, d + 1)
                refs = sums[..., :d] / sums[..., d:].clamp(min=tiny)
            else:  # R = m Pᵀ V = m · v ⊙ Kᵀ (u ⊙ V) = m · v ⊙ P'ᵀ V; without autograd, in V's buffer
                if not agg.folded:
                    values = u * values if grad else values.mul_(u)
                refs = (m * v) * self._product(agg, kernel, values, True)  # (B, H, m, d)
            del values
            if read is not agg:
                kernel = self._readout_kernel(read)
            u, v = read.u.unsqueeze(-1), read.v.unsqueeze(-1)
            if self.options.renormalise:  # O_i = Σ_j P_ij R_j / Σ_j P_ij: u cancels
                sums = self._product(read, kernel, torch.cat([v * refs, v], -1), False)  # (B, H, n, d + 1)
                return merge_heads(sums[..., :d] / sums[..., d:].clamp(min=tiny))
            # O = n P R = n · u ⊙ K (v ⊙ R) = P' (n · v ⊙ R)
            if read.folded and x.shape[0] == 1:  # one sequence: straight into the merged layout (n, H, d)
                merged = kernel.new_empty(1, x.shape[1], self.num_heads, d)
                torch.matmul(kernel, (n * v) * refs, out=merged.transpose(1, 2))
                return merged.view(1, x.shape[1], -1)
            if read.folded:  # (with B > 1 matmul's out= could not be a view: it would copy anyway)
                return merge_heads(kernel @ ((n * v) * refs))
            out = self._product(read, kernel, v * refs, False)  # (B, H, n, d)
            return merge_heads((n * u) * out if grad else out.mul_(n * u))

    # -- looking inside -------------------------------------------------------------------
    def _dense(self, plan: _Plan, with_prior: bool = True) -> Tensor:
        dense = plan.u.unsqueeze(-1) * plan.kernel * plan.v.unsqueeze(-2)
        return dense * plan.post if with_prior and plan.post is not None else dense

    @torch.no_grad()
    def transport_plan(self, x: Tensor, grid: Grid | None = None, with_prior: bool = True) -> Tensor:
        """The plan P (B, H, n, m) that aggregates tokens onto references: T ⊙ M for the
        post-multiplied priors, or, with ``with_prior=False``, Sinkhorn's T itself (whose
        marginals are the transport constraints)."""
        refs = self._references(x.shape[1], grid, None)
        return self._dense(self._sinkhorn(x, [0], grid, None, self._autocast_state(x), refs)[0], with_prior)

    @torch.no_grad()
    def attention_matrix(self, x: Tensor, grid: Grid | None = None, max_tokens: int = 4096) -> Tensor:
        """The implied dense attention A (B, H, n, n), O = A V; only for small n.

        A = n m P_read P_aggᵀ, or with ``renormalise`` diag(1/P_read 1) P_read diag(1/P_aggᵀ 1)
        P_aggᵀ (row-stochastic); P_read = P_agg unless ``readout="asymmetric"``."""
        n = x.shape[1]
        if n > max_tokens:
            raise ValueError(f"set: attention_matrix builds an n × n matrix; n={n} > max_tokens="
                             f"{max_tokens} (SeT itself never does)")
        asym = self.options.readout == "asymmetric"
        refs = self._references(n, grid, None)
        plans = self._sinkhorn(x, [0, 2] if asym else [0], grid, None, self._autocast_state(x), refs)
        agg, read = self._dense(plans[0]), self._dense(plans[-1])
        if self.options.renormalise:
            return (read / read.sum(-1, keepdim=True)) @ (agg / agg.sum(-2, keepdim=True)).mT
        return n * refs.count * read @ agg.mT

    # -- cost -------------------------------------------------------------------------------
    def flops(self, batch: int, n: int, grid: Grid | None = None, causal: bool = False) -> Flops:
        o: SeTOptions = self.options
        h, d, k, m, iters = self.num_heads, self.head_dim, o.anchors, self.references_used(n, grid), o.iters
        plans = 2 if o.readout == "asymmetric" else 1
        per_plan = 2 * batch * h * n * (d * k + k * m) + 4 * iters * batch * h * n * m
        setup = 2 * h * (k * k * d + k**3 + k * k * m)  # κ(Z, Z), its inverse square root, the fold
        transport = 2 * 2 * batch * h * n * m * (d + (1 if o.renormalise else 0))  # aggregation, read-out
        proj = projection_flops(batch, n, self.dim, (3 if plans == 2 else 2) + 1)
        prior = int(o.positional != "none")  # an M ⊙ S or + log M pass, and a K ⊙ M pass
        passes = 3 + prior * ((o.prior != "plan") + (o.prior != "kernel"))  # + max, shift, exp
        # per plan: the kernel passes; the embedding's division by the norm, shift and exp over
        # (n, k) (and the product with the norm for embedding_norm=keep), the norm over (n, d);
        # the two divisions (a reciprocal and a product each) per iteration; the range check of
        # the scaling updated second (m long, or n for columns-then-rows)
        second = m if o.order == "rows-then-columns" else n
        keep = int(o.embedding_norm == "keep")  # the features times ‖u‖
        per_plan_elementwise = (n * m * passes + (3 + keep) * n * k + n * d + 4 * iters * (n + m)
                                + 6 * iters * second)
        # the PyTorch read-out without autograd: u ⊙ V, then n u ⊙ O written in the merged layout
        # (renormalised: the concatenations, the division and the merge; with autograd one pass
        # more, the merge; where the fused passes fold u and M into K, none: the fold rides on
        # the K ⊙ M pass)
        readout = n * d * (4 if o.renormalise else 2)
        return Flops(matmul=proj + setup + plans * per_plan + transport,
                     elementwise=batch * h * (plans * per_plan_elementwise + readout))

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
        feats = torch.cat([self._project(x, 0, self._autocast_state(x)).transpose(0, 1).flatten(1, 2)
                           for x in batches], dim=1)
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
