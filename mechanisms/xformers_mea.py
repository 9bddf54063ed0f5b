"""Softmax attention through ``xformers.ops.memory_efficient_attention`` (CUDA only).

The same function and parameters as ``softmax`` (weights load across), computed by xformers'
fused kernels on tensors in its (B, N, H, d) layout. It never falls back to another
implementation: where xformers cannot run (no CUDA, xformers missing, or its C++/CUDA extensions
failed to load, e.g. built for another PyTorch) ``unavailable_reason`` says why and ``forward``
raises. xformers is imported lazily, and only where its build names the installed torch.

An xformers wheel's C++/CUDA extension loads only beside the PyTorch release it was built for,
which the wheel records in ``xformers/cpp_lib.json`` (``{"version": {"torch": "2.10.0+cu128",
"cuda": 1208, ...}}``). That file is read without importing xformers, so a mismatch is named
(installed torch, required torch, and the command that installs a matching set) even on a machine
where xformers would only print its load warning; the same facts are parsed out of xformers' own
load-failure text when the file is missing.

The causal form passes xformers' ``LowerTriangularMask`` bias: its kernels then skip the key tiles
above the diagonal.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from attnbench.decoding import KVCache, check_token, prompt_lengths, zero_padding
from attnbench.mechanism import Grid
from attnbench.registry import register_mechanism
from mechanisms.softmax import SoftmaxAttention

#: The command that installs a torch / torchvision / xformers set whose versions match.
FIX = "bash scripts/setup.sh --cuda"


@dataclasses.dataclass(frozen=True)
class XFormersBuild:
    """What an installed xformers says of itself, read from its files (nothing imported)."""

    version: str  # xformers' own version, e.g. "0.0.35"
    torch: str | None = None  # the PyTorch its extension was built for, e.g. "2.10.0+cu128"
    cuda: str | None = None  # the CUDA it was built with, e.g. "12.8"; None for a CPU or ROCm build


def release(version: str) -> str:
    """The release part of a version: "2.10.0+cu128" -> "2.10.0", "2.15.0.dev20260101" -> "2.15.0"."""
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
    return match.group(1) if match else version.strip()


def cuda_text(code: object) -> str | None:
    """xformers' CUDA code as a version: 1208 -> "12.8", 12080 -> "12.8", "12.8" -> "12.8"."""
    if code is None or isinstance(code, bool):
        return None
    text = str(code).strip()
    if re.fullmatch(r"\d{4,5}", text):  # 1208 (cpp_lib.json) or 12080 (CUDA_VERSION)
        number = int(text)
        major = number // 1000 if number >= 10000 else number // 100
        minor = (number % 1000) // 10 if number >= 10000 else number % 100
        return f"{major}.{minor}"
    return text if re.fullmatch(r"\d+(\.\d+)*", text) else None


def parse_build_info(metadata: object) -> tuple[str | None, str | None]:
    """(torch, cuda) from the contents of xformers' ``cpp_lib.json``; (None, None) if unreadable."""
    version = metadata.get("version") if isinstance(metadata, dict) else None
    if not isinstance(version, dict):
        return None, None
    built_for = version.get("torch")
    return (built_for.strip() if isinstance(built_for, str) and built_for.strip() else None,
            cuda_text(version.get("cuda")))


_LOAD_FAILURE = re.compile(r"PyTorch\s+(?P<torch>\S+)\s+with\s+CUDA\s+(?P<cuda>\S+)\s*"
                           r"\(you\s+have\s+(?P<have>[^)\s]+)\s*\)")


def parse_load_failure(text: str) -> tuple[str | None, str | None, str | None]:
    """(required torch, its CUDA, installed torch) from xformers' "can't load" text, else Nones.

    The text reads "xFormers was built for: PyTorch 2.10.0+cu128 with CUDA 1208 (you have
    2.14.1+cu130) Python 3.10.19 (you have 3.11.7)", on one line or several."""
    match = _LOAD_FAILURE.search(text or "")
    if match is None:
        return None, None, None
    return match["torch"], cuda_text(match["cuda"]), match["have"]


def installed_build() -> XFormersBuild | None:
    """The installed xformers' version and build info, from its files; None when not installed."""
    try:
        spec = importlib.util.find_spec("xformers")  # a top-level name: finds, does not import
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    version = "unknown version"
    try:
        found = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", (folder / "version.py").read_text())
        version = found.group(1) if found else version
    except OSError:
        pass
    try:
        built_for, cuda = parse_build_info(json.loads((folder / "cpp_lib.json").read_text()))
    except (OSError, ValueError):
        built_for, cuda = None, None
    return XFormersBuild(version, built_for, cuda)


def mismatch(build: XFormersBuild, have: str, have_cuda: str | None = None) -> str:
    """One line: the torch xformers needs, the torch installed, and the command that fixes it."""
    need = f"torch {build.torch}" + (f" (CUDA {build.cuda})" if build.cuda else "")
    got = f"torch {have}" + (f" (CUDA {have_cuda})" if have_cuda else "")
    return (f"xformers {build.version} was built for {need}, but {got} is installed: its C++/CUDA "
            f"kernels cannot load; fix: `{FIX}` (installs a matching torch/torchvision/xformers set)")


def _import_problem(build: XFormersBuild) -> str | None:
    """Import xformers (its build matches the installed torch) and report whether its extension loaded."""
    quiet = logging.getLogger("xformers")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # its load warning: the reason is returned instead
    try:
        import xformers
        from xformers import _cpp_lib
    except Exception as exc:  # an install broken in another way must not take the registry down
        return f"xformers {build.version} cannot be imported ({type(exc).__name__}: {exc}); try `{FIX}`"
    finally:
        quiet.setLevel(level)
    if getattr(xformers, "_has_cpp_library", False):
        return None
    text = " ".join(str(getattr(_cpp_lib, "_cpp_library_load_exception", "")).split())  # one line
    need, need_cuda, have = parse_load_failure(text)
    if need is not None and have is not None and need != have:
        return mismatch(XFormersBuild(build.version, need, need_cuda), have, torch.version.cuda)
    return f"xformers {build.version}: {text or 'its C++/CUDA extension did not load'}; try `{FIX}`"


def diagnose(build: XFormersBuild | None, have: str, have_cuda: str | None,
             load: Callable[[XFormersBuild], str | None] = _import_problem) -> str | None:
    """Why xformers' fused attention cannot load beside torch ``have``; None when it can.

    A release mismatch between the torch the build names and the installed one is decided from
    the files alone; otherwise ``load`` imports xformers and reports what it says."""
    if build is None:
        return f"xformers is not installed; `{FIX}` installs it with the torch it was built for"
    if build.torch is not None and release(build.torch) != release(have):
        return mismatch(build, have, have_cuda)
    return load(build)


def static_problem() -> str | None:
    """The mismatch that the installed files alone show (no import), or None."""
    build = installed_build()
    if build is None or build.torch is None:
        return None
    return diagnose(build, torch.__version__, torch.version.cuda, load=lambda _: None)


@functools.cache
def xformers_problem() -> str | None:
    """Why xformers' fused attention cannot load here, in one line; None when it can."""
    return diagnose(installed_build(), torch.__version__, torch.version.cuda)


@register_mechanism
class XFormersAttention(SoftmaxAttention):
    name = "xformers"
    summary = "softmax attention via xformers.ops.memory_efficient_attention (CUDA only)"
    devices = ("cuda",)
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    flops_countable = False  # xformers' custom kernels are invisible to FlopCounterMode
    masking = "per-length"  # no attention bias here: padded batches run per length of real tokens

    @classmethod
    def unavailable_reason(cls, device: str = "cpu") -> str | None:
        kind = torch.device(device).type
        if kind != "cuda":
            reason = f"xformers.ops.memory_efficient_attention runs on CUDA GPUs only, not on {kind}"
            problem = static_problem()  # what a CUDA machine with this install would also hit
            return f"{reason}; {problem}" if problem else reason
        reasons = [r for r in (super().unavailable_reason(device), xformers_problem()) if r]
        return "; ".join(reasons) or None

    @classmethod
    def backend(cls, device: str = "cpu", dtype: torch.dtype = torch.float32) -> str:
        """The xformers forward op its dispatcher picks for a (1, 64, 2, 32) problem of this dtype."""
        reason = cls.unavailable_reason(device)
        if reason:
            return f"xformers: unavailable ({reason})"
        import xformers
        from xformers.ops import fmha

        q = torch.zeros(1, 64, 2, 32, device=device, dtype=dtype)
        op = fmha._dispatch_fw(fmha.Inputs(query=q, key=q, value=q), needs_gradient=False)
        return f"xformers {xformers.__version__}: {op.NAME}"

    flops_formula = ("8·B·N·C² (projections) + 4·B·P·C (QKᵀ, AV over P query-key pairs per head); "
                     "elementwise 5·B·H·P. P = N², and N(N+1)/2 causal (its kernels skip the tiles "
                     "above the diagonal; the masked part of diagonal tiles is not counted)")

    def mix(self, x: Tensor, grid: Grid | None) -> Tensor:
        return self._attention(x, causal=False)

    def mix_causal(self, x: Tensor) -> Tensor:
        return self._attention(x, causal=True)

    def _attention(self, x: Tensor, causal: bool) -> Tensor:
        """memory_efficient_attention on (B, N, H, d) projections; ``causal``: keys after the query
        masked by its lower-triangular bias."""
        reason = self.unavailable_reason(x.device.type)
        if reason:
            raise RuntimeError(f"{self.name}: {reason}")
        from xformers.ops import LowerTriangularMask, memory_efficient_attention

        b, n, c = x.shape
        q, k, v = (t.transpose(1, 2) for t in self.qkv_heads(x))  # (B, N, H or H_kv, d)
        bias = LowerTriangularMask() if causal else None
        out = memory_efficient_attention(*grouped(q, k, v), attn_bias=bias)  # scale 1/√d
        return self.proj(out.reshape(b, n, c))

    def score_pairs(self, n: int, causal: bool) -> int:
        return n * (n + 1) // 2 if causal else n * n

    # ---- incremental decoding: a key/value cache in xformers' (B, N, H_kv, d) layout ------------
    def prefill(self, x: Tensor, capacity: int, mask: Tensor | None = None,
                outputs: bool = True) -> tuple[Tensor | None, KVCache]:
        lengths = prompt_lengths(self, x, capacity, mask)
        reason = self.unavailable_reason(x.device.type)
        if reason:
            raise RuntimeError(f"{self.name}: {reason}")
        from xformers.ops import LowerTriangularMask, memory_efficient_attention

        b, n, c = x.shape
        q, k, v = (t.transpose(1, 2) for t in self.qkv_heads(x))  # (B, N, H or H_kv, d)
        out = None
        if outputs:  # right padding comes after every real query: the causal form never reads it
            attended = memory_efficient_attention(*grouped(q, k, v), attn_bias=LowerTriangularMask())
            out = zero_padding(self.proj(attended.reshape(b, n, c)), mask)
        return out, KVCache(k, v, lengths, capacity, token_dim=1)

    def step(self, x: Tensor, cache: KVCache) -> Tensor:
        """The new token against every token held; sequences of a padded batch that hold as many
        tokens attend together (xformers takes no per-sequence key lengths without a bias)."""
        check_token(self, x, cache)
        from xformers.ops import memory_efficient_attention

        b, _, c = x.shape
        q, k, v = (t.transpose(1, 2) for t in self.qkv_heads(x))  # (B, 1, H or H_kv, d)
        cache.append(k, v)
        keys, values, held = cache.view()  # (B, L, H_kv, d) each
        if held is None:
            return self.proj(memory_efficient_attention(*grouped(q, keys, values)).reshape(b, 1, c))
        out = x.new_empty(b, 1, c)
        lengths = cache.positions.lengths
        for length in sorted(set(lengths)):
            rows = torch.tensor([i for i, n in enumerate(lengths) if n == length], device=x.device)
            group = grouped(q[rows], keys[rows, :length], values[rows, :length])
            out[rows] = memory_efficient_attention(*group).reshape(len(rows), 1, c)
        return self.proj(out)

    def cache_bytes(self, batch: int, n: int, dtype: torch.dtype) -> int:
        """Keys and values: 2·B·H_kv·n·d elements."""
        return 2 * batch * self.kv_heads * n * self.head_dim * dtype.itemsize


def grouped(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """xformers' layouts of q (B, N, H, d) and k, v (B, M, H_kv, d): as they are for H_kv = H, else
    its grouped (B, N, H_kv, H / H_kv, d) layout with each key/value head broadcast (stride 0)
    over its group, as xformers takes grouped-query attention."""
    b, n, h, d = q.shape
    kv_heads = k.shape[2]
    if kv_heads == h:
        return q, k, v
    group = h // kv_heads
    k, v = (t[:, :, :, None].expand(b, t.shape[1], kv_heads, group, d) for t in (k, v))
    return q.reshape(b, n, kv_heads, group, d), k, v
