"""How cost grows with n: fitted log-log exponents, their labels, and crossovers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

BASELINES = ("softmax", "sdpa")


def fit_exponent(n: pd.Series | np.ndarray, cost: pd.Series | np.ndarray) -> float:
    """Least-squares slope of log(cost) against log(n); NaN with fewer than 2 usable points."""
    n, cost = np.asarray(n, float), np.asarray(cost, float)
    keep = np.isfinite(cost) & (cost > 0) & (n > 0)
    if len(np.unique(n[keep])) < 2:
        return math.nan
    slope, _ = np.polyfit(np.log(n[keep]), np.log(cost[keep]), 1)
    return float(slope)


def label(exponent: float) -> str:
    """'linear' near 1, 'quadratic' near 2, else 'other' (or 'unknown' without a fit)."""
    if not math.isfinite(exponent):
        return "unknown"
    if 0.75 <= exponent <= 1.3:
        return "linear"
    if 1.7 <= exponent <= 2.3:
        return "quadratic"
    if exponent < 0.75:
        return "sublinear"
    return "other"


def crossover(table: pd.DataFrame, mechanism: str, baseline: str, mode: str) -> float:
    """Smallest n from which ``mechanism`` is faster than ``baseline`` at every larger n measured.

    A baseline that failed (out of memory, time-out) where the mechanism ran counts as slower.
    NaN when the mechanism never stays ahead, or when they share no n.
    """
    rows = table[table["mode"] == mode]
    mine = rows[rows["mechanism"] == mechanism].set_index("n")
    theirs = rows[rows["mechanism"] == baseline].set_index("n")
    common = sorted(set(mine.index) & set(theirs.index))
    ahead: list[tuple[int, bool]] = []
    for n in common:
        a, b = mine.loc[n], theirs.loc[n]
        if a["status"] != "ok":
            ahead.append((n, False))
        elif b["status"] != "ok":
            ahead.append((n, b["status"] in ("oom", "timeout")))
        else:
            ahead.append((n, a["time_ms_median"] < b["time_ms_median"]))
    if not ahead or not ahead[-1][1]:
        return math.nan
    start = len(ahead) - 1
    while start > 0 and ahead[start - 1][1]:
        start -= 1
    return float(ahead[start][0])


def fit_table(table: pd.DataFrame, fit_min_n: int = 0) -> pd.DataFrame:
    """Per mechanism and mode: time and memory exponents over ``ok`` rows with n >= fit_min_n,
    the label from the time exponent, and the crossovers against softmax and sdpa."""
    rows = []
    ok = table[(table["status"] == "ok") & (table["n"] >= fit_min_n)]
    for (mechanism, mode), group in table.groupby(["mechanism", "mode"], sort=True):
        fit = ok[(ok["mechanism"] == mechanism) & (ok["mode"] == mode)]
        time_exp = fit_exponent(fit["n"], fit["time_ms_median"])
        rows.append({
            "mechanism": mechanism, "mode": mode,
            "time_exponent": round(time_exp, 3),
            "memory_exponent": round(fit_exponent(fit["n"], fit["peak_mem_mib"]), 3),
            "scaling": label(time_exp),
            "points": len(fit),
            "fit_n_min": int(fit["n"].min()) if len(fit) else math.nan,
            "fit_n_max": int(fit["n"].max()) if len(fit) else math.nan,
            "largest_ok_n": int(group[group["status"] == "ok"]["n"].max())
            if (group["status"] == "ok").any() else math.nan,
            **{f"crossover_vs_{b}": crossover(table, mechanism, b, mode) if mechanism != b else math.nan
               for b in BASELINES},
        })
    return pd.DataFrame(rows)
