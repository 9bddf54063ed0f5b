"""Test plug-in mechanisms with a causal form, for the causal tasks' tests (MQAR's causal form, the
language model) while no built-in mechanism defines ``mix_causal`` on this branch.

``causal_softmax`` is dense softmax attention whose causal form masks the scores above the
diagonal; ``leaky_causal`` is the same but lets the next token through, so that a test can show it
catches a leak. Tests load this file with ``registry.load_module`` (and pass it to sweeps with
``--load``); they never import it, which would register the classes a second time.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from attnbench import Flops, Mechanism, register_mechanism
from attnbench.mechanism import merge_heads, split_heads


@register_mechanism
class CausalSoftmax(Mechanism):
    """softmax(Q Kᵀ / √d) V over all tokens; causal: scores above the diagonal masked out."""

    name = "causal_softmax"
    summary = "dense softmax attention with a masked causal form (tests)"
    complexity = "quadratic"
    no_causal_reason = ""
    offset = 0  # the causal form lets tokens up to t + offset through (0: none after t)

    def __init__(self, dim: int, num_heads: int, options=None) -> None:
        super().__init__(dim, num_heads, options)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def _attend(self, x: Tensor, causal: bool) -> Tensor:
        q, k, v = (split_heads(t, self.num_heads) for t in self.qkv(x).chunk(3, dim=-1))  # (B, H, N, d)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)  # (B, H, N, N)
        if causal:
            n = x.shape[1]
            later = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1 + self.offset)
            scores = scores.masked_fill(later, float("-inf"))
        return self.proj(merge_heads(scores.softmax(-1) @ v))

    def mix(self, x: Tensor, grid) -> Tensor:
        return self._attend(x, causal=False)

    def mix_causal(self, x: Tensor) -> Tensor:
        return self._attend(x, causal=True)

    def flops(self, batch: int, n: int, grid=None) -> Flops:
        return Flops(matmul=2 * batch * n * self.dim * self.dim * 4 + 4 * batch * n * n * self.dim)


@register_mechanism
class LeakyCausal(CausalSoftmax):
    """A planted leak: its "causal" form lets each token see the one after it."""

    name = "leaky_causal"
    summary = "a causal form that leaks one future token (tests)"
    offset = 1
