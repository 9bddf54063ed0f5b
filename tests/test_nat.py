"""Neighbourhood attention (natten) against a dense reference with explicit neighbourhoods.

natten's CPU backend (eager Flex Attention) runs float32 at best and has no backward on the
CPU, so the natten path is checked in float32 under ``no_grad``; the autograd path (dense
masked SDPA) is checked in float64, gradients included.
"""

from __future__ import annotations

import pytest
import torch

from attnbench import OptionError, build_mechanism, get_mechanism

DIM, HEADS = 32, 4  # head dim 8: natten's Flex backend needs a power of two >= 8


def neighbours(size: int, kernel: int, dilation: int) -> torch.Tensor:
    """(size, size) bool, by hand: query i sees the ``kernel`` tokens of its dilation group
    nearest to it, the window centred on i but shifted inward at the borders."""
    allowed = torch.zeros(size, size, dtype=torch.bool)
    for i in range(size):
        group = list(range(i % dilation, size, dilation))  # the tokens i can see, in order
        place = group.index(i)
        start = min(max(place - kernel // 2, 0), len(group) - kernel)
        for j in group[start:start + kernel]:
            allowed[i, j] = True
    return allowed


def test_the_reference_neighbourhoods_are_the_hand_computed_ones():
    rows = neighbours(7, 3, 1)
    assert rows[0].nonzero().flatten().tolist() == [0, 1, 2]  # shifted inward at the border
    assert rows[3].nonzero().flatten().tolist() == [2, 3, 4]  # centred
    assert rows[6].nonzero().flatten().tolist() == [4, 5, 6]
    dilated = neighbours(9, 3, 2)
    assert dilated[0].nonzero().flatten().tolist() == [0, 2, 4]
    assert dilated[4].nonzero().flatten().tolist() == [2, 4, 6]
    assert dilated[7].nonzero().flatten().tolist() == [3, 5, 7]  # group 1, 3, 5, 7: last three
    assert (dilated.sum(1) == 3).all()


def reference_nat(m, x: torch.Tensor, axes) -> torch.Tensor:
    """Dense softmax attention restricted to an explicit N×N neighbourhood mask.

    ``axes``: one (size, kernel, dilation) per axis of the token layout, row-major.
    """
    b, n, c = x.shape
    d = c // HEADS
    allowed = torch.ones(1, 1, dtype=torch.bool)
    for size, kernel, dilation in axes:  # the 2-D neighbourhood is the product of the 1-D ones
        allowed = (allowed[:, None, :, None] & neighbours(size, kernel, dilation)[None, :, None, :])
        allowed = allowed.reshape(allowed.shape[0] * size, -1)
    assert allowed.shape == (n, n)

    weights = [p.double() for p in (m.qkv.weight, m.qkv.bias, m.proj.weight, m.proj.bias)]
    q, k, v = (x @ weights[0].T + weights[1]).split(c, dim=-1)
    out = torch.empty_like(x)
    for head in range(HEADS):
        sl = slice(head * d, (head + 1) * d)
        scores = (q[..., sl] @ k[..., sl].transpose(1, 2) / d**0.5).masked_fill(~allowed, float("-inf"))
        out[..., sl] = torch.softmax(scores, dim=-1) @ v[..., sl]
    return out @ weights[2].T + weights[3]


CASES = [  # options, grid, N, and the (size, kernel, dilation) per axis that must result
    (dict(kernel=5), None, 20, [(20, 5, 1)]),
    (dict(kernel=5, dilation=3), None, 20, [(20, 5, 3)]),
    (dict(kernel=5, dilation=8), None, 20, [(20, 5, 4)]),  # dilation lowered to 20 // 5
    (dict(kernel=3), (9, 11), 99, [(9, 3, 1), (11, 3, 1)]),
    (dict(kernel=3, dilation=3), (9, 11), 99, [(9, 3, 3), (11, 3, 3)]),
    (dict(kernel=5, dilation=2), (7, 12), 84, [(7, 5, 1), (12, 5, 2)]),  # rows too short to dilate
    (dict(kernel=7), (4, 5), 20, [(4, 4, 1), (5, 5, 1)]),  # kernel clamped: global attention
    (dict(kernel=5), (1, 12), 12, [(12, 5, 1)]),  # a length-1 axis is dropped
]
IDS = [f"{o}-{g}-{n}" for o, g, n, _ in CASES]


def build(dtype: torch.dtype, **options):
    torch.manual_seed(0)
    return build_mechanism("nat", DIM, HEADS, **options).to(dtype)


@pytest.mark.parametrize("options, grid, n, axes", CASES, ids=IDS)
def test_natten_matches_the_dense_reference(options, grid, n, axes):
    m = build(torch.float32, **options)
    x = torch.randn(2, n, DIM, dtype=torch.float64)
    with torch.no_grad():  # natten's CPU path: no autograd, float32 at most
        got = m(x.float(), grid)
    torch.testing.assert_close(got.double(), reference_nat(m, x, axes), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options, grid, n, axes", CASES[1::2], ids=IDS[1::2])
def test_the_autograd_path_and_its_gradients_match_the_reference_in_float64(options, grid, n, axes):
    m = build(torch.float64, **options)
    x = torch.randn(2, n, DIM, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, n, DIM, dtype=torch.float64)
    got, expected = m(x, grid), reference_nat(m, x, axes)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    inputs = [x, m.qkv.weight, m.proj.weight]
    g_got = torch.autograd.grad((got * weight).sum(), inputs)
    g_expected = torch.autograd.grad((expected * weight).sum(), inputs)
    for g, e in zip(g_got, g_expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


def test_float64_input_without_grad_runs_natten_in_float32_and_returns_float64():
    m = build(torch.float64, kernel=5, dilation=2)
    x = torch.randn(2, 20, DIM, dtype=torch.float64)
    with torch.no_grad():
        y = m(x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, reference_nat(m, x, [(20, 5, 2)]), rtol=1e-5, atol=1e-5)


def test_a_single_token_attends_to_itself():
    m = build(torch.float64)
    x = torch.randn(2, 1, DIM, dtype=torch.float64)
    v = (x @ m.qkv.weight.T + m.qkv.bias)[..., 2 * DIM:]
    torch.testing.assert_close(m(x), v @ m.proj.weight.T + m.proj.bias)


@pytest.mark.parametrize("dim, heads", [(24, 4), (48, 4), (1024, 1)])  # head dims 6, 12, 1024
def test_a_head_dim_natten_cannot_evaluate_is_refused_when_built(dim, heads):
    """Head dim 12 would train on the CPU (masked SDPA) and then fail at evaluation (Flex)."""
    with pytest.raises(OptionError, match=f"head dim {dim // heads} .*valid head dims: 8, 16, 32, 64, "
                                          "128, 256, 512$"):
        build_mechanism("nat", dim, heads)


@pytest.mark.parametrize("head_dim", [8, 16, 512])
def test_every_valid_head_dim_trains_and_evaluates_on_the_cpu(head_dim):
    m = build_mechanism("nat", 2 * head_dim, 2, kernel=3)
    x = torch.randn(1, 6, 2 * head_dim, requires_grad=True)
    m(x).sum().backward()  # the masked SDPA path
    with torch.no_grad():
        assert m(x).shape == x.shape  # natten's own path


def test_flops_count_kernel_neighbours_per_query():
    m = build_mechanism("nat", DIM, HEADS, kernel=5)
    assert m.flops(2, 99, (9, 11)).matmul == 8 * 2 * 99 * DIM**2 + 4 * 2 * 99 * 25 * DIM
    assert m.flops(2, 20, (4, 5)).matmul == 8 * 2 * 20 * DIM**2 + 4 * 2 * 20 * 20 * DIM  # clamped to 4×5


def test_backend_says_what_runs_on_the_cpu():
    backend = get_mechanism("nat").backend("cpu")
    assert "flex-fna" in backend and "O(N²)" in backend and "no Flex backward on CPU" in backend


def test_nat_options_are_validated_with_the_valid_range():
    with pytest.raises(OptionError, match=r"nat.kernel must be an odd int >= 3, got 4"):
        build_mechanism("nat", DIM, HEADS, kernel=4)
    with pytest.raises(OptionError, match=r"nat.dilation=0 must be an int in \[1, 64\]"):
        build_mechanism("nat", DIM, HEADS, dilation=0)


@pytest.mark.parametrize("dilation", [1, 2, 3])
def test_decoding_dilated_neighbourhoods(dilation):
    """Prefill (also of prompts shorter than kernel·dilation) and steps: the causal forward of a
    sequence of at least kernel·dilation tokens, each step's neighbours found in the rolling window."""
    torch.manual_seed(0)
    m = build_mechanism("nat", 32, 4, kernel=3, dilation=dilation).eval()
    x = torch.randn(2, 14, 32)
    expected = m(x, causal=True)
    for prompt in (1, 3, 5, 9):
        with torch.no_grad():
            out, cache = m.prefill(x[:, :prompt], 14)
            steps = [m.step(x[:, t:t + 1], cache) for t in range(prompt, 14)]
        torch.testing.assert_close(torch.cat([out, *steps], 1), expected, rtol=1e-5, atol=1e-5)
    assert cache.nbytes() == m.cache_bytes(2, 14, torch.float32) == 2 * 2 * 4 * (2 * dilation + 1) * 8 * 4
