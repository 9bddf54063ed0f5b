"""A task results table's plots: the task's own (``Task.plot``), else top-1 against cost."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import ticker, transforms
from matplotlib.lines import Line2D

from attnbench.plots.style import (
    MIN_COST_SPAN,
    cost_axis,
    dodge,
    figure_groups,
    marker_kwargs,
    ordered,
    plain,
    plt,
    save_figure,
    score_limits,
    seeds_text,
    side_legend,
    style,
    wrap,
)
from attnbench.results.aggregate import seed_stats
from attnbench.task import UnknownTaskError, get_task


def chance(rows: pd.DataFrame) -> float:
    """Chance accuracy in % from the table's ``num_classes`` (0 where unknown)."""
    if "num_classes" in rows.columns and rows["num_classes"].notna().any():
        k = float(rows["num_classes"].dropna().iloc[0])
        return 100.0 / k if k >= 2 else 0.0
    return 0.0


def score_against_cost(stats: pd.DataFrame, metric: str, ylabel: str,
                       panels: Sequence[tuple[str, str, float]], floor: float, floor_label: str | None,
                       title: str, legend_title: str) -> plt.Figure:
    """One panel per (cost column, label, scale): the metric's mean over seeds (error bars: the std
    where there are two seeds or more) against the cost, per mechanism; a mechanism's sizes joined
    in order of cost. Score axis from ``floor`` unless every point has error bars."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels) + 2.2, 4.6), sharey=True,
                             layout="constrained", squeeze=False)
    axes = list(axes[0])
    spread = stats[f"{metric}_std"].where(stats["seeds"] > 1)
    lo, hi = score_limits(stats[metric], spread, floor=floor,
                          all_have_errors=bool((stats["seeds"] > 1).all()))
    handles = []
    dodged = False
    for ax, (column, label, scale) in zip(axes, panels, strict=True):
        xs = stats[column] / scale
        log = xs.max() / xs.min() > 8 if (xs > 0).all() else False
        where = np.log(xs) if log else xs
        x_span = float(where.max() - where.min()) if log else max(float(xs.max() - xs.min()) * 1.2,
                                                                  MIN_COST_SPAN * float(xs.mean()))
        shift = dict(zip(stats.index, dodge(list(zip(where, stats[metric], strict=True)), x_span, hi - lo),
                         strict=True))
        for mech in ordered(stats["mechanism"]):
            group = stats[stats["mechanism"] == mech].sort_values(column)
            s = style(mech)
            err = spread[group.index]
            dx = max((shift[i] for i in group.index), key=abs)
            dodged |= dx != 0
            moved = transforms.offset_copy(ax.transData, fig=fig, x=dx, units="points")
            container = ax.errorbar(group[column] / scale, group[metric], yerr=err.where(err.notna(), 0.0),
                                    ls=s.linestyle if len(group) > 1 else "", lw=s.linewidth * 0.7, capsize=3,
                                    ecolor=s.colour, transform=moved, **marker_kwargs(mech, 8))
            if ax is axes[0]:
                container.set_label(f"{mech} ({seeds_text(group['seeds'])})")
                handles.append(container)
        cost_axis(ax, stats[column] / scale)
        ax.set_xlabel(label)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylim(lo, hi)
    axes[0].yaxis.set_major_formatter(ticker.FuncFormatter(plain))
    if floor_label and lo <= floor <= hi:
        for ax in axes:
            ax.axhline(floor, color="0.4", ls=":", lw=1)
        handles.append(Line2D([], [], color="0.4", ls=":", lw=1, label=floor_label))
    axes[0].set_ylabel(ylabel)
    if dodged:
        legend_title += "\n(markers at one point: set a few\npoints apart, left to right)"
    side_legend(axes[-1], handles, fontsize=8, title=legend_title)
    fig.suptitle(wrap(title, fig, 10, 0.8), fontsize=10)
    return fig


def accuracy_plots(table: pd.DataFrame, out: Path, title: str = "") -> list[Path]:
    """Top-1 against forward GFLOPs and against parameters per mechanism, one figure per task,
    data set, image size (and any other configuration that varies); mean ± std over distinct
    seeds, with n. ``title``: added to the figure's title unless it repeats the task's name."""
    written: list[Path] = []
    ok = table[table["status"] == "ok"] if "status" in table.columns else table
    if ok.empty:
        return written
    stats = seed_stats(ok, ["top1"], ["gflops", "params"])
    for key, rows, suffix in figure_groups(stats, ["task", "dataset", "img_size"], ["mechanism", "size"]):
        task, dataset, img = key.get("task", "task"), key.get("dataset", "data"), key.get("img_size", "")
        sizes = list(dict.fromkeys(rows["size"])) if "size" in rows.columns else []
        heading = f"{task} on {dataset} at {img}² px: top-1 against cost"
        if title and title != task:
            heading += f", {title}"
        fig = score_against_cost(
            rows, "top1", "top-1 accuracy (%)",
            [("gflops", f"forward GFLOPs per {img}² image (2 per MAC)", 1.0),
             ("params", "parameters (millions)", 1e6)],
            chance(rows), f"chance ({chance(rows):.3g} %)", heading,
            "mean ± std over seeds"
            + (f"; sizes {', '.join(map(str, sizes))} joined" if len(sizes) > 1 else ""))
        stem = f"accuracy_{task}_{dataset}_{img}{suffix}".replace(":", "-").replace("/", "-")
        written += save_figure(fig, out, stem)
    return written


def task_plots(path: Path, rows: pd.DataFrame, out: Path) -> list[Path]:
    """A task table's plots: the task's own (``Task.plot``), else top-1 against cost where the
    table has those columns."""
    written: list[Path] = []
    names = [t for t in dict.fromkeys(rows["task"].dropna()) if t] if "task" in rows.columns else []
    for name in names:
        mine = rows[rows["task"] == name]
        try:
            task = get_task(name)()
            plot = getattr(task, "plot", None)
        except (UnknownTaskError, TypeError):
            plot = None
        drawn = plot(mine, out) if plot is not None else []
        if not drawn and {"top1", "gflops", "params"} <= set(mine.columns):
            drawn = accuracy_plots(mine, out, path.stem)
        written += list(drawn)
    return written
