"""The accuracy sweep's plots (``attnbench scale --task``), in the project's conventions
(``attnbench.plots.style``): accuracy against n per mechanism variant, and at each n accuracy against
its cost (time per training step, peak memory) with the Pareto front. What is drawn is the task's
score (``attnbench.task.SweepScore``): accuracy from chance up, or a language model's perplexity,
lower is better, on a log axis with a unigram model's beside it.

Means are over distinct seeds (``attnbench.results.aggregate.sweep_stats``), error bars their
standard deviation where there are two seeds or more; points that did not finish are marked by kind
where they failed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib import ticker, transforms
from matplotlib.lines import Line2D

from attnbench.plots.style import (
    cost_axis,
    dodge,
    draw_failures,
    failure_figure,
    failure_handles,
    label_lines,
    marker_kwargs,
    mechanism_handle,
    ordered,
    plain,
    rank_variants,
    save_figure,
    score_limits,
    seeds_text,
    side_legend,
    style,
    ticks_at,
    wrap,
)
from attnbench.results.aggregate import baseline_of, failures, sweep_stats
from attnbench.task import ACCURACY, SweepScore

FRONTIER_COLUMNS = 4  # panels per row of a frontier figure: one per n
FRONT = {"color": "0.45", "lw": 1.2, "ls": "-", "marker": "o", "ms": 14, "mfc": "none", "mec": "0.6"}


def title(meta: dict[str, Any]) -> str:
    """What the sweep trained, at what budget, where."""
    sweep = meta.get("sweep", {})
    budget = (f"{sweep['time_budget']:g} s of training per point" if sweep.get("time_budget")
              else "equal optimiser steps per point")
    machine = ", ".join(str(v) for v in (meta.get("cpu"), meta.get("gpu")) if v)
    count = sweep.get("threads")
    threads = f"{count} thread{'s' if count != 1 else ''}" if sweep.get("device") == "cpu" else ""
    where = ", ".join(p for p in (machine, sweep.get("device"), threads, meta.get("dtype")) if p)
    return f"{sweep.get('task', meta.get('task', 'task'))}, {budget}" + (f"; {where}" if where else "")


def pareto_front(costs: list[float], scores: list[float], higher_is_better: bool = True) -> list[int]:
    """Indices of the points no other point beats on both cost (lower) and score (higher, or lower
    where ``higher_is_better`` is False), in order of cost: each costs more than the one before and
    scores better."""
    if not higher_is_better:
        scores = [-v for v in scores]
    order = sorted(range(len(costs)), key=lambda i: (costs[i], -scores[i]))
    front, best = [], -math.inf
    for i in order:
        if math.isfinite(costs[i]) and math.isfinite(scores[i]) and scores[i] > best:
            front.append(i)
            best = scores[i]
    return front


def _chance(stats: pd.DataFrame, score: SweepScore = ACCURACY) -> pd.Series:
    """The no-skill level per n (chance accuracy in %, a unigram model's perplexity), where the task
    records it."""
    column = score.floor
    if score.floor is None or column not in stats.columns:
        return pd.Series(dtype=float)
    return stats.groupby("seq_len")[column].mean().dropna()


def _score_limits(stats: pd.DataFrame, score: SweepScore = ACCURACY) -> tuple[float, float]:
    """The accuracy axis, always from chance (a mechanism that collapses to it is the finding), a
    little wider than the points so that the chance line and 100 % stay clear of the frame; a score
    where lower is better (perplexity, a log axis): from below the best point to above the worst and
    the no-skill line."""
    chance = _chance(stats, score)
    mean, std = stats[score.column], stats[f"{score.column}_std"].where(stats["seeds"] > 1)
    if not score.higher_is_better:
        values = pd.concat([mean - std.fillna(0.0), mean + std.fillna(0.0), chance])
        values = values[np.isfinite(values) & (values > 0)]
        if values.empty:
            return 1.0, 10.0
        return float(values.min()) / 1.1, float(values.max()) * 1.1
    lo, hi = score_limits(mean, std, floor=float(chance.min()) if len(chance) else 0.0)
    pad = 0.03 * (hi - lo)
    return lo - pad, hi + pad


def _score_axis(ax: plt.Axes, score: SweepScore, limits: tuple[float, float]) -> None:
    """The score's axis: linear for accuracy, logarithmic for a perplexity (lower is better)."""
    if not score.higher_is_better:  # ticks at 1, 2, 5 × 10^k, labelled plainly
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_ylim(*limits)
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(plain))


def _as_series(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows with each variant as a ``mechanism`` of its own, as ``attnbench.plots.style`` draws series."""
    return rows.assign(mechanism=rows["variant"])


def _breaking_note(label: str, breaking: pd.DataFrame, baseline: str) -> str:
    """What the legend says of a variant's breaking length."""
    if label == baseline:
        return "baseline"
    mine = breaking[breaking["variant"] == label]
    if mine.empty:
        return ""
    text = str(mine["breaking"].iloc[0])
    if text == "none":
        return "never breaks"
    return text if text.startswith("n/a") else f"breaks at n = {text}"


def accuracy_against_n(table: pd.DataFrame, breaking: pd.DataFrame, heading: str,
                       score: SweepScore = ACCURACY) -> plt.Figure | None:
    """Mean accuracy (the score) over seeds against n per variant (error bars: std over seeds), the
    chance level, and above the panel the points that did not finish."""
    if score.column not in table.columns:
        return None
    stats = sweep_stats(table, score)
    if stats.empty:
        return None
    column = score.column
    failed = _as_series(failures(table))
    baseline = str(breaking["baseline"].iloc[0]) if len(breaking) else baseline_of(table)
    fig, (ax,), (strip,) = failure_figure(failed["mechanism"].nunique(), 1, 10, 5.2)
    handles = []
    for label in ordered(stats["variant"]):
        rows = stats[stats["variant"] == label].sort_values("seq_len")
        s = style(label)
        spread = rows[f"{column}_std"].where(rows["seeds"] > 1)
        note = _breaking_note(label, breaking, baseline)
        container = ax.errorbar(rows["seq_len"], rows[column], yerr=spread.fillna(0.0), capsize=3,
                                ls=s.linestyle, lw=s.linewidth * 0.8, ecolor=s.colour, clip_on=False,
                                **marker_kwargs(label, 6))
        container.set_label(f"{label} ({seeds_text(rows['seeds'])}{'; ' + note if note else ''})")
        handles.append(container)
    chance = _chance(stats, score)
    if len(chance):
        ax.plot(chance.index, chance.values, color="0.4", ls=":", lw=1.2, marker="")
        handles.append(Line2D([], [], color="0.4", ls=":", lw=1.2, label=score.floor_label))
    _score_axis(ax, score, _score_limits(stats, score))
    ax.set_xscale("log", base=2)
    ticks_at(ax.xaxis, table["seq_len"].dropna().unique())
    ax.set_xlabel("sequence length n (tokens)")
    ax.set_ylabel(score.label)
    ax.grid(True, which="major", alpha=0.3)
    draw_failures(strip, failed, "seq_len")
    handles += failure_handles(failed)
    side_legend(ax, handles, fontsize=7.5,
                title=f"mean ± std over seeds; breaking:\nover {score.margin_text()} {baseline}")
    name = score.label.split(" (")[0]
    fig.suptitle(wrap(f"{name[:1].upper()}{name[1:]} against sequence length: {heading}", fig, 10, 0.75),
                 fontsize=10)
    return fig


def frontier(table: pd.DataFrame, cost: str, xlabel: str, heading: str,
             score: SweepScore = ACCURACY) -> plt.Figure | None:
    """At each n, a panel of accuracy (the score, mean over seeds) against ``cost`` per variant, the
    Pareto front (no other point cheaper and better) drawn through the points on it."""
    if score.column not in table.columns:
        return None
    stats = sweep_stats(table, score)
    column = score.column
    if stats.empty or cost not in stats.columns or not stats[cost].notna().any():
        return None
    failed = failures(table)
    lengths = sorted(int(n) for n in stats["seq_len"].unique())
    ncols = min(FRONTIER_COLUMNS, len(lengths))
    nrows = math.ceil(len(lengths) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.3 * ncols + 3.0, 3.1 * nrows + 0.9), sharey=True,
                             squeeze=False, layout="constrained")
    limits = _score_limits(stats, score)
    labels = ordered(stats["variant"])
    dodged = False
    for ax, n in zip(axes.flat, lengths, strict=False):
        here = stats[(stats["seq_len"] == n) & stats[cost].notna()].reset_index(drop=True)
        x, y = here[cost], here[column]
        cost_axis(ax, x)
        log = ax.get_xscale() == "log"
        where = np.log(x) if log else x
        x_span = float(where.max() - where.min()) or 1.0
        y_at = np.log(y) if not score.higher_is_better else y  # the axis's own scale
        y_span = (np.log(limits[1] / limits[0]) if not score.higher_is_better else limits[1] - limits[0])
        shift = dodge(list(zip(where, y_at, strict=True)), x_span, y_span)
        dodged |= any(shift)
        front = pareto_front(list(x), list(y), score.higher_is_better)
        ax.plot(x.iloc[front], y.iloc[front], **{**FRONT, "marker": ""}, drawstyle="steps-post", zorder=0)
        for i in [i for label in ordered(here["variant"]) for i in here.index[here["variant"] == label]]:
            r = here.loc[i]
            std = r[f"{column}_std"]
            err = std if r["seeds"] > 1 and math.isfinite(std) else 0.0
            moved = transforms.offset_copy(ax.transData, fig=fig, x=shift[i], units="points")
            if i in front:  # the ring moves with its marker
                ax.plot([x[i]], [y[i]], **{**FRONT, "ls": ""}, transform=moved, clip_on=False, zorder=1)
            ax.errorbar([x[i]], [y[i]], yerr=[err], capsize=3, ls="", ecolor=style(r["variant"]).colour,
                        clip_on=False, transform=moved, **marker_kwargs(r["variant"], 7))
        missing = sorted(set(failed[failed["seq_len"] == n]["variant"]))
        ax.set_title(f"n = {n}" + (f"\n{label_lines('not finished: ' + ', '.join(missing), 34)}" if missing
                                    else ""), fontsize=8.5)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(lengths):]:
        ax.set_visible(False)
    for row in axes:
        row[0].set_ylabel(score.label)
    _score_axis(axes[0][0], score, limits)
    handles = [mechanism_handle(label, line=False) for label in labels]
    handles.append(Line2D([], [], **FRONT, label="Pareto front"))
    legend_title = "mean over seeds\n(bars: std)"
    if dodged:
        legend_title += "\n(markers at one point:\nset apart, left to right)"
    side_legend(axes[0][ncols - 1], handles, fontsize=7.5, title=legend_title)
    name = score.label.split(" (")[0]
    fig.suptitle(wrap(f"{name[:1].upper()}{name[1:]} against {xlabel.split(' (')[0]} at each n: {heading}",
                      fig, 10, 0.8), fontsize=10)
    return fig


def accuracy_sweep_plots(table: pd.DataFrame, breaking: pd.DataFrame, out: Path,
                         meta: dict[str, Any], tuned: str = "", score: SweepScore = ACCURACY) -> list[Path]:
    """``accuracy_n``, ``frontier_time`` and ``frontier_memory`` (PNG and SVG) in ``out``: the score
    (accuracy, or perplexity) against n, and against cost; ``tuned``: how each point's run was chosen,
    in the title (``attnbench.sweeps.tuning.label``)."""
    rank_variants(table["variant"].dropna())
    heading = title(meta) + (f"; {tuned}" if tuned else "")
    written: list[Path] = []
    for stem, fig in (("accuracy_n", accuracy_against_n(table, breaking, heading, score)),
                      ("frontier_time", frontier(table, "step_ms", "time per training step (ms)", heading,
                                                 score)),
                      ("frontier_memory", frontier(table, "peak_mem_mib", "peak memory (MiB)", heading,
                                                   score))):
        if fig is not None:
            written += save_figure(fig, out, stem)
    return written
