"""``attnbench report``: every result in some folders on one page, for a paper's supplement or a PR.

The page (``render_html``) is one self-contained HTML file: its styles and a few lines of script
(package data in ``attnbench/report/assets``) inline, every plot embedded as a base64 PNG, nothing
fetched from the network; its tables sort when a header is clicked. ``render_markdown`` writes
the same report as Markdown, with the plots as PNG files in a folder beside it. In order:

1. The verdict, the answer first (``attnbench.report.verdict``): per accuracy sweep, each variant's score
   at each n, the accuracy–time and accuracy–memory fronts it is on there, its breaking length;
   per kernel sweep, each mechanism's time exponent with its interval and the n from which it
   stays faster than softmax and sdpa. One small table per sweep, side by side on the first screen.
2. Kernel sweeps (folders with ``scale.csv``): the time, memory and ratio plots, the fitted
   exponents with their 95 % intervals, what did not finish, the same-round ratios and the
   machine's steadiness.
3. Accuracy sweeps (folders with ``accuracy.csv`` or ``breaking.csv``): their tables and plots.
4. Tasks (results tables): mean ± std over distinct seeds per full configuration, with n and
   repeats (``attnbench.results.aggregate``), the task's plots, and every run.
5. Resolution probes (folders with ``resolution.csv``): the summary, the plot and every side.
6. With ``--compare SAVED``: this sweep against a saved one (time and memory ratios, regressions)
   and task aggregates against the saved tables.
7. Run contexts: machine, device, threads, dtype, versions, commit and date of every run folder
   and task table (``meta.json``, or a table's context columns).

The plots are drawn afresh from the tables by the same functions as ``attnbench plot``, in a
temporary folder: nothing is written into the folders reported on.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import html
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd

from attnbench.measure.fit import fit_table, ratio_table
from attnbench.plots.kernel import scaling_plots, sweep_title
from attnbench.plots.resolution import probe_title, resolution_plots
from attnbench.plots.style import slug
from attnbench.plots.task_tables import task_plots
from attnbench.report.verdict import Verdict, accuracy_verdict, kernel_verdict
from attnbench.results.aggregate import aggregate, config_columns, format_spread
from attnbench.results.discover import Found, discover
from attnbench.results.tables import git_commit, read_table, read_task_table, write_atomic
from attnbench.sweeps.kernel import (
    by_variant,
    compare,
    fit_summary,
    machine_summary,
    ratio_summary,
    read_rounds,
    read_sweep,
)
from attnbench.sweeps.resolution import read_probe
from attnbench.task import UnknownTaskError, finished_runs, get_task


class ReportError(ValueError):
    """A report that cannot be made as asked (no results in the folders, a bad --compare)."""


# ---- what a report is made of -----------------------------------------------------------------


@dataclasses.dataclass
class Text:
    text: str
    pre: bool = False  # preformatted (console summaries)
    small: bool = False  # a legend


@dataclasses.dataclass
class Table:
    frame: pd.DataFrame
    caption: str = ""


@dataclasses.dataclass
class Figure:
    png: bytes
    name: str  # file name in Markdown's image folder
    caption: str = ""


@dataclasses.dataclass
class Cards:
    """Small tables side by side where the page is wide enough (the verdict); one after another in
    Markdown."""
    tables: list[Table]


@dataclasses.dataclass
class Details:
    summary: str
    blocks: list[Any]


@dataclasses.dataclass
class Section:
    title: str
    anchor: str
    blocks: list[Any] = dataclasses.field(default_factory=list)
    level: int = 2


@dataclasses.dataclass
class Report:
    title: str
    header: list[tuple[str, str]]
    sections: list[Section]

    def figures(self) -> int:
        return sum(1 for s in self.sections for b in _walk(s.blocks) if isinstance(b, Figure))


def _walk(blocks: Iterable[Any]) -> Iterable[Any]:
    for b in blocks:
        yield b
        if isinstance(b, Details):
            yield from _walk(b.blocks)


# ---- formatting -------------------------------------------------------------------------------


def cell(value: Any, digits: int = 4) -> str:
    """A table cell: integers whole, floats to ``digits`` significant figures, missing as '—'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return "yes" if value else "no"
    if isinstance(value, (int,)) or (hasattr(value, "dtype") and "int" in str(getattr(value, "dtype", ""))):
        return str(int(value))
    if isinstance(value, float):
        if math.isinf(value):
            return "∞" if value > 0 else "-∞"
        if value == int(value) and abs(value) < 1e9:
            return str(int(value))
        return f"{value:.{digits}g}"
    text = str(value)
    return text if text.strip() else "—"


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame(rows)


def _slug(text: str) -> str:
    return slug(text).lower() or "section"


def _png_figures(paths: Sequence[Path], prefix: str, captions: dict[str, str] | None = None) -> list[Figure]:
    figures = []
    for path in paths:
        if path.suffix != ".png" or not path.is_file():
            continue
        caption = (captions or {}).get(path.stem, path.stem.replace("_", " "))
        figures.append(Figure(path.read_bytes(), f"{prefix}-{path.name}", caption))
    return figures


def _meta(folder: Path) -> dict[str, Any]:
    path = folder / "meta.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def _show(path: Path) -> str:
    """A path as the reader should see it: relative to the working directory where it can be."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


# ---- 1. the verdict ---------------------------------------------------------------------------


def _cards(verdicts: Sequence[Verdict], base: Path | None) -> list[Any]:
    """Each different legend once, then the tables, each captioned by its folder (below ``base``)."""
    legend = list(dict.fromkeys(line for v in verdicts for line in v.legend))
    tables = [Table(v.frame, f"{v.folder.resolve().relative_to(base) if base else _show(v.folder)}: {v.note}")
              for v in verdicts]
    return [*(Text(line, small=True) for line in legend), Cards(tables)]


def _common_parent(folders: Sequence[Path]) -> Path | None:
    """The folder all of ``folders`` lie under, where there are several and it is not one of them."""
    if len(folders) < 2:
        return None
    base = Path(os.path.commonpath([f.resolve() for f in folders]))
    return None if any(f.resolve() == base for f in folders) else base


def verdict_sections(found: Found, fit_min_n: int | None) -> list[Section]:
    """The answer first: one small table per accuracy sweep and per kernel sweep."""
    base = _common_parent([*found.accuracy, *found.sweeps])
    top = Section("Verdict", "verdict")
    sections = [top]
    if found.accuracy:
        blocks = _cards([accuracy_verdict(f) for f in found.accuracy], base)
        sections.append(Section("Accuracy sweeps: the fronts at each n and the breaking lengths",
                                "verdict-accuracy", blocks, level=3))
    if found.sweeps:
        blocks = _cards([kernel_verdict(f, _fit_min_n(f, fit_min_n)) for f in found.sweeps], base)
        sections.append(Section("Kernel sweeps: how time grows with n and where each overtakes the baselines",
                                "verdict-kernel", blocks, level=3))
    if len(sections) == 1:
        top.blocks.append(Text("No accuracy or kernel sweep in these folders: the tasks and probes below."))
    return sections


# ---- 2. kernel sweeps -------------------------------------------------------------------------


def _fit_min_n(folder: Path, given: int | None) -> int:
    if given is not None:
        return given
    fits = read_table(folder / "fits.csv")
    if "fit_n_min" in fits.columns and fits["fit_n_min"].notna().any():
        return int(fits["fit_n_min"].min())
    return 1024


def sweep_section(folder: Path, tmp: Path, fit_min_n: int | None, index: int) -> Section:
    meta = _meta(folder)
    # a series, a fit and a row per variant (set[m=16], set[m=64]), as `attnbench scale` draws them
    table = by_variant(read_sweep(folder / "scale.csv"))
    rounds = by_variant(read_rounds(folder / "rounds.csv"))
    min_n = _fit_min_n(folder, fit_min_n)
    fits = fit_table(table, min_n)
    ratios = ratio_table(rounds)
    out = tmp / f"sweep{index}"
    out.mkdir(parents=True)
    paths = scaling_plots(table, fits, out, sweep_title(meta), ratios)
    sweep = meta.get("sweep", {})
    section = Section(f"Kernel sweep: {_show(folder)}", f"sweep-{index}", level=3)
    facts = [f"{table['mechanism'].nunique()} mechanisms, n = {cell(table['n'].min())} to "
             f"{cell(table['n'].max())}", f"modes {', '.join(sorted(table['mode'].dropna().unique()))}"]
    if sweep:
        facts.append(f"B = {sweep.get('batch')}, H = {sweep.get('heads')}, d = {sweep.get('head_dim')}, "
                     f"{sweep.get('dtype')}, {sweep.get('layout', '1d')} layout, {sweep.get('device')}, "
                     f"{sweep.get('threads')} threads, budget {sweep.get('budget')} s per configuration"
                     f"{', compiled' if sweep.get('compile') else ', eager'}"
                     f"{', causal' if sweep.get('causal') else ''}")
    section.blocks.append(Text("; ".join(facts) + ". Exponents fitted over n ≥ " + str(min_n)
                               + " (least squares on log-log, 95 % t interval)."))
    captions = {}
    for m in table["mode"].dropna().unique():
        stem = m.replace("+", "_")
        captions[f"time_{stem}"] = (f"Time per step against n ({m}): median, band at the quartiles of the "
                                    "timed runs where recorded; what did not finish marked above")
        captions[f"memory_{stem}"] = f"Peak memory against n ({m})"
        captions[f"ratios_{stem}"] = f"Time and memory against the baseline at the largest n all ran ({m})"
    section.blocks += _png_figures(paths, f"sweep{index}", captions)
    section.blocks.append(Table(fit_summary(fits), "Fitted exponents (time and memory ∝ n^k), 95 % "
                                "intervals, labels only where the interval supports them, and crossovers: "
                                "the n from which a mechanism stays faster than the baseline"))
    not_ok = table[table["status"] != "ok"]
    if len(not_ok):
        rows = []
        for (mech, mode, status, message), group in not_ok.groupby(
                ["mechanism", "mode", "status", not_ok["message"].fillna("")], sort=True):
            ns = sorted(group["n"])
            rows.append({"mechanism": mech, "mode": mode, "n": ", ".join(cell(n) for n in ns) if len(ns) < 4
                         else f"{cell(ns[0])} to {cell(ns[-1])} ({len(ns)} lengths)", "status": status,
                         "message": message})
        section.blocks.append(Table(pd.DataFrame(rows), "What did not run or finish"))
    same = ratio_summary(ratios) if len(ratios) else None
    if same is not None:
        baseline, wide = same
        section.blocks.append(Table(wide.reset_index(), f"Time relative to {baseline}, from the same rounds: "
                                    "median [quartiles]"))
    section.blocks.append(Text(machine_summary(table, rounds, meta), pre=True))
    columns = [c for c in ("mechanism", "n", "mode", "status", "time_ms_median", "time_ms_q1", "time_ms_q3",
                           "time_ms_iqr", "runs", "rounds", "noisy", "peak_mem_mib", "gflops",
                           "floor_fraction", "backend")
               if c in table.columns and table[c].notna().any()]  # what the table recorded
    section.blocks.append(Details(f"every row of scale.csv ({len(table)})", [Table(table[columns])]))
    return section


# ---- 3. accuracy sweeps -----------------------------------------------------------------------


def accuracy_section(folder: Path, index: int) -> Section:
    section = Section(f"Accuracy sweep: {_show(folder)}", f"accuracy-{index}", level=3)
    for name, caption in (("breaking.csv", "Breaking lengths"), ("accuracy.csv", "Accuracy against length")):
        table = read_table(folder / name)
        if len(table):
            section.blocks.append(Table(table, f"{caption} ({name})"))
    section.blocks += _png_figures(sorted(folder.glob("*.png")), f"accuracy{index}")
    return section


# ---- 4. tasks ---------------------------------------------------------------------------------

COST_COLUMNS = ("params", "gflops", "train_img_s", "eval_img_s", "train_seq_s", "eval_seq_s", "peak_mem_mib",
                "train_mem_mib", "wall_s")


def _task_metrics(name: str, table: pd.DataFrame) -> list[str]:
    try:
        cls = get_task(name)
        declared = list(getattr(cls, "metrics", ()))
        headline = getattr(cls, "headline", None)
    except UnknownTaskError:
        declared, headline = [], None
    metrics = [m for m in dict.fromkeys([headline, *declared]) if m and m in table.columns
               and pd.to_numeric(table[m], errors="coerce").notna().any() and not m.endswith("_s")]
    return metrics


def seed_table(rows: pd.DataFrame, metrics: Sequence[str]) -> tuple[pd.DataFrame, str]:
    """The aggregate over seeds as the page shows it: the configuration columns that differ between
    rows, n, repeats and seeds, then 'mean ± std (n = k)' per metric and cost; and a line naming
    what all rows share."""
    costs = [c for c in COST_COLUMNS
             if c in rows.columns and pd.to_numeric(rows[c], errors="coerce").notna().any()]
    agg = aggregate(rows, [*metrics, *costs])
    config = config_columns(rows)
    varying = [c for c in config if agg[c].map(cell).nunique() > 1 or c in ("mechanism",)]
    shared = [f"{c} {cell(agg[c].iloc[0])}" for c in config if c not in varying and len(agg)]
    shown = agg[varying].copy()
    shown["seeds (n)"] = agg["n_seeds"]
    shown["repeats"] = agg["n_repeats"]
    shown["seed values"] = agg["seed_list"]
    for m in [*metrics, *costs]:
        digits = 1 if m not in ("params", "gflops") else 4
        if m == "params":
            shown["params (M)"] = [format_spread(v / 1e6, s / 1e6, n, 3) for v, s, n in
                                   zip(agg[f"{m}_mean"], agg[f"{m}_std"], agg[f"{m}_n"], strict=True)]
            continue
        shown[m] = [format_spread(v, s, n, digits) for v, s, n in
                    zip(agg[f"{m}_mean"], agg[f"{m}_std"], agg[f"{m}_n"], strict=True)]
    return shown, "; ".join(shared)


def task_sections(path: Path, tmp: Path, include_limited: bool, index: int) -> list[Section]:
    table = read_task_table(path)
    sections = []
    for j, name in enumerate(dict.fromkeys(table["task"].dropna())):
        mine = table[table["task"] == name]
        rows = finished_runs(mine, include_limited)
        section = Section(f"Task {name}: {_show(path)}", f"task-{index}-{j}", level=3)
        failed = int((mine["status"] != "ok").sum()) if "status" in mine.columns else 0
        limited = len(finished_runs(mine, True)) - len(finished_runs(mine, False))
        notes = [f"{len(mine)} runs in the table, {len(rows)} shown"]
        if failed:
            notes.append(f"{failed} that did not finish left out")
        if limited:
            notes.append(f"{limited} smoke runs (--max-steps / --limit-*) "
                         + ("shown as configurations of their own" if include_limited else
                            "left out (--include-limited shows them)"))
        section.blocks.append(Text("; ".join(notes) + ". Each row below is one full configuration; its seeds "
                                   "are distinct seeds, a repeat of a seed counts once (the latest run), and "
                                   "every figure is mean ± std over seeds with its n."))
        if rows.empty:
            sections.append(section)
            continue
        metrics = _task_metrics(name, rows)
        shown, shared = seed_table(rows, metrics)
        section.blocks.append(Table(shown, "Mean ± std over seeds per configuration"
                                    + (f" (all rows: {shared})" if shared else "")))
        out = tmp / f"task{index}-{j}"
        out.mkdir(parents=True)
        section.blocks += _png_figures(task_plots(path, rows, out), f"task{index}-{j}")
        raw = [c for c in ("mechanism", "size", "dataset", "epochs", "seed", *metrics, "limited", "date",
                           "git_commit", "run_dir") if c in mine.columns]
        if "status" in mine.columns:
            raw.insert(raw.index("seed") + 1 if "seed" in raw else 0, "status")
        section.blocks.append(Details(f"every run ({len(mine)})", [Table(mine[raw].reset_index(drop=True))]))
        sections.append(section)
    return sections


# ---- 5. resolution probes ---------------------------------------------------------------------


def probe_section(folder: Path, tmp: Path, index: int) -> Section:
    table = read_probe(folder / "resolution.csv")
    meta = _meta(folder)
    section = Section(f"Resolution probe: {_show(folder)}", f"probe-{index}", level=3)
    if table.empty:
        section.blocks.append(Text("resolution.csv holds no rows."))
        return section
    limit = (table["memory_limit_mib"].dropna() if "memory_limit_mib" in table.columns
             else pd.Series([], dtype=float))
    out = tmp / f"probe{index}"
    out.mkdir(parents=True)
    paths = resolution_plots(table, out, probe_title(table, meta),
                                   float(limit.iloc[0]) if len(limit) else None)
    summary = read_table(folder / "summary.csv")
    if len(summary):
        shown = pd.DataFrame({
            "mechanism": summary["mechanism"], "size": summary.get("size"),
            "training side (px)": summary["train_side"],
            "s/step there": summary["train_step_ms"] / 1e3, "peak there (MiB)": summary["train_peak_mem_mib"],
            "largest side trained (px)": summary["largest_side"],
            "peak there (MiB) ": summary["largest_peak_mem_mib"],
            "first side that did not (px)": summary["first_failed_side"], "why": summary["failure"]})
        section.blocks.append(Table(shown, "Per mechanism: the cost at the training side, the largest side "
                                    "that trained and why the next did not"))
    section.blocks += _png_figures(paths, f"probe{index}", {"resolution": "Peak memory and time per training "
                                                            "step against the image side; sides that did not "
                                                            "train marked above"})
    columns = [c for c in ("mechanism", "side", "status", "step_ms", "img_s", "peak_mem_mib", "message")
               if c in table.columns]
    section.blocks.append(Details(f"every side tried ({len(table)})", [Table(table[columns])]))
    return section


# ---- 6. against a saved run -------------------------------------------------------------------


def compare_sections(found: Found, saved: Path, tmp: Path) -> list[Section]:
    theirs = discover([saved])
    if theirs.empty():
        raise ReportError(f"--compare {saved}: no scale.csv, resolution.csv or task table there")
    sections = []
    saved_sweep = (saved / "scale.csv") if (saved / "scale.csv").is_file() else (
        theirs.sweeps[0] / "scale.csv" if theirs.sweeps else None)
    for i, folder in enumerate(found.sweeps):
        if saved_sweep is None:
            break
        if folder.resolve() == saved_sweep.parent.resolve():
            continue
        work = tmp / f"compare{i}"
        work.mkdir(parents=True)
        shutil.copy(folder / "scale.csv", work / "scale.csv")  # compare() writes compare.csv beside it
        result = compare(work, saved_sweep.parent)
        section = Section(f"Sweep {_show(folder)} against {_show(saved_sweep.parent)}", f"compare-sweep-{i}",
                          level=3)
        flagged = result[result["regression"]]
        section.blocks.append(Text(
            f"{len(result)} configurations measured in both; {len(flagged)} regressions (over 10 % slower, "
            f"by more than the two runs' IQRs, neither flagged noisy); {int(result['noisy'].sum())} pairs "
            "noisy, not judged. Ratios: this run / the saved one."))
        section.blocks.append(Table(result.sort_values("time_ratio", ascending=False).reset_index(drop=True)))
        sections.append(section)
    for i, path in enumerate(found.tables):
        mine = read_task_table(path)
        for other in theirs.tables:
            if other.resolve() == path.resolve():
                continue
            saved_table = read_task_table(other)
            names = set(mine["task"].dropna()) & set(saved_table["task"].dropna())
            for name in sorted(names):
                section = _task_comparison(name, mine, saved_table, path, other,
                                           f"compare-task-{i}-{_slug(name)}")
                if section is not None:
                    sections.append(section)
    if not sections:
        sections.append(Section(f"Against {_show(saved)}", "compare-none", [Text(
            "Nothing in these folders matches the saved run (no sweep or task table in common).")], level=3))
    return sections


def _task_comparison(name: str, mine: pd.DataFrame, theirs: pd.DataFrame, path: Path, other: Path,
                     anchor: str) -> Section | None:
    a, b = finished_runs(mine[mine["task"] == name]), finished_runs(theirs[theirs["task"] == name])
    metrics = [m for m in _task_metrics(name, a) if m in b.columns]
    if a.empty or b.empty or not metrics:
        return None
    keys = [c for c in config_columns(a) if c in b.columns and c not in ("device", "world_size")]
    left = aggregate(a, metrics, keys)
    right = aggregate(b, metrics, keys)
    for frame in (left, right):
        frame["_key"] = frame[keys].apply(lambda r: tuple(cell(v) for v in r), axis=1)
    both = left.merge(right, on="_key", suffixes=("", " (saved)"))
    if both.empty:
        return None
    shown = both[[c for c in keys if both[c].map(cell).nunique() > 1 or c == "mechanism"]].copy()
    for m in metrics:
        for suffix in ("", " (saved)"):
            shown[f"{m}{suffix}"] = [format_spread(v, s, n) for v, s, n in zip(
                both[f"{m}_mean{suffix}"], both[f"{m}_std{suffix}"], both[f"{m}_n{suffix}"], strict=True)]
        shown[f"Δ {m}"] = both[f"{m}_mean"] - both[f"{m}_mean (saved)"]
    return Section(f"Task {name}: {_show(path)} against {_show(other)}", anchor,
                   [Text("Configurations in both tables; Δ: this mean minus the saved mean."), Table(shown)],
                   level=3)


# ---- 7. run contexts --------------------------------------------------------------------------


def _date(text: Any) -> str:
    """``2026-11-25T17:25:29+00:00`` as ``2026-11-25 17:25 UTC``."""
    text = str(text)
    if len(text) >= 16 and text[10] == "T":
        return f"{text[:10]} {text[11:16]}" + (" UTC" if text.endswith(("+00:00", "Z")) else "")
    return text


def _versions(meta: dict[str, Any]) -> dict[str, str]:
    versions = meta.get("versions", {}) or {}
    return {k: versions.get(k, "—") for k in ("torch", "natten", "xformers")}


def _context_row(source: Path, kind: str, meta: dict[str, Any], dtype: str) -> dict[str, Any]:
    machine = ", ".join(str(v) for v in (meta.get("cpu"), meta.get("gpu")) if v) or "not recorded"
    cpus = meta.get("cpu_count")
    return {"source": _show(source), "kind": kind, "date": _date(meta.get("date", "—")), "machine": machine,
            "CPUs": cpus if cpus is not None else "—", "device": meta.get("device", "—"),
            "threads": meta.get("threads", "—"), "dtype": dtype, **_versions(meta),
            "python": meta.get("python", "—"), "commit": meta.get("git_commit", "—")}


def _unique(rows: pd.DataFrame, column: str) -> str:
    if column not in rows.columns:
        return "not recorded"
    values = [cell(v) for v in dict.fromkeys(rows[column].dropna())]
    return ", ".join(values) if values else "not recorded"


def contexts(found: Found) -> Section:
    rows, commands = [], []
    for folder in found.sweeps:
        meta = _meta(folder)
        sweep = meta.get("sweep", {})
        rows.append(_context_row(folder, "kernel sweep", meta, sweep.get("dtype", "not recorded")))
        commands.append((folder, meta.get("commands") or [meta.get("command", "—")]))
    for folder in found.probes:
        meta = _meta(folder)
        rows.append(_context_row(folder, "resolution probe", meta,
                                 meta.get("probe", {}).get("dtype", "float32")))
        commands.append((folder, [meta.get("command", "—")]))
    for folder in found.accuracy:
        meta = _meta(folder)
        rows.append(_context_row(folder, "accuracy sweep", meta, meta.get("dtype", "not recorded")))
        commands.append((folder, meta.get("commands") or [meta.get("command", "—")]))
    for path in found.tables:
        table = read_task_table(path)
        dates = table["date"].dropna().astype(str) if "date" in table.columns else pd.Series([], dtype=str)
        amp = _unique(table, "amp")
        runs = f"{len(table)} run{'' if len(table) == 1 else 's'}"
        rows.append({"source": _show(path), "kind": f"task table ({runs})",
                     "date": (_date(dates.min()) if dates.min() == dates.max() else
                              f"{_date(dates.min())} to {_date(dates.max())}") if len(dates) else "—",
                     "machine": ", ".join(v for v in (_unique(table, "cpu"), _unique(table, "gpu"))
                                          if v != "not recorded") or "not recorded",
                     "CPUs": "—", "device": _unique(table, "device"), "threads": _unique(table, "threads"),
                     "dtype": f"float32, AMP {amp}" if amp != "not recorded" else "float32",
                     "torch": _unique(table, "torch"), "natten": "—", "xformers": "—", "python": "—",
                     "commit": _unique(table, "git_commit")})
    section = Section("Run contexts", "contexts")
    section.blocks.append(Text("Where each figure below came from: the machine, the device and its threads, "
                               "the dtype, the library versions and the attnbench commit (-dirty: with local "
                               "changes) of every run folder and task table."))
    section.blocks.append(Table(_frame(rows)))
    if commands:
        lines = [f"{_show(folder)}:\n" + "\n".join(f"  {c}" for c in cmds if c) for folder, cmds in commands]
        section.blocks.append(Details("command lines", [Text("\n".join(lines), pre=True)]))
    return section


# ---- the whole report -------------------------------------------------------------------------


def build(folders: Sequence[Path], compare_with: Path | None = None, include_limited: bool = False,
          fit_min_n: int | None = None, title: str = "attnbench report",
          argv: Sequence[str] | None = None) -> Report:
    """Everything in and under ``folders``, as a ``Report``."""
    for folder in folders:
        if not folder.is_dir():
            raise ReportError(f"{folder}: not a folder")
    found = discover(folders)
    if found.empty():
        raise ReportError(f"no results in {', '.join(map(str, folders))}: no scale.csv, resolution.csv, "
                          "accuracy.csv / breaking.csv or task results table in them or under them")
    sections = verdict_sections(found, fit_min_n)
    with tempfile.TemporaryDirectory(prefix="attnbench-report-") as name:
        tmp = Path(name)
        top = Section("Kernel sweeps", "sweeps")
        top.blocks.append(Text("Time and memory of one attention call against the sequence length n, every "
                               "mechanism measured the same way." if found.sweeps else
                               "No kernel sweep (scale.csv) in these folders."))
        sections.append(top)
        sections += [sweep_section(f, tmp, fit_min_n, i) for i, f in enumerate(found.sweeps)]
        top = Section("Accuracy sweeps", "accuracy")
        top.blocks.append(Text("Accuracy against length and the lengths where each mechanism breaks."
                               if found.accuracy else
                               "No accuracy sweep (accuracy.csv / breaking.csv) in these folders."))
        sections.append(top)
        sections += [accuracy_section(f, i) for i, f in enumerate(found.accuracy)]
        top = Section("Tasks", "tasks")
        top.blocks.append(Text("Each task table: mean ± std over distinct seeds per full configuration."
                               if found.tables else "No task results table in these folders."))
        sections.append(top)
        for i, path in enumerate(found.tables):
            sections += task_sections(path, tmp, include_limited, i)
        top = Section("Resolution probes", "probes")
        top.blocks.append(Text("The largest image side each mechanism trains at, and the cost on the way."
                               if found.probes else "No resolution probe (resolution.csv) in these folders."))
        sections.append(top)
        sections += [probe_section(f, tmp, i) for i, f in enumerate(found.probes)]
        if compare_with is not None:
            sections.append(Section(f"Against the saved run {_show(compare_with)}", "compare"))
            sections += compare_sections(found, compare_with, tmp)
    sections.append(contexts(found))
    header = [("generated", dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")),
              ("attnbench commit", git_commit()),
              ("folders", ", ".join(_show(f) for f in folders)),
              ("command", " ".join(argv) if argv is not None else " ".join(["attnbench", *sys.argv[1:]]))]
    if compare_with is not None:
        header.append(("compared with", _show(compare_with)))
    return Report(title, header, sections)


# ---- HTML -------------------------------------------------------------------------------------

ASSETS = resources.files("attnbench.report") / "assets"


def asset(name: str) -> str:
    """A file of ``assets`` (package data), to be inlined: the page fetches nothing."""
    return (ASSETS / name).read_text(encoding="utf-8")


def _numeric(series: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)


def _html_table(table: Table) -> str:
    frame = table.frame
    parts = ["<table>"]
    if table.caption:
        parts.append(f"<caption>{html.escape(table.caption)}</caption>")
    parts.append("<thead><tr>")
    numeric = [_numeric(frame[c]) for c in frame.columns]
    for c, num in zip(frame.columns, numeric, strict=True):
        parts.append(f'<th class="sortable"{" data-numeric" if num else ""}>{html.escape(str(c))}</th>')
    parts.append("</tr></thead><tbody>")
    for row in frame.itertuples(index=False):
        cells = "".join(_html_cell(v, num) for v, num in zip(row, numeric, strict=True))
        parts.append(f"<tr>{cells}</tr>")
    parts.append("</tbody></table>")
    return "".join(parts)


LONG = 120  # characters of a cell shown; the whole text is its tooltip


def _html_cell(value: Any, numeric: bool) -> str:
    text = cell(value)
    if numeric:
        return f'<td class="num">{html.escape(text)}</td>'
    if len(text) > LONG:
        return f'<td class="long" title="{html.escape(text)}">{html.escape(text[:LONG - 1])}…</td>'
    return f'<td{" class=short" if len(text) <= 24 else ""}>{html.escape(text)}</td>'


def _html_blocks(blocks: Iterable[Any]) -> str:
    out = []
    for block in blocks:
        if isinstance(block, Text):
            tag = "pre" if block.pre else "p"
            out.append(f"<{tag}{' class=legend' if block.small else ''}>{html.escape(block.text)}</{tag}>")
        elif isinstance(block, Table):
            out.append(_html_table(block))
        elif isinstance(block, Figure):
            data = base64.b64encode(block.png).decode("ascii")
            out.append(f'<figure><img alt="{html.escape(block.caption)}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{html.escape(block.caption)}</figcaption></figure>")
        elif isinstance(block, Cards):
            out.append('<div class="cards">' + "".join(f'<div class="card">{_html_table(t)}</div>'
                                                       for t in block.tables) + "</div>")
        elif isinstance(block, Details):
            out.append(f"<details><summary>{html.escape(block.summary)}</summary>{_html_blocks(block.blocks)}"
                       "</details>")
    return "\n".join(out)


def render_html(report: Report) -> str:
    toc = "".join(f'<li><a href="#{s.anchor}">{html.escape(s.title)}</a></li>' for s in report.sections
                  if s.level == 2)
    header = " · ".join(f"<span><b>{html.escape(k)}</b> <code>{html.escape(v)}</code></span>"
                        for k, v in report.header)
    body = "\n".join(f'<section id="{s.anchor}"><h{s.level}>{html.escape(s.title)}</h{s.level}>'
                     f"{_html_blocks(s.blocks)}</section>" for s in report.sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(report.title)}</title><style>{asset('report.css')}</style>"
            f"<script>{asset('errors.js')}</script></head>"
            f'<body><h1>{html.escape(report.title)}</h1><p class="header">{header}</p>'
            f"<nav><ol>{toc}</ol></nav>\n{body}\n<script>{asset('sort.js')}</script></body></html>\n")


# ---- Markdown ---------------------------------------------------------------------------------


def _md_cell(value: Any) -> str:
    return cell(value).replace("|", "\\|").replace("\n", " ")


def _md_table(table: Table) -> str:
    frame = table.frame
    lines = [f"*{table.caption}*", ""] if table.caption else []
    lines.append("| " + " | ".join(_md_cell(c) for c in frame.columns) + " |")
    lines.append("|" + "|".join("---:" if _numeric(frame[c]) else "---" for c in frame.columns) + "|")
    lines += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def _md_blocks(blocks: Iterable[Any], images: Path, link: str) -> str:
    out = []
    for block in blocks:
        if isinstance(block, Text):
            out.append(f"```text\n{block.text}\n```" if block.pre else block.text)
        elif isinstance(block, Table):
            out.append(_md_table(block))
        elif isinstance(block, Cards):
            out.append("\n\n".join(_md_table(t) for t in block.tables))
        elif isinstance(block, Figure):
            images.mkdir(parents=True, exist_ok=True)
            (images / block.name).write_bytes(block.png)
            out.append(f"![{block.caption}]({link}/{block.name})\n\n*{block.caption}*")
        elif isinstance(block, Details):
            out.append(f"<details><summary>{html.escape(block.summary)}</summary>\n\n"
                       f"{_md_blocks(block.blocks, images, link)}\n\n</details>")
    return "\n\n".join(out)


def render_markdown(report: Report, out: Path) -> str:
    """The report as Markdown; its plots are written to ``<out stem>_files/`` beside ``out``."""
    images = out.parent / f"{out.stem}_files"
    if images.exists():
        shutil.rmtree(images)
    parts = [f"# {report.title}", "", *[f"- **{k}**: `{v}`" for k, v in report.header], "",
             "Contents: " + " · ".join(f"[{s.title}](#{s.anchor})" for s in report.sections if s.level == 2)]
    for s in report.sections:
        parts += ["", f'<a id="{s.anchor}"></a>', "", f"{'#' * s.level} {s.title}", "",
                  _md_blocks(s.blocks, images, images.name)]
    return "\n".join(parts) + "\n"


def write(report: Report, out: Path, fmt: str) -> list[Path]:
    """Write the report; the files written (the page, and for Markdown its images)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "md":
        write_atomic(out, render_markdown(report, out))
        images = out.parent / f"{out.stem}_files"
        return [out, *sorted(images.glob("*.png"))] if images.exists() else [out]
    write_atomic(out, render_html(report))
    return [out]
