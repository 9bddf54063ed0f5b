"""Plots a paper can use: the style and layout every plot of the project shares (one module per
result kind beside this one draws its own figures).

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
  measured length or side; aggregates over distinct seeds, with n shown
  (``attnbench.results.aggregate.seed_stats``).
- Labels fit: figures use constrained layout, crowded tick labels turn or thin out, and bar
  labels get room inside their axes; ``layout_problems`` checks a drawn figure (every text inside
  the figure, no two tick labels overlapping) and the tests run it on every plot.
- The same data gives the same files (no date in the SVG, fixed SVG ids), so redrawing a
  committed folder leaves it as it was.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
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
from matplotlib import patheffects, ticker  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from attnbench.options import split_label  # noqa: E402
from attnbench.results.aggregate import config_columns  # noqa: E402
from attnbench.results.tables import replacing  # noqa: E402

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


def failure_figure(failing: int, ncols: int, width: float, height: float, **kwargs: Any):
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


def draw_failures(strip: plt.Axes | None, failed: pd.DataFrame, x: str) -> None:
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
    draw_failures(strip, failed, x)


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
