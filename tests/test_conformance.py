"""The conformance suite: every registered mechanism, built-in or plug-in, obeys the contract.

It runs against whatever the registry holds, so a new mechanism is covered the moment it is
registered, and none can rot unnoticed.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from attnbench import OptionError, build_mechanism, get_mechanism
from tests.conftest import mechanism_params

DIM, HEADS, BATCH = 32, 4, 2
GRID = (4, 5)  # H != W, so a transposed grid would be caught
SEQ = 12


def shapes(name: str) -> list[tuple[int, tuple[int, int] | None]]:
    """(N, grid) pairs to test: a 2-D grid always, a plain sequence unless a grid is required."""
    cases = [(GRID[0] * GRID[1], GRID)]
    if not get_mechanism(name).needs_grid:
        cases.append((SEQ, None))
    return cases


def build(name: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    torch.manual_seed(seed)
    return build_mechanism(name, DIM, HEADS).to(dtype)


pytestmark = pytest.mark.parametrize("name", mechanism_params())


def test_shape_and_dtype(name):
    for dtype in (torch.float32, torch.float64):
        m = build(name, dtype=dtype)
        for n, grid in shapes(name):
            y = m(torch.randn(BATCH, n, DIM, dtype=dtype), grid)
            assert y.shape == (BATCH, n, DIM)
            assert y.dtype == dtype


def test_finite_outputs_and_gradients_for_every_parameter(name):
    m = build(name)
    for n, grid in shapes(name):
        m.zero_grad(set_to_none=True)
        x = torch.randn(BATCH, n, DIM, requires_grad=True)
        y = m(x, grid)
        assert torch.isfinite(y).all()
        (y * torch.randn_like(y)).sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
        for pname, p in m.named_parameters():
            assert p.grad is not None, f"{name}: parameter {pname} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{name}: parameter {pname} has a non-finite gradient"


def test_batch_independence(name):
    m = build(name)
    for n, grid in shapes(name):
        x = torch.randn(3, n, DIM)
        y = m(x, grid)
        x2 = x.clone()
        x2[1:] = torch.randn_like(x2[1:]) * 3
        y2 = m(x2, grid)
        torch.testing.assert_close(y2[0], y[0], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(y2[1], y[1]), "changing a sample must change its output"


def test_deterministic_under_a_seed(name):
    x = torch.randn(BATCH, GRID[0] * GRID[1], DIM)
    y1 = build(name, seed=123)(x, GRID)
    y2 = build(name, seed=123)(x, GRID)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)


def test_float32_agrees_with_float64(name):
    m64 = build(name, dtype=torch.float64)
    m32 = copy.deepcopy(m64).float()
    for n, grid in shapes(name):
        x = torch.randn(BATCH, n, DIM, dtype=torch.float64)
        y64 = m64(x, grid)
        y32 = m32(x.float(), grid)
        torch.testing.assert_close(y32.double(), y64, rtol=1e-4, atol=1e-4)


def test_wrong_input_shapes_are_clear_errors(name):
    m = build(name)
    n = GRID[0] * GRID[1]
    with pytest.raises(ValueError, match=r"expected x of shape \(B, N, C=32\)"):
        m(torch.randn(n, DIM), GRID)
    with pytest.raises(ValueError, match=r"expected x of shape"):
        m(torch.randn(BATCH, n, DIM + 1), GRID)
    with pytest.raises(ValueError, match=r"does not match N=20"):
        m(torch.randn(BATCH, n, DIM), (3, 3))


def test_missing_grid_is_a_clear_error_when_one_is_needed(name):
    m = build(name)
    x = torch.randn(BATCH, GRID[0] * GRID[1], DIM)
    if get_mechanism(name).needs_grid:
        with pytest.raises(ValueError, match="needs a 2-D grid"):
            m(x)
    else:
        assert m(x).shape == x.shape


def test_bad_construction_is_a_clear_error(name):
    with pytest.raises(OptionError, match="not divisible by num_heads"):
        build_mechanism(name, 30, 4)
    with pytest.raises(OptionError, match="unknown option.*valid options"):
        build_mechanism(name, DIM, HEADS, no_such_option=1)


def test_flop_formula_matches_the_flop_counter(name):
    cls = get_mechanism(name)
    if not cls.flops_countable:
        pytest.skip(f"{name} runs custom kernels that FlopCounterMode cannot see")
    m = build(name)
    for n, grid in shapes(name):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            m(torch.randn(BATCH, n, DIM), grid)
        assert m.flops(BATCH, n, grid).matmul == counter.get_total_flops()


# ---- padding masks: padding never leaks into real tokens (values, positions or gradients) ----

PAD_N = 14


def padded_batch(dtype: torch.dtype, junk: float = 50.0) -> tuple[torch.Tensor, torch.Tensor]:
    """x (5, 14, C) with junk of scale ``junk`` at padding, and its mask: right padding of lengths
    5, 9, 9 and 14 (two of a length, one unpadded), and one sequence with holes."""
    mask = torch.zeros(5, PAD_N, dtype=torch.bool)
    for row, length in enumerate((5, 9, 9, 14)):
        mask[row, :length] = True
    mask[4, [0, 2, 3, 7, 8, 11, 13]] = True
    x = torch.randn(5, PAD_N, DIM, dtype=dtype)
    x = torch.where(mask[..., None], x, junk * torch.randn_like(x))
    return x, mask


def exact_dtype(name: str) -> tuple[torch.dtype, float]:
    """float64 with a tight tolerance where the mechanism runs it, else float32."""
    if torch.float64 in get_mechanism(name).dtypes:
        return torch.float64, 1e-8
    return torch.float32, 1e-5


@pytest.mark.parametrize("junk", [50.0, 2.0, 0.01],
                         ids=["large-padding", "padding-like-tokens", "small-padding"])
def test_padding_does_not_change_real_tokens(name, junk):
    """With a mask, the output at real tokens is the mechanism on those tokens alone; zero at padding."""
    dtype, tol = exact_dtype(name)
    m = build(name, dtype=dtype).eval()
    x, mask = padded_batch(dtype, junk)
    y = m(x, mask=mask)
    assert y.shape == x.shape and y.dtype == dtype
    assert (y[~mask] == 0).all(), "outputs at padding must be zero"
    for row in range(len(x)):
        alone = m(x[row, mask[row]][None])[0]  # the same tokens with no padding at all
        torch.testing.assert_close(y[row, mask[row]], alone, rtol=tol, atol=tol)


def test_a_mask_without_padding_runs_the_plain_mix(name, monkeypatch):
    """All tokens real (a batch of full sequences): the unpadded path, not the padding machinery."""
    dtype, _ = exact_dtype(name)
    m = build(name, dtype=dtype).eval()
    x = torch.randn(3, PAD_N, DIM, dtype=dtype)
    expected = m(x)
    monkeypatch.setattr(m, "mix_padded", lambda *a: pytest.fail("mix_padded on a mask with no padding"))
    monkeypatch.setattr(m, "_mix_per_length", lambda *a: pytest.fail("per-length on a mask with no padding"))
    torch.testing.assert_close(m(x, mask=torch.ones(3, PAD_N, dtype=torch.bool)), expected)


def test_padding_gets_no_gradient_and_real_gradients_are_unchanged(name):
    dtype, tol = exact_dtype(name)
    m = build(name, dtype=dtype).eval()
    x, mask = padded_batch(dtype)
    weight = torch.randn_like(x)
    x_padded = x.clone().requires_grad_()
    (m(x_padded, mask=mask) * weight).sum().backward()
    padded_grads = {k: p.grad.clone() for k, p in m.named_parameters()}
    assert (x_padded.grad[~mask] == 0).all(), "padding must get no gradient"

    m.zero_grad(set_to_none=True)
    for row in range(len(x)):
        alone = x[row, mask[row]][None].clone().requires_grad_()
        (m(alone)[0] * weight[row, mask[row]]).sum().backward()
        torch.testing.assert_close(x_padded.grad[row, mask[row]], alone.grad[0], rtol=tol, atol=tol)
    for k, p in m.named_parameters():  # summed over the sequences one at a time
        torch.testing.assert_close(padded_grads[k], p.grad, rtol=tol * 100, atol=tol * 100, msg=k)


def test_bad_masks_are_clear_errors(name):
    m = build(name)
    x, mask = padded_batch(torch.float32)
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \(B, N\)"):
        m(x, mask=mask[:, :-1])
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        m(x, mask=mask.float())
    with pytest.raises(ValueError, match="at least one real token"):
        m(x, mask=torch.zeros_like(mask))
    with pytest.raises(ValueError, match="padding masks are for sequences"):
        m(torch.randn(2, GRID[0] * GRID[1], DIM), GRID, mask=torch.ones(2, 20, dtype=torch.bool))
