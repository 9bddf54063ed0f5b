"""Small C kernels for mechanisms, where eager PyTorch leaves a memory-bound loop at twice the
floor: compiled once per machine with the system C compiler and OpenMP, cached, loaded with
ctypes. The library binds to the OpenMP runtime torch has already loaded (the same soname), so
its threads are torch's threads. Without a compiler ``load`` says why, and the caller falls back
to its PyTorch path."""

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
    return next((shutil.which(n) for n in names if shutil.which(n)), None)


@functools.cache
def load(source: Path) -> ctypes.CDLL:
    """The shared library built from the C file ``source``, compiled on first use (-march=native:
    the cache key holds the compiler, the flags and the CPU). Raises NativeUnavailable."""
    if os.environ.get("ATTNBENCH_NATIVE", "1") == "0":
        raise NativeUnavailable("native kernels are switched off (ATTNBENCH_NATIVE=0)")
    if platform.system() != "Linux":
        raise NativeUnavailable(f"native kernels are built on Linux only, not {platform.system()}")
    cc = compiler()
    if cc is None:
        raise NativeUnavailable("no C compiler found (set CC, or install gcc)")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise NativeUnavailable(f"{cc} --version failed: {e}") from None
    from attnbench.results import cpu_model  # (pandas with it: imported on first use only)

    text = Path(source).read_bytes()
    key = hashlib.sha256(b"\0".join([text, version.encode(), " ".join(FLAGS + LIBS).encode(),
                                     cpu_model().encode(), platform.machine().encode()])).hexdigest()[:16]
    target = cache_dir() / f"{Path(source).stem}-{key}.so"
    if not target.exists():
        _compile(cc, Path(source), target)
    try:
        return ctypes.CDLL(str(target))
    except OSError as e:
        raise NativeUnavailable(f"cannot load {target}: {e}") from None


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
