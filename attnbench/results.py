"""Results on disk: where runs write, tidy CSV tables written atomically, the context every run
carries, and the one aggregate over seeds that every plot, table and report stands on.

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
import warnings
from collections.abc import Callable, Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
from filelock import FileLock

from attnbench.schema import SchemaError, upgrade

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
    ``ResultsError``: plots and fits cannot stand on it. ``kind``: the table comes back in its
    kind's current layout (``attnbench.schema.upgrade``); one from a newer attnbench is a ``ResultsError``."""
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


# ---- seeds, not repeats ------------------------------------------------------------------------

# The columns of a task table that set up the experiment: rows that differ in any of them are
# different experiments, never seeds of one. Every run records these, whatever its task; a task adds
# its own settings by declaring them (``config_columns``, a class attribute of the task: image side,
# sequence length, …). What a run measured (metrics, speed, memory, FLOPs) and where it ran (date,
# commit, CPU, threads, backend) are not configuration; nor is the seed, which ``aggregate`` counts.
SHARED_CONFIG_COLUMNS: tuple[str, ...] = (
    "task", "dataset", "mechanism", "size", "epochs", "options", "mechanism_init", "batch_size",
    "world_size", "device", "amp", "limited", "max_steps", "limit_train", "limit_val", "subset",
    "time_budget", "train_examples", "val_examples")
SEED_COLUMN = "seed"
TASK_TABLE_REQUIRED = ("task", "mechanism", "dataset", SEED_COLUMN)  # what aggregates over seeds stand on
_MISSING = "<none>"


def read_task_table(path: Path) -> pd.DataFrame:
    """A task results table (``results/local/<task>.csv``) as plots and the report read it: without
    a ``seed`` column, say, its rows cannot be told apart as seeds, and it is a ``ResultsError``."""
    return read_table(path, required=TASK_TABLE_REQUIRED, kind="task")


def task_config_columns(name: str) -> tuple[str, ...]:
    """The settings columns that task ``name`` declares (its ``config_columns``); none, with a
    warning, for a task that is not installed here (its rows then group by the shared settings)."""
    from attnbench.tasks import UnknownTaskError, get_task

    try:
        return tuple(get_task(name).config_columns)
    except UnknownTaskError:
        warnings.warn(f"task {name!r} is not installed here (a plug-in: load it with --load), so its own "
                      "settings columns are unknown: its rows are grouped by the shared settings only",
                      stacklevel=2)
        return ()


def config_columns(table: pd.DataFrame) -> list[str]:
    """The configuration columns of a task results table that ``table`` has: ``SHARED_CONFIG_COLUMNS``,
    then those declared by each task in its ``task`` column, in order of appearance. Pass the
    result to ``aggregate`` as ``config``."""
    names = table["task"].dropna().astype(str).unique() if "task" in table.columns else []
    wanted = [*SHARED_CONFIG_COLUMNS, *(c for name in names for c in task_config_columns(name))]
    return [c for c in dict.fromkeys(wanted) if c in table.columns]


def _key(value: Any) -> str:
    """A configuration value as a grouping key: missing and empty alike, 48 and 48.0 alike."""
    if value is None or (isinstance(value, str) and not value.strip()) or (
            not isinstance(value, str) and pd.isna(value)):
        return _MISSING
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _limited(value: Any) -> bool:
    """``limited`` as a bool: a row from before the column (missing) was not limited."""
    return str(value).strip().lower() in ("true", "1", "1.0", "yes")


def aggregate(table: pd.DataFrame, metrics: Sequence[str],
              config: Sequence[str] | None = None) -> pd.DataFrame:
    """Mean and spread over seeds of each configuration in a task results table.

    ``table``: rows as the harness writes them (one per run); rows whose ``status`` is not ``ok``
    are left out (a failed run is no seed). Limited runs are kept but, ``limited`` being a
    configuration column, never pooled with full ones: pass ``finished_runs(table)``
    (``attnbench.tasks``) to leave them out, as plots do unless ``--include-limited``.
    ``metrics``: the numeric columns to summarise (``top1``, ``gflops``, ``train_img_s``, …).
    ``config``: the columns that define a configuration; default ``config_columns(table)`` (task,
    data set, mechanism, size, epochs, options, limits, batch, device, the task's own settings).

    A configuration's seeds are its distinct values of ``seed``. Several rows with the same
    configuration and seed are repeats of one run: the last row in the table (the latest run)
    stands for that seed, and the earlier ones are counted in ``n_repeats``, never as seeds.
    Missing and empty values are equal (a column added later matches its absence in older rows;
    ``limited`` missing means not limited).

    Returns one row per configuration, in order of first appearance: the ``config`` columns
    (values of the configuration's latest row; ``limited`` as a bool), then ``n_seeds``,
    ``n_repeats`` and ``seed_list`` (the seeds, sorted, comma-separated: "0,1,2"), then for each metric
    ``<metric>_mean``, ``<metric>_std`` (sample standard deviation over seeds, NaN for one) and
    ``<metric>_n`` (seeds with a value: a metric may be missing from some rows).
    """
    config = config_columns(table) if config is None else list(config)
    missing = [c for c in [*config, SEED_COLUMN, *metrics] if c not in table.columns]
    if missing:
        raise ValueError(f"aggregate: the table has no column {', '.join(map(repr, missing))}; "
                         f"it has {', '.join(map(str, table.columns))}")
    rows = table[table["status"] == "ok"] if "status" in table.columns else table
    rows = rows.reset_index(drop=True).copy()
    columns = [*config, "n_seeds", "n_repeats", "seed_list",
               *[f"{m}_{stat}" for m in metrics for stat in ("mean", "std", "n")]]
    if rows.empty:
        return pd.DataFrame(columns=columns)
    if "limited" in config:
        rows["limited"] = rows["limited"].map(_limited)
    rows["_config"] = [tuple(_key(v) for v in r) for r in rows[config].itertuples(index=False, name=None)]
    rows["_seed"] = rows[SEED_COLUMN].map(_key)
    out = []
    for _, runs in rows.groupby("_config", sort=False):
        seeds = runs.groupby("_seed", sort=False).tail(1)  # the latest run of each seed
        entry: dict[str, Any] = {c: seeds[c].iloc[-1] for c in config}
        order = sorted(seeds["_seed"], key=lambda s: (0, float(s)) if _numeric(s) else (1, s))
        entry.update(n_seeds=len(seeds), n_repeats=len(runs) - len(seeds), seed_list=",".join(order))
        for m in metrics:
            values = pd.to_numeric(seeds[m], errors="coerce").dropna()
            entry.update({f"{m}_mean": values.mean() if len(values) else math.nan,
                          f"{m}_std": values.std(ddof=1) if len(values) > 1 else math.nan,
                          f"{m}_n": len(values)})
        out.append(entry)
    return pd.DataFrame(out, columns=columns)


def _numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def format_spread(mean: float, std: float, n: int, digits: int = 1) -> str:
    """``96.8 ± 0.2 (n = 3)``, or ``56.0 (n = 1)`` where there is one seed: every aggregate shows its n."""
    if not math.isfinite(mean):
        return f"— (n = {n})"
    spread = f" ± {std:.{digits}f}" if n > 1 and math.isfinite(std) else ""
    return f"{mean:.{digits}f}{spread} (n = {n})"
