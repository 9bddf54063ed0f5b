"""Results on disk: where runs write, tidy CSV tables written atomically, the context every run
carries, and the readers that turn a damaged file into one line naming it.

Where results go (paths relative to the working directory; ``results/README.md`` shows the tree):

    results/local/<task>.csv     a user's task tables, and the plots drawn beside them   git-ignored
    results/runs/<time>-<what>/  run folders: training runs, sweeps, resolution probes  git-ignored
    results/reference/           the committed reference runs the README cites          tracked

Nothing writes under ``results/reference/`` unless ``--results`` or ``--out`` names it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import platform
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
from filelock import FileLock

from attnbench.results.schema import SchemaError, upgrade

RESULTS = Path("results")
LOCAL = RESULTS / "local"  # a user's task tables and their plots (git-ignored)
RUNS = RESULTS / "runs"  # run folders (git-ignored)
REFERENCE = RESULTS / "reference"  # committed reference runs: written only when --out/--results say so


def local_table(task: str) -> Path:
    """Where ``attnbench run --task TASK`` appends its row by default: ``results/local/TASK.csv``."""
    return LOCAL / f"{task}.csv"


def new_run_dir(name: str, seed: int | None = None) -> Path:
    """A new run folder's default path, ``results/runs/<YYYYmmdd-HHMMSS>-<name>[-seed<N>]-<token>``.

    The random token (8 hex digits) keeps apart runs of the same name and seed started in the
    same second, in one process or several: each gets a folder of its own.
    """
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    seeded = f"-seed{seed}" if seed is not None else ""
    return RUNS / f"{stamp}-{name}{seeded}-{secrets.token_hex(4)}"


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` (unique to this call) to write the new file to; when the
    block ends it replaces ``path`` in one rename, so a reader sees the old file or the new one,
    never half of one. If the block fails, the temporary file is removed and ``path`` is untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask's mode, as open()
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: never half-written."""
    with replacing(path) as tmp:
        tmp.write_text(text)


def write_table(path: Path, table: pd.DataFrame) -> None:
    write_atomic(path, table.to_csv(index=False))


def table_lock(path: Path) -> FileLock:
    """The lock of a shared table, ``.<name>.lock`` beside it: held while one process reads the
    table and writes it back, so that appends from any number of processes lose nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(path.with_name(f".{path.name}.lock"))


def append_rows(path: Path, rows: Sequence[dict[str, Any]], columns: list[str],
                then: Callable[[pd.DataFrame], pd.DataFrame] | None = None) -> pd.DataFrame:
    """Append ``rows`` to the CSV at ``path`` (created with ``columns`` first) under the table's
    lock, writing it atomically; returns the table as written. ``then``: a column that depends on
    every row (the accuracy sweep's ``selected``), brought up to date under the same lock."""
    with table_lock(path):
        table = read_table(path, columns)
        if not rows:
            return table
        new = pd.DataFrame(list(rows))
        table = new if table.empty else pd.concat([table, new], ignore_index=True)
        if then is not None:
            table = then(table)
        ordered = columns + [c for c in table.columns if c not in columns]
        table = table.reindex(columns=ordered)
        write_table(path, table)
        return table


def append_row(path: Path, row: dict[str, Any], columns: list[str],
               then: Callable[[pd.DataFrame], pd.DataFrame] | None = None) -> pd.DataFrame:
    """Append one row to the CSV at ``path``: ``append_rows`` of one."""
    return append_rows(path, [row], columns, then)


# The file that says which command's run a folder holds.
RUN_FILES = {"scale.csv": "a kernel sweep (`attnbench scale`)",
             "accuracy.csv": "an accuracy sweep (`attnbench scale --task`)",
             "resolution.csv": "a resolution probe (`attnbench resolution`)",
             "checkpoint.pt": "a training run (`attnbench run`)"}


def foreign_run(folder: Path, own: str) -> str | None:
    """What other command's run ``folder`` holds (``own``: the file of the asking command's runs),
    or None: an --out that would mix two kinds of run in one folder is refused."""
    return next((what for name, what in RUN_FILES.items() if name != own and (folder / name).exists()), None)


class ResultsError(ValueError):
    """A results file that cannot be read (not CSV or JSON, columns missing): one line naming it."""


def read_table(path: Path, columns: list[str] | None = None, required: Sequence[str] = (),
               numbers: Sequence[str] = (), ok_numbers: Sequence[str] = (),
               kind: str | None = None) -> pd.DataFrame:
    """The CSV table at ``path``; missing (or empty, unless columns are ``required``): an empty table
    of ``columns``. A file that is not a CSV table, lacks a ``required`` column, or holds no finite
    number in a ``numbers`` column of a row (``ok_numbers``: of a row whose status is ok) is a
    ``ResultsError``: plots and fits cannot stand on it. ``kind``: the table comes back in its kind's
    current layout (``schema.upgrade``); one from a newer attnbench is a ``ResultsError``."""
    table = _read_csv(path, columns, required, numbers, ok_numbers)
    try:
        return table if kind is None else upgrade(table, kind, str(path))
    except SchemaError as exc:
        raise ResultsError(str(exc)) from None


def _read_csv(path: Path, columns: list[str] | None, required: Sequence[str], numbers: Sequence[str],
              ok_numbers: Sequence[str]) -> pd.DataFrame:
    if not path.exists():
        return pd.DataFrame(columns=columns or [])
    if path.stat().st_size == 0:
        if required:
            raise ResultsError(f"{path}: an empty file; expected a CSV table with {', '.join(required)}")
        return pd.DataFrame(columns=columns or [])
    try:
        table = pd.read_csv(path, keep_default_na=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as exc:
        reason = " ".join(str(exc).split())
        raise ResultsError(f"{path}: not a readable CSV table ({reason})") from None
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise ResultsError(f"{path}: not an attnbench table: no column {', '.join(missing)}")
    ok = table["status"] == "ok" if "status" in table.columns else pd.Series(True, index=table.index)
    for names, rows, which in ((numbers, table, "every row"),
                               (ok_numbers, table[ok], "every row of status ok")):
        for name in (c for c in names if c in table.columns):
            values = pd.to_numeric(rows[name], errors="coerce").astype(float)
            bad = values.index[~values.map(math.isfinite)]
            if len(bad):
                raw = rows.at[bad[0], name]
                shown = "empty or NaN" if pd.isna(raw) else repr(raw)
                raise ResultsError(f"{path}: row {bad[0] + 1}: {name} is {shown}; expected a finite number "
                                   f"in {which} (a damaged table)")
    return table


def read_meta(path: Path) -> dict[str, Any]:
    """The JSON object at ``path`` (a run's ``meta.json``); missing: ``{}``; anything else is a
    ``ResultsError``."""
    if not path.exists():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (ValueError, OSError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ResultsError(f"{path}: not readable JSON ({' '.join(str(exc).split())})") from None
    if not isinstance(meta, dict):
        raise ResultsError(f"{path}: expected a JSON object, found {type(meta).__name__}")
    return meta


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


SEED_COLUMN = "seed"
TASK_TABLE_REQUIRED = ("task", "mechanism", "dataset", SEED_COLUMN)  # what aggregates over seeds stand on


def read_task_table(path: Path) -> pd.DataFrame:
    """A task results table (``results/local/<task>.csv``) as plots and the report read it: without
    a ``seed`` column, say, its rows cannot be told apart as seeds, and it is a ``ResultsError``."""
    return read_table(path, required=TASK_TABLE_REQUIRED, kind="task")


def flag(table: pd.DataFrame, column: str) -> pd.Series:
    """A boolean column as written to CSV (True/False, empty for failures); False where missing."""
    if column not in table.columns:
        return pd.Series(False, index=table.index)
    return table[column].map(lambda v: v is True or str(v).strip().lower() == "true")
