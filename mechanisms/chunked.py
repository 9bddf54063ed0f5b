"""Chunked forms of the gated linear recurrences, in plain PyTorch: the CPU path of ``retnet``,
``gla``, ``gated_deltanet``, ``mamba2`` and ``based`` (and their CUDA path where
flash-linear-attention cannot load). A module of shared kernels; it registers no mechanism.

Per head, a state S_t (dk × dv) is updated token by token and read by the query:

    decay_attention:  S_t = diag(exp g_t) S_{t-1} + k_t v_tᵀ                     o_t = S_tᵀ (scale · q_t)
    delta_rule:       S_t = exp(g_t) (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ     o_t = S_tᵀ (scale · q_t)

with g_t ≤ 0 a log-decay: one per head and token (RetNet, Mamba2's SSD, simple GLA; shape
(B, H, N)), one per key channel (GLA; (B, H, N, dk)), or none (plain linear attention, Based).

The sequence is cut into chunks of c tokens (padded at the end with zeros, which change no real
output: the recurrence is causal). Within a chunk every token-to-token term is a masked c × c
matrix product, with decays exp(G_i − G_j) ≤ 1 from cumulative log-decays G restarted at each
chunk, so nothing overflows; across chunks only the states travel, one (dk × dv) per chunk boundary,
in a Python loop over the chunks (never over tokens). Memory is linear in n: O(n·c) for the
within-chunk terms and O(n/c · dk·dv) for the states. This follows the chunkwise-parallel form of
GLA (Yang et al., 2024) and, for the delta rule, its WY/UT form (Yang et al., 2024, "Parallelizing
Linear Transformers with the Delta Rule over Sequence Length"), as flash-linear-attention's kernels
compute them.

With ``final_state=True`` both also return the state after the last token, S_N (B, H, dk, dv),
for decoding: the zero padding at the end of the last chunk leaves it as the last real token left it
(k = v = 0, g = 0). ``recurrence_step`` advances such a state by one token, in place: the step of
incremental decoding, O(dk·dv) per head whatever the context.

Every function takes (B, H, N, d) tensors and computes in at least float32 (float64 stays float64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def chunk_length(n: int, chunk: int, sub_chunk: int = 1) -> int:
    """The chunk actually used for ``n`` tokens: ``chunk``, or fewer for a short sequence (rounded up
    to a multiple of ``sub_chunk``, which must divide ``chunk``)."""
    return min(chunk, -(-n // sub_chunk) * sub_chunk)


def _chunks(x: Tensor, c: int) -> Tensor:
    """(B, H, N, ...) -> (B, H, N'/c, c, ...), zero-padded at the end to a multiple of c."""
    pad = -x.shape[2] % c
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 3) + (0, pad))
    return x.unflatten(2, (-1, c))


def _lower(c: int, device: torch.device, strict: bool = False) -> Tensor:
    """(c, c) bool: j ≤ i (or j < i when ``strict``)."""
    return torch.ones(c, c, dtype=torch.bool, device=device).tril(-1 if strict else 0)


def _pair_decay(g_cum: Tensor, keep: Tensor) -> Tensor:
    """exp(G_i − G_j) where ``keep`` (c, c) holds, else 0: (..., c) -> (..., c, c). The masked pairs
    get −inf before exp, so no overflow and no NaN in either pass."""
    diff = g_cum.unsqueeze(-1) - g_cum.unsqueeze(-2)
    return diff.masked_fill(~keep, float("-inf")).exp()


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def decay_attention(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None = None, scale: float = 1.0,
                    chunk: int = 64, sub_chunk: int = 16,
                    final_state: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """o_t = S_tᵀ(scale·q_t), S_t = diag(exp g_t) S_{t-1} + k_t v_tᵀ, chunk by chunk.

    q, k: (B, H, N, dk); v: (B, H, N, dv); g: None, (B, H, N) or (B, H, N, dk) log-decays (≤ 0).
    ``sub_chunk`` (a divisor of ``chunk``) is used by per-channel decays only. Returns (B, H, N, dv),
    and with ``final_state`` also S_N (B, H, dk, dv) in the working dtype."""
    b, h, n, dk = q.shape
    dtype, work = q.dtype, _work_dtype(q.dtype)
    per_channel = g is not None and g.dim() == 4
    c = chunk_length(n, chunk, sub_chunk if per_channel else 1)
    q, k, v = (_chunks(t.to(work), c) for t in (q, k, v))  # (B, H, M, c, d)
    q = q * scale
    if g is None:
        scores = (q @ k.transpose(-1, -2)).masked_fill(~_lower(c, q.device), 0)  # (B, H, M, c, c)
        delta = k.transpose(-1, -2) @ v  # (B, H, M, dk, dv): each chunk's k vᵀ sum
        states = delta.cumsum(2) - delta  # the state before each chunk: the sum over earlier chunks
        out = (scores @ v + q @ states).flatten(2, 3)[:, :, :n].to(dtype)
        return (out, states[:, :, -1] + delta[:, :, -1]) if final_state else out
    g = g.to(work) if per_channel else g.to(work).unsqueeze(-1)  # (B, H, N, dk|1)
    g_cum = _chunks(g, c).cumsum(3)  # (B, H, M, c, dk|1): restarted at each chunk
    last = g_cum[:, :, :, -1:]  # (B, H, M, 1, dk|1): the whole chunk's log-decay
    if per_channel:
        scores = _per_channel_scores(q, k, g_cum, min(sub_chunk, c))
    else:
        scores = (q @ k.transpose(-1, -2)) * _pair_decay(g_cum[..., 0], _lower(c, q.device))
    delta = (k * (last - g_cum).exp()).transpose(-1, -2) @ v  # (B, H, M, dk, dv), decayed to chunk end
    decay = last.transpose(-1, -2).exp()  # (B, H, M, dk|1, 1)
    states = _scan(delta, decay)  # (B, H, M, dk, dv): the state before each chunk
    inter = (q * g_cum.exp()) @ states  # the earlier chunks, decayed to each token
    out = (scores @ v + inter).flatten(2, 3)[:, :, :n].to(dtype)
    return (out, decay[:, :, -1] * states[:, :, -1] + delta[:, :, -1]) if final_state else out


def _scan(delta: Tensor, decay: Tensor) -> Tensor:
    """States before each chunk: S_0 = 0, S_{m+1} = decay_m · S_m + delta_m; a loop over chunks."""
    state = torch.zeros_like(delta[:, :, 0])
    states = []
    for m in range(delta.shape[2]):
        states.append(state)
        state = decay[:, :, m] * state + delta[:, :, m]
    return torch.stack(states, 2)


def _per_channel_scores(q: Tensor, k: Tensor, g_cum: Tensor, s: int) -> Tensor:
    """A_ij = Σ_d q_id k_jd exp(G_id − G_jd) for j ≤ i, else 0: (B, H, M, c, d) -> (B, H, M, c, c).

    Sub-chunks of s tokens: pairs in different sub-chunks I > J factor through the log-decay R_J at
    the end of J, A = (q_i exp(G_i − R_J)) · (k_j exp(R_J − G_j)), both factors ≤ 1; pairs in the
    same sub-chunk are summed over d explicitly ((s, s, d) per sub-chunk, s·d per token)."""
    *lead, c, d = q.shape
    t = c // s
    qs, ks, gs = (x.unflatten(-2, (t, s)) for x in (q, k, g_cum))  # (..., T, s, d)
    ref = gs[..., -1, :]  # (..., T, d): R_J, the end of each sub-chunk
    # across sub-chunks: q_i exp(G_i − R_J) for every (I, J), masked to I > J by a −inf exponent
    later = torch.ones(t, t, dtype=torch.bool, device=q.device).tril(-1)[:, :, None, None]  # (T, T, 1, 1)
    q_to = (gs.unsqueeze(-3) - ref[..., None, :, None, :]).masked_fill(~later, float("-inf")).exp()
    q_to = qs.unsqueeze(-3) * q_to  # (..., T_I, T_J, s, d)
    k_from = ks * (ref.unsqueeze(-2) - gs).exp()  # (..., T_J, s, d)
    across = q_to @ k_from.unsqueeze(-4).transpose(-1, -2)  # (..., T_I, T_J, s, s)
    # within a sub-chunk: the (s, s, d) decays, masked to j ≤ i
    keep = _lower(s, q.device)[:, :, None]
    within = (gs.unsqueeze(-2) - gs.unsqueeze(-3)).masked_fill(~keep, float("-inf")).exp()
    within = (qs.unsqueeze(-2) * within * ks.unsqueeze(-3)).sum(-1)  # (..., T, s, s)
    blocks = across + torch.eye(t, dtype=q.dtype, device=q.device)[:, :, None, None] * within.unsqueeze(-3)
    return blocks.transpose(-3, -2).reshape(*lead, c, c)


def delta_rule(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None = None,
               scale: float = 1.0, chunk: int = 64,
               final_state: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """The (gated) delta rule, o_t = S_tᵀ(scale·q_t), S_t = exp(g_t)(I − β_t k_t k_tᵀ)S_{t-1} + β_t k_t v_tᵀ.

    q, k: (B, H, N, dk); v: (B, H, N, dv); beta: (B, H, N); g: None or (B, H, N) log-decays.
    Within a chunk the pseudo-values u = β(v − Sᵀk) solve the unit lower-triangular system
    (I + A) u = βv − β exp(G) K S_0, A_ij = β_i exp(G_i − G_j) k_i·k_j (j < i): T = (I + A)⁻¹ is
    computed for every chunk at once; only U = T βv − (T β exp(G) K) S_0 and the state wait for the
    chunk before. Returns (B, H, N, dv), and with ``final_state`` also S_N (B, H, dk, dv) in the
    working dtype."""
    n = q.shape[2]
    dtype, work = q.dtype, _work_dtype(q.dtype)
    c = chunk_length(n, chunk)
    q, k, v = (_chunks(t.to(work), c) for t in (q, k, v))  # (B, H, M, c, d)
    beta = _chunks(beta.to(work).unsqueeze(-1), c)  # (B, H, M, c, 1)
    g_cum = (torch.zeros_like(beta) if g is None else _chunks(g.to(work).unsqueeze(-1), c)).cumsum(3)
    q = q * scale
    lower = _lower(c, q.device)
    decays = _pair_decay(g_cum[..., 0], lower)  # (B, H, M, c, c): exp(G_i − G_j), j ≤ i
    k_beta = k * beta
    a = ((k_beta @ k.transpose(-1, -2)) * decays).masked_fill(~_lower(c, q.device, strict=True), 0)
    eye = torch.eye(c, dtype=work, device=q.device)
    t = torch.linalg.solve_triangular(eye + a, eye.expand_as(a), upper=False, unitriangular=True)
    w = t @ (k_beta * g_cum.exp())  # (B, H, M, c, dk)
    u = t @ (v * beta)  # (B, H, M, c, dv)
    scores = (q @ k.transpose(-1, -2)) * decays  # (B, H, M, c, c), j ≤ i
    q_decayed = q * g_cum.exp()
    last = g_cum[:, :, :, -1:]  # (B, H, M, 1, 1)
    k_decayed = k * (last - g_cum).exp()
    state = q.new_zeros(*q.shape[:2], q.shape[-1], v.shape[-1])  # (B, H, dk, dv)
    out = []
    for m in range(q.shape[2]):
        u_m = u[:, :, m] - w[:, :, m] @ state  # (B, H, c, dv): the chunk's pseudo-values
        out.append(q_decayed[:, :, m] @ state + scores[:, :, m] @ u_m)
        state = last[:, :, m].exp() * state + k_decayed[:, :, m].transpose(-1, -2) @ u_m
    out = torch.stack(out, 2).flatten(2, 3)[:, :, :n].to(dtype)
    return (out, state) if final_state else out


def recurrence_step(state: Tensor, q: Tensor, k: Tensor, v: Tensor, g: Tensor | None = None,
                    beta: Tensor | None = None, scale: float = 1.0) -> Tensor:
    """One token of either recurrence, ``state`` (B, H, dk, dv) advanced in place (its dtype, at least
    float32, is the working one): S = diag(exp g) S, then S += k vᵀ, or for the delta rule
    (``beta`` given) S += k (β (v − Sᵀk))ᵀ; returns o = Sᵀ(scale·q) (B, H, dv) in q's dtype.

    q, k: (B, H, dk); v: (B, H, dv); g: None, (B, H) or (B, H, dk) log-decays; beta: (B, H)."""
    b, h, dk, dv = state.shape
    dtype, work = q.dtype, state.dtype
    q, k, v = q.to(work), k.to(work), v.to(work)
    if g is not None:
        decay = g.to(work).exp()
        state.mul_(decay.unsqueeze(-1) if decay.dim() == 3 else decay[..., None, None])
    if beta is not None:  # the delta rule's write: β (v − Sᵀk), against the decayed state
        v = beta.to(work).unsqueeze(-1) * (v - (k.unsqueeze(-2) @ state).squeeze(-2))
    state.view(b * h, dk, dv).baddbmm_(k.reshape(b * h, dk, 1), v.reshape(b * h, 1, dv))  # S += k vᵀ
    return ((scale * q).unsqueeze(-2) @ state).squeeze(-2).to(dtype)


def decay_attention_flops(n: int, dk: int, dv: int, chunk: int, per_channel: bool = False,
                          sub_chunk: int = 16) -> tuple[int, int]:
    """(matmul, elementwise) FLOPs of ``decay_attention`` for one (sample, head) of ``n`` tokens; the
    matmuls as FlopCounterMode counts them (padding included)."""
    c = chunk_length(n, chunk, sub_chunk if per_channel else 1)
    padded = -(-n // c) * c
    matmul = 2 * padded * (c * dk + c * dv + 2 * dk * dv)  # scores, scores·v, chunk states, q·states
    elementwise = padded * (3 * c + 4 * dk + 2 * dv)  # masks and decays of the scores, decayed q and k
    if per_channel:
        s = min(sub_chunk, c)
        elementwise += padded * (4 * s * dk + 3 * c * dk)  # within sub-chunks; q's factors across them
    return matmul, elementwise


def delta_rule_flops(n: int, dk: int, dv: int, chunk: int) -> tuple[int, int]:
    """(matmul, elementwise) FLOPs of ``delta_rule`` for one (sample, head); the triangular inverse
    (c³/3 per chunk) is counted with the elementwise work, as FlopCounterMode does not see it."""
    c = chunk_length(n, chunk)
    padded = -(-n // c) * c
    matmul = 2 * padded * c * (3 * dk + 2 * dv) + 6 * padded * dk * dv
    elementwise = padded * (c * c // 3 + 4 * c + 4 * dk + 2 * dv)
    return matmul, elementwise
