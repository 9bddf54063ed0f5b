"""The softmax baselines against an explicit reference and against each other."""

from __future__ import annotations

import torch

from attnbench import build_mechanism


def reference_attention(x, qkv_w, qkv_b, proj_w, proj_b, heads, kv_heads=None):
    """Multi-head softmax attention written out head by head, token by token; with ``kv_heads``,
    query head h reads key/value head h // (heads / kv_heads)."""
    b, n, c = x.shape
    d = c // heads
    kv_heads = kv_heads or heads
    q, k, v = (x @ qkv_w.T + qkv_b).split([c, kv_heads * d, kv_heads * d], dim=-1)
    out = torch.empty_like(x)
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        kv = slice(h // (heads // kv_heads) * d, (h // (heads // kv_heads) + 1) * d)
        scores = q[..., sl] @ k[..., kv].transpose(1, 2) / d**0.5
        weights = scores.exp() / scores.exp().sum(-1, keepdim=True)
        out[..., sl] = weights @ v[..., kv]
    return out @ proj_w.T + proj_b


def test_softmax_matches_the_reference_in_float64():
    m = build_mechanism("softmax", 24, 3).double()
    x = torch.randn(2, 7, 24, dtype=torch.float64)
    expected = reference_attention(x, m.qkv.weight, m.qkv.bias, m.proj.weight, m.proj.bias, 3)
    torch.testing.assert_close(m(x), expected, rtol=1e-10, atol=1e-10)


def test_grouped_query_softmax_matches_the_reference_in_float64():
    for name in ("softmax", "sdpa"):
        for kv_heads in (1, 2):
            m = build_mechanism(name, 24, 6, kv_heads=kv_heads).double()
            x = torch.randn(2, 7, 24, dtype=torch.float64)
            expected = reference_attention(x, m.qkv.weight, m.qkv.bias, m.proj.weight, m.proj.bias, 6,
                                           kv_heads)
            torch.testing.assert_close(m(x), expected, rtol=1e-10, atol=1e-10)


def test_sdpa_equals_softmax_with_shared_weights():
    ref = build_mechanism("softmax", 64, 4)
    fused = build_mechanism("sdpa", 64, 4)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(3, 100, 64, requires_grad=True)
    torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)
    g_ref, = torch.autograd.grad(ref(x).square().sum(), x)
    g_fused, = torch.autograd.grad(fused(x).square().sum(), x)
    torch.testing.assert_close(g_fused, g_ref, rtol=1e-4, atol=1e-5)


def test_softmax_rows_of_attention_sum_to_one():
    m = build_mechanism("softmax", 16, 2)
    q = k = torch.randn(1, 2, 9, 8)
    v = torch.ones(1, 2, 9, 8)
    torch.testing.assert_close(m.attend(q, k, v), v)  # averaging ones gives ones
