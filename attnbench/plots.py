"""Comparison plots. One colour per mechanism everywhere in the project, units on every axis."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files, not windows: runs headless and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

# Fixed colours for the built-in mechanisms (colour-blind-safe Tableau/Okabe-Ito hues); SeT
# gets the strongest. Plug-ins get a stable colour from their name.
COLOURS = {
    "set": "#d62728",
    "softmax": "#1f77b4",
    "sdpa": "#17becf",
    "xformers": "#9edae5",
    "swin": "#2ca02c",
    "nat": "#98df8a",
    "linear": "#ff7f0e",
    "performer": "#9467bd",
    "nystromformer": "#8c564b",
    "sinkformer": "#e377c2",
}
_SPARE = ["#7f7f7f", "#bcbd22", "#aec7e8", "#ffbb78", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d"]


def colour(mechanism: str) -> str:
    """The mechanism's colour, the same in every plot."""
    if mechanism in COLOURS:
        return COLOURS[mechanism]
    return _SPARE[int(hashlib.sha1(mechanism.encode()).hexdigest(), 16) % len(_SPARE)]


def _save(fig: plt.Figure, out: Path, stem: str) -> list[Path]:
    paths = [out / f"{stem}.png", out / f"{stem}.svg"]
    for p in paths:
        fig.savefig(p, dpi=150 if p.suffix == ".png" else None, bbox_inches="tight")
    plt.close(fig)
    return paths


def _reference_slopes(ax: plt.Axes, n: np.ndarray, y0: float) -> None:
    """Faint O(n) and O(n²) guides through (min n, y0)."""
    lo, hi = n.min(), n.max()
    xs = np.array([lo, hi])
    for power, style in ((1, ":"), (2, "--")):
        ax.plot(xs, y0 * (xs / lo) ** power, style, color="0.6", lw=1, alpha=0.6, zorder=0,
                label=f"slope {power} (O(n{'²' if power == 2 else ''}))")


def _fit_label(mech: str, fit: pd.DataFrame, prefix: str) -> str:
    """``set (n^1.00 [0.95, 1.05])``: the exponent with its 95 % interval, where there is one."""
    if fit.empty or not math.isfinite(fit[f"{prefix}_exponent"].iloc[0]):
        return mech
    exp = fit[f"{prefix}_exponent"].iloc[0]
    lo, hi = fit.get(f"{prefix}_ci_low"), fit.get(f"{prefix}_ci_high")
    if lo is None or hi is None or not (math.isfinite(lo.iloc[0]) and math.isfinite(hi.iloc[0])):
        return f"{mech} (n^{exp:.2f})"
    return f"{mech} (n^{exp:.2f} [{lo.iloc[0]:.2f}, {hi.iloc[0]:.2f}])"


def scaling_plots(table: pd.DataFrame, fits: pd.DataFrame, out: Path, title: str,
                  ratios: pd.DataFrame | None = None) -> list[Path]:
    """Time and memory against n, log-log, per mode (rows flagged noisy as hollow markers, left out
    of the fits), plus ratio bars against the baseline."""
    from attnbench.fit import flag

    written: list[Path] = []
    for mode in sorted(table["mode"].unique()):
        rows = table[(table["mode"] == mode) & (table["status"] == "ok")]
        if rows.empty:
            continue
        panels = (("time_ms_median", "time", "time per step (ms)", "time"),
                  ("peak_mem_mib", "memory", "peak memory (MiB)", "memory"))
        noisy_any = False
        for column, prefix, unit, stem in panels:
            fig, ax = plt.subplots(figsize=(7.5, 5))
            data = rows[rows[column] > 0]
            if data.empty:
                plt.close(fig)
                continue
            for mech, group in data.groupby("mechanism"):
                group = group.sort_values("n")
                fit = fits[(fits["mechanism"] == mech) & (fits["mode"] == mode)]
                lw = 2.6 if mech == "set" else 1.6
                ax.plot(group["n"], group[column], "-", color=colour(mech), lw=lw,
                        label=_fit_label(mech, fit, prefix))
                noisy = flag(group, "noisy")
                noisy_any |= bool(noisy.any())
                ax.plot(group["n"][~noisy], group[column][~noisy], "o", color=colour(mech), ms=4)
                ax.plot(group["n"][noisy], group[column][noisy], "o", mfc="white", mec=colour(mech), ms=6)
                if column == "time_ms_median" and (group["time_ms_iqr"] > 0).any():
                    low = np.maximum(group[column] - group["time_ms_iqr"] / 2, group[column] / 10)  # log axis
                    ax.fill_between(group["n"], low, group[column] + group["time_ms_iqr"] / 2,
                                    color=colour(mech), alpha=0.15)
            ns = np.sort(data["n"].unique())
            _reference_slopes(ax, ns, float(data[data["n"] == ns[0]][column].median()))
            if noisy_any:
                ax.plot([], [], "o", mfc="white", mec="0.4", label="noisy (left out of the fit)")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length n (tokens)")
            ax.set_ylabel(unit)
            ax.set_title(f"{stem.capitalize()} against n, {mode} (exponent [95% CI]) — {title}", fontsize=10)
            ax.grid(True, which="major", alpha=0.3)
            ax.legend(fontsize=7, loc="upper left", ncol=2)
            written += _save(fig, out, f"{stem}_{mode.replace('+', '_')}")
        mode_ratios = ratios[ratios["mode"] == mode] if ratios is not None and len(ratios) else None
        written += _ratio_bars(rows, out, mode, title, mode_ratios)
    return written


def _ratio_bars(rows: pd.DataFrame, out: Path, mode: str, title: str,
                ratios: pd.DataFrame | None = None) -> list[Path]:
    """Time and memory relative to the baseline at the largest n where both ran; the time from the
    rounds where both were timed together (median, whiskers at the quartiles) where there are such."""
    baseline = next((b for b in ("softmax", "sdpa") if b in set(rows["mechanism"])), None)
    if baseline is None:
        return []
    base = rows[rows["mechanism"] == baseline].set_index("n")
    mechs = sorted(set(rows["mechanism"]))
    common = set(base.index)
    for m in mechs:
        common &= set(rows[rows["mechanism"] == m]["n"])
    if not common:
        return []
    n = max(common)
    at_n = rows[rows["n"] == n].set_index("mechanism")
    same_round = (ratios[(ratios["n"] == n) & (ratios["baseline"] == baseline)].set_index("mechanism")
                  if ratios is not None else pd.DataFrame())
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, column, what in ((axes[0], "time_ms_median", "time"), (axes[1], "peak_mem_mib", "peak memory")):
        ratios_here = [at_n.loc[m, column] / base.loc[n, column]
                       if base.loc[n, column] > 0 and at_n.loc[m, column] > 0 else math.nan for m in mechs]
        errors = None
        if column == "time_ms_median" and len(same_round):
            for i, m in enumerate(mechs):
                if m in same_round.index:
                    ratios_here[i] = same_round.loc[m, "ratio_median"]
            low = [r - same_round.loc[m, "ratio_q1"] if m in same_round.index else 0 for m, r in
                   zip(mechs, ratios_here, strict=True)]
            high = [same_round.loc[m, "ratio_q3"] - r if m in same_round.index else 0 for m, r in
                    zip(mechs, ratios_here, strict=True)]
            errors = [np.nan_to_num(low), np.nan_to_num(high)]
        ax.barh(mechs, ratios_here, xerr=errors, color=[colour(m) for m in mechs], capsize=3)
        ax.axvline(1.0, color="0.3", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel(f"{what} relative to {baseline} (×, lower is better)")
        for y, r in enumerate(ratios_here):
            if math.isfinite(r):
                ax.text(r, y, f" {r:.2g}×", va="center", fontsize=8)
    fig.suptitle(f"At n = {n} (largest n all ran), {mode}; time: same-round ratios, whiskers at the quartiles"
                 f" — {title}", fontsize=10)
    fig.tight_layout()
    return _save(fig, out, f"ratios_{mode.replace('+', '_')}")


_SIZE_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]


def accuracy_plots(table: pd.DataFrame, out: Path, title: str) -> list[Path]:
    """Top-1 against forward GFLOPs and against parameters, one colour per mechanism, one marker
    per model size, one figure per (task, data set, image size); several seeds: mean ± std."""
    written: list[Path] = []
    ok = table[table["status"] == "ok"] if "status" in table.columns else table
    sizes = list(dict.fromkeys(ok["size"]))
    for (task, dataset, img), rows in ok.groupby(["task", "dataset", "img_size"]):
        stats = rows.groupby(["mechanism", "size"]).agg(
            top1=("top1", "mean"), spread=("top1", "std"), runs=("top1", "size"),
            gflops=("gflops", "median"), params=("params", "median")).reset_index()
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
        for ax, column, label in ((axes[0], "gflops", f"forward GFLOPs per image at {img}² (2 per MAC)"),
                                  (axes[1], "params", "parameters (millions)")):
            for _, r in stats.iterrows():
                x = r[column] / (1e6 if column == "params" else 1)
                marker = _SIZE_MARKERS[sizes.index(r["size"]) % len(_SIZE_MARKERS)]
                ax.errorbar(x, r["top1"], yerr=r["spread"] if r["runs"] > 1 else None, fmt=marker,
                            color=colour(r["mechanism"]), ms=9 if r["mechanism"] == "set" else 7, capsize=3)
                ax.annotate(f" {r['mechanism']}", (x, r["top1"]), fontsize=8, va="center")
            ax.set_xscale("log")
            plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:.3g}")  # 0.0236, not 2.36×10⁻²
            ax.xaxis.set_major_formatter(plain)
            ax.xaxis.set_minor_formatter(plain)
            ax.set_xlabel(label)
            ax.grid(True, which="both", alpha=0.3)
        axes[0].set_ylabel("top-1 accuracy (%)")
        handles = [plt.Line2D([], [], ls="", marker="o", color=colour(m), label=m)
                   for m in sorted(set(stats["mechanism"]))]
        handles += [plt.Line2D([], [], ls="", marker=_SIZE_MARKERS[sizes.index(s) % len(_SIZE_MARKERS)],
                               color="0.4", label=f"size {s}") for s in dict.fromkeys(stats["size"])]
        axes[1].legend(handles=handles, fontsize=8, loc="best")
        fig.suptitle(f"{task} on {dataset} at {img}²: accuracy against cost (mean ± std over seeds) "
                     f"— {title}", fontsize=10)
        fig.tight_layout()
        stem = f"accuracy_{task}_{dataset}_{img}".replace(":", "-").replace("/", "-")
        written += _save(fig, out, stem)
    return written


def resolution_plots(table: pd.DataFrame, out: Path, title: str, limit_mib: float | None) -> list[Path]:
    """Peak memory and time per training step against the image side, log-log, per mechanism;
    the sides that did not train are crosses on the memory limit."""
    if not (table["status"] == "ok").any():
        return []  # nothing trained: the table says why
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, column, unit in ((axes[0], "peak_mem_mib", "peak memory of a training step (MiB)"),
                             (axes[1], "step_ms", "time per training step (s)")):
        scale = 1e-3 if column == "step_ms" else 1.0
        for mech, rows in table.groupby("mechanism", sort=False):
            rows = rows.sort_values("side")
            ok = rows[rows["status"] == "ok"]
            lw = 2.6 if mech == "set" else 1.6
            ax.plot(ok["side"], ok[column] * scale, "o-", color=colour(mech), lw=lw, ms=4,
                    label=f"{mech} (largest {int(ok['side'].max())} px)" if len(ok) else f"{mech} (none)")
            failed = rows[~rows["status"].isin(["ok", "unavailable"])]
            if len(failed) and column == "peak_mem_mib" and limit_mib:
                ax.plot(failed["side"], [limit_mib] * len(failed), "x", color=colour(mech), ms=9, mew=2)
        if column == "peak_mem_mib" and limit_mib:
            ax.axhline(limit_mib, color="0.3", ls="--", lw=1,
                       label=f"memory limit {limit_mib / 1024:.1f} GiB (×: did not train)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("image side (pixels)")
        ax.set_ylabel(unit)
        ax.grid(True, which="major", alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, out, "resolution")
