"""The kernel sweep's plots (``scale``): time, memory and the decode costs against the sequence
length, log-log with the fitted exponents, and the same-round ratios against the baselines."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import ticker
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from attnbench.plots.style import (
    failed_rows,
    failure_figure,
    failure_handles,
    log_log_panel,
    marker_kwargs,
    ordered,
    plain,
    plt,
    rank_variants,
    save_figure,
    side_legend,
    sorted_bars,
    style,
    wrap,
)
from attnbench.results.tables import flag

GUIDES = {0: ("-.", "O(1)"), 1: (":", "O(n)"), 2: ("--", "O(n²)")}


def _reference_slopes(ax: plt.Axes, n: np.ndarray, y0: float, powers: Sequence[int] = (1, 2)) -> None:
    """Faint guides of the given slopes (O(n) and O(n²); O(1) and O(n) for decoding) through (min n, y0)."""
    lo, hi = n.min(), n.max()
    xs = np.array([lo, hi])
    for power in powers:
        line, name = GUIDES[power]
        ax.plot(xs, y0 * (xs / lo) ** power, line, color="0.55", lw=1, alpha=0.7, zorder=0,
                label=f"guide: slope {power}, {name}")


def _fit_label(mech: str, fit: pd.DataFrame, prefix: str) -> str:
    """``set: n^1.00 [0.95, 1.05]``: the exponent with its 95 % interval, where there is one."""
    if fit.empty or f"{prefix}_exponent" not in fit or not math.isfinite(fit[f"{prefix}_exponent"].iloc[0]):
        return mech
    exp = fit[f"{prefix}_exponent"].iloc[0]
    lo, hi = fit.get(f"{prefix}_ci_low"), fit.get(f"{prefix}_ci_high")
    if lo is None or hi is None or not (math.isfinite(lo.iloc[0]) and math.isfinite(hi.iloc[0])):
        return f"{mech}: n^{exp:.2f}"
    return f"{mech}: n^{exp:.2f} [{lo.iloc[0]:.2f}, {hi.iloc[0]:.2f}]"


QUARTILE_COLUMNS = ("time_ms_q1", "time_ms_q3")


def _against_n(rows: pd.DataFrame, fits: pd.DataFrame, column: str, prefix: str, unit: str,
               what: str, mode: str, title: str, powers: Sequence[int] = (1, 2),
               x_label: str = "sequence length n (tokens)") -> plt.Figure | None:
    ok = rows[(rows["status"] == "ok") & (rows[column] > 0)]
    if ok.empty:
        return None
    failed = failed_rows(rows)
    fig, (ax,), (strip,) = failure_figure(failed["mechanism"].nunique(), 1, 10, 5.2)
    band = column == "time_ms_median" and rows[list(QUARTILE_COLUMNS)].notna().any(axis=None)
    noisy_any = False
    for mech in ordered(ok["mechanism"]):
        group = ok[ok["mechanism"] == mech].sort_values("n")
        s = style(mech)
        fit = fits[fits["mechanism"] == mech]
        ax.plot(group["n"], group[column], ls=s.linestyle, lw=s.linewidth,
                label=_fit_label(mech, fit, prefix), **marker_kwargs(mech, 5))
        noisy = flag(group, "noisy")
        if noisy.any():
            noisy_any = True
            ax.plot(group["n"][noisy], group[column][noisy], ls="", marker=s.marker, mfc="white",
                    mec=s.colour, mew=1.2, ms=7)
        if band:
            q = group[list(QUARTILE_COLUMNS)].astype(float)
            keep = (q > 0).all(axis=1)
            ax.fill_between(group["n"][keep], q["time_ms_q1"][keep], q["time_ms_q3"][keep], color=s.colour,
                            alpha=0.2, lw=0)
    ns = np.sort(ok["n"].unique())
    _reference_slopes(ax, ns, float(ok[ok["n"] == ns[0]][column].median()), powers)
    log_log_panel(ax, strip, failed, rows, "n", x_label, unit)
    handles, _ = ax.get_legend_handles_labels()
    if column == "time_ms_median":
        handles.append(Patch(fc="0.6", alpha=0.35, label="quartiles of the timed runs") if band else
                       Patch(fc="none", ec="none", label="no quartile band: this table records only the "
                             "IQR's width"))
    if noisy_any:
        handles.append(Line2D([], [], ls="", marker="o", mfc="white", mec="0.3",
                              label="noisy: left out of the fit"))
    handles += failure_handles(failed)
    unavailable = sorted(set(rows[rows["status"] == "unavailable"]["mechanism"]))
    if unavailable:
        handles.append(Patch(fc="none", ec="none", label=f"not run here: {', '.join(unavailable)}"))
    side_legend(ax, handles, fontsize=7.5, title=f"{what} ∝ n^k, 95% CI")
    fig.suptitle(wrap(f"{what.capitalize()} against n ({mode}), {title}", fig, 10, 0.75), fontsize=10)
    return fig


# (column, fit prefix, axis label, file stem, guide slopes) per figure of a mode
KERNEL_PANELS = (("time_ms_median", "time", "time per step (ms)", "time", (1, 2)),
                 ("peak_mem_mib", "memory", "peak memory (MiB)", "memory", (1, 2)))
DECODE_PANELS = (("time_ms_median", "time", "time per generated token (ms)", "time", (0, 1)),
                 ("cache_mib", "cache", "cache memory, measured (MiB)", "cache", (0, 1)),
                 ("prefill_ms", "prefill", "prefill of the n-token prompt (ms)", "prefill", (1, 2)),
                 ("peak_mem_mib", "memory", "peak memory of one step (MiB)", "memory", (0, 1)))


def scaling_plots(table: pd.DataFrame, fits: pd.DataFrame, out: Path, title: str,
                  ratios: pd.DataFrame | None = None) -> list[Path]:
    """Per mode: time and memory against n, log-log (quartile bands, noisy rows hollow and left
    out of the fits, failures marked at their n), and ratio bars against the baseline."""
    written: list[Path] = []
    rank_variants(table["mechanism"])
    for mode in sorted(table["mode"].dropna().unique()):
        rows = table[table["mode"] == mode]
        if not (rows["status"] == "ok").any():
            continue
        mode_fits = fits[fits["mode"] == mode] if "mode" in fits.columns else fits
        panels = DECODE_PANELS if mode == "decode" else KERNEL_PANELS
        if mode == "decode" and "cache_bytes" in rows.columns:
            rows = rows.assign(cache_mib=pd.to_numeric(rows["cache_bytes"]) / 2**20)
        for column, prefix, unit, stem, powers in panels:
            if column not in rows.columns:
                continue
            x_label = "context n (tokens held)" if mode == "decode" else "sequence length n (tokens)"
            fig = _against_n(rows, mode_fits, column, prefix, unit, stem, mode, title, powers, x_label)
            if fig is not None:
                written += save_figure(fig, out, f"{stem}_{mode.replace('+', '_')}")
        mode_ratios = ratios[ratios["mode"] == mode] if ratios is not None and len(ratios) else None
        written += _ratio_bars(rows[rows["status"] == "ok"], out, mode, title, mode_ratios)
    return written


def _ratio_bars(rows: pd.DataFrame, out: Path, mode: str, title: str,
                ratios: pd.DataFrame | None = None) -> list[Path]:
    """Time and memory relative to the baseline at the largest n where all ran, sorted; the time
    from the rounds where both were timed together (median, whiskers at the quartiles) where
    there are such rounds."""
    baseline = next((b for b in ("softmax", "sdpa") if b in set(rows["mechanism"])), None)
    if baseline is None:
        return []
    base = rows[rows["mechanism"] == baseline].set_index("n")
    mechs = ordered(rows["mechanism"])
    common = set(base.index)
    for m in mechs:
        common &= set(rows[rows["mechanism"] == m]["n"])
    if not common:
        return []
    n = max(common)
    at_n = rows[rows["n"] == n].drop_duplicates("mechanism").set_index("mechanism")
    same_round = pd.DataFrame()
    if ratios is not None and len(ratios):
        same_round = ratios[(ratios["n"] == n) & (ratios["baseline"] == baseline)].set_index("mechanism")
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.36 * len(mechs) + 2.0), layout="constrained")
    for ax, column, what in ((axes[0], "time_ms_median", "time"), (axes[1], "peak_mem_mib", "peak memory")):
        b = base.loc[n, column]
        b = b.iloc[0] if isinstance(b, pd.Series) else b
        values = [at_n.loc[m, column] / b if b > 0 and at_n.loc[m, column] > 0 else math.nan for m in mechs]
        low = high = None
        heading = what
        if column == "time_ms_median" and len(same_round):
            low, high = list(values), list(values)
            for i, m in enumerate(mechs):
                if m in same_round.index:
                    values[i], low[i], high[i] = (same_round.loc[m, c] for c in ("ratio_median", "ratio_q1",
                                                                                 "ratio_q3"))
            heading = "time, from the same rounds (whiskers: quartiles)"
        ax.set_xscale("log")
        sorted_bars(ax, mechs, values, low, high, base=1.0, fmt=lambda v: f"{v:.2g}×")
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(plain))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel(f"{what} relative to {baseline} (×; left of 1: less)")
        ax.set_title(heading, fontsize=9)
        ax.grid(True, axis="x", which="major", alpha=0.3)
    fig.suptitle(wrap(f"Against {baseline} at n = {n} (the largest n every mechanism ran), {mode}, {title}",
                      fig, 10), fontsize=10)
    return save_figure(fig, out, f"ratios_{mode.replace('+', '_')}")


def sweep_title(meta: dict[str, Any]) -> str:
    title = f"{meta.get('cpu') or ''} {meta.get('gpu') or ''}".strip()
    sweep = meta.get("sweep", {})
    if sweep:
        title += (f", {sweep.get('device')}, {sweep.get('threads')} threads, B={sweep.get('batch')}, "
                  f"H={sweep.get('heads')}, d={sweep.get('head_dim')}, {sweep.get('dtype')}"
                  f"{', compiled' if sweep.get('compile') else ''}"
                  f"{', causal' if sweep.get('causal') else ''}")
    return title
