"""Grouped-query and multi-query heads: every registered mechanism with a ``kv_heads`` option
(built-in or plug-in) projects keys and values to H_kv heads, each shared by its group of query
heads, in the forward and backward passes (and in decoding: tests/test_decode.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from attnbench import OptionError, build_mechanism, get_mechanism, mechanism_names
from tests.test_conformance import exact_dtype, padded_batch

DIM, HEADS, BATCH = 32, 4, 2
SEQ = 12


def kv_heads_params() -> list:
    """The mechanisms with a ``kv_heads`` option, skipped with the reason where they cannot run here."""
    params = []
    for name in mechanism_names():
        cls = get_mechanism(name)
        if not any(f.name == "kv_heads" for f in dataclasses.fields(cls.Options)):
            continue
        reason = cls.unavailable_reason("cpu")
        marks = [pytest.mark.skip(reason=f"{name}: {reason}")] if reason else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


each = pytest.mark.parametrize("name", kv_heads_params())


def test_the_softmax_family_takes_kv_heads():
    assert {"softmax", "sdpa", "xformers"} <= {p.values[0] for p in kv_heads_params()}


def repeated_heads(gqa, mha) -> None:
    """Load ``gqa``'s weights into ``mha`` (the same mechanism with one key/value head per query
    head), each key/value head's rows repeated for its group: the dense form of the same function."""
    c, d = gqa.dim, gqa.head_dim
    group = gqa.num_heads // gqa.kv_heads
    state = gqa.state_dict()
    for part in ("weight", "bias"):
        key = f"qkv.{part}"
        if key not in state:
            continue
        q, k, v = state[key].split([c, gqa.kv_heads * d, gqa.kv_heads * d])
        k, v = (t.unflatten(0, (gqa.kv_heads, d)).repeat_interleave(group, 0).flatten(0, 1) for t in (k, v))
        state[key] = torch.cat([q, k, v])
    mha.load_state_dict(state)


@each
@pytest.mark.parametrize("kv_heads", [1, 2])
def test_grouped_query_heads_equal_multi_head_attention_with_repeated_heads(name, kv_heads):
    """Values and input gradients, plain and padded, causal where there is a causal form: H_kv
    key/value heads shared over groups are the H-head mechanism whose key/value heads repeat;
    parameter gradients are the repeats' summed."""
    dtype, tol = exact_dtype(name)
    torch.manual_seed(0)
    gqa = build_mechanism(name, DIM, HEADS, kv_heads=kv_heads).to(dtype)
    mha = build_mechanism(name, DIM, HEADS).to(dtype)
    assert gqa.qkv.weight.shape == (DIM + 2 * kv_heads * DIM // HEADS, DIM)  # K, V projected to H_kv heads
    repeated_heads(gqa, mha)
    x, mask = padded_batch(dtype)
    causal = get_mechanism(name).causal_problem() is None
    for m, is_causal in [(None, False), (mask, False)] + [(None, True), (mask, True)] * causal:
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = gqa(a, mask=m, causal=is_causal), mha(b, mask=m, causal=is_causal)
        torch.testing.assert_close(ya, yb, rtol=tol, atol=tol)
        weight = torch.randn_like(ya)
        (ya * weight).sum().backward()
        (yb * weight).sum().backward()
        torch.testing.assert_close(a.grad, b.grad, rtol=tol, atol=tol)
    expected = torch.empty_like(gqa.qkv.weight.grad)
    repeated = mha.qkv.weight.grad.split([DIM, DIM, DIM])
    group = HEADS // kv_heads
    expected[:DIM] = repeated[0]
    for i, part in enumerate(repeated[1:]):  # each shared head's gradient: its group's, summed
        summed = part.unflatten(0, (kv_heads, group, DIM // HEADS)).sum(1).flatten(0, 1)
        expected[DIM + i * kv_heads * DIM // HEADS:DIM + (i + 1) * kv_heads * DIM // HEADS] = summed
    torch.testing.assert_close(gqa.qkv.weight.grad, expected, rtol=tol * 100, atol=tol * 100)


@each
def test_kv_heads_equal_to_heads_is_multi_head_attention(name):
    x = torch.randn(BATCH, SEQ, DIM)
    torch.manual_seed(1)
    default = build_mechanism(name, DIM, HEADS)
    torch.manual_seed(1)
    explicit = build_mechanism(name, DIM, HEADS, kv_heads=HEADS)
    torch.testing.assert_close(explicit(x), default(x), rtol=0, atol=0)


@each
def test_kv_heads_that_do_not_divide_heads_are_refused(name):
    with pytest.raises(OptionError, match=r"kv_heads=3 does not divide num_heads=4; valid: 1, 2, 4"):
        build_mechanism(name, DIM, HEADS, kv_heads=3)
    with pytest.raises(OptionError, match="kv_heads must be a positive int"):
        build_mechanism(name, DIM, HEADS, kv_heads=0)
