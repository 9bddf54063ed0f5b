"""Incremental decoding, checked before it is timed: for every registered mechanism that decodes
(built-in or plug-in), prefill and token-by-token steps reproduce the parallel causal forward at
every position, with and without a right-padded batch; the others refuse with their reason."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from attnbench import OptionError, build_mechanism, get_mechanism, mechanism_names
from tests.test_conformance import exact_dtype

DIM, HEADS = 32, 4
N, PROMPT = 14, 9  # 9 prompt tokens, then 5 steps
LENGTHS = (3, 9, 6, 9)  # a right-padded batch of prompts: two of a length, one unpadded


def params(decoding: bool) -> list:
    """The mechanisms that decode (``decoding``) or that refuse to, skipped with the reason where
    they cannot run here."""
    found = []
    for name in mechanism_names():
        cls = get_mechanism(name)
        if (cls.decode_problem() is None) != decoding:
            continue
        reason = cls.unavailable_reason("cpu")
        marks = [pytest.mark.skip(reason=f"{name}: {reason}")] if reason else []
        found.append(pytest.param(name, marks=marks, id=name))
    return found


decoders = pytest.mark.parametrize("name", params(decoding=True))


def build(name: str, dtype: torch.dtype, **options) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_mechanism(name, DIM, HEADS, **options).to(dtype).eval()


def takes_kv_heads(name: str) -> bool:
    return any(f.name == "kv_heads" for f in dataclasses.fields(get_mechanism(name).Options))


def decode(m, x: torch.Tensor, prompt: int, mask: torch.Tensor | None = None, capacity: int | None = None):
    """Prefill ``x[:, :prompt]`` and step through the rest of ``x`` token by token: (outputs, cache)."""
    out, cache = m.prefill(x[:, :prompt], capacity or x.shape[1], mask)
    outputs = [out] + [m.step(x[:, t:t + 1], cache) for t in range(prompt, x.shape[1])]
    return torch.cat(outputs, 1), cache


def test_the_built_in_decoders_are_the_ones_the_issue_names():
    names = {p.values[0] for p in params(decoding=True)}
    assert {"softmax", "sdpa", "xformers", "linear", "performer"} <= names


@decoders
@pytest.mark.parametrize("kv_heads", [None, 2, 1], ids=["mha", "gqa", "mqa"])
def test_prefill_and_steps_reproduce_the_causal_forward(name, kv_heads):
    if kv_heads is not None and not takes_kv_heads(name):
        pytest.skip(f"{name} has no kv_heads option")
    dtype, tol = exact_dtype(name)
    m = build(name, dtype, **({} if kv_heads is None else {"kv_heads": kv_heads}))
    x = torch.randn(2, N, DIM, dtype=dtype)
    expected = m(x, causal=True)
    with torch.no_grad():
        got, _ = decode(m, x, PROMPT)
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    with torch.no_grad():  # a one-token prompt: every later token a step
        got, _ = decode(m, x, 1)
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


@decoders
def test_a_padded_prompt_continues_after_its_real_tokens(name):
    """Each sequence of a right-padded batch: its prompt's outputs as the causal forward of its real
    tokens alone (zero at padding), then each step's as if it came right after them."""
    dtype, tol = exact_dtype(name)
    m = build(name, dtype)
    mask = torch.zeros(len(LENGTHS), PROMPT, dtype=torch.bool)
    for row, length in enumerate(LENGTHS):
        mask[row, :length] = True
    prompt = torch.randn(len(LENGTHS), PROMPT, DIM, dtype=dtype)
    prompt = torch.where(mask[..., None], prompt, 50 * torch.randn_like(prompt))  # junk at padding
    steps = torch.randn(len(LENGTHS), N - PROMPT, DIM, dtype=dtype)
    with torch.no_grad():
        out, cache = m.prefill(prompt, PROMPT + steps.shape[1], mask)
        stepped = torch.cat([m.step(steps[:, j:j + 1], cache) for j in range(steps.shape[1])], 1)
    assert (out[~mask] == 0).all(), "outputs at padding must be zero"
    for row, length in enumerate(LENGTHS):
        alone = torch.cat([prompt[row, :length], steps[row]])[None]  # the real tokens, then the steps
        expected = m(alone, causal=True)[0]
        torch.testing.assert_close(out[row, :length], expected[:length], rtol=tol, atol=tol)
        torch.testing.assert_close(stepped[row], expected[length:], rtol=tol, atol=tol)


@decoders
def test_a_padded_prompt_decodes_whatever_fresh_memory_holds(name, monkeypatch):
    """Memory the cache takes fresh may hold NaN (uninitialised): a right-padded prompt's masked slots
    must still not reach a step's output (0 · NaN is NaN), so every step stays finite."""
    dtype, _ = exact_dtype(name)
    m = build(name, dtype)
    plain_empty = torch.Tensor.new_empty
    monkeypatch.setattr(torch.Tensor, "new_empty",
                        lambda t, *a, **k: plain_empty(t, *a, **k).fill_(float("nan")))
    mask = torch.zeros(len(LENGTHS), PROMPT, dtype=torch.bool)
    for row, length in enumerate(LENGTHS):
        mask[row, :length] = True
    prompt = torch.randn(len(LENGTHS), PROMPT, DIM, dtype=dtype)
    with torch.no_grad():
        _, cache = m.prefill(prompt, N, mask)
        tokens = torch.randn(len(LENGTHS), 3, DIM, dtype=dtype)
        stepped = torch.cat([m.step(tokens[:, j:j + 1], cache) for j in range(3)], 1)
    assert torch.isfinite(stepped).all()


@decoders
def test_steps_never_reallocate_the_cache(name):
    """The cache's tensors stay where prefill put them, at the size its formula gives."""
    dtype, _ = exact_dtype(name)
    m = build(name, dtype)
    x = torch.randn(2, N, DIM, dtype=dtype)
    with torch.no_grad():
        _, cache = m.prefill(x[:, :PROMPT], N)
        before = [t.data_ptr() for t in cache.tensors()]
        size = cache.nbytes()
        for t in range(PROMPT, N):
            m.step(x[:, t:t + 1], cache)
    assert [t.data_ptr() for t in cache.tensors()] == before
    assert cache.nbytes() == size == m.cache_bytes(2, N, dtype)


@decoders
def test_restore_puts_the_cache_back_as_it_was(name):
    dtype, tol = exact_dtype(name)
    m = build(name, dtype)
    x = torch.randn(2, PROMPT + 2, DIM, dtype=dtype)
    with torch.no_grad():
        _, cache = m.prefill(x[:, :PROMPT], PROMPT + 2)
        saved = cache.snapshot()
        first = m.step(x[:, PROMPT:PROMPT + 1], cache)
        m.step(x[:, PROMPT + 1:], cache)
        cache.restore(saved)
        again = m.step(x[:, PROMPT:PROMPT + 1], cache)
        cache.restore(saved)
        other = m.step(x[:, PROMPT + 1:], cache)  # a different token at the same place
        _, fresh = m.prefill(x[:, :PROMPT], PROMPT + 2)
        expected = m.step(x[:, PROMPT + 1:], fresh)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    torch.testing.assert_close(other, expected, rtol=tol, atol=tol)


@decoders
def test_a_cache_built_without_outputs_decodes_the_same(name):
    """``outputs=False`` (the sweep's way when the full prefill does not fit) builds the same cache."""
    dtype, tol = exact_dtype(name)
    m = build(name, dtype)
    x = torch.randn(2, N, DIM, dtype=dtype)
    with torch.no_grad():
        out, cache = m.prefill(x[:, :PROMPT], N, outputs=False)
        assert out is None
        stepped = torch.cat([m.step(x[:, t:t + 1], cache) for t in range(PROMPT, N)], 1)
        expected, _ = decode(m, x, PROMPT)
    torch.testing.assert_close(stepped, expected[:, PROMPT:], rtol=tol, atol=tol)


@decoders
def test_bad_decoding_input_is_a_clear_error(name):
    m = build(name, torch.float32)
    x = torch.randn(2, PROMPT, DIM)
    with pytest.raises(ValueError, match=r"capacity=8 must be an int >= the prompt's N=9"):
        m.prefill(x, 8)
    with pytest.raises(ValueError, match=r"expected a prompt x of shape \(B, N, C=32\)"):
        m.prefill(x[0], PROMPT)
    holes = torch.ones(2, PROMPT, dtype=torch.bool)
    holes[0, 2] = False
    with pytest.raises(ValueError, match="must be right padding"):
        m.prefill(x, PROMPT, holes)
    _, cache = m.prefill(x, PROMPT + 1)
    with pytest.raises(ValueError, match=r"step takes one token per sequence, x of shape \(B=2, 1, C=32\)"):
        m.step(torch.randn(2, 2, DIM), cache)
    m.step(torch.randn(2, 1, DIM), cache)  # the one slot left
    if type(cache).__name__ == "KVCache":
        with pytest.raises(ValueError, match="decode cache full: it holds 10 tokens"):
            m.step(torch.randn(2, 1, DIM), cache)


@pytest.mark.parametrize("name", params(decoding=False))
def test_mechanisms_without_decoding_refuse_with_their_reason(name):
    cls = get_mechanism(name)
    reason = cls.decode_problem()
    m = build_mechanism(name, DIM, HEADS)
    refusal = re.escape(f"{name}: incremental decoding is not supported: {reason}")
    for call in (lambda: m.prefill(torch.randn(1, 4, DIM), 8), lambda: m.step(torch.randn(1, 1, DIM), None)):
        with pytest.raises(OptionError, match=refusal):
            call()


@pytest.mark.parametrize("name", [p for p in params(decoding=True) if takes_kv_heads(p.values[0])])
def test_grouped_query_heads_shrink_the_cache_by_heads_over_kv_heads(name):
    """Measured: the bytes the cache holds fall by H / H_kv."""
    sizes = {}
    for kv_heads in (HEADS, 2, 1):
        m = build(name, torch.float32, kv_heads=kv_heads)
        with torch.no_grad():
            _, cache = m.prefill(torch.randn(3, PROMPT, DIM), 64)
        sizes[kv_heads] = cache.nbytes()
        assert sizes[kv_heads] == m.cache_bytes(3, 64, torch.float32)
    assert sizes[HEADS] == 2 * sizes[2] == 4 * sizes[1]


@pytest.mark.skipif(get_mechanism("xformers").unavailable_reason("cuda") is not None,
                    reason=f"xformers on cuda: {get_mechanism('xformers').unavailable_reason('cuda')}")
@pytest.mark.parametrize("kv_heads", [None, 2, 1], ids=["mha", "gqa", "mqa"])
def test_xformers_decodes_as_softmax_on_cuda(kv_heads):
    """xformers' kernels (CUDA only) against softmax with the same weights: the causal forward, and
    prefill and steps of a padded batch, with grouped-query heads."""
    options = {} if kv_heads is None else {"kv_heads": kv_heads}
    ref = build("softmax", torch.float32, **options).cuda()
    fused = build("xformers", torch.float32, **options).cuda()
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(len(LENGTHS), N, DIM, device="cuda")
    mask = torch.arange(PROMPT, device="cuda") < torch.tensor(LENGTHS, device="cuda")[:, None]
    with torch.no_grad():
        torch.testing.assert_close(fused(x, causal=True), ref(x, causal=True), rtol=1e-3, atol=1e-3)
        for m in (None, mask):
            expected, _ = decode(ref, x, PROMPT, m)
            got, cache = decode(fused, x, PROMPT, m)
            torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
    assert cache.nbytes() == fused.cache_bytes(len(LENGTHS), N, torch.float32)
