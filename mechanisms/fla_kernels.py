"""flash-linear-attention's (fla) chunked Triton kernels for the gated linear recurrences: whether
one can run here, and if not why and the fix. A module of shared helpers; it registers no mechanism.

fla's kernels take attnbench's heads-last layout as it is: q, k (B, N, H, dk), v (B, N, H, dv),
per-head gates (B, N, H), per-channel gates (B, N, H, dk). They run on CUDA GPUs in float32,
float16 or bfloat16; everywhere else the mechanisms run their chunked PyTorch form
(``mechanisms.chunked``). fla is imported only when a CUDA device asks for it: on a machine without
a Triton GPU backend its import warns and falls back to the CPU, where its kernels cannot run.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import re
import warnings
from collections.abc import Callable

import torch

#: The fla release range attnbench is written against (the kernels' keyword arguments change
#: between minor releases); pyproject's test extra pins the same range.
REQUIREMENT = "fla-core>=0.6,<0.7"
RELEASES = ((0, 6), (0, 7))  # the same range: at least the first, below the second
FIX = f"pip install '{REQUIREMENT}'"

#: kernel name -> (module, function) in fla
KERNELS: dict[str, tuple[str, str]] = {
    "retention": ("fla.ops.retention", "chunk_retention"),
    "simple_gla": ("fla.ops.simple_gla", "chunk_simple_gla"),
    "gla": ("fla.ops.gla", "chunk_gla"),
    "gated_delta_rule": ("fla.ops.gated_delta_rule", "chunk_gated_delta_rule"),
    "based": ("fla.ops.based", "fused_chunk_based"),
}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def installed_version() -> str | None:
    """The installed fla-core's version (read from its metadata, nothing imported), or None."""
    try:
        return importlib.metadata.version("fla-core")
    except importlib.metadata.PackageNotFoundError:
        return None


def static_problem(version: str | None = None) -> str | None:
    """What the installed files alone say against fla's kernels (not installed, or a release outside
    the range), without importing fla; None when nothing does. ``version``: the installed one."""
    version = installed_version() if version is None else version
    if version is None:
        return (f"flash-linear-attention is not installed; fix: `{FIX}` (scripts/setup.sh installs it with "
                "the test tools)")
    found = re.match(r"\s*(\d+)\.(\d+)", version)
    if found is None or not RELEASES[0] <= (int(found[1]), int(found[2])) < RELEASES[1]:
        wanted = REQUIREMENT.removeprefix("fla-core")
        return (f"fla-core {version} is installed, attnbench calls the kernels of {wanted} (their arguments "
                f"change between releases); fix: `{FIX}`")
    return None


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


@functools.cache
def import_problem(name: str) -> str | None:
    """Import fla's kernel ``name``; None when it loads and fla found a Triton GPU backend."""
    module, function = KERNELS[name]
    version = installed_version()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fla's fall-back-to-CPU warning: the reason is returned
            getattr(importlib.import_module(module), function)
            from fla.utils import device_platform
    except Exception as exc:  # a broken install must not take the registry down
        return f"fla-core {version} cannot be imported ({_one_line(exc)}); fix: `{FIX}`"
    if device_platform not in ("cuda", "hip"):
        return (f"fla-core {version} found no Triton GPU backend (it reports {device_platform!r}); "
                f"fix: the triton release that torch {torch.__version__} requires, then `{FIX}`")
    return None


def fla_problem(name: str, device: str | torch.device, dtype: torch.dtype) -> str | None:
    """Why fla's kernel ``name`` cannot run on ``device`` for ``dtype``, in one line; None when it can."""
    kind = torch.device(device).type
    if kind != "cuda":
        return f"fla's Triton kernels run on CUDA GPUs only, not on {kind}"
    if dtype not in DTYPES:
        return f"fla's kernels take float32, float16 or bfloat16, not {str(dtype).removeprefix('torch.')}"
    if not torch.cuda.is_available():
        return "CUDA is not available on this machine"
    return static_problem() or import_problem(name)


def kernel(name: str) -> Callable:
    """fla's function for kernel ``name`` (call only where ``fla_problem`` is None)."""
    module, function = KERNELS[name]
    return getattr(importlib.import_module(module), function)


def describe(name: str) -> str:
    """``fla-core 0.6.0: fla.ops.gla.chunk_gla``: what runs where fla does."""
    module, function = KERNELS[name]
    return f"fla-core {installed_version()} Triton: {module}.{function}"
