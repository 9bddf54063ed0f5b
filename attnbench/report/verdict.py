"""The report's first screen: each sweep's answer in one small table.

An accuracy sweep's: per variant and length n, its score (mean over seeds), whether it lies on the
score–time and the score–memory Pareto fronts at that n (``accuracy_plots.pareto_front``, the
fronts its frontier plots draw), and its breaking length (``breaking.csv``). A kernel sweep's: per
mechanism (variant), mode and causal setting, the time exponent with its 95 % interval and the n
from which it stays faster than softmax and than sdpa (``fit.fit_table``, as in the sweep's own
section). Modes, causal settings and scores are read from the tables, never assumed.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pandas as pd

from attnbench.measure.fit import fit_table
from attnbench.plots.accuracy import pareto_front
from attnbench.results.aggregate import BASELINES, aggregate
from attnbench.results.tables import flag, read_table
from attnbench.sweeps.kernel import MEASURED, by_variant

# A sweep's score: the first of these its table holds values of, and whether higher is better.
SCORES = (("accuracy", True), ("perplexity", False))
# The fronts: the score against each cost (a column of accuracy.csv), marked by a letter.
COSTS = (("step_ms", "T"), ("peak_mem_mib", "M"))


@dataclasses.dataclass
class Verdict:
    """One sweep's answer: the table, a note on this sweep (task, seeds, lengths) and the legend
    that sweeps of its kind share (a page says each different legend once)."""

    folder: Path
    frame: pd.DataFrame
    note: str
    legend: list[str] = dataclasses.field(default_factory=list)


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _short(value: float) -> str:
    """A score as the verdict shows it: three significant figures, whole numbers whole."""
    return f"{value:.3g}" if abs(value) < 1e3 else f"{value:.0f}"


def score_of(table: pd.DataFrame) -> tuple[str, bool] | None:
    """The score column of an accuracy sweep's table and whether higher is better; None if it has none."""
    for column, higher in SCORES:
        if column in table.columns and pd.to_numeric(table[column], errors="coerce").notna().any():
            return column, higher
    return None


# ---- accuracy sweeps --------------------------------------------------------------------------


def _breaking_text(value: Any) -> str | None:
    """A breaking length as breaking.csv writes it: a number, ``none`` (broke at no length judged),
    or words saying why it could not be judged (``n/a: no softmax``)."""
    number = _number(value)
    if math.isfinite(number):
        return str(int(number))
    text = "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value).strip()
    if text == "none":
        return "never"
    return text or None


def breaking_lengths(breaking: pd.DataFrame) -> dict[str, str | None]:
    """Variant label → breaking length as shown; the baseline's own row says ``baseline``."""
    key = next((c for c in ("variant", "mechanism") if c in breaking.columns), None)
    column = next((c for c in ("breaking", "breaking_n") if c in breaking.columns), None)
    if key is None or column is None:
        return {}
    shown = {str(k): _breaking_text(v) for k, v in zip(breaking[key], breaking[column], strict=True)}
    if "baseline" in breaking.columns:
        shown.update({str(b): "baseline" for b in breaking["baseline"].dropna().unique()})
    return shown


def _breaking_rule(breaking: pd.DataFrame) -> str:
    baseline = breaking["baseline"].dropna() if "baseline" in breaking.columns else pd.Series([], dtype=str)
    margin = pd.to_numeric(breaking.get("margin", pd.Series([], dtype=float)), errors="coerce").dropna()
    if baseline.empty:
        return ""
    gap = f" more than {margin.iloc[0]:g} points" if len(margin) else ""
    return f"breaks at n: the first n{gap} short of {baseline.iloc[0]} (never: at no n judged)"


def front_marks(stats: pd.DataFrame, label: str, length: str, score: str,
                higher: bool) -> dict[tuple[str, Any], list[str]]:
    """(variant, n) → the letters of the fronts (``COSTS``) it is on at that n."""
    marks: dict[tuple[str, Any], list[str]] = {}
    sign = 1.0 if higher else -1.0  # pareto_front takes higher scores as better
    for n, here in stats.groupby(length, sort=True):
        for cost, letter in COSTS:
            if f"{cost}_mean" not in here.columns:
                continue
            rows = here[here[f"{cost}_mean"].notna() & here[f"{score}_mean"].notna()].reset_index(drop=True)
            front = pareto_front(list(rows[f"{cost}_mean"].astype(float)),
                                 list(sign * rows[f"{score}_mean"].astype(float)))
            for i in front:
                marks.setdefault((str(rows[label].iloc[i]), n), []).append(letter)
    return marks


def accuracy_verdict(folder: Path) -> Verdict:
    """Per variant: its score at each n with the fronts it is on there, and its breaking length."""
    table = read_table(folder / "accuracy.csv")
    breaking = read_table(folder / "breaking.csv")
    broke = breaking_lengths(breaking)
    label = next((c for c in ("variant", "mechanism") if c in table.columns), None)
    length = next((c for c in ("seq_len", "n") if c in table.columns), None)
    found = score_of(table)
    notes = []
    if "task" in table.columns and table["task"].notna().any():
        notes.append(", ".join(map(str, dict.fromkeys(table["task"].dropna()))))
    rule = [_breaking_rule(breaking)] if len(breaking) else []
    if label is None or length is None or found is None:  # breaking lengths only
        frame = pd.DataFrame({"variant": list(broke), "breaks at n": list(broke.values())})
        return Verdict(folder, frame, "; ".join(notes), rule)
    score, higher = found
    if "seed" not in table.columns:
        table = table.assign(seed=0)
    costs = [c for c, _ in COSTS if c in table.columns]
    stats = aggregate(table, [score, *costs], [label, length])
    marks = front_marks(stats, label, length, score, higher)
    lengths = sorted(table[length].dropna().unique(), key=_number)
    labels = [str(v) for v in dict.fromkeys(table[label].dropna())]
    labels += [v for v in broke if v not in labels and broke[v] != "baseline"]  # judged, never finished
    status = table["status"] if "status" in table.columns else pd.Series("ok", index=table.index)
    failed = table[status.ne("ok") & status.notna()].assign(status=status)
    rows = []
    for variant in labels:
        row: dict[str, Any] = {"variant": variant}
        for n in lengths:
            mine = stats[(stats[label].astype(str) == variant) & (stats[length] == n)]
            value = _number(mine[f"{score}_mean"].iloc[0]) if len(mine) else math.nan
            why = failed[(failed[label].astype(str) == variant) & (failed[length] == n)]["status"]
            shown = " ".join([_short(value), *marks.get((variant, n), [])]) if math.isfinite(value) else (
                str(why.iloc[-1]) if len(why) else None)  # a point that did not finish: its status
            row[f"n = {_short(_number(n))}"] = shown
        row["breaks at n"] = broke.get(variant)
        rows.append(row)
    seeds = int(stats["n_seeds"].max()) if len(stats) else 0
    some = "up to " if stats["n_seeds"].nunique() > 1 else ""
    notes.append(f"{score}, mean over {some}{seeds} seed{'s' if seeds != 1 else ''}")
    fronts = [f"{letter}: on the {score}–{'time' if c == 'step_ms' else 'memory'} front at that n"
              for c, letter in COSTS if c in costs]
    legend = [f"{' / '.join(fronts)} (no variant there is both cheaper and better)"] if fronts else []
    legend = ["; ".join([f"{score}: {'higher' if higher else 'lower'} is better", *legend, *rule])]
    return Verdict(folder, pd.DataFrame(rows), "; ".join(notes), legend)


# ---- kernel sweeps ----------------------------------------------------------------------------


def _exponent(k: float, low: float, high: float, points: int) -> str | None:
    """``1.14 ± 0.10``: the fit's t interval is symmetric about k; a fit of two points has none."""
    if not math.isfinite(k):
        return None
    if math.isfinite(low) and math.isfinite(high):
        return f"{k:.2f} ± {(high - low) / 2:.2f}"
    return f"{k:.2f} ({points} pts)"


def kernel_fits(table: pd.DataFrame, fit_min_n: int) -> pd.DataFrame:
    """``fit_table`` per causal setting."""
    causal = flag(table, "causal")
    parts = [fit_table(rows, fit_min_n).assign(causal=bool(setting))
             for setting, rows in table.groupby(causal, sort=True)]
    return pd.concat(parts, ignore_index=True) if parts else fit_table(table, fit_min_n)


def kernel_verdict(folder: Path, fit_min_n: int) -> Verdict:
    """Per mechanism (and causal setting where both were swept): the time exponent and the crossovers,
    one cell per mode joined ``fwd / fwd+bwd``; mechanisms that ran nowhere are named in the notes."""
    table = by_variant(read_table(folder / "scale.csv", required=MEASURED, kind="scale"))
    ok = table[table["status"] == "ok"]
    fits = kernel_fits(table, fit_min_n)
    fits = fits[fits["mechanism"].isin(set(ok["mechanism"]))]
    modes = [str(m) for m in dict.fromkeys(table["mode"].dropna())]
    settings = sorted(set(flag(table, "causal")))
    mechanisms = set(table["mechanism"])
    cells = {"k ± 95 %": [_exponent(*r) for r in zip(
        fits["time_exponent"], fits["time_ci_low"], fits["time_ci_high"], fits["points"], strict=True)]}
    for b in BASELINES:
        if b in mechanisms:
            cells[f"vs {b}"] = [_crossing(v) for v in fits[f"crossover_vs_{b}"]]
    keys = ["mechanism", *(["causal"] if len(settings) > 1 else [])]
    long = fits[keys + ["mode"]].assign(**cells)
    rows = []
    for key, group in long.groupby(keys, sort=False):
        by_mode = group.set_index("mode")
        row = dict(zip(keys, key if isinstance(key, tuple) else (key,), strict=True))
        for column in cells:
            row[column] = _per_mode([by_mode[column].get(mode) for mode in modes])
        rows.append(row)
    frame = pd.DataFrame(rows, columns=[*keys, *cells])
    notes = [" / ".join(modes) + (" in each cell" if len(modes) > 1 else "")
             + (", causal" if settings == [True] else "")]
    if len(ok):
        notes.append(f"n = {int(ok['n'].min())}–{int(ok['n'].max())}, k from {fit_min_n}")
    idle = sorted(mechanisms - set(ok["mechanism"]))
    if idle:
        notes.append(f"{len(idle)} not run here")
    if not any(b in mechanisms for b in BASELINES):
        notes.append(f"no {' or '.join(BASELINES)} to cross")
    legend = ["k: time ∝ n^k (least squares on log-log) ± its 95 % interval, none from 2 points (pts); "
              "vs B: the n from which it is faster than B at every n both ran (—: not at the largest)"]
    return Verdict(folder, frame, "; ".join(notes), legend)


def _crossing(value: Any) -> str | None:
    """The crossover n as an integer, or None where there is none."""
    n = _number(value)
    return f"{int(n)}" if math.isfinite(n) else None


def _per_mode(cells: list[Any]) -> str | None:
    """The cells of one row, one per mode in the sweep's order, joined ``a / b`` (``—``: none)."""
    if len(cells) == 1:
        return cells[0]
    return " / ".join("—" if c is None or (isinstance(c, float) and math.isnan(c)) else str(c) for c in cells)
