"""Reference tests for the gated linear recurrences: retnet, gla, gated_deltanet, mamba2, based.

Three levels, all in float64:

- the chunked kernels of ``mechanisms.chunked`` against flash-linear-attention's own naive
  references (``fla.ops.*.naive``, imported on the CPU), values and gradients, at lengths that are
  not a multiple of the chunk;
- each mechanism's causal form against a reference written here: its layer from the weights (explicit
  convolution taps, rotary angles, norms) around a token-by-token recurrence, and around fla's naive
  function for the same recurrence;
- the contract around them: both directions (Vim's mean of a forward and a reversed scan, on a 2-D
  grid), no leak from later tokens, padding through the per-length path, options, backends, and
  LRA's parameter rule in the shared sequence encoder.

fla's naive references cast to float32 inside (``.float()``, ``dtype=torch.float32``); they run
under ``Float64``, a torch-function mode that keeps those casts in float64, so they are compared at
float64 tolerances. fla's Triton kernels are checked against the same references where a CUDA GPU
and fla load (skipped elsewhere, with the reason).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from attnbench import OptionError, build_mechanism, get_mechanism
from mechanisms import chunked, fla_kernels
from tasks.common.sequence import PARAMS_TOLERANCE
from tasks.common.text_encoder import SIZES, build_encoder, count_parameters
from tests.tasks.glue.tiny import needs_minilm

F64 = torch.float64
PEERS = ["retnet", "gla", "gated_deltanet", "mamba2", "based"]
TOL = dict(rtol=1e-9, atol=1e-10)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # fla's "Triton is not supported on current platform" on the CPU
    fla_naive = pytest.importorskip("fla.ops.gla.naive", reason="fla-core is a test dependency: "
                                    f"`pip install '{fla_kernels.REQUIREMENT}'`")
    from fla.ops.based.naive import naive_chunk_based, naive_parallel_based
    from fla.ops.gated_delta_rule.naive import naive_chunk_gated_delta_rule, naive_recurrent_gated_delta_rule
    from fla.ops.gla.naive import naive_recurrent_gla
    from fla.ops.retention.naive import naive_retention
    from fla.ops.simple_gla.naive import naive_chunk_simple_gla, naive_recurrent_simple_gla


class Float64(TorchFunctionMode):
    """Inside, casts to float32 (``x.float()``, ``.to(torch.float32)``, ``dtype=torch.float32``)
    keep float64: fla's naive references then compute in float64."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.float:
            return args[0].double()
        args = tuple(F64 if a is torch.float32 else a for a in args)
        kwargs = {k: F64 if v is torch.float32 else v for k, v in (kwargs or {}).items()}
        return func(*args, **kwargs)


def test_the_float64_mode_keeps_fla_references_in_float64():
    q, k, v = (torch.randn(1, 9, 2, 4, dtype=F64) for _ in range(3))
    g = -torch.rand(1, 9, 2, dtype=F64)
    plain, _ = naive_recurrent_simple_gla(q, k, v, g)
    with Float64():
        exact, _ = naive_recurrent_simple_gla(q, k, v, g)
    ours = heads_last(chunked.decay_attention(*heads_first(q, k, v, g), scale=4**-0.5, chunk=4))
    torch.testing.assert_close(exact, ours, **TOL)
    assert (plain - ours).abs().max() > 1e-12, "without the mode fla's reference runs in float32"


# ---- layouts and the token-by-token recurrences -----------------------------------------------
def heads_first(*tensors):
    """(B, N, H, ...) -> (B, H, N, ...)."""
    return tuple(t.transpose(1, 2) for t in tensors)


def heads_last(t):
    return t.transpose(1, 2)


def recurrence(q, k, v, g=None, beta=None, scale=1.0, final_state=False):
    """o_t = S_tᵀ(scale·q_t), token by token, on (B, N, H, ·) tensors; g: None, (B, N, H) or
    (B, N, H, dk) log-decays; beta (B, N, H): the delta rule S_t = e^g (I − β k kᵀ) S + β k vᵀ.
    ``final_state``: also S_N (B, H, dk, dv)."""
    b, n, h, dk = q.shape
    state = torch.zeros(b, h, dk, v.shape[-1], dtype=q.dtype)
    out = []
    for t in range(n):
        if g is not None:
            decay = g[:, t].exp()
            state = state * (decay[..., None] if decay.dim() == 3 else decay[..., None, None])
        write = v[:, t]
        if beta is not None:  # β (v − Sᵀk): the delta rule's correction
            write = beta[:, t, :, None] * (write - (state * k[:, t, :, :, None]).sum(-2))
        state = state + k[:, t, :, :, None] * write[:, :, None, :]
        out.append((state * scale * q[:, t, :, :, None]).sum(-2))
    return (torch.stack(out, 1), state) if final_state else torch.stack(out, 1)


# ---- the chunked kernels against fla's naive references -------------------------------------
# B, H, n, dk, dv, chunk
SHAPES = [(1, 1, 1, 4, 4, 4), (2, 3, 13, 4, 5, 4), (1, 2, 37, 8, 6, 16), (2, 2, 64, 4, 4, 64)]
SHAPE_IDS = [f"B{b}-H{h}-n{n}-dk{dk}-dv{dv}-c{c}" for b, h, n, dk, dv, c in SHAPES]


def inputs(b, h, n, dk, dv, decay=1.0):
    """q, k, v (B, N, H, ·), a per-head log-decay g (B, N, H) and a per-channel one (B, N, H, dk),
    β (B, N, H), all float64 leaves; ``decay`` scales the log-decays."""
    q, k = torch.randn(b, n, h, dk, dtype=F64), torch.randn(b, n, h, dk, dtype=F64)
    v = torch.randn(b, n, h, dv, dtype=F64)
    g = -decay * torch.rand(b, n, h, dtype=F64)
    gk = -decay * torch.rand(b, n, h, dk, dtype=F64)
    beta = torch.rand(b, n, h, dtype=F64)
    return [t.requires_grad_() for t in (q, k, v, g, gk, beta)]


def assert_same_values_and_gradients(ours, reference, leaves, tol=TOL):
    """Outputs, and gradients of a random projection of them with respect to every leaf, agree."""
    torch.testing.assert_close(ours, reference, **tol)
    weight = torch.randn_like(ours)
    got = torch.autograd.grad((ours * weight).sum(), leaves, allow_unused=True, retain_graph=True)
    want = torch.autograd.grad((reference * weight).sum(), leaves, allow_unused=True)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        if a is None or b is None:
            assert a is None and b is None, f"leaf {i}: a gradient on one side only"
            continue
        torch.testing.assert_close(a, b, **tol, msg=f"gradient of leaf {i}")


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("decay", [1.0, 40.0], ids=["gentle-decay", "strong-decay"])
def test_scalar_decay_matches_fla_simple_gla(shape, decay):
    b, h, n, dk, dv, c = shape
    q, k, v, g, _, _ = leaves = inputs(b, h, n, dk, dv, decay)
    ours = heads_last(chunked.decay_attention(*heads_first(q, k, v, g), scale=dk**-0.5, chunk=c))
    with Float64():
        reference, _ = naive_recurrent_simple_gla(q, k, v, g)
        chunked_reference, _ = naive_chunk_simple_gla(q, k, v, g, chunk_size=8)
    assert_same_values_and_gradients(ours, reference, leaves)
    torch.testing.assert_close(ours, chunked_reference, **TOL)
    torch.testing.assert_close(ours, recurrence(q, k, v, g, scale=dk**-0.5), **TOL)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("decay", [1.0, 40.0], ids=["gentle-decay", "strong-decay"])
def test_per_channel_decay_matches_fla_gla(shape, decay):
    b, h, n, dk, dv, c = shape
    q, k, v, _, gk, _ = leaves = inputs(b, h, n, dk, dv, decay)
    ours = heads_last(chunked.decay_attention(*heads_first(q, k, v, gk), scale=dk**-0.5, chunk=c,
                                              sub_chunk=min(4, c)))
    with Float64():
        reference, _ = naive_recurrent_gla(q, k, v, gk)
    assert_same_values_and_gradients(ours, reference, leaves)
    torch.testing.assert_close(ours, recurrence(q, k, v, gk, scale=dk**-0.5), **TOL)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_fixed_decays_match_fla_retention(shape):
    b, h, n, dk, dv, c = shape
    q, k, v, _, _, _ = leaves = inputs(b, h, n, dk, dv)
    from mechanisms.retnet import log_decays

    g = log_decays(h)[:, None].expand(b, h, n)
    ours = chunked.decay_attention(*heads_first(q, k, v), g, scale=dk**-0.5, chunk=c)
    with Float64():
        reference = naive_retention(*heads_first(q, k, v))
    assert_same_values_and_gradients(ours, reference, leaves)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("decay", [1.0, 40.0], ids=["gentle-decay", "strong-decay"])
def test_delta_rule_matches_fla_gated_delta_rule(shape, decay):
    b, h, n, dk, dv, c = shape
    q, k, v, g, _, beta = leaves = inputs(b, h, n, dk, dv, decay)
    k_unit = F.normalize(k, dim=-1)  # as the mechanism feeds it: the delta rule's keys have unit norm
    ours = heads_last(chunked.delta_rule(*heads_first(q, k_unit, v, beta, g), scale=dk**-0.5, chunk=c))
    with Float64():
        reference, _ = naive_recurrent_gated_delta_rule(q, k_unit, v, beta, g)
        chunked_reference, _ = naive_chunk_gated_delta_rule(q, k_unit, v, g, beta, chunk_size=8)
    assert_same_values_and_gradients(ours, reference, leaves)
    torch.testing.assert_close(ours, chunked_reference, **TOL)
    torch.testing.assert_close(ours, recurrence(q, k_unit, v, g, beta, scale=dk**-0.5), **TOL)
    ungated = heads_last(chunked.delta_rule(*heads_first(q, k_unit, v, beta), scale=dk**-0.5, chunk=c))
    torch.testing.assert_close(ungated, recurrence(q, k_unit, v, None, beta, scale=dk**-0.5), **TOL)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("kind", ["plain", "scalar-decay", "per-channel-decay", "delta-rule",
                                  "gated-delta-rule"])
def test_final_state_and_steps_continue_the_recurrence(shape, kind):
    """The chunked form's state after the last token (a padded last chunk included) is the
    token-by-token one, and ``recurrence_step`` from it gives the outputs of the longer sequence."""
    b, h, n, dk, dv, c = shape
    steps = 3
    q, k, v, g, gk, beta = (t.detach() for t in inputs(b, h, n + steps, dk, dv))
    if kind.endswith("delta-rule"):
        k = F.normalize(k, dim=-1)
    g = {"scalar-decay": g, "per-channel-decay": gk, "gated-delta-rule": g}.get(kind)
    beta = beta if kind.endswith("delta-rule") else None
    prompt = [None if t is None else t[:, :n] for t in (q, k, v, g, beta)]
    expected, expected_state = recurrence(q, k, v, g, beta, scale=dk**-0.5, final_state=True)
    _, prompt_state = recurrence(*prompt, scale=dk**-0.5, final_state=True)
    pq, pk, pv, pg, pbeta = (None if t is None else t.transpose(1, 2) for t in prompt)  # heads first
    if beta is None:
        out, state = chunked.decay_attention(pq, pk, pv, pg, scale=dk**-0.5, chunk=c, sub_chunk=min(4, c),
                                             final_state=True)
    else:
        out, state = chunked.delta_rule(pq, pk, pv, pbeta, pg, scale=dk**-0.5, chunk=c, final_state=True)
    torch.testing.assert_close(heads_last(out), expected[:, :n], **TOL)
    torch.testing.assert_close(state, prompt_state, **TOL)
    for t in range(n, n + steps):
        token = [None if x is None else x[:, t] for x in (q, k, v, g, beta)]  # (B, H, ·)
        o = chunked.recurrence_step(state, *token[:3], g=token[3], beta=token[4], scale=dk**-0.5)
        torch.testing.assert_close(o, expected[:, t], **TOL)
    torch.testing.assert_close(state, expected_state, **TOL)


@pytest.mark.parametrize("n, c", [(1, 4), (13, 4), (32, 8), (40, 64)])
def test_taylor_linear_attention_matches_fla_based(n, c):
    from mechanisms.based import EPS, taylor_features

    q, k, v = (torch.randn(2, 3, n, d, dtype=F64, requires_grad=True) for d in (4, 4, 5))
    features = taylor_features(q), taylor_features(k)
    sums = chunked.decay_attention(*features, torch.cat([v, torch.ones_like(v[..., :1])], -1), chunk=c)
    ours = sums[..., :-1] / (sums[..., -1:] + EPS)
    with Float64():
        reference = naive_parallel_based(q, k, v, use_norm=True)
    assert_same_values_and_gradients(ours, reference, [q, k, v])
    if n % 8 == 0:  # fla's chunked reference needs a whole number of chunks
        with Float64():
            torch.testing.assert_close(ours, naive_chunk_based(q, k, v, chunk_size=8), **TOL)


def test_taylor_features_give_the_second_order_expansion_of_exp():
    from mechanisms.based import taylor_features

    q, k = torch.randn(7, 6, dtype=F64), torch.randn(5, 6, dtype=F64)
    s = q @ k.T / math.sqrt(6)
    torch.testing.assert_close(taylor_features(q) @ taylor_features(k).T, 1 + s + s**2 / 2, **TOL)


def test_chunked_memory_is_linear_in_n_no_token_loop():
    """The chunk loop runs n/c times: no (n × n) tensor and no per-token Python step (a 4096-token
    sequence in chunks of 64 saves 64 chunk states)."""
    calls = []
    original = chunked._scan

    def counting(delta, decay):
        calls.append(delta.shape[2])
        return original(delta, decay)

    chunked._scan = counting
    try:
        q = torch.randn(1, 1, 4096, 4)
        out = chunked.decay_attention(q, q, q, -torch.rand(1, 1, 4096), chunk=64)
    finally:
        chunked._scan = original
    assert out.shape == q.shape and calls == [4096 // 64]


# ---- each mechanism against a reference layer written here ------------------------------------
def linear(x, layer):
    return F.linear(x, layer.weight, layer.bias)


def causal_taps(x, conv, silu=True):
    """y_t = Σ_j w_j x_{t−K+1+j} (+ bias), zeros before the start, per channel; (B, N, D)."""
    w = conv.weight[:, 0]  # (D, K)
    taps = w.shape[1]
    padded = torch.cat([x.new_zeros(x.shape[0], taps - 1, x.shape[2]), x], 1)
    y = sum(padded[:, j:j + x.shape[1]] * w[:, j] for j in range(taps))
    y = y + conv.bias if conv.bias is not None else y
    return F.silu(y) if silu else y


def rms(x, eps):
    return x / torch.sqrt((x**2).mean(-1, keepdim=True) + eps)


def rotate(x):
    """Rotary positions as complex rotations: (x_i + i·x_{i+d/2}) · e^{i t 10000^(−2i/d)}."""
    n, d = x.shape[1], x.shape[-1]
    angles = torch.arange(n, dtype=F64)[:, None] * 10000.0 ** (-torch.arange(0, d, 2, dtype=F64) / d)
    turn = torch.polar(torch.ones_like(angles), angles)[:, None]  # (N, 1, d/2)
    z = torch.complex(x[..., :d // 2], x[..., d // 2:]) * turn
    return torch.cat([z.real, z.imag], -1)


def reference_retnet(m, x, core):
    b, n, _ = x.shape
    h, o = m.num_heads, m.options
    q, k, v = linear(x, m.q_proj), linear(x, m.k_proj), linear(x, m.v_proj)
    if o.conv:
        q, k, v = (causal_taps(t, conv.conv) for t, conv in zip((q, k, v), m.convs, strict=True))
    q, k, v = rotate(q.view(b, n, h, -1)), rotate(k.view(b, n, h, -1)), v.view(b, n, h, -1)
    if core == "fla":
        with Float64():
            out = heads_last(naive_retention(*heads_first(q, k, v)))
    else:
        gamma = torch.tensor([1 - 2.0 ** (-5 - i) for i in range(h)], dtype=F64)
        out = recurrence(q, k, v, gamma.log().expand(b, n, h), scale=q.shape[-1] ** -0.5)
    gate = linear(x, m.g_proj).view(b, n, h, -1)
    return linear((rms(out, o.eps) * m.norm.weight * F.silu(gate)).flatten(2), m.o_proj)


def reference_gla(m, x, core):
    b, n, _ = x.shape
    h, o = m.num_heads, m.options
    q, k, v = linear(x, m.q_proj), linear(x, m.k_proj), linear(x, m.v_proj)
    if o.conv:
        q, k, v = (causal_taps(t, conv.conv) for t, conv in zip((q, k, v), m.convs, strict=True))
    q, k, v = q.view(b, n, h, -1), k.view(b, n, h, -1), v.view(b, n, h, -1)
    gk = (F.logsigmoid(linear(linear(x, m.gk_proj[0]), m.gk_proj[1])) / o.gate_normalizer).view(b, n, h, -1)
    if core == "fla":
        with Float64():
            out, _ = naive_recurrent_gla(q, k, v, gk)
    else:
        out = recurrence(q, k, v, gk, scale=q.shape[-1] ** -0.5)
    gate = linear(x, m.g_proj).view(b, n, h, -1)
    return linear((rms(out, o.eps) * m.norm.weight * F.silu(gate)).flatten(2), m.o_proj)


def reference_gated_deltanet(m, x, core):
    b, n, _ = x.shape
    h, o = m.num_heads, m.options
    q, k, v = linear(x, m.q_proj), linear(x, m.k_proj), linear(x, m.v_proj)
    if o.conv:
        q, k, v = (causal_taps(t, conv.conv) for t, conv in zip((q, k, v), m.convs, strict=True))
    else:
        q, k, v = F.silu(q), F.silu(k), F.silu(v)
    unit = lambda t: t / torch.sqrt((t**2).sum(-1, keepdim=True) + 1e-6)
    q, k, v = unit(q.view(b, n, h, -1)), unit(k.view(b, n, h, -1)), v.view(b, n, h, -1)
    beta = torch.sigmoid(linear(x, m.b_proj))
    g = -torch.exp(m.A_log) * torch.log1p(torch.exp(linear(x, m.a_proj) + m.dt_bias))
    if core == "fla":
        with Float64():
            out, _ = naive_recurrent_gated_delta_rule(q, k, v, beta, g)
    else:
        out = recurrence(q, k, v, g, beta, scale=q.shape[-1] ** -0.5)
    gate = linear(x, m.g_proj).view(b, n, h, -1)
    return linear((rms(out, o.eps) * m.norm.weight * F.silu(gate)).flatten(2), m.o_proj)


def reference_mamba2(m, x, core):
    b, n, _ = x.shape
    h, o, inner = m.num_heads, m.options, m.inner
    z, xbc, dt = linear(x, m.in_proj).split((inner, inner + 2 * o.state, h), -1)
    xs, bs, cs = causal_taps(xbc, m.conv).split((inner, o.state, o.state), -1)
    xs = xs.view(b, n, h, -1)
    step = torch.log1p(torch.exp(dt + m.dt_bias))  # softplus
    a = -torch.exp(m.A_log) * step
    keys, queries = bs[:, :, None].expand(b, n, h, -1), cs[:, :, None].expand(b, n, h, -1)
    if core == "fla":
        with Float64():
            y, _ = naive_recurrent_simple_gla(queries, keys, xs * step[..., None], a, scale=1.0)
    else:
        y = recurrence(queries, keys, xs * step[..., None], a)
    y = ((y + m.D[:, None] * xs).flatten(2)) * F.silu(z)
    return linear(rms(y, o.eps) * m.norm_weight, m.o_proj)


def reference_based(m, x, core):
    b, n, _ = x.shape
    h, f = m.num_heads, m.options.feature_dim
    q = linear(x, m.q_proj).view(b, n, h, f)
    k = linear(x, m.k_proj).view(b, n, h, f)
    v = linear(x, m.v_proj).view(b, n, h, -1)
    if core == "fla":
        with Float64():
            out = heads_last(naive_parallel_based(*heads_first(q, k, v), use_norm=True))
    else:
        out = torch.empty_like(v)
        for t in range(n):
            s = (q[:, t, None] * k[:, :t + 1]).sum(-1) / math.sqrt(f)  # (B, t+1, H)
            weights = 1 + s + s**2 / 2
            out[:, t] = (weights[..., None] * v[:, :t + 1]).sum(1) / (weights.sum(1)[..., None] + 1e-6)
    return linear(out.flatten(2), m.o_proj)


REFERENCES = {"retnet": reference_retnet, "gla": reference_gla, "gated_deltanet": reference_gated_deltanet,
              "mamba2": reference_mamba2, "based": reference_based}
# small chunks, so the tested lengths span several chunks and end inside one; a short convolution
# on retnet and gla too (off by default), and none on gated_deltanet (its SiLU-only branch)
OPTIONS = {"retnet": [{"chunk": 8}, {"chunk": 4, "conv": 3, "expand_v": 2}],
           "gla": [{"chunk": 8, "sub_chunk": 4}, {"chunk": 4, "sub_chunk": 2, "conv": 2, "expand_k": 1}],
           "gated_deltanet": [{"chunk": 8}, {"chunk": 4, "conv": 0, "expand_v": 2}],
           "mamba2": [{"chunk": 8, "state": 6}, {"chunk": 4, "state": 3, "expand": 2, "conv": 2}],
           "based": [{"chunk": 8, "feature_dim": 4}, {"chunk": 4}]}
CONFIGS = [(1, 1, 16, 1), (2, 13, 24, 3), (3, 21, 16, 2)]  # batch, n, dim, heads


def build(name, dim, heads, seed=0, **options):
    torch.manual_seed(seed)
    m = build_mechanism(name, dim, heads, **options).to(F64)
    with torch.no_grad():  # away from the init, so that every gate and norm weight matters
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def cases():
    for name in PEERS:
        for i, options in enumerate(OPTIONS[name]):
            for b, n, dim, heads in CONFIGS:
                yield pytest.param(name, options, b, n, dim, heads,
                                   id=f"{name}-opts{i}-B{b}-n{n}-C{dim}-H{heads}")


@pytest.mark.parametrize("name, options, b, n, dim, heads", list(cases()))
def test_causal_form_matches_the_reference_layer(name, options, b, n, dim, heads):
    """Values and gradients (input and every parameter) against the layer written here, around a
    token-by-token recurrence and around fla's naive function."""
    m = build(name, dim, heads, **options)
    x = torch.randn(b, n, dim, dtype=F64, requires_grad=True)
    leaves = [x, *m.parameters()]
    ours = m(x, causal=True)
    assert_same_values_and_gradients(ours, REFERENCES[name](m, x, "loop"), leaves)
    torch.testing.assert_close(ours, REFERENCES[name](m, x, "fla"), **TOL)


@pytest.mark.parametrize("name", PEERS)
def test_the_chunk_size_changes_nothing(name):
    x = torch.randn(2, 19, 24, dtype=F64)
    outputs = []
    for chunk in (1, 4, 5, 64):
        extra = {"sub_chunk": 1} if name == "gla" else {}
        outputs.append(build(name, 24, 3, chunk=chunk, **extra)(x, causal=True))
    for out in outputs[1:]:
        torch.testing.assert_close(out, outputs[0], **TOL)


@pytest.mark.parametrize("name", PEERS)
def test_no_leak_from_later_tokens(name):
    """Changing tokens after t moves nothing at or before t, and they get no gradient from there."""
    m = build(name, 24, 3, chunk=4)
    x = torch.randn(2, 15, 24, dtype=F64, requires_grad=True)
    t = 6
    later = x.detach().clone()
    later[:, t + 1:] = 10 * torch.randn_like(later[:, t + 1:])
    y = m(x, causal=True)
    torch.testing.assert_close(m(later, causal=True)[:, :t + 1], y[:, :t + 1], rtol=0, atol=1e-12)
    (grad,) = torch.autograd.grad(y[:, :t + 1].sum(), x)
    assert grad[:, t + 1:].abs().max() <= 1e-12
    assert grad[:, :t + 1].abs().max() > 0


@pytest.mark.parametrize("name", PEERS)
def test_padded_causal_batches_run_each_sequence_alone(name):
    m = build(name, 24, 3, chunk=4)
    lengths = (5, 11, 11, 14)
    mask = torch.zeros(len(lengths), 14, dtype=torch.bool)
    for row, length in enumerate(lengths):
        mask[row, :length] = True
    x = torch.where(mask[..., None], torch.randn(4, 14, 24, dtype=F64), 50.0)
    x.requires_grad_()
    y = m(x, mask=mask, causal=True)
    assert (y[~mask] == 0).all()
    (grad,) = torch.autograd.grad((y * torch.arange(14.0, dtype=F64)[:, None]).sum(), x)
    assert (grad[~mask] == 0).all()
    for row, length in enumerate(lengths):
        alone = x[row:row + 1, :length].detach().requires_grad_()
        out = m(alone, causal=True)
        torch.testing.assert_close(y[row, :length], out[0], **TOL)
        torch.testing.assert_close(y[row, :length], REFERENCES[name](m, alone, "loop")[0], **TOL)
        weight = torch.arange(float(length), dtype=F64)[:, None]
        (alone_grad,) = torch.autograd.grad((out * weight).sum(), alone)
        torch.testing.assert_close(grad[row, :length], alone_grad[0], **TOL)


# ---- both directions ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PEERS)
def test_bidirectional_is_the_mean_of_a_forward_and_a_reversed_scan_on_a_grid(name):
    """On a 4 × 5 grid flattened row-major: mix = ½ (causal(x) + flip(causal(flip(x)))), the output
    projection shared (Vim's divided sum), and every token reaches every other."""
    m = build(name, 24, 3, chunk=4)
    assert m.options.direction == "bidirectional"
    x = torch.randn(2, 20, 24, dtype=F64, requires_grad=True)
    ours = m(x, (4, 5))
    expected = (m(x, causal=True) + m(x.flip(1), causal=True).flip(1)) / 2
    assert_same_values_and_gradients(ours, expected, [x, *m.parameters()])
    # the reference layer, run in raster order and in reverse
    reference = (REFERENCES[name](m, x, "loop") + REFERENCES[name](m, x.flip(1), "loop").flip(1)) / 2
    torch.testing.assert_close(ours, reference, **TOL)
    first = torch.autograd.grad(ours[:, 0].sum(), x, retain_graph=True)[0]
    last = torch.autograd.grad(ours[:, -1].sum(), x)[0]
    assert first[:, -1].abs().max() > 1e-8, "the top-left token must see the bottom-right one"
    assert last[:, 0].abs().max() > 1e-8, "the bottom-right token must see the top-left one"


@pytest.mark.parametrize("name", PEERS)
def test_direction_causal_makes_the_plain_call_causal(name):
    bidirectional = build(name, 24, 3, chunk=4)
    causal = build(name, 24, 3, chunk=4, direction="causal")
    causal.load_state_dict(bidirectional.state_dict())  # the same weights: the direction adds none
    x = torch.randn(2, 20, 24, dtype=F64)
    torch.testing.assert_close(causal(x, (4, 5)), bidirectional(x, causal=True), **TOL)
    torch.testing.assert_close(causal(x), causal(x, causal=True), **TOL)
    assert sum(p.numel() for p in causal.parameters()) == sum(p.numel() for p in bidirectional.parameters())


@pytest.mark.parametrize("name", PEERS)
def test_flops_count_both_scans(name):
    one = build_mechanism(name, 24, 3, direction="causal")
    both = build_mechanism(name, 24, 3)
    assert one.flops(2, 20).matmul < both.flops(2, 20).matmul < 2 * one.flops(2, 20).matmul


# ---- options, backends -----------------------------------------------------------------------
@pytest.mark.parametrize("name", PEERS)
def test_bad_choices_are_one_line_errors(name):
    with pytest.raises(OptionError, match=r"direction='sideways'; valid choices: bidirectional, causal"):
        build_mechanism(name, 24, 3, direction="sideways")
    with pytest.raises(OptionError, match=r"kernel='triton'; valid choices: auto, fla, torch"):
        build_mechanism(name, 24, 3, kernel="triton")
    with pytest.raises(OptionError, match=r"chunk=0 "):
        build_mechanism(name, 24, 3, chunk=0)
    m = build_mechanism(name, 24, 3, kernel="fla")
    with pytest.raises(ValueError, match=r"kernel='fla' cannot run here: fla's Triton kernels run on CUDA"):
        m(torch.randn(1, 5, 24))


@pytest.mark.parametrize("name, dim, heads, option, value, message", [
    ("retnet", 24, 3, "expand_k", 0.3, r"retnet: expand_k=0.3 gives 7.2 channels for dim=24; it must "),
    ("gla", 24, 4, "expand_v", 0.25, r"gla: expand_v=0.25 gives 6 channels, not divisible by num_heads=4$"),
    ("gated_deltanet", 24, 3, "expand_k", 8.5, r"gated_deltanet.expand_k=8.5 "),
    ("mamba2", 24, 3, "state", 0, r"mamba2.state=0 "),
    ("based", 24, 3, "feature_dim", 65, r"based.feature_dim=65 "),
])
def test_bad_sizes_are_one_line_errors(name, dim, heads, option, value, message):
    with pytest.raises(OptionError, match=message):
        build_mechanism(name, dim, heads, **{option: value})


def test_retnet_needs_an_even_key_width_per_head_and_gla_a_dividing_sub_chunk():
    with pytest.raises(OptionError, match="need an even key width per head; expand_k=0.5 gives 3 "):
        build_mechanism("retnet", 24, 4)
    with pytest.raises(OptionError, match="sub_chunk=24 must divide chunk=64"):
        build_mechanism("gla", 24, 3, sub_chunk=24)


@pytest.mark.parametrize("name", PEERS)
def test_the_backend_names_the_pytorch_form_here_and_why_not_fla(name):
    cls = get_mechanism(name)
    assert cls.backend("cpu").startswith("chunked PyTorch (")
    assert "fla's Triton kernels run on CUDA GPUs only, not on cpu" == fla_kernels.fla_problem(
        cls.fla_kernel, "cpu", torch.float32)
    assert "float64" in fla_kernels.fla_problem(cls.fla_kernel, "cuda", F64)


def test_fla_problems_name_the_fix(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(fla_kernels, "installed_version", lambda: None)
    why = fla_kernels.fla_problem("gla", "cuda", torch.float16)
    assert why == ("flash-linear-attention is not installed; fix: `pip install 'fla-core>=0.6,<0.7'` "
                   "(scripts/setup.sh installs it with the test tools)")
    backend = get_mechanism("gla").backend("cuda", torch.float16)
    assert backend.startswith("chunked PyTorch (") and backend.endswith(f"fla's kernel not used: {why}")


def test_an_fla_release_outside_the_range_is_named_on_every_device(monkeypatch):
    assert fla_kernels.static_problem("0.6.0") is None and fla_kernels.static_problem("0.6.3.dev1") is None
    for version in ("0.5.2", "0.7.0", "1.0"):
        assert fla_kernels.static_problem(version) == (
            f"fla-core {version} is installed, attnbench calls the kernels of >=0.6,<0.7 (their arguments "
            "change between releases); fix: `pip install 'fla-core>=0.6,<0.7'`")
    monkeypatch.setattr(fla_kernels, "installed_version", lambda: "0.5.2")
    backend = get_mechanism("retnet").backend("cpu")
    assert backend.endswith(f"; on CUDA too: {fla_kernels.static_problem('0.5.2')}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without a GPU reports")
def test_fla_here_imports_but_finds_no_gpu_backend():
    fla_kernels.import_problem.cache_clear()
    why = fla_kernels.import_problem("simple_gla")
    assert why is not None and "found no Triton GPU backend" in why and "fix:" in why


def test_based_larger_features_than_fla_takes_run_the_pytorch_form():
    m = build_mechanism("based", 24, 3, feature_dim=20)
    assert m.fla_limit() == "fla's fused_chunk_based takes feature_dim <= 16, not 20"
    assert build_mechanism("based", 24, 3).fla_limit() is None


# ---- LRA's parameter rule --------------------------------------------------------------------------
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("name", PEERS)
def test_lra_parameter_rule_in_the_shared_sequence_encoder(name, size):
    """At its defaults, each mechanism's encoder has at most 10 % more parameters than softmax's, with
    the smallest embeddings a sequence task could have (16 tokens, 64 positions: the strictest case)."""
    with torch.device("meta"):
        params = count_parameters(build_encoder(size, name, 16, 10, 64))
        softmax = count_parameters(build_encoder(size, "softmax", 16, 10, 64))
    assert params <= (1 + PARAMS_TOLERANCE) * softmax, f"{name}, {size}: {params:,} vs softmax's {softmax:,}"


# ---- fla's Triton kernels, where a GPU lends them ---------------------------------------------------
def cuda_problem(name: str) -> str | None:
    return fla_kernels.fla_problem(get_mechanism(name).fla_kernel, "cuda", torch.float32)


def assert_near(got, want, what, tol=5e-3):
    """Largest error within ``tol`` of the largest value: TF32 and half-size blocks in fla's float32
    kernels stay far inside it, a wrong scale, gate or layout does not."""
    error, size = (got.double() - want.double()).abs().max().item(), want.abs().max().item()
    assert error <= tol * size, f"{what}: largest error {error:.3g} against largest value {size:.3g}"


@pytest.mark.parametrize("name", PEERS)
def test_fla_kernels_match_the_reference_on_cuda(name):
    """fla's Triton kernel in the mechanism, on 200 tokens (several of fla's 64-token chunks): the
    causal form against the reference layer in float64, and both directions, values and gradients,
    against the chunked PyTorch form on the same GPU."""
    why = cuda_problem(name)
    if why is not None:
        pytest.skip(f"fla's kernel for {name} cannot run here: {why}")
    torch.manual_seed(0)
    fla = build_mechanism(name, 64, 2, kernel="fla").cuda()
    torch_form = copy.deepcopy(fla)
    torch_form.options = dataclasses.replace(fla.options, kernel="torch")
    x = torch.randn(2, 200, 64, device="cuda", requires_grad=True)
    reference = REFERENCES[name](copy.deepcopy(fla).cpu().double(), x.detach().cpu().double(), "loop")
    assert_near(fla(x, causal=True).cpu(), reference, "causal output against the reference layer")
    for causal in (True, False):
        ours, theirs = torch_form(x, causal=causal), fla(x, causal=causal)
        weight = torch.randn_like(ours)
        (g_ours,) = torch.autograd.grad((ours * weight).sum(), x)
        (g_theirs,) = torch.autograd.grad((theirs * weight).sum(), x)
        assert_near(theirs, ours, f"output (causal={causal}) against the PyTorch form")
        assert_near(g_theirs, g_ours, f"input gradient (causal={causal}) against the PyTorch form", 1e-2)


# ---- starting from all-MiniLM-L6-v2 (--init minilm) ------------------------------------------------
@needs_minilm
@pytest.mark.parametrize("name", PEERS)
def test_minilm_init_leaves_the_recurrences_random_and_says_so(name):
    """BERT's attention maps onto no projection of theirs; Mamba2's in_proj (2·C + 2·S + H outputs,
    whose floor division by C is 2) is not taken for a stacked key/value projection."""
    from tasks.common.text_encoder import init_from_minilm, minilm_folder

    model = build_encoder("minilm", name, 30522, 2, 32)
    before = {k: v.clone() for k, v in model.layers[0].mixer.state_dict().items()}
    note = init_from_minilm(model, minilm_folder())
    assert note.startswith("minilm (attention random (no qkv/in_proj/proj); random: ")
    for key, value in model.layers[0].mixer.state_dict().items():
        assert torch.equal(value, before[key]), key
