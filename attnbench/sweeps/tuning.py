"""Tuning an accuracy sweep per point, the field's convention (Zoology, MAD): every mechanism gets
its own best learning rate (and weight decay) instead of the softmax model's.

``--lr a,b,c`` and ``--weight-decay a,b`` make a grid; each point (variant, n, seed) trains every
value of it, and the run with the best score on the task's validation split (held out from
training, never the test split: ``val_accuracy``) stands for the point. ``accuracy.csv`` keeps
every run, with ``lr``, ``weight_decay`` (empty: the task's own value) and ``selected``; the
breaking lengths, the fronts and the plots read ``tuned_view``, one row per point, labelled with
``label``. Without a grid every point has one run, which stands for it: nothing changes.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import pandas as pd

from attnbench.sweeps.base import SweepError

GRID = ("lr", "weight_decay")  # the columns a grid sets, one run per combination
POINT = ("variant", "seq_len", "seed")  # what a tuned run stands for
SELECT_BY = "val_accuracy"  # the validation score that picks a point's run: higher is better
NO_VALUE = ""  # a grid column's text where the task's own value was used


def parse_values(text: str, flag: str, minimum: float, strict: bool) -> list[float]:
    """``3e-4,1e-3`` -> [0.0003, 0.001], in the order given, each once; every value above
    ``minimum`` (``strict``) or at least it. A mistake is one line naming ``flag``."""
    try:
        values = list(dict.fromkeys(float(v) for v in text.split(",")))
    except ValueError:
        raise SweepError(f"{flag} {text!r}: expected a comma list of numbers, e.g. 3e-4,1e-3,3e-3") from None
    bad = [v for v in values if not math.isfinite(v) or (v <= minimum if strict else v < minimum)]
    if bad:
        raise SweepError(f"{flag} {text!r}: every value must be {'>' if strict else '>='} {minimum:g}, "
                         f"got {bad[0]:g}")
    return values


def combinations(lrs: Sequence[float], weight_decays: Sequence[float]
                 ) -> list[tuple[float | None, float | None]]:
    """The grid's (lr, weight_decay) pairs, lr first; None where a flag was not given (the task's value)."""
    return list(itertools.product(list(lrs) or [None], list(weight_decays) or [None]))


def value_text(value: Any) -> str:
    """A grid value as a key and a file name: ``0.003``; ``""`` for the task's own (None, NaN, empty)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return NO_VALUE
    number = float(value)
    return NO_VALUE if math.isnan(number) else f"{number:g}"


def run_suffix(lr: float | None, weight_decay: float | None) -> str:
    """What a run of the grid adds to its point's folder name: ``-lr0.003-wd0.01``, or nothing."""
    parts = [f"-{short}{value_text(v)}" for short, v in (("lr", lr), ("wd", weight_decay)) if v is not None]
    return "".join(parts)


def _grid_keys(table: pd.DataFrame) -> pd.DataFrame:
    """The grid columns as text (``value_text``), ``""`` where a table has none."""
    return pd.DataFrame({c: table[c].map(value_text) if c in table.columns else NO_VALUE for c in GRID},
                        index=table.index)


def select(table: pd.DataFrame, metric: str = SELECT_BY, higher: bool = True) -> pd.Series:
    """True on the run that stands for its point: among the latest row of each run (an earlier row
    of the same run was replaced), the finished run (status ``ok``) with the best ``metric``; ties
    and missing scores go to the smallest lr, then weight decay, so that the choice never depends
    on the order in which runs finished. A point with one finished run: that run."""
    chosen = pd.Series(False, index=table.index)
    if table.empty:
        return chosen
    keys = _grid_keys(table)
    runs = table.assign(_lr=keys["lr"], _wd=keys["weight_decay"])
    latest = runs.drop_duplicates([*POINT, "_lr", "_wd"], keep="last")
    ok = latest[latest["status"] == "ok"] if "status" in latest.columns else latest
    if ok.empty:
        return chosen
    score = pd.to_numeric(ok[metric], errors="coerce") if metric in ok.columns else pd.Series(math.nan,
                                                                                               index=ok.index)
    rank = (score if higher else -score).fillna(-math.inf)
    order = ok.assign(_rank=rank, _lr_n=pd.to_numeric(ok["_lr"], errors="coerce").fillna(-math.inf),
                      _wd_n=pd.to_numeric(ok["_wd"], errors="coerce").fillna(-math.inf))
    order = order.sort_values(["_rank", "_lr_n", "_wd_n"], ascending=[False, True, True], kind="stable")
    best = order.drop_duplicates(list(POINT), keep="first").index
    chosen[best] = True
    return chosen


def mark_selected(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with its ``selected`` column brought up to date (``select``)."""
    return table.assign(selected=select(table))


def tuned_view(table: pd.DataFrame) -> pd.DataFrame:
    """One row per point, what the breaking lengths and plots read: its selected run; where no run
    of the point finished, its latest row (what stopped it: a failure, or unavailable)."""
    if table.empty:
        return table
    chosen = select(table)
    done = table[chosen]
    finished = set(map(tuple, done[list(POINT)].astype(str).to_numpy()))
    rest = table[~chosen]
    unfinished = rest[[tuple(k) not in finished for k in rest[list(POINT)].astype(str).to_numpy()]]
    stopped = unfinished.drop_duplicates(list(POINT), keep="last")
    return table.loc[sorted([*done.index, *stopped.index])]


def grid_of(table: pd.DataFrame) -> dict[str, list[str]]:
    """The values each grid column took in ``table`` (as text, smallest first; ``""``: the task's own)."""
    keys = _grid_keys(table)
    return {c: sorted(set(keys[c]), key=lambda v: -math.inf if v == NO_VALUE else float(v)) for c in GRID}


def label(table: pd.DataFrame, metric: str = SELECT_BY) -> str:
    """How the tables and plots say that a sweep was tuned: ``tuned: best of lr 0.001, 0.003 by
    val_accuracy``; ``""`` where no point trained more than one run."""
    if table.empty:
        return ""
    keys = _grid_keys(table)
    runs = table.assign(_lr=keys["lr"], _wd=keys["weight_decay"]).drop_duplicates([*POINT, "_lr", "_wd"])
    if not (runs.groupby(list(POINT)).size() > 1).any():
        return ""
    names = {"lr": "lr", "weight_decay": "weight decay"}
    shown = {c: ", ".join(v or "the task's" for v in values) for c, values in grid_of(table).items()
             if len(values) > 1}
    parts = [f"{names[c]} {values}" for c, values in shown.items()]
    return f"tuned: best of {' × '.join(parts)} by {metric}"
