"""The resolution probe's plot: peak memory and time per training step against the image side."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from attnbench.plots.style import (
    failed_rows,
    failure_figure,
    failure_handles,
    log_log_panel,
    marker_kwargs,
    ordered,
    save_figure,
    side_legend,
    style,
    wrap,
)


def resolution_plots(table: pd.DataFrame, out: Path, title: str, limit_mib: float | None) -> list[Path]:
    """Peak memory and time per training step against the image side, log-log, per mechanism,
    a tick at every side tried; the sides that did not train marked by kind above the panels."""
    if not (table["status"] == "ok").any():
        return []  # nothing trained: the table says why
    failed = failed_rows(table)
    fig, axes, strips = failure_figure(failed["mechanism"].nunique(), 2, 12, 4.8)
    for ax, strip, column, unit in (
            (axes[0], strips[0], "peak_mem_mib", "peak memory of a training step (MiB)"),
            (axes[1], strips[1], "step_ms", "time per training step (s)")):
        scale = 1e-3 if column == "step_ms" else 1.0
        for mech in ordered(table["mechanism"]):
            rows = table[(table["mechanism"] == mech) & (table["status"] == "ok")].sort_values("side")
            s = style(mech)
            largest = f"largest trained {int(rows['side'].max())} px" if len(rows) else "none trained"
            ax.plot(rows["side"], rows[column] * scale, ls=s.linestyle, lw=s.linewidth,
                    label=f"{mech} ({largest})", **marker_kwargs(mech, 5))
        if column == "peak_mem_mib" and limit_mib:
            ax.axhline(limit_mib, color="0.3", ls="--", lw=1,
                       label=f"memory limit {limit_mib / 1024:.1f} GiB")
        log_log_panel(ax, strip, failed, table, "side", "image side (pixels)", unit)
    handles, _ = axes[0].get_legend_handles_labels()
    side_legend(axes[-1], handles + failure_handles(failed), fontsize=8)
    fig.suptitle(wrap(title, fig, 10, 0.8), fontsize=10)
    return save_figure(fig, out, "resolution")


def probe_title(table: pd.DataFrame, meta: dict[str, Any]) -> str:
    first = table.iloc[0]
    probe = meta.get("probe", {})
    device, threads = probe.get("device", first.get("device")), probe.get("threads", first.get("threads"))
    machine = ", ".join(str(v) for v in (meta.get("cpu"), meta.get("gpu")) if v)
    return (f"{first['task']}, {first['size']} backbone: one training step at growing image sides"
            f"{', ' + machine if machine else ''}, {device}, {threads} threads")
