"""The mechanism contract: what every token mixer in the registry declares and obeys.

A mechanism maps tokens ``x: (B, N, C)`` to ``(B, N, C)``; ``grid=(H, W)`` is given for
image tokens (``H * W == N``, row-major) and is ``None`` for sequences. Everything a user or
the engine needs to know about it is declared once, as class attributes of its class.

Padding: sequences of a batch may carry ``mask: (B, N)`` bool, True at real tokens. The output
at a sequence's real tokens is then exactly the mechanism applied to those tokens alone, in
order, as if the padding were not there (no value, gradient or position leaks from it), and
the output at padding is zero. A mechanism honours the mask natively or, by default, runs each
group of equally long sequences without their padding (``masking`` says which).

Causal: ``forward(x, causal=True)`` makes the output at position t depend on tokens 0..t only
(values and gradients). Causality is defined on 1-D sequences (``grid=None``). A mechanism
supports it by writing ``mix_causal``; one that has no sound causal form leaves it out and says
why in ``no_causal_reason``, and ``causal=True`` is then refused with that reason. Of the two, the
one declared nearer in the class hierarchy decides, so a subclass of a causal mechanism refuses by
setting ``no_causal_reason`` alone. With padding, the causal form runs on each sequence's real
tokens alone, as the padding contract says. ``flops(..., causal=True)`` counts the causal form as
it runs: half the score products only where its kernel skips the masked half.

Decoding: a causal mechanism may also generate incrementally: ``prefill`` runs the causal form
over a prompt and returns a cache (a KV cache, a recurrent state, a rolling window;
``attnbench.decoding``), and ``step`` mixes one more token per sequence against it. Prefill and
steps reproduce the parallel causal forward at every position; a right-padded prompt's next token
follows its real tokens. A mechanism without them says why in ``no_decode_reason`` (as for causal,
the nearer of ``prefill`` and ``no_decode_reason`` in the class hierarchy decides).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from attnbench.registry import OptionError, check_ranges, make_options
from attnbench.validate import Range

Complexity = Literal["quadratic", "linear", "local"]
Masking = Literal["native", "per-length"]
Grid = tuple[int, int]


def require(condition: bool, message: str) -> None:
    """Raise ``OptionError(message)`` unless ``condition``: one line per option check."""
    if not condition:
        raise OptionError(message)


def option(default: float, lo: float, hi: float, *, lo_open: bool = False) -> Any:
    """A numeric option with its valid range, declared once: ``m: int = option(64, 1, 4096)``.
    The range is checked wherever options are made (``--opt``, ``build_mechanism``, a mechanism's
    constructor) and shown by ``attnbench list --mechanism NAME``; every range is finite."""
    return dataclasses.field(default=default, metadata={"range": Range(lo, hi, lo_open)})


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """For mechanisms without options of their own."""


@dataclasses.dataclass(frozen=True)
class Flops:
    """Analytic forward-pass cost. FLOPs, not MACs: a multiply-add counts 2.

    ``matmul`` counts matrix products only (what ``torch.utils.flop_counter`` sees);
    ``elementwise`` counts the rest that grows with the attention pattern (exp, sums,
    Sinkhorn updates), a few FLOPs per element, so iterative methods are not flattered.
    """

    matmul: int
    elementwise: int = 0

    @property
    def total(self) -> int:
        return self.matmul + self.elementwise


class Mechanism(nn.Module):
    """Base class of every token mixer. Subclasses set the class attributes and write ``mix``."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    complexity: ClassVar[Complexity]
    needs_grid: ClassVar[bool] = False
    devices: ClassVar[tuple[str, ...]] = ("cpu", "cuda")
    dtypes: ClassVar[tuple[torch.dtype, ...]] = (
        torch.float32, torch.float64, torch.float16, torch.bfloat16)
    flops_formula: ClassVar[str] = ""
    # True when every matmul runs through PyTorch ops that FlopCounterMode sees.
    flops_countable: ClassVar[bool] = True
    # native: mix_padded masks inside the batched computation; per-length: the base class runs
    # the real tokens of each group of equally long sequences through mix, without padding
    masking: ClassVar[Masking] = "per-length"
    # why the mechanism has no causal form (shown by `list` and in refused rows); a mechanism
    # that writes mix_causal supports causal=True and leaves this empty
    no_causal_reason: ClassVar[str] = "declares no causal form (it does not define mix_causal)"
    no_decode_reason: ClassVar[str] = "declares no incremental decoding (it does not define prefill and step)"

    def __init__(self, dim: int, num_heads: int, options: Any = None) -> None:
        super().__init__()
        require(isinstance(dim, int) and dim > 0, f"{self.name}: dim must be a positive int, got {dim!r}")
        require(isinstance(num_heads, int) and num_heads > 0,
                f"{self.name}: num_heads must be a positive int, got {num_heads!r}")
        require(dim % num_heads == 0,
                f"{self.name}: dim={dim} is not divisible by num_heads={num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.options = options if options is not None else self.make_options()
        if dataclasses.is_dataclass(self.options):  # options made directly, not by make_options
            check_ranges(type(self.options), self.name,
                         {f.name: getattr(self.options, f.name) for f in dataclasses.fields(self.options)})

    # ---- declared facts -------------------------------------------------------------------
    @classmethod
    def make_options(cls, **values: Any) -> Any:
        """The mechanism's options dataclass from keyword values (strings are converted)."""
        return make_options(cls.Options, cls.name, **values)

    @classmethod
    def unavailable_reason(cls, device: str = "cpu") -> str | None:
        """Why this mechanism cannot run on ``device`` here, or None when it can."""
        kind = torch.device(device).type
        if kind not in cls.devices:
            return f"supports {', '.join(cls.devices)} only, not {kind}"
        if kind == "cuda" and not torch.cuda.is_available():
            return "CUDA is not available on this machine"
        return None

    @classmethod
    def causal_problem(cls) -> str | None:
        """Why ``causal=True`` is refused, or None when the mechanism has a causal form: the nearer
        declaration in the class hierarchy decides, a ``mix_causal`` or a ``no_causal_reason``."""
        for klass in cls.__mro__:
            if "mix_causal" in vars(klass) and klass is not Mechanism:
                return None
            if "no_causal_reason" in vars(klass):
                return klass.no_causal_reason
        return cls.no_causal_reason

    @classmethod
    def decode_problem(cls) -> str | None:
        """Why incremental decoding is refused, or None when ``prefill`` and ``step`` exist."""
        causal = cls.causal_problem()
        if causal is not None:
            return f"no causal form: {causal}"
        for klass in cls.__mro__:
            if klass is Mechanism:
                break
            if "prefill" in vars(klass):
                return None if cls.step is not Mechanism.step else cls.no_decode_reason
            if "no_decode_reason" in vars(klass):
                return klass.no_decode_reason
        return cls.no_decode_reason

    @classmethod
    def backend(cls, device: str = "cpu", dtype: torch.dtype = torch.float32) -> str:
        """Which implementation actually runs on ``device`` for ``dtype`` (recorded with results)."""
        return "eager PyTorch"

    # ---- the contract -----------------------------------------------------------------------
    def forward(self, x: Tensor, grid: Grid | None = None, mask: Tensor | None = None,
                causal: bool = False) -> Tensor:
        """Mix tokens ``x: (B, N, C)``; ``grid=(H, W)`` for image tokens; ``mask: (B, N)`` bool,
        True at real tokens, for padded sequences; ``causal`` for left-to-right sequences.
        Returns ``(B, N, C)``, zero at padding."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"{self.name}: expected x of shape (B, N, C={self.dim}), "
                             f"got {tuple(x.shape)}")
        if causal:
            return self._forward_causal(x, grid, mask)
        if grid is not None:
            if len(grid) != 2 or grid[0] * grid[1] != x.shape[1]:
                raise ValueError(f"{self.name}: grid {tuple(grid)} does not match N={x.shape[1]} "
                                 "tokens (need H * W == N)")
            grid = (int(grid[0]), int(grid[1]))
        elif self.needs_grid:
            raise ValueError(f"{self.name}: needs a 2-D grid=(H, W) for its tokens; got grid=None")
        if mask is None:
            return self.mix(x, grid)
        if self._check_mask(x, grid, mask):  # no padding at all (a batch of full sequences): plain mix
            return self.mix(x, grid)
        out = self.mix_padded(x, mask) if self.masking == "native" else self._mix_per_length(x, mask)
        return out.masked_fill(~mask.unsqueeze(-1), 0)

    def _forward_causal(self, x: Tensor, grid: Grid | None, mask: Tensor | None) -> Tensor:
        """The causal branch of ``forward``: refused with the reason where there is no causal
        form; padded batches run each group of equal lengths without padding."""
        problem = self.causal_problem()
        if problem is not None:
            raise OptionError(f"{self.name}: causal=True is not supported: {problem}")
        if grid is not None:
            raise ValueError(f"{self.name}: causal attention is defined on 1-D sequences (grid=None); "
                             f"got grid={tuple(grid)}")
        if mask is None or self._check_mask(x, None, mask):
            return self.mix_causal(x)
        return self._mix_per_length(x, mask, causal=True).masked_fill(~mask.unsqueeze(-1), 0)

    def _check_mask(self, x: Tensor, grid: Grid | None, mask: Tensor) -> bool:
        """A one-line error for a mask that does not fit ``x``; True when every token is real
        (the one host read, for both)."""
        if grid is not None:
            raise ValueError(f"{self.name}: padding masks are for sequences (grid=None); got grid={grid}")
        if mask.dtype != torch.bool or tuple(mask.shape) != tuple(x.shape[:2]):
            raise ValueError(f"{self.name}: mask must be a bool tensor of shape (B, N)={tuple(x.shape[:2])}"
                             f" (True at real tokens), got {mask.dtype} {tuple(mask.shape)}")
        if mask.device != x.device:
            raise ValueError(f"{self.name}: mask is on {mask.device}, x on {x.device}")
        some, every = torch.stack([mask.any(-1).all(), mask.all()]).tolist()
        if not some:
            raise ValueError(f"{self.name}: every sequence needs at least one real token (a mask row "
                             "is all False)")
        return every

    def _mix_per_length(self, x: Tensor, mask: Tensor, causal: bool = False) -> Tensor:
        """``mix`` (``mix_causal`` when causal) on the real tokens of each group of equally long
        sequences; zeros at padding."""
        b, n, c = x.shape
        lengths = mask.sum(-1)  # (B,)
        flat = x.new_zeros(b * n, c)
        for length in lengths.unique().tolist():
            rows = (lengths == length).nonzero().squeeze(1)  # sequences with this many real tokens
            keep = mask[rows]  # (R, N), `length` True per row
            real = x[rows][keep].view(len(rows), length, c)  # (R, L, C), padding removed, order kept
            where = (rows[:, None] * n + torch.arange(n, device=x.device))[keep]  # flat token indices
            mixed = self.mix_causal(real) if causal else self.mix(real, None)
            flat = flat.index_copy(0, where, mixed.reshape(-1, c))
        return flat.view(b, n, c)

    def mix(self, x: Tensor, grid: Grid | None) -> Tensor:
        """The mechanism itself, on validated input."""
        raise NotImplementedError

    def mix_causal(self, x: Tensor) -> Tensor:
        """The causal form on validated sequences ``x: (B, N, C)`` (no padding): the output at t
        depends on ``x[:, :t + 1]`` only. Mechanisms without one leave this out."""
        raise NotImplementedError

    def prefill(self, x: Tensor, capacity: int, mask: Tensor | None = None,
                outputs: bool = True) -> tuple[Tensor | None, DecodeCache]:
        """The causal form over prompts ``x: (B, N, C)`` (``mask: (B, N)``, True at real tokens, for
        right-padded prompts) and a cache with room for ``capacity >= N`` tokens in all, so that
        ``step`` never reallocates. Returns ``(output (B, N, C), cache)``; ``outputs=False`` builds
        the cache alone (None for the output), where the prompt's outputs are not wanted."""
        raise OptionError(f"{self.name}: incremental decoding is not supported: {self.decode_problem()}")

    def step(self, x: Tensor, cache: DecodeCache) -> Tensor:
        """One new token per sequence ``x: (B, 1, C)`` after what ``cache`` holds; returns its output
        ``(B, 1, C)`` and advances the cache (a padded prompt's next token follows its real ones)."""
        raise OptionError(f"{self.name}: incremental decoding is not supported: {self.decode_problem()}")

    def cache_bytes(self, batch: int, n: int, dtype: torch.dtype) -> int:
        """Bytes of the cache that ``prefill`` allocates for ``batch`` sequences and a capacity of
        ``n`` tokens, by formula (what ``DecodeCache.nbytes`` measures)."""
        raise NotImplementedError

    def mix_padded(self, x: Tensor, mask: Tensor) -> Tensor:
        """Native masking (``masking = "native"``): sequences ``x: (B, N, C)`` with ``mask: (B, N)``;
        the output at real tokens must equal ``mix`` of those tokens alone."""
        raise NotImplementedError

    def flops(self, batch: int, n: int, grid: Grid | None = None, causal: bool = False) -> Flops:
        """Analytic FLOPs of one forward pass on ``batch`` sequences of ``n`` tokens; ``causal``:
        of the causal form, as its kernel performs it."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.num_heads}, options={self.options}"


def count_flops(module: Mechanism, batch: int, n: int, grid: Grid | None = None,
                causal: bool = False) -> Flops | None:
    """``module.flops`` of the forward that runs; None for a causal forward whose ``flops`` takes
    no ``causal`` (a plug-in written before it): its causal count is not declared. A mechanism
    that refuses causal is refused here too (``OptionError`` with its reason)."""
    if not causal:
        return module.flops(batch, n, grid)
    problem = module.causal_problem()
    if problem is not None:
        raise OptionError(f"{module.name}: causal=True is not supported: {problem}")
    parameters = inspect.signature(module.flops).parameters.values()
    if not any(p.name == "causal" or p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    return module.flops(batch, n, grid, causal=True)


class DecodeCache:
    """What ``step`` reads and advances. ``snapshot``/``restore`` put it back as it was (the decode
    sweep times many steps at one context length); ``tensors`` are what it holds, for its bytes
    (the per-sequence token counts, a few integers, are bookkeeping and not among them)."""

    @property
    def batch(self) -> int:
        """Sequences in the batch."""
        raise NotImplementedError

    def snapshot(self) -> Any:
        raise NotImplementedError

    def restore(self, snapshot: Any) -> None:
        raise NotImplementedError

    def tensors(self) -> list[Tensor]:
        raise NotImplementedError

    def nbytes(self) -> int:
        """Bytes the cache holds (each storage counted once): the measured cache memory."""
        seen: dict[int, int] = {}
        for t in self.tensors():
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return sum(seen.values())


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """(B, N, H*d) -> (B, H, N, d)."""
    b, n, c = x.shape
    return x.view(b, n, num_heads, c // num_heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """(B, H, N, d) -> (B, N, H*d)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def projection_flops(batch: int, n: int, dim: int, outputs: int) -> int:
    """FLOPs of ``outputs`` linear maps C -> C over ``batch * n`` tokens."""
    return 2 * batch * n * dim * dim * outputs
