"""Results on disk: tidy CSV tables written atomically, and the context every run carries."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_table(path: Path, table: pd.DataFrame) -> None:
    write_atomic(path, table.to_csv(index=False))


def append_row(path: Path, row: dict[str, Any], columns: list[str]) -> pd.DataFrame:
    """Append one row to the CSV at ``path`` (created with ``columns`` first), atomically."""
    table = read_table(path, columns)
    new = pd.DataFrame([row])
    table = new if table.empty else pd.concat([table, new], ignore_index=True)
    ordered = columns + [c for c in table.columns if c not in columns]
    table = table.reindex(columns=ordered)
    write_table(path, table)
    return table


def read_table(path: Path, columns: list[str] | None = None) -> pd.DataFrame:
    if path.exists():
        return pd.read_csv(path, keep_default_na=True)
    return pd.DataFrame(columns=columns or [])


def git_commit(root: Path | None = None) -> str:
    """The commit of the attnbench checkout, with ``-dirty`` when it has local changes."""
    root = root or Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_context(device: str, threads: int, argv: list[str] | None = None) -> dict[str, Any]:
    """Everything needed to know where a figure came from (goes to ``meta.json``)."""
    import torch

    ctx: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(argv if argv is not None else sys.argv),
        "git_commit": git_commit(),
        "device": device,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
        "cuda": torch.version.cuda if device.startswith("cuda") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {p: _version(p) for p in ("torch", "natten", "xformers", "numpy", "pandas",
                                              "attnbench")},
    }
    return ctx


def write_meta(path: Path, meta: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(meta, indent=2) + "\n")
