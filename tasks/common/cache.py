"""Where the embedded data sets live, and how each is written once.

Every task without ``--data`` writes a small real data set into the official layout of its
benchmark, once, under ``$ATTNBENCH_CACHE`` (default ``$XDG_CACHE_HOME/attnbench``, else
``~/.cache/attnbench``), and then reads it through the same code as the real data.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path


def cache_root() -> Path:
    """Where embedded data sets are written: $ATTNBENCH_CACHE, else $XDG_CACHE_HOME/attnbench."""
    if os.environ.get("ATTNBENCH_CACHE"):
        return Path(os.environ["ATTNBENCH_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "attnbench"


def build_once(name: str, complete: Sequence[str], write: Callable[[Path], None],
               root: Path | None = None) -> Path:
    """The folder ``root/name`` (default root: ``cache_root()``), written by ``write(folder)`` on
    first use; it counts as written when every path of ``complete`` (relative to it) exists.

    ``write`` fills a new empty folder inside a temporary one, which is then renamed into place:
    concurrent writers (the ranks of a distributed run) and killed runs never leave half a set.
    """
    target = (root or cache_root()) / name
    done = lambda: all((target / path).exists() for path in complete)
    if done():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}."))
    try:
        (tmp / "set").mkdir()
        write(tmp / "set")
        try:
            (tmp / "set").rename(target)
        except OSError:  # another process finished first: theirs is as good as ours
            if not done():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
