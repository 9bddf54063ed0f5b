"""Plots a paper can use, every one the project draws.

- One style per mechanism everywhere (``style``): a colour from Paul Tol's colour-blind-safe
  "muted" scheme plus black, and a marker of its own, so that the ten built-in mechanisms stay
  apart in colour, in greyscale and for colour-blind readers; plug-ins get a stable pair from
  their name.
- Time bands are the quartiles of the timed runs (``time_ms_q1`` … ``time_ms_q3``), never the
  median ± IQR/2; a table that records only the IQR's width gets no band, and says so.
- Configurations that did not finish (out of memory, time-out, error, compile error) are marked
  where they failed, one symbol per kind (``FAILURES``), in a strip above the measurements, and
  named in the legend.
- Honest axes: scores from a meaningful floor (chance) unless every point has seed error bars,
  and never a range narrower than ``MIN_SCORE_SPAN`` points; bars sorted by value; ticks at every
  measured length or side; aggregates over distinct seeds, with n shown (``seed_stats``).
- Labels fit: figures use constrained layout, crowded tick labels turn or thin out, and bar
  labels get room inside their axes; ``layout_problems`` checks a drawn figure (every text inside
  the figure, no two tick labels overlapping) and the tests run it on every plot.
- The same data gives the same files (no date in the SVG, fixed SVG ids), so redrawing a
  committed folder leaves it as it was.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import os
import re
import textwrap
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files, not windows: runs headless and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib import patheffects, ticker, transforms  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from attnbench.options import split_label  # noqa: E402
from attnbench.results import read_meta, read_task_table, replacing  # noqa: E402

plt.rcParams["svg.hashsalt"] = "attnbench"  # the same SVG ids on every redraw

# ---- one style per mechanism ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Style:
    """How a mechanism is drawn in every plot: colour, marker, line style and width."""

    colour: str
    marker: str
    linestyle: str = "-"
    linewidth: float = 1.6


EDGE = "0.15"  # marker edges: light colours stay visible on white and in greyscale
# Paul Tol's "muted" scheme (https://personal.sron.nl/~pault/, colour-blind safe) and black; each
# built-in mechanism also has a marker no other built-in uses. SeT, the flagship, is black and thick.
STYLES: dict[str, Style] = {
    "set": Style("#000000", "o", "-", 2.6),
    "softmax": Style("#332288", "s"),        # indigo
    "sdpa": Style("#88CCEE", "D", "--"),     # cyan: same maths as softmax, a fused kernel
    "xformers": Style("#44AA99", "h", "--"),  # teal
    "swin": Style("#117733", "^"),           # green
    "nat": Style("#DDCC77", "v"),            # sand
    "linear": Style("#CC6677", "P"),         # rose
    "performer": Style("#882255", "X"),      # wine
    "nystromformer": Style("#999933", "*"),  # olive
    "sinkformer": Style("#AA4499", "p"),     # purple
}
# Plug-ins: Okabe & Ito's colour-blind-safe hues with the markers the built-ins leave free.
_SPARE_COLOURS = ["#E69F00", "#56B4E9", "#009E73", "#0072B2", "#D55E00", "#CC79A7"]
_SPARE_MARKERS = ["<", ">", "d", "H", "8"]


# Variants of a mechanism (``set[m=16]``, ``set[m=64]``: options swept by ``scale --opt set.m=16,64``)
# keep its colour and marker; each gets a line style and a shade of its own, numbered in the order
# of their option values (``rank_variants``), the first drawn as the mechanism itself.
VARIANT_LINES = ("-", "--", ":", "-.")
VARIANT_SHADES = (0.0, 0.3, 0.55, 0.75)  # how far toward white (dark colours) or black (light ones)
_VARIANT_RANKS: dict[str, int] = {}


def style(mechanism: str) -> Style:
    """The mechanism's style, the same in every plot (plug-ins: a stable pair from the name); a
    variant's, its mechanism's told apart by line and shade."""
    if mechanism in STYLES:
        return STYLES[mechanism]
    base, swept = split_label(mechanism)
    if swept:
        s = style(base)
        rank = _VARIANT_RANKS.get(mechanism, _hash(mechanism) % len(VARIANT_LINES))
        lines = [s.linestyle, *(line for line in VARIANT_LINES if line != s.linestyle)]
        return Style(_shade(s.colour, VARIANT_SHADES[rank % len(VARIANT_SHADES)]), s.marker,
                     lines[rank % len(lines)], s.linewidth)
    h = _hash(mechanism)
    return Style(_SPARE_COLOURS[h % len(_SPARE_COLOURS)],
                 _SPARE_MARKERS[(h // len(_SPARE_COLOURS)) % len(_SPARE_MARKERS)], "-.")


def _hash(name: str) -> int:
    return int(hashlib.sha1(str(name).encode()).hexdigest(), 16)


def _shade(colour_hex: str, amount: float) -> str:
    """``colour_hex`` moved ``amount`` of the way to white (a dark colour) or to black (a light one)."""
    rgb = np.array(matplotlib.colors.to_rgb(colour_hex))
    target = 1.0 if rgb @ [0.299, 0.587, 0.114] < 0.5 else 0.0
    return matplotlib.colors.to_hex(rgb + amount * (target - rgb))


def _value_key(value: str) -> tuple[int, float | str]:
    try:
        return (0, float(value))
    except ValueError:
        return (1, value)


def _order_key(label: str) -> tuple:
    """SeT first, then by mechanism, its variants in the order of their option values."""
    base, swept = split_label(label)
    return (base != "set", base, tuple(_value_key(v) for v in swept.values()), str(label))


def rank_variants(labels: Iterable[str]) -> None:
    """Number the variants of each mechanism among ``labels`` in the order of their option values,
    so that ``style`` draws m=16, 64, 256 from the mechanism's own shade to lighter ones."""
    count: dict[str, int] = {}
    for label in ordered(labels):
        base, swept = split_label(label)
        if swept:
            _VARIANT_RANKS[label] = count.get(base, 0)
            count[base] = count.get(base, 0) + 1


def colour(mechanism: str) -> str:
    """The mechanism's colour, the same in every plot."""
    return style(mechanism).colour


def marker_kwargs(mechanism: str, size: float = 6.0) -> dict[str, Any]:
    s = style(mechanism)
    return {"marker": s.marker, "color": s.colour, "mec": EDGE, "mew": 0.6,
            "ms": size * (1.25 if s.marker == "*" else 1.0)}


def ordered(mechanisms: Iterable[str]) -> list[str]:
    """SeT first, then by name, variants in the order of their values: the legend order of every plot."""
    return sorted(set(mechanisms), key=_order_key)


def mechanism_handle(mechanism: str, label: str | None = None, line: bool = True) -> Line2D:
    s = style(mechanism)
    return Line2D([], [], ls=s.linestyle if line else "", lw=s.linewidth, label=label or mechanism,
                  **marker_kwargs(mechanism))


# ---- what did not finish ----------------------------------------------------------------------

# status -> (marker, legend label). Line and glyph markers: none is a mechanism's filled marker.
FAILURES: dict[str, tuple[str, str]] = {
    "oom": ("x", "out of memory"),
    "timeout": ("$◷$", "time-out (over the budget)"),
    "error": ("$⚠$", "error"),
    "compile-error": ("$⊘$", "compile error"),
}
NOT_FAILED = ("ok", "unavailable")  # unavailable: cannot run here at all, not a failure at this n


def failure_marker(status: str) -> tuple[str, str]:
    return FAILURES.get(status, ("$?$", str(status)))


def failed_rows(table: pd.DataFrame) -> pd.DataFrame:
    return table[~table["status"].isin(NOT_FAILED) & table["status"].notna()]


def _figure(failing: int, ncols: int, width: float, height: float, **kwargs: Any):
    """A figure of ``ncols`` panels, with a strip above each for what did not finish when
    ``failing`` mechanisms failed somewhere: (fig, panels, strips)."""
    if not failing:
        fig, axes = plt.subplots(1, ncols, figsize=(width, height), layout="constrained", squeeze=False,
                                 **kwargs)
        return fig, list(axes[0]), [None] * ncols
    strip_h = 0.45 + 0.2 * failing
    fig = plt.figure(figsize=(width, height + strip_h), layout="constrained")
    grid = fig.add_gridspec(2, ncols, height_ratios=[strip_h, height])
    panels, strips = [], []
    for i in range(ncols):
        panel = fig.add_subplot(grid[1, i], sharey=panels[0] if panels and kwargs.get("sharey") else None)
        strip = fig.add_subplot(grid[0, i], sharex=panel)
        panels.append(panel)
        strips.append(strip)
    return fig, panels, strips


def _draw_failures(strip: plt.Axes | None, failed: pd.DataFrame, x: str) -> None:
    """Each failed configuration at its ``x``, in its mechanism's colour, one row per mechanism."""
    if strip is None:
        return
    names = ordered(failed["mechanism"])
    for i, mech in enumerate(names):
        for status, rows in failed[failed["mechanism"] == mech].groupby("status"):
            marker, _ = failure_marker(status)
            glyph = marker.startswith("$")
            strip.plot(rows[x], [i] * len(rows), ls="", marker=marker, color=colour(mech),
                       ms=11 if glyph else 8, mew=1.0 if glyph else 2.0, clip_on=False)
    strip.set_yticks(range(len(names)), names, fontsize=7)
    strip.set_ylim(len(names) - 0.5, -0.5)
    strip.tick_params(axis="x", labelbottom=False, length=0)
    strip.tick_params(axis="y", length=0)
    strip.grid(True, axis="x", alpha=0.3)
    for side in ("top", "right"):
        strip.spines[side].set_visible(False)
    strip.set_title("did not finish (no measurement)", fontsize=8, loc="left")


def log_log_panel(ax: plt.Axes, strip: plt.Axes | None, failed: pd.DataFrame, tried: pd.DataFrame, x: str,
                  xlabel: str, ylabel: str) -> None:
    """A cost-against-size panel finished: log-log (base 2 along ``x``, a tick at every ``x`` tried),
    plain tick numbers, labels and grid, and the ``failed`` rows marked on the strip above it."""
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ticks_at(ax.xaxis, tried[x].unique())
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(plain))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.3)
    _draw_failures(strip, failed, x)


def failure_handles(failed: pd.DataFrame) -> list[Line2D]:
    statuses = [s for s in FAILURES if s in set(failed["status"])]
    statuses += sorted(set(failed["status"]) - set(FAILURES))
    handles = []
    for status in statuses:
        marker, label = failure_marker(status)
        glyph = marker.startswith("$")
        handles.append(Line2D([], [], ls="", marker=marker, color="0.25", ms=10 if glyph else 7,
                              mew=1.0 if glyph else 2.0, label=label))
    return handles


# ---- layout: labels that fit ------------------------------------------------------------------


def wrap(text: str, fig: plt.Figure, fontsize: float = 10, share: float = 1.0) -> str:
    """``text`` broken into lines that fit ``share`` of the figure's width."""
    chars = max(20, int(share * fig.get_figwidth() * 72 / (0.6 * fontsize)))
    return "\n".join(textwrap.fill(line, chars) for line in text.split("\n"))


def label_lines(text: str, width: int = 26) -> str:
    """A long tick label on a few lines (broken at spaces, never inside a hyphenated value)."""
    return textwrap.fill(text, width, break_on_hyphens=False, break_long_words=False)


def plain(value: float, _pos: Any = None) -> str:
    """16384, 0.0236, 1.5: no powers of ten on the axes."""
    if not math.isfinite(value):
        return ""
    if value == int(value) and abs(value) < 1e7:
        return f"{int(value)}"
    return f"{value:.3g}"


def ticks_at(axis: matplotlib.axis.Axis, values: Iterable[float]) -> None:
    """A tick, labelled plainly, at every measured value, and no others."""
    values = sorted({float(v) for v in values if pd.notna(v)})
    axis.set_major_locator(ticker.FixedLocator(values))
    axis.set_major_formatter(ticker.FuncFormatter(plain))
    axis.set_minor_locator(ticker.NullLocator())


MIN_COST_SPAN = 0.3  # the narrowest linear cost axis, as a fraction of its centre


def cost_axis(ax: plt.Axes, values: Iterable[float], axis: str = "x") -> None:
    """Log when the values span more than a factor of 8; else linear and at least
    ``MIN_COST_SPAN`` of its centre wide, so that a cost gap of a few per cent is not stretched
    over the whole width. Plain labels, no minor labels (they are what crowds a short log axis)."""
    values = [v for v in values if pd.notna(v) and v > 0]
    target = ax.xaxis if axis == "x" else ax.yaxis
    if values and max(values) / min(values) > 8:
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
        target.set_major_formatter(ticker.FuncFormatter(plain))
        target.set_minor_formatter(ticker.NullFormatter())
        return
    target.set_major_locator(ticker.MaxNLocator(6))
    target.set_major_formatter(ticker.FuncFormatter(plain))
    if values:
        lo, hi = min(values), max(values)
        mid = (lo + hi) / 2
        half = max(0.6 * (hi - lo), MIN_COST_SPAN * mid / 2)
        (ax.set_xlim if axis == "x" else ax.set_ylim)(max(0.0, mid - half), mid + half)


def dodge(points: Sequence[tuple[float, float]], x_span: float, y_span: float,
          step: float = 8.0) -> list[float]:
    """Horizontal offsets in points that set apart markers which would print on one another
    (chains of points within 2.5 % of the x span and 3.5 % of the y span of each other); 0 for
    the others."""
    n = len(points)
    cluster = list(range(n))

    def root(i: int) -> int:
        while cluster[i] != i:
            i = cluster[i]
        return i

    for i in range(n):
        for j in range(i + 1, n):
            (x, y), (u, v) = points[i], points[j]
            if abs(u - x) <= 0.025 * x_span and abs(v - y) <= 0.035 * y_span:
                cluster[root(j)] = root(i)
    offsets = [0.0] * n
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    for members in groups.values():
        members.sort(key=lambda i: points[i][0])
        for k, i in enumerate(members):
            offsets[i] = (k - (len(members) - 1) / 2) * step
    return offsets


def _drawn_tick_labels(axis: matplotlib.axis.Axis) -> list[matplotlib.text.Text]:
    lo, hi = sorted(axis.get_view_interval())
    slack = 1e-9 * max(abs(lo), abs(hi), 1e-300)
    labels = []
    for tick in [*axis.get_major_ticks(), *axis.get_minor_ticks()]:
        loc = tick.get_loc()
        if loc is None or not (lo - slack <= loc <= hi + slack) or not tick.get_visible():
            continue
        labels += [t for t in (tick.label1, tick.label2) if t.get_visible() and t.get_text().strip()]
    return labels


def drawn_texts(fig: plt.Figure) -> list[matplotlib.text.Text]:
    """Every text the figure draws: titles, axis and tick labels, legends, annotations."""
    texts = list(fig.texts)
    legends = list(fig.legends)
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        texts += [ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label,
                  ax.xaxis.get_offset_text(), ax.yaxis.get_offset_text(), *ax.texts]
        if ax.xaxis.get_visible():
            texts += _drawn_tick_labels(ax.xaxis)
        if ax.yaxis.get_visible():
            texts += _drawn_tick_labels(ax.yaxis)
        if ax.get_legend() is not None:
            legends.append(ax.get_legend())
    for legend in legends:
        texts += [*legend.get_texts(), legend.get_title()]
    return [t for t in texts if t.get_visible() and t.get_text().strip()]


def _overlapping(labels: Sequence[matplotlib.text.Text], renderer: Any) -> bool:
    boxes = sorted((t.get_window_extent(renderer) for t in labels), key=lambda b: b.x0)
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            if min(a.x1, b.x1) - max(a.x0, b.x0) > 0.5 and min(a.y1, b.y1) - max(a.y0, b.y0) > 0.5:
                return True
    return False


def side_legend(ax: plt.Axes, handles: Sequence[Any], fontsize: float = 8, title: str | None = None) -> None:
    """The legend beside ``ax``, on its right, where it covers no data (constrained layout makes
    room for it)."""
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
              fontsize=fontsize, title=title, title_fontsize=fontsize)


def layout_problems(fig: plt.Figure, tolerance: float = 1.0) -> list[str]:
    """What a reader would see clipped or overprinted: texts not wholly inside the figure, tick
    labels of one axis that overlap, and texts that overprint one another (a title under a
    legend, a bar label on a tick label). Empty for a figure fit to print."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    page = fig.bbox
    problems = []
    texts = drawn_texts(fig)
    boxes = [t.get_window_extent(renderer) for t in texts]
    for text, box in zip(texts, boxes, strict=True):
        if (box.x0 < page.x0 - tolerance or box.y0 < page.y0 - tolerance or box.x1 > page.x1 + tolerance
                or box.y1 > page.y1 + tolerance):
            problems.append(f"text {text.get_text()!r} at {box.bounds} outside the figure {page.bounds}")
    for i, (a, ta) in enumerate(zip(boxes, texts, strict=True)):
        for b, tb in zip(boxes[i + 1:], texts[i + 1:], strict=True):
            if min(a.x1, b.x1) - max(a.x0, b.x0) > 1.5 and min(a.y1, b.y1) - max(a.y0, b.y0) > 1.5:
                problems.append(f"texts {ta.get_text()!r} and {tb.get_text()!r} overlap")
    for ax in fig.axes:
        for name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
            labels = _drawn_tick_labels(axis)
            if _overlapping(labels, renderer):
                problems.append(f"{name} tick labels overlap: {[t.get_text() for t in labels]}")
    return problems


def _declutter_ticks(fig: plt.Figure) -> None:
    """Crowded x tick labels turn upright, then every other one goes (the tick stays); crowded
    y tick labels thin out."""
    for _ in range(6):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        changed = False
        for ax in fig.axes:
            for axis in (ax.xaxis, ax.yaxis):
                labels = _drawn_tick_labels(axis)
                if not _overlapping(labels, renderer):
                    continue
                changed = True
                if axis is ax.xaxis and labels[0].get_rotation() != 90:
                    for t in axis.get_ticklabels(which="both"):
                        t.set_rotation(90)
                        t.set_ha("center")
                else:
                    shown = sorted(labels, key=lambda t: t.get_window_extent(renderer).x0
                                   if axis is ax.xaxis else t.get_window_extent(renderer).y0)
                    for t in shown[1::2]:
                        t.set_visible(False)
        if not changed:
            return


def make_room(ax: plt.Axes, texts: Sequence[matplotlib.text.Text], pad: float = 0.02) -> None:
    """Widen the x limits until every text placed in data coordinates lies inside the axes."""
    if not texts:
        return
    log = ax.get_xscale() == "log"
    f = (lambda v: math.log(v)) if log else (lambda v: v)
    g = math.exp if log else (lambda v: v)
    for _ in range(5):
        ax.figure.canvas.draw()
        renderer = ax.figure.canvas.get_renderer()
        box = ax.get_window_extent(renderer)
        lo, hi = ax.get_xlim()
        flo, fhi = f(lo), f(hi)
        new_lo, new_hi = flo, fhi
        for t in texts:
            extent = t.get_window_extent(renderer)
            anchor = f(t.get_position()[0])
            right = (extent.x1 - box.x0) / box.width
            left = (extent.x0 - box.x0) / box.width
            at = (anchor - flo) / (fhi - flo)
            if right > 1 - pad:  # keep lo, move hi so that the text ends at 1 - pad
                room = max(1 - pad - (right - at), 0.2)
                new_hi = max(new_hi, flo + (anchor - flo) / room)
            if left < pad:  # keep hi, move lo
                room = max(1 - pad - (at - left), 0.2)
                new_lo = min(new_lo, fhi - (fhi - anchor) / room)
        if (new_lo, new_hi) == (flo, fhi):
            return
        ax.set_xlim(g(new_lo), g(new_hi))


MIN_SCORE_SPAN = 10.0  # points of a percentage: the narrowest score axis drawn


def score_limits(values: Iterable[float], errors: Iterable[float] | None = None, floor: float = 0.0,
                 ceiling: float | None = 100.0, all_have_errors: bool = False,
                 min_span: float = MIN_SCORE_SPAN) -> tuple[float, float]:
    """Limits of a score axis that never blow a small gap up to the full height: from ``floor``
    (chance, or 0) when some point stands on one seed; around the points and their error bars
    when every point has them, but at least ``min_span`` wide."""
    v = np.asarray(list(values), float)
    e = np.nan_to_num(np.asarray(list(errors), float)) if errors is not None else np.zeros_like(v)
    keep = np.isfinite(v)
    v, e = v[keep], e[keep]
    if not len(v):
        return floor, ceiling if ceiling is not None else floor + min_span
    lo, hi = float((v - e).min()), float((v + e).max())
    if not all_have_errors:
        lo = min(floor, lo)
        top = hi + 0.08 * (hi - lo) + 1e-9
        return lo, min(top, ceiling) if ceiling is not None and hi <= ceiling else top
    span = max(hi - lo, min_span)
    mid = (hi + lo) / 2
    lo, hi = mid - 0.55 * span, mid + 0.55 * span
    if ceiling is not None and hi > ceiling:
        lo, hi = lo - (hi - ceiling), ceiling
    if lo < floor:
        lo, hi = floor, max(hi, floor + span)
    return lo, hi


def save_figure(fig: plt.Figure, out: Path, stem: str, formats: Sequence[str] = ("png", "svg"),
                dpi: int = 150) -> list[Path]:
    """Tidy the tick labels, write ``stem.png`` and ``stem.svg`` in ``out`` (byte-identical for the
    same data), close the figure; the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    _declutter_ticks(fig)
    paths = []
    for fmt in formats:
        path = out / f"{stem}.{fmt}"
        metadata = {"Date": None} if fmt == "svg" else None
        with replacing(path) as tmp:  # runs redraw shared plots: a reader never sees half of one
            fig.savefig(tmp, format=fmt, dpi=dpi if fmt == "png" else None, metadata=metadata)
        paths.append(path)
    plt.close(fig)
    return paths


def slug(text: Any) -> str:
    """A file-name part: runs of anything but letters, digits, ``_.-`` become one ``-``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(text)).strip("-")


# ---- seeds, not repeats -----------------------------------------------------------------------


def seed_stats(rows: pd.DataFrame, metrics: Sequence[str], costs: Sequence[str] = ()) -> pd.DataFrame:
    """``attnbench.results.aggregate`` in the columns the plots read: per full configuration, the
    mean over distinct seeds of each metric and cost column (``<column>``), their standard
    deviation (``<column>_std``), ``seeds`` (how many) and ``repeats`` (rows of a seed already
    counted: the latest row of a configuration and seed stands for it)."""
    from attnbench.results import aggregate

    columns = [c for c in dict.fromkeys([*metrics, *costs]) if c in rows.columns]
    stats = aggregate(rows, columns)
    stats = stats.rename(columns={"n_seeds": "seeds", "n_repeats": "repeats",
                                  **{f"{c}_mean": c for c in columns}})
    for c in [*metrics, *costs]:
        if c not in stats.columns:
            stats[c], stats[f"{c}_std"] = math.nan, math.nan
    return stats


def config_columns(stats: pd.DataFrame) -> list[str]:
    from attnbench.results import config_columns as columns

    return columns(stats)


def seeds_text(counts: Iterable[int]) -> str:
    """'n = 3 seeds', 'n = 1–3 seeds'."""
    counts = sorted({int(c) for c in counts if pd.notna(c)})
    if not counts:
        return "n = 0"
    span = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
    return f"n = {span} seed{'' if counts[-1] == 1 else 's'}"


def varying(stats: pd.DataFrame, fixed: Sequence[str], within: Sequence[str]) -> list[str]:
    """The configuration columns, besides ``fixed`` and ``within``, that take more than one value
    for one series (one value of ``within``, e.g. one mechanism): each value gets a figure of its
    own, never an average with another. A column that only follows the series (SeT's k-means
    start) does not split."""
    keys = [c for c in within if c in stats.columns]
    columns = []
    for c in config_columns(stats):
        if c in fixed or c in within or stats[c].nunique(dropna=False) < 2:
            continue
        per_series = stats.groupby(keys, dropna=False)[c].nunique(dropna=False) if keys else \
            pd.Series([stats[c].nunique(dropna=False)])
        if (per_series > 1).any():
            columns.append(c)
    return columns


def figure_groups(stats: pd.DataFrame, by: Sequence[str], within: Sequence[str], split: bool = True):
    """(key dict, rows, stem suffix) per figure: grouped by ``by`` and, with ``split``, by the other
    configuration columns that vary for one series (``within`` vary inside a figure). Without
    ``split`` those stay in one figure as series of their own: see ``variant_labels``."""
    extra = varying(stats, by, within) if split else []
    keys = [c for c in [*by, *extra] if c in stats.columns]
    if not keys:
        yield {}, stats, ""
        return
    for values, rows in stats.groupby(keys, dropna=False, sort=True):
        values = values if isinstance(values, tuple) else (values,)
        key = dict(zip(keys, values, strict=True))
        suffix = "".join(f"_{c}-{slug(key[c])}" for c in extra)
        yield key, rows, suffix


def _options(text: Any) -> dict[str, str]:
    if not isinstance(text, str) or not text.strip():
        return {}
    pairs = [p.partition("=") for p in text.replace(",", ";").split(";") if p.strip()]
    return {k.strip(): v.strip() for k, _, v in pairs}


def variant_labels(rows: pd.DataFrame, by: Sequence[str], within: Sequence[str]) -> list[str]:
    """A label per row: its ``within`` values (the mechanism, a size) and, where one series holds
    several configurations (an ablation of options), what sets this one apart: ``set (prior=kernel)``."""
    extra = varying(rows, by, within)
    labels = []
    for _, r in rows.iterrows():
        parts = []
        for c in extra:
            if c == "options":
                mine = _options(r[c])
                keys = sorted({k for o in rows[c] for k in _options(o)})
                differing = [k for k in keys if len({_options(o).get(k) for o in rows[c]}) > 1]
                parts += [f"{k}={mine.get(k, 'default')}" for k in differing]
            else:
                parts.append(f"{c}={r[c]}")
        head = " ".join(str(r[c]) for c in within if c in rows.columns and pd.notna(r[c]))
        labels.append(f"{head} ({', '.join(parts)})" if parts else head)
    return labels


# ---- the sequence-length sweep ----------------------------------------------------------------


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
    from attnbench.fit import flag

    ok = rows[(rows["status"] == "ok") & (rows[column] > 0)]
    if ok.empty:
        return None
    failed = failed_rows(rows)
    fig, (ax,), (strip,) = _figure(failed["mechanism"].nunique(), 1, 10, 5.2)
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


def whisker(container: Any) -> Any:
    """An error bar outlined in white, visible on a dark bar as on a light one."""
    halo = [patheffects.withStroke(linewidth=2.6, foreground="white")]
    for artist in container.lines[1] + container.lines[2]:
        artist.set_path_effects(halo)
    return container


def sorted_bars(ax: plt.Axes, names: Sequence[str], values: Sequence[float],
                low: Sequence[float] | None = None, high: Sequence[float] | None = None,
                base: float = 0.0, fmt: Callable[[float], str] = lambda v: f"{v:.3g}",
                notes: Sequence[str] | None = None, hatch: str | None = None,
                best: str = "low", labels: Sequence[str] | None = None) -> list[str]:
    """Horizontal bars from ``base``, best first at the top (``best``: "low" or "high" values), each
    in its mechanism's colour and labelled with its value at its end (inside the axes); NaN bars
    last, unlabelled. ``low``/``high``: whisker ends; ``labels``: the tick labels, when not the
    mechanisms' names. Returns the order drawn."""
    sign = 1 if best == "low" else -1
    ax.set_axisbelow(True)  # grid lines behind the bars
    order = sorted(range(len(names)), key=lambda i: (not math.isfinite(values[i]),
                                                      sign * values[i] if math.isfinite(values[i]) else 0))
    texts = []
    for y, i in enumerate(order):
        v = values[i]
        if not math.isfinite(v):
            ax.text(base, y, " not measured", va="center", fontsize=7.5, color="0.4")
            continue
        ax.barh(y, v - base, left=base, color=colour(names[i]), edgecolor=EDGE, lw=0.6, hatch=hatch,
                height=0.7)
        lo = low[i] if low is not None and math.isfinite(low[i]) else v
        hi = high[i] if high is not None and math.isfinite(high[i]) else v
        if lo != v or hi != v:
            whisker(ax.errorbar(v, y, xerr=[[v - lo], [hi - v]], color="0.15", capsize=3, lw=1))
        label = fmt(v) + (f" {notes[i]}" if notes is not None and notes[i] else "")
        if v >= base:
            texts.append(ax.text(max(hi, v), y, f" {label}", va="center", ha="left", fontsize=7.5))
        else:
            texts.append(ax.text(min(lo, v), y, f"{label} ", va="center", ha="right", fontsize=7.5))
    ax.set_yticks(range(len(order)), [(labels or names)[i] for i in order])
    ax.set_ylim(len(order) - 0.5, -0.5)
    ax.axvline(base, color="0.3", lw=1)
    finite = [v for v in values if math.isfinite(v)]
    if ax.get_xscale() == "linear" and finite and min(finite) >= base:
        ax.set_xlim(left=base)  # the bars start where the axis does: at 0, or at chance
    make_room(ax, texts)
    return [names[i] for i in order]


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


# ---- task accuracy against cost ---------------------------------------------------------------


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


# ---- the resolution probe ---------------------------------------------------------------------


def resolution_plots(table: pd.DataFrame, out: Path, title: str, limit_mib: float | None) -> list[Path]:
    """Peak memory and time per training step against the image side, log-log, per mechanism,
    a tick at every side tried; the sides that did not train marked by kind above the panels."""
    if not (table["status"] == "ok").any():
        return []  # nothing trained: the table says why
    failed = failed_rows(table)
    fig, axes, strips = _figure(failed["mechanism"].nunique(), 2, 12, 4.8)
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


# ---- a folder of results ----------------------------------------------------------------------


@dataclasses.dataclass
class Found:
    """What a results folder holds: sweeps (folders with scale.csv), resolution probes (folders
    with resolution.csv), accuracy sweeps (folders with accuracy.csv or breaking.csv) and task
    results tables (CSV files with task, mechanism and dataset columns)."""

    sweeps: list[Path] = dataclasses.field(default_factory=list)
    probes: list[Path] = dataclasses.field(default_factory=list)
    accuracy: list[Path] = dataclasses.field(default_factory=list)
    tables: list[Path] = dataclasses.field(default_factory=list)

    def empty(self) -> bool:
        return not (self.sweeps or self.probes or self.accuracy or self.tables)


TASK_TABLE_COLUMNS = {"task", "mechanism", "dataset"}
NOT_TASK_TABLES = {"scale.csv", "resolution.csv", "summary.csv", "history.csv", "accuracy.csv",
                   "breaking.csv", "rounds.csv", "ratios.csv", "fits.csv", "compare.csv"}
SKIP_DIRS = {"__pycache__", "node_modules"}


def is_task_table(path: Path) -> bool:
    if path.name in NOT_TASK_TABLES:
        return False
    try:
        header = set(pd.read_csv(path, nrows=0).columns)
    except (ValueError, OSError):
        return False
    return TASK_TABLE_COLUMNS <= header


def discover(folders: Iterable[Path]) -> Found:
    """Every sweep, probe, accuracy sweep and task table in and under ``folders``, in path order."""
    found = Found()
    seen: set[Path] = set()
    for top in folders:
        for root, dirs, files in os.walk(top):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIP_DIRS)
            here = Path(root)
            if here.resolve() in seen:
                continue
            seen.add(here.resolve())
            if "scale.csv" in files:
                found.sweeps.append(here)
            if "resolution.csv" in files:
                found.probes.append(here)
            if "accuracy.csv" in files or "breaking.csv" in files:
                found.accuracy.append(here)
            found.tables += [here / f for f in sorted(files)
                             if f.endswith(".csv") and is_task_table(here / f)]
    return found


def task_plots(path: Path, rows: pd.DataFrame, out: Path) -> list[Path]:
    """A task table's plots: the task's own (``Task.plot``), else top-1 against cost where the
    table has those columns."""
    from attnbench.tasks import UnknownTaskError, get_task

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


def sweep_title(meta: dict[str, Any]) -> str:
    title = f"{meta.get('cpu') or ''} {meta.get('gpu') or ''}".strip()
    sweep = meta.get("sweep", {})
    if sweep:
        title += (f", {sweep.get('device')}, {sweep.get('threads')} threads, B={sweep.get('batch')}, "
                  f"H={sweep.get('heads')}, d={sweep.get('head_dim')}, {sweep.get('dtype')}"
                  f"{', compiled' if sweep.get('compile') else ''}"
                  f"{', causal' if sweep.get('causal') else ''}")
    return title


def probe_title(table: pd.DataFrame, meta: dict[str, Any]) -> str:
    first = table.iloc[0]
    probe = meta.get("probe", {})
    device, threads = probe.get("device", first.get("device")), probe.get("threads", first.get("threads"))
    machine = ", ".join(str(v) for v in (meta.get("cpu"), meta.get("gpu")) if v)
    return (f"{first['task']}, {first['size']} backbone: one training step at growing image sides"
            f"{', ' + machine if machine else ''}, {device}, {threads} threads")


def _meta(folder: Path) -> dict[str, Any]:
    return read_meta(folder / "meta.json")


def _changed(folder: Path, before: dict[Path, int]) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and before.get(p) != p.stat().st_mtime_ns)


def redraw(folders: Iterable[Path], fit_min_n: int = 1024, include_limited: bool = False) -> list[Path]:
    """Redraw every plot in and under ``folders``: each sweep's (with its fit and ratio tables),
    each resolution probe's and each task table's; the files written, exactly."""
    from attnbench.resolution import read_probe
    from attnbench.sweep import finish
    from attnbench.tasks import finished_runs

    found = discover(folders)
    written: list[Path] = []
    for folder in found.sweeps:
        before = {p: p.stat().st_mtime_ns for p in folder.iterdir() if p.is_file()}
        finish(folder, fit_min_n, log=io.StringIO())  # its own line names scale.csv, which it does not write
        written += _changed(folder, before)
    for folder in found.probes:
        table = read_probe(folder / "resolution.csv")
        if table.empty:
            continue
        limit = table["memory_limit_mib"].dropna()
        written += resolution_plots(table, folder, probe_title(table, _meta(folder)),
                                    float(limit.iloc[0]) if len(limit) else None)
    for path in found.tables:
        rows = finished_runs(read_task_table(path), include_limited)
        written += task_plots(path, rows, path.parent)
    return written
