"""Incremental decoding: the caches that ``Mechanism.prefill`` builds and ``step`` advances, and the
checks every mechanism's prefill and step share.

A cache holds what the next token needs of the tokens before it, per sequence of the batch:
``KVCache`` every key and value, in buffers allocated once at prefill for the capacity asked (a
step writes one slot per sequence in place, never reallocating); ``StateCache`` a recurrent state
of fixed size (linear attention's Σ φ(k)vᵀ and Σ φ(k)), updated in place; ``WindowCache`` the last
keys and values of a local window, in a ring of fixed size. Prompts may be right-padded (``mask``
True at each sequence's first L tokens): a sequence then holds its L real tokens only, and its
next token follows them.

Every cache can ``snapshot`` and ``restore`` itself (the decode sweep times many steps at one
context length) and names the ``tensors`` it holds, whose bytes are the measured cache memory.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from attnbench.mechanism import DecodeCache, Mechanism
from attnbench.registry import OptionError


def prompt_lengths(module: Mechanism, x: Tensor, capacity: int, mask: Tensor | None) -> list[int]:
    """Check a prompt ``x: (B, N, C)`` for ``prefill`` (``mask``: right padding only; room for
    ``capacity >= N`` tokens) and return each sequence's number of real tokens (one host read).
    A mechanism that refuses decoding (one that inherits a prefill it cannot use) says why."""
    refuse_unless_decoding(module)
    if x.dim() != 3 or x.shape[-1] != module.dim:
        raise ValueError(f"{module.name}: expected a prompt x of shape (B, N, C={module.dim}), "
                         f"got {tuple(x.shape)}")
    n = x.shape[1]
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < n:
        raise ValueError(f"{module.name}: capacity={capacity!r} must be an int >= the prompt's N={n} "
                         "(the tokens held after the last step)")
    if mask is None:
        return [n] * x.shape[0]
    module._check_mask(x, None, mask)
    lengths = mask.sum(-1)  # (B,)
    prefix = (mask == (torch.arange(n, device=mask.device) < lengths[:, None])).all()
    *lengths, right_padded = torch.cat([lengths, prefix[None].long()]).tolist()
    if not right_padded:
        raise ValueError(f"{module.name}: a prompt's mask must be right padding (each row True at its "
                         "first L tokens, then False); got a row with holes or left padding")
    return lengths


def refuse_unless_decoding(module: Mechanism) -> None:
    """``OptionError`` with the mechanism's reason where it does not decode."""
    problem = module.decode_problem()
    if problem is not None:
        raise OptionError(f"{module.name}: incremental decoding is not supported: {problem}")


def check_token(module: Mechanism, x: Tensor, cache: DecodeCache) -> None:
    """One new token per sequence of the cache: ``x: (B, 1, C)``."""
    if not isinstance(cache, DecodeCache):
        refuse_unless_decoding(module)
        raise TypeError(f"{module.name}: step takes the cache that prefill returned, "
                        f"got {type(cache).__name__}")
    batch = cache.batch
    if x.dim() != 3 or x.shape[0] != batch or x.shape[1] != 1 or x.shape[-1] != module.dim:
        raise ValueError(f"{module.name}: step takes one token per sequence, x of shape "
                         f"(B={batch}, 1, C={module.dim}); got {tuple(x.shape)}")


def zero_padding(out: Tensor, mask: Tensor | None) -> Tensor:
    """A prefill's output (B, N, C) with zeros at padding, as ``forward`` gives."""
    return out if mask is None else out.masked_fill(~mask.unsqueeze(-1), 0)


class Positions:
    """Tokens held per sequence: on the host (which slots a step reads: no device sync) and on the
    device (where each sequence writes)."""

    def __init__(self, lengths: list[int], device: torch.device) -> None:
        self.lengths = list(lengths)
        self.device_lengths = torch.tensor(lengths, device=device)  # (B,)
        self.ragged = len(set(lengths)) > 1

    @property
    def longest(self) -> int:
        return max(self.lengths)

    def advance(self) -> None:
        self.lengths = [n + 1 for n in self.lengths]
        self.device_lengths += 1

    def snapshot(self) -> tuple[list[int], Tensor]:
        return list(self.lengths), self.device_lengths.clone()

    def restore(self, snapshot: tuple[list[int], Tensor]) -> None:
        self.lengths = list(snapshot[0])
        self.device_lengths.copy_(snapshot[1])


class KVCache(DecodeCache):
    """Keys and values of every token so far, in buffers of ``capacity`` tokens allocated at
    prefill: ``k``, ``v`` of shape (B, H_kv, capacity, d) (``token_dim=2``) or (B, capacity, H_kv, d)
    (``token_dim=1``, the layout of kernels that take heads last)."""

    def __init__(self, k: Tensor, v: Tensor, lengths: list[int], capacity: int, token_dim: int = 2) -> None:
        shape = list(k.shape)
        prompt, shape[token_dim] = shape[token_dim], capacity
        # zeros, not empty: the slots past a padded prompt are masked out of attention, but masked
        # weights times a NaN left in uninitialised memory are still NaN
        self.k, self.v = k.new_zeros(shape), v.new_zeros(shape)
        self.k.narrow(token_dim, 0, prompt).copy_(k)
        self.v.narrow(token_dim, 0, prompt).copy_(v)
        self.token_dim, self.capacity = token_dim, capacity
        self.positions = Positions(lengths, k.device)
        self.rows = torch.arange(len(lengths), device=k.device)

    @property
    def batch(self) -> int:
        return len(self.positions.lengths)

    def append(self, k: Tensor, v: Tensor) -> None:
        """Write one token per sequence (``k``, ``v`` in the cache's layout, one token long) after
        each sequence's last, in place."""
        at = self.positions
        if at.longest >= self.capacity:
            raise ValueError(f"decode cache full: it holds {self.capacity} tokens (the capacity given to "
                             "prefill); prefill with a larger capacity")
        if not at.ragged:
            self.k.narrow(self.token_dim, at.longest, 1).copy_(k)
            self.v.narrow(self.token_dim, at.longest, 1).copy_(v)
        elif self.token_dim == 2:  # slot lengths[b] of sequence b
            self.k[self.rows, :, at.device_lengths] = k[:, :, 0]
            self.v[self.rows, :, at.device_lengths] = v[:, :, 0]
        else:
            self.k[self.rows, at.device_lengths] = k[:, 0]
            self.v[self.rows, at.device_lengths] = v[:, 0]
        at.advance()

    def view(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """Keys and values up to the longest sequence (views, no copy), and which of them each
        sequence holds: ``(B, L)`` bool, or None when every sequence holds them all."""
        longest = self.positions.longest
        k, v = self.k.narrow(self.token_dim, 0, longest), self.v.narrow(self.token_dim, 0, longest)
        if not self.positions.ragged:
            return k, v, None
        held = torch.arange(longest, device=k.device) < self.positions.device_lengths[:, None]
        return k, v, held

    def snapshot(self) -> Any:
        return self.positions.snapshot()  # slots past a sequence's length are never read

    def restore(self, snapshot: Any) -> None:
        self.positions.restore(snapshot)

    def tensors(self) -> list[Tensor]:
        return [self.k, self.v]


class StateCache(DecodeCache):
    """A recurrent state of fixed size: named tensors that ``step`` updates in place."""

    def __init__(self, lengths: list[int], **state: Tensor) -> None:
        self.state = state
        self.positions = Positions(lengths, next(iter(state.values())).device)

    @property
    def batch(self) -> int:
        return len(self.positions.lengths)

    def __getitem__(self, name: str) -> Tensor:
        return self.state[name]

    def snapshot(self) -> Any:
        return {k: t.clone() for k, t in self.state.items()}, self.positions.snapshot()

    def restore(self, snapshot: Any) -> None:
        state, positions = snapshot
        for name, saved in state.items():
            self.state[name].copy_(saved)
        self.positions.restore(positions)

    def tensors(self) -> list[Tensor]:
        return list(self.state.values())


class WindowCache(DecodeCache):
    """The last ``size`` keys and values of each sequence, in a ring: position p sits in slot
    p mod size of ``k``, ``v`` (B, H, size, d)."""

    def __init__(self, k: Tensor, v: Tensor, lengths: list[int], size: int) -> None:
        b, h, _, d = k.shape
        self.size = size
        self.positions = Positions(lengths, k.device)
        self.rows = torch.arange(b, device=k.device)
        # slot s holds the latest real position p < length with p ≡ s (mod size); p < 0: empty
        slots = torch.arange(size, device=k.device)
        last = self.positions.device_lengths[:, None] - 1  # (B, 1)
        source = (last - (last - slots) % size).clamp(min=0)  # (B, size)
        index = source[:, None, :, None].expand(b, h, size, d)
        self.k, self.v = k.gather(2, index), v.gather(2, index)  # (B, H, size, d)

    @property
    def batch(self) -> int:
        return len(self.positions.lengths)

    def append(self, k: Tensor, v: Tensor) -> None:
        """Write one token per sequence, ``k``, ``v`` (B, H, 1, d), over the oldest in its ring."""
        slot = self.positions.device_lengths % self.size  # (B,)
        self.k[self.rows, :, slot] = k[:, :, 0]
        self.v[self.rows, :, slot] = v[:, :, 0]
        self.positions.advance()

    def gather(self, back: Tensor, first: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """For the newest token t of each sequence, the keys and values at positions t − back
        (``back``: (K,) offsets, each < size) that are >= ``first`` (B,): k, v (B, H, K, d) and
        (B, K) bool, True where the position is one of them."""
        newest = self.positions.device_lengths - 1  # (B,)
        where = newest[:, None] - back  # (B, K)
        held = where >= first[:, None]
        slot = where % self.size
        k = self.k[self.rows[:, None], :, slot]  # (B, K, H, d)
        v = self.v[self.rows[:, None], :, slot]
        return k.transpose(1, 2), v.transpose(1, 2), held

    def snapshot(self) -> Any:
        return self.k.clone(), self.v.clone(), self.positions.snapshot()

    def restore(self, snapshot: Any) -> None:
        k, v, positions = snapshot
        self.k.copy_(k)
        self.v.copy_(v)
        self.positions.restore(positions)

    def tensors(self) -> list[Tensor]:
        return [self.k, self.v]
