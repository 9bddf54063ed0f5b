"""How cost grows with n: fitted log-log exponents with their 95 % intervals, labels that claim
only what the interval supports, same-round ratios between mechanisms, and crossovers."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
from scipy import stats

from attnbench.results.aggregate import BASELINES
from attnbench.results.tables import flag

CONFIDENCE = 0.95
MIN_LABEL_POINTS = 4
CONSTANT_BAND = (-0.2, 0.2)
LINEAR_BAND = (0.8, 1.2)
QUADRATIC_BAND = (1.8, 2.2)
CONSTANT_DIVIDE = 0.5  # halfway between constant and linear (a decoder's token: state against KV cache)
DIVIDE = 1.5  # halfway between linear and quadratic: an interval must stay on its side


@dataclasses.dataclass(frozen=True)
class Fit:
    """A fitted exponent with its two-sided confidence interval, R² and number of points."""

    exponent: float
    ci_low: float
    ci_high: float
    r2: float
    points: int


def fit_power_law(n: pd.Series | np.ndarray, cost: pd.Series | np.ndarray,
                  confidence: float = CONFIDENCE) -> Fit:
    """Least-squares slope of log(cost) against log(n), with its t interval (standard error of
    the slope times the t quantile at k − 2 degrees of freedom), over the finite positive points."""
    n, cost = np.asarray(n, float), np.asarray(cost, float)
    keep = np.isfinite(cost) & (cost > 0) & (n > 0)
    x, y = np.log(n[keep]), np.log(cost[keep])
    k = len(x)
    if len(np.unique(x)) < 2:
        return Fit(math.nan, math.nan, math.nan, math.nan, k)
    xc, yc = x - x.mean(), y - y.mean()
    sxx = float((xc**2).sum())
    slope = float((xc * yc).sum() / sxx)
    ssr = float(((yc - slope * xc) ** 2).sum())
    sst = float((yc**2).sum())
    r2 = 1 - ssr / sst if sst > 0 else math.nan
    if k > 2:
        half = float(stats.t.ppf(0.5 + confidence / 2, k - 2)) * math.sqrt(ssr / (k - 2) / sxx)
    else:
        half = math.inf  # two points fit any line exactly: no interval
    return Fit(slope, slope - half, slope + half, r2, k)


def fit_exponent(n: pd.Series | np.ndarray, cost: pd.Series | np.ndarray) -> float:
    """The fitted exponent alone; NaN with fewer than 2 usable points."""
    return fit_power_law(n, cost).exponent


def label(fit: Fit) -> str:
    """'constant', 'linear' or 'quadratic' only when the 95 % interval [lo, hi] supports it and
    excludes its neighbours.

    - fewer than 4 points: 'no label (k points)' (three points fit too much too well);
    - 'constant': the interval reaches the constant band (lo <= 0.2 and hi >= -0.2) and lies wholly
      below 0.5, halfway to linear, so it excludes 1 (a recurrent decoder's cost per token);
    - 'linear': the interval reaches the linear band (lo <= 1.2 and hi >= 0.8) and lies wholly
      below 1.5, halfway to quadratic, so it excludes 2;
    - 'quadratic': it reaches the quadratic band (lo <= 2.2 and hi >= 1.8) and lies wholly above
      1.5, so it excludes 1;
    - otherwise 'uncertain (95% CI lo to hi)': too wide, between the two, or outside both (a
      negative or cubic exponent from noisy points is not a finding).
    """
    if fit.points < MIN_LABEL_POINTS:
        return f"no label ({fit.points} points)"
    lo, hi = fit.ci_low, fit.ci_high
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "unknown"
    if lo <= CONSTANT_BAND[1] and hi >= CONSTANT_BAND[0] and hi < CONSTANT_DIVIDE:
        return "constant"
    if lo <= LINEAR_BAND[1] and hi >= LINEAR_BAND[0] and hi < DIVIDE:
        return "linear"
    if lo <= QUADRATIC_BAND[1] and hi >= QUADRATIC_BAND[0] and lo > DIVIDE:
        return "quadratic"
    return f"uncertain (95% CI {lo:.2f} to {hi:.2f})"


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


def _fit_columns(prefix: str, fit: Fit) -> dict[str, object]:
    return {f"{prefix}_exponent": round(fit.exponent, 3), f"{prefix}_ci_low": round(fit.ci_low, 3),
            f"{prefix}_ci_high": round(fit.ci_high, 3), f"{prefix}_r2": round(fit.r2, 4)}


# Decode sweeps: the exponents of the cache's bytes and of the prefill's time, beside the token's.
DECODE_FITS = (("cache", "cache_bytes"), ("prefill", "prefill_ms"))


def fit_table(table: pd.DataFrame, fit_min_n: int = 0) -> pd.DataFrame:
    """Per mechanism and mode: time and memory exponents with their intervals over the ``ok``
    rows with n >= fit_min_n that are not flagged noisy (how many were left out is a column),
    the labels, and the crossovers against softmax and sdpa (noisy rows left out there too);
    in a decode sweep's table also the exponents of cache bytes and prefill time."""
    rows = []
    extra = [(prefix, column) for prefix, column in DECODE_FITS  # what a decode sweep measured
             if column in table.columns and table[column].notna().any()]
    noisy = flag(table, "noisy")
    clean = table[~noisy]
    candidates = table[(table["status"] == "ok") & (table["n"] >= fit_min_n)]
    for (mechanism, mode), group in table.groupby(["mechanism", "mode"], sort=True):
        mine = candidates[(candidates["mechanism"] == mechanism) & (candidates["mode"] == mode)]
        fit = mine[~noisy.loc[mine.index]]
        time_fit = fit_power_law(fit["n"], fit["time_ms_median"])
        memory_fit = fit_power_law(fit["n"], fit["peak_mem_mib"])
        rows.append({
            "mechanism": mechanism, "mode": mode,
            **_fit_columns("time", time_fit), "scaling": label(time_fit),
            **_fit_columns("memory", memory_fit), "memory_scaling": label(memory_fit),
            "points": len(fit), "noisy_left_out": len(mine) - len(fit),
            "fit_n_min": int(fit["n"].min()) if len(fit) else math.nan,
            "fit_n_max": int(fit["n"].max()) if len(fit) else math.nan,
            "largest_ok_n": int(group[group["status"] == "ok"]["n"].max())
            if (group["status"] == "ok").any() else math.nan,
            **{f"crossover_vs_{b}": crossover(clean, mechanism, b, mode) if mechanism != b else math.nan
               for b in BASELINES},
        })
        for prefix, column in extra:  # bytes are counted, not timed: noise leaves none of them out
            points = mine if prefix == "cache" else fit
            rows[-1].update(_fit_columns(prefix, fit_power_law(points["n"], pd.to_numeric(points[column]))))
    return pd.DataFrame(rows)


def ratio_table(rounds: pd.DataFrame) -> pd.DataFrame:
    """Per mode, n and ordered pair of mechanisms: time(mechanism) / time(baseline) over the
    rounds in which both were timed one after the other (same ``pass``) and the probe saw no
    slow-down: median and quartiles, and how many rounds. Ratios of one round hold on a busy
    machine where absolute times drift."""
    columns = ["mode", "n", "mechanism", "baseline", "ratio_median", "ratio_q1", "ratio_q3", "rounds"]
    if rounds.empty:
        return pd.DataFrame(columns=columns)
    calm = rounds[~flag(rounds, "disturbed")]
    rows = []
    for (mode, n), group in calm.groupby(["mode", "n"], sort=True):
        wide = group.pivot_table(index="pass", columns="mechanism", values="time_ms_median", aggfunc="first")
        for mechanism in wide.columns:
            for baseline in wide.columns:
                ratio = (wide[mechanism] / wide[baseline]).dropna()
                if mechanism == baseline or ratio.empty:
                    continue
                q1, q2, q3 = np.percentile(ratio, [25, 50, 75])
                rows.append({"mode": mode, "n": int(n), "mechanism": mechanism, "baseline": baseline,
                             "ratio_median": q2, "ratio_q1": q1, "ratio_q3": q3, "rounds": len(ratio)})
    return pd.DataFrame(rows, columns=columns)
