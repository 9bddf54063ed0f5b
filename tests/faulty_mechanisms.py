"""Mechanisms that fail on purpose (raise, hang, run out of memory, break the compiler), for the
tests that check a sweep records each failure and goes on.

Tests load this file with ``--load`` (``registry.load_module``) so that the sweep's worker
processes load it too; they never import it, which would register every class a second time
under another module name.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import nn

from attnbench import Flops, Mechanism, register_mechanism


class _Base(Mechanism):
    """A linear projection with a FLOP count: all a sweep needs before the failure."""

    complexity = "linear"

    def __init__(self, dim: int, num_heads: int, options=None) -> None:
        super().__init__(dim, num_heads, options)
        self.proj = nn.Linear(dim, dim)

    def flops(self, batch: int, n: int, grid=None) -> Flops:
        return Flops(matmul=2 * batch * n * self.dim * self.dim)


@register_mechanism
class Boom(_Base):
    """Raises at every n."""

    name = "faulty_boom"

    def mix(self, x, grid):
        raise RuntimeError(f"boom at n={x.shape[1]}")


@register_mechanism
class Hog(_Base):
    """Asks for 4 TiB: out of memory on any machine (under a sweep's memory cap, an error it records)."""

    name = "faulty_hog"

    def mix(self, x, grid):
        return self.proj(x) + torch.ones(2**40, dtype=torch.float32).sum()


@register_mechanism
class UntouchedHog(_Base):
    """Reserves 3 GiB it never touches: fails only under a sweep's memory limit."""

    name = "fake_hog"

    def mix(self, x, grid):
        return self.proj(x) + torch.empty(3 * 2**30, dtype=torch.uint8)[:1].float()


@register_mechanism
class Sleepy(_Base):
    """Sleeps far past a test's time budget at every n."""

    name = "faulty_sleepy"
    sleep_s = 60

    def mix(self, x, grid):
        time.sleep(self.sleep_s)
        return self.proj(x)


@register_mechanism
class LongSleepy(Sleepy):
    """Sleepy for twice as long (the accuracy sweep's)."""

    name = "fake_sleepy"
    sleep_s = 120


@register_mechanism
class SleepyFrom32(_Base):
    """Measures at once at n = 16; at n >= 32 writes its pid to the file named by $SLEEPY_MARKER
    and sleeps $SLEEPY_S seconds (300 unless set; 0 lets a resumed sweep finish), so that a sweep
    over 16,32 stays mid-configuration, in a worker, for as long as a test needs."""

    name = "sleepy_from_32"

    def mix(self, x, grid):
        sleep_s = float(os.environ.get("SLEEPY_S", "300"))
        if x.shape[1] >= 32 and sleep_s > 0:
            Path(os.environ["SLEEPY_MARKER"]).write_text(str(os.getpid()))
            time.sleep(sleep_s)
        return self.proj(x)


@register_mechanism
class Uncompilable(_Base):
    """Runs eagerly; under ``torch.compile`` its graph break is an error."""

    name = "faulty_uncompilable"

    def mix(self, x, grid):
        with torch._dynamo.error_on_graph_break(True):
            y = self.proj(x)
            torch._dynamo.graph_break()
            return y


class _Prefix(_Base):
    """A causal mean: the output at t is the projected mean of tokens 0..t (sound on its own)."""

    def mix(self, x, grid):
        return self.proj(x.mean(1, keepdim=True).expand_as(x))

    def prefix_mean(self, x):
        count = torch.arange(1, x.shape[1] + 1, dtype=x.dtype, device=x.device)[:, None]
        return x.cumsum(1) / count  # (B, N, C)

    @staticmethod
    def next_token(x):
        """x shifted one place back: position t holds token t + 1 (zero at the end)."""
        return torch.nn.functional.pad(x[:, 1:], (0, 0, 0, 1))


@register_mechanism
class PlantedLeak(_Prefix):
    """The causal mean plus the next token: one future token leaks into every output."""

    name = "faulty_leak"

    def mix_causal(self, x):
        return self.proj(self.prefix_mean(x) + 0.1 * self.next_token(x))


@register_mechanism
class PlantedGradientLeak(_Prefix):
    """The causal mean whose values are sound but whose gradient reaches the next token
    (``next - next.detach()`` is zero, its derivative is not): only the gradient check sees it."""

    name = "faulty_gradient_leak"

    def mix_causal(self, x):
        ahead = self.next_token(x)
        return self.proj(self.prefix_mean(x) + (ahead - ahead.detach()))


@register_mechanism
class CausalOnly(_Base):
    """Runs only when called with causal=True, so a causal sweep shows that causal reached the
    call; its ``flops`` predates ``causal`` (a plug-in written before it)."""

    name = "faulty_causal_only"

    def mix(self, x, grid):
        raise RuntimeError("called without causal=True")

    def mix_causal(self, x):
        return self.proj(x)
