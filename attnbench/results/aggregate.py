"""Seeds, not repeats: the one aggregate over seeds that every plot, table, report and sweep
stands on (``aggregate``, and ``seed_stats`` in the columns they read), and the baselines a
variant is judged against."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import pandas as pd

from attnbench.results.tables import SEED_COLUMN
from attnbench.task import ACCURACY, SweepScore, UnknownTaskError, get_task

# what a variant is judged against: softmax, else sdpa (the same maths, fused), where measured
BASELINES = ("softmax", "sdpa")

# The columns of a task table that set up the experiment: rows that differ in any of them are
# different experiments, never seeds of one. Every run records these, whatever its task; a task adds
# its own settings by declaring them (``config_columns``, a class attribute of the task: image side,
# sequence length, …). What a run measured (metrics, speed, memory, FLOPs) and where it ran (date,
# commit, CPU, threads, backend) are not configuration; nor is the seed, which ``aggregate`` counts.
SHARED_CONFIG_COLUMNS: tuple[str, ...] = (
    "task", "dataset", "mechanism", "size", "epochs", "options", "mechanism_init", "batch_size",
    "world_size", "device", "amp", "limited", "max_steps", "limit_train", "limit_val", "subset",
    "time_budget", "train_examples", "val_examples")
_MISSING = "<none>"


def task_config_columns(name: str) -> tuple[str, ...]:
    """The settings columns that task ``name`` declares (its ``config_columns``); none, with a
    warning, for a task that is not installed here (its rows then group by the shared settings)."""
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
    (``attnbench.task``) to leave them out, as plots do unless ``--include-limited``.
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


def seed_stats(rows: pd.DataFrame, metrics: Sequence[str], costs: Sequence[str] = (),
               config: Sequence[str] | None = None) -> pd.DataFrame:
    """``aggregate`` in the columns plots, sweeps and the report read: per configuration of the
    finished rows (``config``, default ``config_columns``), the mean over distinct seeds of each
    metric and cost column (``<column>``, NaN where the table has none), their standard deviation
    (``<column>_std``) and count (``<column>_n``), ``seeds`` (how many) and ``repeats`` (rows of a
    seed already counted: the latest row of a configuration and seed stands for it)."""
    wanted = [c for c in dict.fromkeys([*metrics, *costs]) if c is not None]
    columns = [c for c in wanted if c in rows.columns]
    ok = rows[rows["status"] == "ok"] if "status" in rows.columns else rows
    stats = aggregate(ok, columns, config)
    stats = stats.rename(columns={"n_seeds": "seeds", "n_repeats": "repeats",
                                  **{f"{c}_mean": c for c in columns}})
    for c in wanted:
        if c not in stats.columns:
            stats[c], stats[f"{c}_std"] = math.nan, math.nan
    return stats


def sweep_stats(table: pd.DataFrame, score: SweepScore = ACCURACY) -> pd.DataFrame:
    """``seed_stats`` of an accuracy sweep's points, per variant and n: the score (accuracy), its
    best evaluation, its floor (chance), time per step and peak memory."""
    metrics = [m for m in (score.column, score.best, score.floor, "step_ms", "peak_mem_mib")
               if m is not None and m in table.columns]
    return seed_stats(table, metrics, config=["mechanism", "variant", "seq_len"])


def failures(table: pd.DataFrame) -> pd.DataFrame:
    """The points that did not finish (unavailable ones are not failures: they never could run)."""
    return table[~table["status"].isin(["ok", "unavailable"]) & table["status"].notna()]


def baseline_of(table: pd.DataFrame) -> str:
    """The sweep's reference: the first of ``BASELINES`` among its variants."""
    labels = set(table["variant"].dropna()) if "variant" in table.columns else set()
    return next((b for b in BASELINES if b in labels), BASELINES[0])
