"""``attnbench plot``: redraw every plot of a results folder."""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from attnbench.cli.common import UsageError
from attnbench.plots.resolution import probe_title, resolution_plots
from attnbench.plots.task_tables import task_plots
from attnbench.results.discover import discover
from attnbench.results.tables import read_meta, read_task_table
from attnbench.sweeps import accuracy
from attnbench.sweeps.base import MAX_N
from attnbench.sweeps.kernel import finish
from attnbench.sweeps.resolution import read_probe
from attnbench.task import finished_runs
from attnbench.validate import existing_dir, int_in


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``plot`` command's arguments."""
    p = sub.add_parser("plot", help="redraw every plot of a results folder",
                       description="Redraw every plot in and under a folder: each `scale` sweep's (with its "
                                   "fit and ratio tables), each `resolution` probe's, and each task results "
                                   "table's (results/local/imagenet.csv and the like), beside what it draws "
                                   "from; prints every file it wrote.")
    p.add_argument("run_dir", type=existing_dir,
                   help="a folder written by `scale` or `resolution`, or a folder of task tables and run "
                        "folders (results/local, results/reference, results)")
    p.add_argument("--fit-min-n", type=int_in(1, MAX_N), default=1024, help="fit exponents over n >= this")
    p.add_argument("--include-limited", action="store_true",
                   help="also draw task runs cut short by --max-steps/--limit-train/--limit-val (smoke runs)")
    p.set_defaults(func=cmd_plot)


def cmd_plot(args: argparse.Namespace) -> int:
    found = discover([args.run_dir]) if args.run_dir.is_dir() else None
    if found is None or found.empty():
        raise UsageError(f"{args.run_dir}: no scale.csv there (a folder written by `scale`), nor "
                         "accuracy.csv (`scale --task`), nor resolution.csv (`resolution`), nor a task "
                         "results table such as results/local/imagenet.csv, in it or under it")
    written = redraw([args.run_dir], args.fit_min_n, args.include_limited)
    for folder in found.accuracy:
        if (folder / "accuracy.csv").is_file():
            written += accuracy.finish(folder, log=io.StringIO()).paths
    for path in written:
        print(path)
    if not written:
        hint = "" if args.include_limited else " (smoke runs are drawn with --include-limited)"
        print(f"attnbench plot: nothing to draw in {args.run_dir}: no finished run{hint}", file=sys.stderr)
    return 0


def _meta(folder: Path) -> dict[str, Any]:
    return read_meta(folder / "meta.json")


def _changed(folder: Path, before: dict[Path, int]) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and before.get(p) != p.stat().st_mtime_ns)


def redraw(folders: Iterable[Path], fit_min_n: int = 1024, include_limited: bool = False) -> list[Path]:
    """Redraw every plot in and under ``folders``: each sweep's (with its fit and ratio tables),
    each resolution probe's and each task table's; the files written, exactly."""
    found = discover(folders)
    written: list[Path] = []
    for folder in found.sweeps:
        before = {p: p.stat().st_mtime_ns for p in folder.iterdir() if p.is_file()}
        finish(folder, fit_min_n, log=io.StringIO())  # its own line names scale.csv, which it does not write
        written += _changed(folder, before)
    for folder in found.probes:
        table = read_probe(folder / "resolution.csv")
        if table.empty:
            continue
        limit = table["memory_limit_mib"].dropna()
        written += resolution_plots(table, folder, probe_title(table, _meta(folder)),
                                    float(limit.iloc[0]) if len(limit) else None)
    for path in found.tables:
        rows = finished_runs(read_task_table(path), include_limited)
        written += task_plots(path, rows, path.parent)
    return written
