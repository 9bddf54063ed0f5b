"""Table layouts by version: every row a table of attnbench holds carries ``schema_version``, and
its folder's ``meta.json`` the version of its kind, so that ``upgrade`` can bring a table written by
an older attnbench to the current layout in one place, one documented step per version, and no
reader asks whether a column exists.

A row without ``schema_version`` (every table written before versions existed: the committed
reference folders) is version 1, its kind's first layout. Such a table may be of any later layout
too, so a step fills only what older rows lack (a column absent, or empty in those rows) and never
replaces a value a row holds. A table or ``meta.json`` from a newer attnbench is refused.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import pandas as pd

VERSION_COLUMN = "schema_version"  # in every row, and a key of meta.json
UNVERSIONED = 1  # the version of a row or meta.json without one: its kind's first layout


class SchemaError(ValueError):
    """A table or meta.json this attnbench cannot read as its kind: one line naming it."""


# what an older row takes for a new column: a value, or a function of the older rows (a Series)
Default = Any | Callable[[pd.DataFrame], pd.Series]


@dataclasses.dataclass(frozen=True)
class Step:
    """The columns that appeared in ``version`` and what a row of an older version takes for each;
    ``settings``: the same for a sweep's settings in meta.json (``sweep``)."""

    version: int
    why: str
    columns: Mapping[str, Default]
    settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def _mechanism(rows: pd.DataFrame) -> pd.Series:
    return rows["mechanism"]


def _latest_finished_run(rows: pd.DataFrame) -> pd.Series:
    """Before grids a point trained one run: its latest row stands for it where it finished."""
    latest = ~rows.duplicated(["variant", "seq_len", "seed"], keep="last")
    return latest & (rows["status"] == "ok")


NOT_MEASURED = math.nan  # a quantity an older attnbench did not record

# Per kind of table, its steps in order; its current version is the last step's (1 without steps).
STEPS: dict[str, tuple[Step, ...]] = {
    # scale.csv: the kernel sweep, its decode mode included (attnbench scale)
    "scale": (
        Step(2, "the machine probe: interleaved rounds, retries, noise flags, floors, --compile",
             {"compiled": False, **dict.fromkeys(
                 ("rounds", "attempts", "spread", "noisy", "flops_matmul", "floor_ms", "floor_fraction",
                  "machine_gflops", "machine_gbs", "machine_slowdown", "compile_s"), NOT_MEASURED)}),
        Step(3, "the quartiles of the timed runs", dict.fromkeys(("time_ms_q1", "time_ms_q3"), NOT_MEASURED)),
        Step(4, "variants of swept options: a row without one is its mechanism", {"variant": _mechanism}),
        Step(5, "--causal: older sweeps were not causal", {"causal": False}, {"causal": False}),
        Step(6, "--mode decode and --kv-heads: older rows used every head and did not decode",
             {"kv_heads": NOT_MEASURED, **dict.fromkeys(
                 ("prefill_ms", "prefill_status", "tokens_s", "cache_bytes", "cache_bytes_formula"),
                 NOT_MEASURED)}, {"kv_heads": None}),
    ),
    # rounds.csv: the kernel sweep's interleaved rounds
    "rounds": (
        Step(2, "variants of swept options: a row without one is its mechanism", {"variant": _mechanism}),
    ),
    # accuracy.csv: the accuracy sweep (attnbench scale --task)
    "accuracy": (
        Step(2, "--lr/--weight-decay grids: older runs used the task's own values (empty), had no "
                "validation split, and each point's latest finished row stood for it",
             {"lr": NOT_MEASURED, "weight_decay": NOT_MEASURED, "val_accuracy": NOT_MEASURED,
              "selected": _latest_finished_run}),
    ),
    # resolution.csv: the resolution probe (attnbench resolution); one layout so far
    "resolution": (),
    # a task table (results/local/<task>.csv): one row per training run (attnbench run)
    "task": (
        Step(2, "smoke limits: an older run was not limited", {
            "limited": False, **dict.fromkeys(("max_steps", "limit_train", "limit_val"), NOT_MEASURED)}),
        Step(3, "training-time budgets and seeded subsets: an older run had neither",
             dict.fromkeys(("time_budget", "subset"), NOT_MEASURED)),
    ),
}


def current(kind: str) -> int:
    """The version of ``kind``'s tables that this attnbench writes."""
    return max((s.version for s in _steps(kind)), default=UNVERSIONED)


def _steps(kind: str) -> tuple[Step, ...]:
    if kind not in STEPS:
        raise SchemaError(f"no table kind {kind!r}; valid kinds: {', '.join(STEPS)}")
    return STEPS[kind]


def _version_of(values: pd.Series, kind: str, source: str) -> pd.Series:
    """Each row's version (``UNVERSIONED`` where empty); a newer one than ``current`` is refused."""
    versions = pd.to_numeric(values, errors="coerce").fillna(UNVERSIONED).astype(int)
    newest = int(versions.max()) if len(versions) else UNVERSIONED
    if newest > current(kind):
        raise SchemaError(f"{source}: schema version {newest} of a {kind} table is newer than this attnbench "
                          f"reads (at most {current(kind)}); update attnbench to read it")
    return versions


def upgrade(table: pd.DataFrame, kind: str, source: str = "the table") -> pd.DataFrame:
    """``table`` (a ``kind`` table as read from CSV) in the current layout: each step's columns
    filled in the rows older than it where they are empty, and every row stamped current. The
    rows of a table written in the current layout come back unchanged."""
    table = table.copy()
    versions = _version_of(table.get(VERSION_COLUMN, pd.Series(UNVERSIONED, index=table.index)), kind, source)
    for step in _steps(kind):
        older = versions < step.version
        for column, default in step.columns.items():
            if column not in table.columns:
                table[column] = math.nan
            empty = older & table[column].isna()
            if empty.any():
                value = default(table[empty]) if callable(default) else default
                table[column] = table[column].astype(object)
                table.loc[empty, column] = value
                table[column] = table[column].infer_objects()
    table[VERSION_COLUMN] = current(kind)
    return table


def stamped(row: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """``row`` with the current version of ``kind``: how a writer hands a row to its table."""
    return {**row, VERSION_COLUMN: current(kind)}


def stamp(meta: dict[str, Any], kind: str) -> dict[str, Any]:
    """``meta`` (a folder's meta.json) with the version of the ``kind`` tables its folder holds."""
    meta[VERSION_COLUMN] = current(kind)
    return meta


def upgrade_meta(meta: Mapping[str, Any], kind: str, source: str = "meta.json") -> dict[str, Any]:
    """``meta`` as the current version records it: the sweep settings (``sweep``) that appeared
    after its version filled with what an older sweep ran with; a newer meta.json is refused."""
    meta = dict(meta)
    version = _version_of(pd.Series([meta.get(VERSION_COLUMN)], dtype=object), kind, source).iloc[0]
    if isinstance(meta.get("sweep"), Mapping) and meta["sweep"]:
        sweep = dict(meta["sweep"])
        for step in (s for s in _steps(kind) if s.version > version):
            for key, value in step.settings.items():
                sweep.setdefault(key, value)
        meta["sweep"] = sweep
    meta[VERSION_COLUMN] = current(kind)
    return meta
