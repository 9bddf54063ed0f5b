"""Small C kernels for mechanisms, where eager PyTorch leaves a memory-bound loop at twice the
floor: compiled once per machine with the system C compiler and OpenMP, cached, loaded with
ctypes. Where torch ships GNU OpenMP (its pip wheels: torch/lib/libgomp.so.1) the library binds
to that runtime, already loaded under the same soname, so its threads are torch's threads.
Without a compiler ``load`` says why, and the caller falls back to its PyTorch path."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = ("-O3", "-march=native", "-funroll-loops", "-fopenmp", "-fno-math-errno", "-fPIC", "-shared")
LIBS = ("-lm",)


class NativeUnavailable(RuntimeError):
    """The C kernel cannot be built or loaded here; the message says why in one line."""


def cache_dir() -> Path:
    """Where compiled kernels live: $ATTNBENCH_CACHE, else $XDG_CACHE_HOME or ~/.cache, /attnbench."""
    if os.environ.get("ATTNBENCH_CACHE"):
        return Path(os.environ["ATTNBENCH_CACHE"]) / "native"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "attnbench" / "native"


def compiler() -> str | None:
    """$CC, else the first of cc, gcc, clang on the PATH."""
    names = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
    return next(filter(None, map(shutil.which, names)), None)


def load(source: Path) -> ctypes.CDLL:
    """The shared library built from the C file ``source``, compiled on first use. Raises
    NativeUnavailable with the reason; a failure is remembered too (no second build per process)."""
    lib = _build(Path(source))
    if isinstance(lib, str):
        raise NativeUnavailable(lib)
    return lib


@functools.cache
def _build(source: Path) -> ctypes.CDLL | str:
    """``load``'s outcome, once per process: the library, or why there is none. The cache key
    holds the source, the compiler, the flags and what -march=native resolves to on this CPU."""
    if os.environ.get("ATTNBENCH_NATIVE", "1") == "0":
        return "native kernels are switched off (ATTNBENCH_NATIVE=0)"
    if platform.system() != "Linux":
        return f"native kernels are built on Linux only, not {platform.system()}"
    cc = compiler()
    if cc is None:
        return "no C compiler found (set CC, or install gcc)"
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        target_flags = subprocess.run([cc, "-march=native", "-Q", "--help=target"], capture_output=True,
                                      text=True, timeout=30).stdout  # gcc: the CPU's features; else ""
    except (OSError, subprocess.SubprocessError) as e:
        return f"{cc} --version failed: {e}"
    key = hashlib.sha256(b"\0".join([source.read_bytes(), version.encode(), target_flags.encode(),
                                     " ".join(FLAGS + LIBS).encode(), platform.machine().encode()]))
    target = cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"
    try:
        if not target.exists():
            _compile(cc, source, target)
        return ctypes.CDLL(str(target))
    except NativeUnavailable as e:
        return str(e)
    except OSError as e:
        return f"cannot load {target}: {e}"


def _compile(cc: str, source: Path, target: Path) -> None:
    """Compile to a temporary file beside ``target`` and rename it into place, so that concurrent
    first uses never load a half-written library."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
    except OSError as e:
        raise NativeUnavailable(f"cannot write the kernel cache {target.parent}: {e}") from None
    try:
        done = subprocess.run([cc, *FLAGS, "-o", tmp, str(source), *LIBS], capture_output=True,
                              text=True, timeout=300)
        if done.returncode != 0:
            first = next((ln for ln in done.stderr.splitlines() if "error" in ln), done.stderr.strip()[:200])
            raise NativeUnavailable(f"compiling {source.name} failed: {first}")
        os.replace(tmp, target)
    except (OSError, subprocess.SubprocessError) as e:
        raise NativeUnavailable(f"compiling {source.name} failed: {e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
