"""What a results folder holds, found by the files each kind of run writes: kernel sweeps
(``scale.csv``), accuracy sweeps (``accuracy.csv``), resolution probes (``resolution.csv``) and
task results tables (CSV files with task, mechanism and dataset columns)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from pathlib import Path

import pandas as pd


@dataclasses.dataclass
class Found:
    """What a results folder holds: sweeps (folders with scale.csv), resolution probes (folders
    with resolution.csv), accuracy sweeps (folders with accuracy.csv or breaking.csv) and task
    results tables (CSV files with task, mechanism and dataset columns)."""

    sweeps: list[Path] = dataclasses.field(default_factory=list)
    probes: list[Path] = dataclasses.field(default_factory=list)
    accuracy: list[Path] = dataclasses.field(default_factory=list)
    tables: list[Path] = dataclasses.field(default_factory=list)

    def empty(self) -> bool:
        return not (self.sweeps or self.probes or self.accuracy or self.tables)


TASK_TABLE_COLUMNS = {"task", "mechanism", "dataset"}
NOT_TASK_TABLES = {"scale.csv", "resolution.csv", "summary.csv", "history.csv", "accuracy.csv",
                   "breaking.csv", "rounds.csv", "ratios.csv", "fits.csv", "compare.csv"}
SKIP_DIRS = {"__pycache__", "node_modules"}


def is_task_table(path: Path) -> bool:
    if path.name in NOT_TASK_TABLES:
        return False
    try:
        header = set(pd.read_csv(path, nrows=0).columns)
    except (ValueError, OSError):
        return False
    return TASK_TABLE_COLUMNS <= header


def discover(folders: Iterable[Path]) -> Found:
    """Every sweep, probe, accuracy sweep and task table in and under ``folders``, in path order."""
    found = Found()
    seen: set[Path] = set()
    for top in folders:
        for root, dirs, files in os.walk(top):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIP_DIRS)
            here = Path(root)
            if here.resolve() in seen:
                continue
            seen.add(here.resolve())
            if "scale.csv" in files:
                found.sweeps.append(here)
            if "resolution.csv" in files:
                found.probes.append(here)
            if "accuracy.csv" in files or "breaking.csv" in files:
                found.accuracy.append(here)
            found.tables += [here / f for f in sorted(files)
                             if f.endswith(".csv") and is_task_table(here / f)]
    return found
