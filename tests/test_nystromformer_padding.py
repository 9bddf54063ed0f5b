"""Nyströmformer's native padding masks: each sequence's real tokens alone, in one or two batched groups.

Lengths straddle the landmark count m (exact softmax at L <= m, Nyström with the sequence's own
segments above it), one sequence has holes and one is unpadded; values and gradients must equal
running each sequence's real tokens through the module alone.
"""

from __future__ import annotations

import pytest
import torch

from attnbench import build_mechanism
from mechanisms.nystromformer import NystromAttention
from mechanisms.softmax import SoftmaxAttention

F64 = torch.float64
DIM, HEADS, N = 24, 3, 20
TOL = 1e-10


def padded_batch(m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (6, N, C) with junk at padding and its mask: right padding of lengths m - 1, m, m + 1,
    2m + 1 (or N), holes leaving m + 2 real tokens, and one unpadded sequence."""
    lengths = [max(m - 1, 1), m, m + 1, min(2 * m + 1, N)]
    mask = torch.zeros(6, N, dtype=torch.bool)
    for row, length in enumerate(lengths):
        mask[row, :length] = True
    mask[4, torch.randperm(N)[: m + 2]] = True  # holes anywhere, first and last tokens included or not
    mask[5] = True
    x = torch.randn(6, N, DIM, dtype=F64)
    return torch.where(mask[..., None], x, 30 * torch.randn_like(x)), mask


@pytest.mark.parametrize("conv_kernel", [0, 3])
@pytest.mark.parametrize("landmarks", [3, 4, 8])
def test_padded_batch_equals_each_sequence_alone(landmarks, conv_kernel):
    mech = build_mechanism("nystromformer", DIM, HEADS, landmarks=landmarks, conv_kernel=conv_kernel).to(F64)
    x, mask = padded_batch(landmarks)
    weight = torch.randn_like(x)

    x_padded = x.clone().requires_grad_()
    y = mech(x_padded, mask=mask)
    (y * weight).sum().backward()
    padded_grads = {name: p.grad.clone() for name, p in mech.named_parameters()}
    assert (y[~mask] == 0).all(), "outputs at padding must be zero"
    assert (x_padded.grad[~mask] == 0).all(), "padding must get no gradient"

    mech.zero_grad(set_to_none=True)
    for row in range(len(x)):
        alone = x[row, mask[row]][None].clone().requires_grad_()
        y_alone = mech(alone)
        (y_alone[0] * weight[row, mask[row]]).sum().backward()
        torch.testing.assert_close(y[row, mask[row]], y_alone[0], rtol=TOL, atol=TOL)
        torch.testing.assert_close(x_padded.grad[row, mask[row]], alone.grad[0], rtol=TOL, atol=TOL)
    for name, p in mech.named_parameters():  # summed over the sequences run one at a time
        torch.testing.assert_close(padded_grads[name], p.grad, rtol=TOL, atol=TOL, msg=name)


def test_many_lengths_run_as_at_most_two_groups(monkeypatch):
    """One Nyström call for every L > m and one softmax call for every L <= m, not one per length."""
    calls = {"nystrom": 0, "softmax": 0}
    nystrom, softmax = NystromAttention.nystrom, SoftmaxAttention.attend

    def counted_nystrom(self, *args, **kwargs):
        calls["nystrom"] += 1
        return nystrom(self, *args, **kwargs)

    def counted_softmax(self, *args, **kwargs):
        calls["softmax"] += 1
        return softmax(self, *args, **kwargs)

    monkeypatch.setattr(NystromAttention, "nystrom", counted_nystrom)
    monkeypatch.setattr(SoftmaxAttention, "attend", counted_softmax)
    mech = build_mechanism("nystromformer", DIM, HEADS, landmarks=4)
    mask = torch.arange(N) < torch.arange(1, N + 1)[:, None]  # (N, N): lengths 1 .. N, all distinct
    mech(torch.randn(N, N, DIM), mask=mask)
    assert calls == {"nystrom": 1, "softmax": 1}
