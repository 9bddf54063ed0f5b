"""Swin window attention against a dense masked-softmax reference built from first principles."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from attnbench import OptionError, build_mechanism

DIM, HEADS = 24, 3


def same_window(size: int, window: int, shift: bool) -> torch.Tensor:
    """(size, size) bool along one axis: do two positions share a window?

    Shifted windows, in the grid's own coordinates, have their edges at ⌊w/2⌋ + k·w: the roll
    and the region mask of Swin amount to exactly that. An axis no longer than the window is
    one window, unshifted.
    """
    pos = torch.arange(size)
    if size <= window:
        segment = torch.zeros(size, dtype=torch.long)
    else:
        segment = (pos - (window // 2 if shift else 0)).div(window, rounding_mode="floor")
    return segment[:, None] == segment[None, :]


def reference_swin(m, x: torch.Tensor, grid) -> torch.Tensor:
    """Dense attention over all N tokens with an explicit N×N window mask and N×N bias."""
    b, n, c = x.shape
    h, w = grid if grid is not None else (1, n)
    win, shift, d = m.options.window, m.options.shift, c // HEADS
    row, col = torch.arange(n) // w, torch.arange(n) % w  # row-major token coordinates

    allowed = same_window(h, win, shift)[row][:, row] & same_window(w, win, shift)[col][:, col]  # (N, N)
    index = (row[:, None] - row[None, :] + win - 1) * (2 * win - 1) + (col[:, None] - col[None, :] + win - 1)
    bias = m.bias_table[index.where(allowed, 0)]  # (N, N, heads); only allowed pairs are used

    q, k, v = (x @ m.qkv.weight.T + m.qkv.bias).split(c, dim=-1)
    out = torch.empty_like(x)
    for head in range(HEADS):
        sl = slice(head * d, (head + 1) * d)
        scores = q[..., sl] @ k[..., sl].transpose(1, 2) / d**0.5 + bias[..., head]
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[..., sl] = torch.softmax(scores, dim=-1) @ v[..., sl]
    return out @ m.proj.weight.T + m.proj.bias


CASES = [  # (window, grid or None for a sequence, N)
    (4, (8, 12), 96),  # divisible
    (4, (9, 10), 90),  # padded to 12×12
    (4, (3, 10), 30),  # rows clamped to one window of 3, columns padded
    (7, (4, 5), 20),  # the conformance grid: one window, no shift
    (4, None, 10),  # 1-D, padded to 12
    (5, None, 15),  # 1-D, divisible
]


def build(window: int, shift: bool):
    torch.manual_seed(0)
    m = build_mechanism("swin", DIM, HEADS, window=window, shift=shift).double()
    with torch.no_grad():  # a bias large enough to matter in the comparison
        m.bias_table.normal_()
    return m


@pytest.mark.parametrize("shift", [False, True], ids=["plain", "shifted"])
@pytest.mark.parametrize("window, grid, n", CASES)
def test_swin_matches_the_dense_reference_in_float64(window, grid, n, shift):
    m = build(window, shift)
    x = torch.randn(2, n, DIM, dtype=torch.float64)
    torch.testing.assert_close(m(x, grid), reference_swin(m, x, grid), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("window, grid, n", [CASES[1], CASES[4]])
def test_swin_gradients_match_the_reference(window, grid, n):
    m = build(window, shift=True)
    x = torch.randn(2, n, DIM, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, n, DIM, dtype=torch.float64)
    inputs = [x, m.bias_table, m.qkv.weight]
    got = torch.autograd.grad((m(x, grid) * weight).sum(), inputs)
    expected = torch.autograd.grad((reference_swin(m, x, grid) * weight).sum(), inputs)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


def test_shifted_windows_on_a_sequence_are_the_hand_computed_ones():
    """10 tokens, w=4, shifted by 2: windows {0,1}, {2..5}, {6..9} (no attention to padding)."""
    m = build(4, shift=True)
    x = torch.randn(1, 10, DIM, dtype=torch.float64, requires_grad=True)
    jacobian = torch.autograd.functional.jacobian(lambda t: m(t, None).sum(-1), x)  # (1, 10, 1, 10, C)
    depends = jacobian[0, :, 0].abs().sum(-1) > 0  # (10, 10): output i depends on input j
    groups = [range(0, 2), range(2, 6), range(6, 10)]
    expected = torch.zeros(10, 10, dtype=torch.bool)
    for g in groups:
        expected[g.start:g.stop, g.start:g.stop] = True
    assert torch.equal(depends, expected)


@pytest.mark.parametrize("window, grid, n", CASES)
def test_swin_flop_formula_matches_the_counter_with_padding_and_shift(window, grid, n):
    m = build_mechanism("swin", DIM, HEADS, window=window, shift=True)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        m(torch.randn(2, n, DIM), grid)
    assert m.flops(2, n, grid).matmul == counter.get_total_flops()


def test_swin_options_are_validated_with_the_valid_range():
    with pytest.raises(OptionError, match=r"swin.window=0 must be an int in \[1, 256\]"):
        build_mechanism("swin", DIM, HEADS, window=0)
    with pytest.raises(OptionError, match=r"swin.shift must be True or False"):
        build_mechanism("swin", DIM, HEADS, shift=2)
    assert build_mechanism("swin", DIM, HEADS, shift="true", window="5").options.shift is True
    assert build_mechanism("swin", DIM, HEADS, window=5).bias_table.shape == (81, HEADS)


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("window", [4, 5])
def test_decoding_the_windows_of_a_sequence_longer_than_the_window(shift, window):
    """Prefill (also of prompts no longer than the window) and steps: the causal forward of the
    whole sequence, whose windows (shifted or not) each step finds without seeing the rest."""
    torch.manual_seed(0)
    m = build_mechanism("swin", DIM, HEADS, window=window, shift=shift).double().eval()
    x = torch.randn(2, 13, DIM, dtype=torch.float64)
    expected = m(x, causal=True)
    for prompt in (1, window - 1, window, 9):
        with torch.no_grad():
            out, cache = m.prefill(x[:, :prompt], 13)
            steps = [m.step(x[:, t:t + 1], cache) for t in range(prompt, 13)]
        torch.testing.assert_close(torch.cat([out, *steps], 1), expected, rtol=1e-10, atol=1e-10)
