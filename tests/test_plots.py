"""Every plot the project draws is fit for a paper: one style per mechanism, quartile bands, failures
marked where they happened, honest axes, sorted bars, labels inside the figure and never overprinted,
seeds counted (not repeats), and `attnbench plot DIR` redrawing every table and naming what it wrote.

The layout check (``attnbench.plots.style.layout_problems``) runs on every figure saved in these tests:
``checked_figures`` wraps ``Figure.savefig``.
"""

from __future__ import annotations

import colorsys
import math
import re
import shutil
from pathlib import Path

import matplotlib.colors as mcolors
import matplotlib.figure
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PolyCollection

from attnbench.cli import main
from attnbench.plots import style as plots
from attnbench.plots.kernel import scaling_plots
from attnbench.plots.resolution import resolution_plots
from attnbench.plots.style import FAILURES, STYLES, layout_problems, score_limits, style
from attnbench.plots.task_tables import accuracy_plots
from attnbench.results.aggregate import seed_stats
from attnbench.results.discover import discover

ROOT = Path(__file__).resolve().parents[1]
TOL_MUTED = {"#332288", "#88CCEE", "#44AA99", "#117733", "#999933", "#DDCC77", "#CC6677", "#882255",
             "#AA4499"}
OKABE_ITO = {"#E69F00", "#56B4E9", "#009E73", "#0072B2", "#D55E00", "#CC79A7", "#F0E442"}


def committed_results() -> Path:
    """The folder of committed reference runs (wherever the repository keeps it): the one holding
    the committed ImageNet table."""
    found = [p.parent for p in sorted(ROOT.glob("results/**/imagenet.csv"))
             if not {"local", "runs"} & set(p.relative_to(ROOT / "results").parts)]
    if not found:
        pytest.skip("no committed results/**/imagenet.csv in this checkout")
    return found[0]


@pytest.fixture
def checked_figures(monkeypatch):
    """Every figure saved while the test runs, with what ``layout_problems`` found in it."""
    seen: list[tuple[str, matplotlib.figure.Figure, list[str]]] = []
    original = matplotlib.figure.Figure.savefig

    def savefig(self, fname, *args, **kwargs):
        # save_figure writes through a temporary ".<name>.<pid>-<hex>.tmp" beside the file: its real name
        name = re.sub(r"^\.(.*)\.\d+-[0-9a-f]+\.tmp$", r"\1", Path(fname).name)
        seen.append((str(Path(fname).with_name(name)), self, layout_problems(self)))
        return original(self, fname, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    return seen


def assert_fit_to_print(seen):
    assert seen, "no figure was saved"
    bad = {name: problems for name, _, problems in seen if problems}
    assert not bad, bad


# ---- one style per mechanism ------------------------------------------------------------------


def luminance(hex_colour: str) -> float:
    r, g, b = mcolors.to_rgb(hex_colour)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def test_every_built_in_mechanism_has_its_own_colour_and_marker_from_a_colour_blind_safe_palette():
    from attnbench import mechanism_names

    names = set(mechanism_names()) | set(STYLES)
    built_in = [n for n in names if n in STYLES]
    assert len(built_in) >= 10
    colours = [STYLES[n].colour.upper() for n in built_in]
    markers = [STYLES[n].marker for n in built_in]
    assert len(set(colours)) == len(colours) and len(set(markers)) == len(markers)  # apart in greyscale too
    assert set(colours) <= TOL_MUTED | {"#000000"}
    # the pairs the issue named: hue or lightness far apart, and different markers
    for a, b in (("nat", "swin"), ("sdpa", "softmax")):
        (ha, la, _), (hb, lb, _) = (colorsys.rgb_to_hls(*mcolors.to_rgb(style(m).colour)) for m in (a, b))
        assert abs(la - lb) > 0.3 or min(abs(ha - hb), 1 - abs(ha - hb)) > 0.15, (a, b)
        assert style(a).marker != style(b).marker
    failure_markers = {m for m, _ in FAILURES.values()}
    assert not failure_markers & set(markers) and len(failure_markers) == len(FAILURES)


def test_a_plug_in_gets_a_stable_style_of_its_own():
    first, again = style("my_plugin_attention"), style("my_plugin_attention")
    assert first == again and first.colour.upper() in OKABE_ITO
    assert first.marker not in {s.marker for s in STYLES.values()}
    assert plots.colour("set") == STYLES["set"].colour


# ---- the sweep's plots --------------------------------------------------------------------------

MECHS = ["set", "softmax", "sdpa", "xformers", "swin", "nat", "linear", "performer", "nystromformer",
         "sinkformer", "plugin_a", "plugin_b"]


def sweep_table() -> pd.DataFrame:
    """12 mechanisms (10 built-in, 2 plug-ins) over n = 256..65536: quartiles recorded, every kind of
    failure at a known n, one mechanism unavailable, some rows noisy."""
    rows = []
    fail_at = {"softmax": ("oom", 32768), "sdpa": ("timeout", 32768), "nat": ("error", 16384),
               "sinkformer": ("compile-error", 16384)}
    for i, mech in enumerate(MECHS):
        power = 2.0 if mech in ("softmax", "sdpa", "nat", "sinkformer") else 1.0
        for n in [256 * 2**k for k in range(9)]:
            status, message = "ok", ""
            if mech == "xformers":
                status, message = "unavailable", "CUDA only"
            elif mech in fail_at and n >= fail_at[mech][1]:
                if n > fail_at[mech][1]:
                    continue
                status, message = fail_at[mech][0], "failed on purpose"
            median = (1 + i) * 1e-3 * (n / 256) ** power if status == "ok" else math.nan
            rows.append({"mechanism": mech, "n": n, "mode": "fwd", "status": status, "message": message,
                         "time_ms_median": median, "time_ms_q1": 0.8 * median, "time_ms_q3": 1.5 * median,
                         "time_ms_iqr": 0.7 * median, "peak_mem_mib": median * 3,
                         "noisy": mech == "linear" and n == 1024})
    return pd.DataFrame(rows)


@pytest.fixture
def sweep_plots(tmp_path, checked_figures):
    from attnbench.measure.fit import fit_table

    table = sweep_table()
    paths = scaling_plots(table, fit_table(table, 1024), tmp_path, "a 2-core test machine, cpu, 2 threads, "
                          "B=1, H=4, d=32, float32, with a long title that has to wrap to fit its figure")
    figures = {Path(name).stem: fig for name, fig, _ in checked_figures if name.endswith(".png")}
    return table, paths, figures, checked_figures


def test_sweep_plots_are_written_and_fit_to_print(sweep_plots, tmp_path):
    _, paths, figures, seen = sweep_plots
    assert {p.name for p in paths} == {f"{s}_fwd.{e}" for s in ("time", "memory", "ratios")
                                       for e in ("png", "svg")}
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)
    assert_fit_to_print(seen)


def test_the_time_band_runs_from_the_first_to_the_third_quartile(sweep_plots):
    table, _, figures, _ = sweep_plots
    panel = next(ax for ax in figures["time_fwd"].axes if ax.get_ylabel().startswith("time"))
    bands = [c for c in panel.collections if isinstance(c, PolyCollection)]
    assert len(bands) == table[table["status"] == "ok"]["mechanism"].nunique()
    ok = table[table["status"] == "ok"]
    lows = {round(v, 12) for v in ok["time_ms_q1"]}
    highs = {round(v, 12) for v in ok["time_ms_q3"]}
    for band in bands:
        ys = {round(y, 12) for y in band.get_paths()[0].vertices[:, 1]}
        assert ys <= lows | highs  # q1 and q3, never median ± IQR/2
        assert min(ys) > 0  # nothing runs to the log axis' floor


def test_a_table_with_only_the_iqr_gets_no_band_and_says_so(tmp_path, checked_figures):
    from attnbench.measure.fit import fit_table
    from attnbench.results.schema import upgrade

    table = upgrade(sweep_table().drop(columns=["time_ms_q1", "time_ms_q3"]), "scale")  # as read_sweep reads
    scaling_plots(table, fit_table(table, 1024), tmp_path, "old table")
    fig = next(f for name, f, _ in checked_figures if name.endswith("time_fwd.png"))
    panel = next(ax for ax in fig.axes if ax.get_ylabel().startswith("time"))
    assert not [c for c in panel.collections if isinstance(c, PolyCollection)]
    assert any("only the IQR" in t.get_text() for t in panel.get_legend().get_texts())


def test_failures_are_marked_by_kind_at_the_n_where_they_failed_and_named_in_the_legend(sweep_plots):
    table, _, figures, _ = sweep_plots
    for stem in ("time_fwd", "memory_fwd"):
        fig = figures[stem]
        strip = next(ax for ax in fig.axes if ax.get_title(loc="left").startswith("did not finish"))
        marked = {(line.get_marker(), float(x)) for line in strip.get_lines() for x in line.get_xdata()}
        failed = table[~table["status"].isin(["ok", "unavailable"])]
        for r in failed.itertuples():
            assert (FAILURES[r.status][0], float(r.n)) in marked, (stem, r.mechanism, r.status)
        legend = {t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()}
        for _, label in FAILURES.values():
            assert label in legend
        assert any(text.startswith("not run here: xformers") for text in legend)


def test_ratio_bars_are_sorted_by_value_and_their_labels_stay_inside(sweep_plots):
    _, _, figures, _ = sweep_plots
    fig = figures["ratios_fwd"]
    for ax in fig.axes:
        names = [t.get_text() for t in ax.get_yticklabels()]
        labels = {t.get_position()[1]: float(t.get_text().strip().rstrip("×")) for t in ax.texts}
        values = [labels[y] for y in sorted(labels)]
        assert values == sorted(values) and len(names) == len(values)
    # layout_problems (run on save) found every label inside the figure and nothing overprinted


def test_every_measured_n_has_a_tick(sweep_plots):
    table, _, figures, _ = sweep_plots
    panel = next(ax for ax in figures["time_fwd"].axes if ax.get_ylabel().startswith("time"))
    assert set(panel.get_xticks()) == set(float(n) for n in table["n"].unique())


# ---- task plots ---------------------------------------------------------------------------------


def imagenet_rows(repeat: bool = False) -> pd.DataFrame:
    rows = []
    for mech, base in (("set", 96.8), ("softmax", 95.4), ("swin", 95.7), ("nat", 95.4)):
        for seed in range(3):
            rows.append({"task": "imagenet", "mechanism": mech, "size": "micro", "dataset": "mnist5k",
                         "num_classes": 10, "img_size": 48, "epochs": 8, "seed": seed,
                         "top1": base + seed * 0.3, "gflops": 0.02 + 0.001 * len(mech), "params": 1.2e6,
                         "status": "ok", "limited": False, "date": f"2026-01-01T00:0{seed}:00"})
    if repeat:  # a repeat of set's seed 0, and a one-epoch check: neither is another seed of the 8-epoch runs
        rows.append({**rows[0], "top1": 10.0, "date": "2026-01-02T00:00:00"})
        rows.append({**rows[0], "epochs": 1, "top1": 50.0})
    return pd.DataFrame(rows)


def test_seeds_are_counted_not_repeats():
    stats = seed_stats(imagenet_rows(repeat=True), ["top1"])
    eight = stats[(stats["mechanism"] == "set") & (stats["epochs"] == 8)].iloc[0]
    assert (eight["seeds"], eight["repeats"]) == (3, 1)
    assert eight["top1"] == pytest.approx(np.mean([10.0, 96.8 + 0.3, 96.8 + 0.6]))  # the latest run of seed 0
    one = stats[(stats["mechanism"] == "set") & (stats["epochs"] == 1)].iloc[0]
    assert one["seeds"] == 1


def test_accuracy_plot_shows_n_keeps_configurations_apart_and_does_not_repeat_its_title(tmp_path,
                                                                                       checked_figures):
    paths = accuracy_plots(imagenet_rows(repeat=True), tmp_path, "imagenet")
    stems = {p.stem for p in paths}
    assert stems == {"accuracy_imagenet_mnist5k_48_epochs-1", "accuracy_imagenet_mnist5k_48_epochs-8"}
    assert_fit_to_print(checked_figures)
    fig = next(f for name, f, _ in checked_figures if name.endswith("epochs-8.png"))
    title = fig.get_suptitle()
    assert title.count("imagenet") == 1
    legend = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert "set (n = 3 seeds)" in legend


def test_score_axes_are_honest():
    # two single-seed points 0.1 apart: from the floor, never the gap over the whole height
    lo, hi = score_limits([56.0, 56.1], floor=0.0)
    assert lo == 0.0 and hi - lo > 50
    # with seed error bars: zoomed, but at least MIN_SCORE_SPAN wide
    lo, hi = score_limits([95.4, 95.5], [0.2, 0.3], floor=10.0, all_have_errors=True)
    assert hi - lo >= plots.MIN_SCORE_SPAN and hi <= 100


def test_ade20k_plot_does_not_stretch_a_tenth_of_a_point(tmp_path, checked_figures):
    from tasks.ade20k.plots import plot_results

    table = pd.DataFrame([{"task": "ade20k", "mechanism": m, "size": "micro", "dataset": "embedded x",
                           "crop_size": 96, "epochs": 3, "seed": 0, "miou": v, "gflops": g, "peak_mem_mib": p,
                           "status": "ok"}
                          for m, v, g, p in (("set", 56.0, 0.33, 1100), ("softmax", 56.1, 0.37, 1113))])
    paths = plot_results(table, tmp_path)
    assert {p.suffix for p in paths} == {".png", ".svg"}
    assert_fit_to_print(checked_figures)
    fig = checked_figures[0][1]
    low, high = fig.axes[0].get_ylim()
    assert low <= 0 and high - low > 50


def test_glue_bars_start_at_chance_and_are_sorted(tmp_path, checked_figures):
    from tasks.glue.plots import plot_scores

    rows = [{"task": "glue", "glue_task": "sst2", "mechanism": m, "size": "tiny", "dataset": "embedded rt",
             "epochs": 3, "seed": s, "score": v + s, "train_seq_s": 400 + 50 * i, "status": "ok"}
            for i, (m, v) in enumerate((("set", 71.0), ("softmax", 72.0), ("linear", 73.0)))
            for s in range(3)]
    plot_scores(pd.DataFrame(rows), tmp_path)
    assert_fit_to_print(checked_figures)
    fig = checked_figures[0][1]
    scores = fig.axes[0]
    assert scores.get_xlim()[0] == pytest.approx(50.0)
    assert [t.get_text() for t in scores.get_yticklabels()] == ["linear", "softmax", "set"]  # best first


def test_coco_bars_are_sorted_and_their_labels_fit(tmp_path, checked_figures):
    from tasks.coco.plots import plot_results

    rows = [{"task": "coco", "mechanism": m, "size": "micro", "dataset": "embedded:c", "img_size": 128,
             "epochs": 6, "seed": 0, "box_AP": b, "mask_AP": b - 3, "peak_mem_mib": 1300 + 10 * b,
             "train_img_s": 8, "status": "ok"}
            for m, b in (("set", 51.2), ("softmax", 53.9), ("linear", 52.5))]
    plot_results(pd.DataFrame(rows), tmp_path)
    assert_fit_to_print(checked_figures)
    bars = checked_figures[0][1].axes[0]
    assert [t.get_text().split("\n")[0] for t in bars.get_yticklabels()] == ["softmax", "linear", "set"]


# ---- resolution probe ---------------------------------------------------------------------------


def test_resolution_plot_ticks_every_side_and_marks_each_kind_of_failure(tmp_path, checked_figures):
    sides = [96, 192, 384, 576, 608, 640, 672, 704, 736, 768]
    rows = []
    for mech in ("set", "softmax"):
        for side in sides:
            status = "ok" if mech == "set" or side <= 576 else ("timeout" if side == 672 else
                                                                "oom" if side >= 704 else "error")
            rows.append({"task": "coco", "mechanism": mech, "size": "micro", "side": side, "status": status,
                         "step_ms": side**2 / 100 if status == "ok" else math.nan,
                         "peak_mem_mib": side**2 / 50 if status == "ok" else math.nan,
                         "memory_limit_mib": 19000})
    table = pd.DataFrame(rows)
    assert [p.name for p in resolution_plots(table, tmp_path, "coco probe", 19000)] == ["resolution.png",
                                                                                       "resolution.svg"]
    assert_fit_to_print(checked_figures)  # ten sides close together on a log axis: no tick label overprints
    fig = checked_figures[0][1]
    panels = [ax for ax in fig.axes if ax.get_xlabel() == "image side (pixels)"]
    assert len(panels) == 2
    for ax in panels:
        assert set(ax.get_xticks()) == {float(s) for s in sides}
    legend = {t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()}
    assert {"out of memory", "time-out (over the budget)", "error"} <= legend


# ---- `attnbench plot DIR` on the committed results ------------------------------------------------


@pytest.fixture
def committed_copy(tmp_path):
    copy = tmp_path / "reference"
    shutil.copytree(committed_results(), copy)
    return copy


def test_plot_redraws_every_committed_table_and_lists_exactly_what_it_wrote(committed_copy, capsys,
                                                                            checked_figures):
    found = discover([committed_copy])
    assert found.sweeps and len(found.probes) >= 2 and len(found.tables) >= 4
    before = {p: p.stat().st_mtime_ns for p in committed_copy.rglob("*") if p.is_file()}
    assert main(["plot", str(committed_copy)]) == 0
    listed = [Path(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    changed = [p for p in committed_copy.rglob("*") if p.is_file() and before.get(p) != p.stat().st_mtime_ns]
    assert sorted(listed) == sorted(changed)
    assert not [p for p in listed if p.name in ("scale.csv", "resolution.csv")]
    names = {p.name for p in listed}
    for sweep in found.sweeps:
        table = pd.read_csv(sweep / "scale.csv")
        expected = {"fits.csv", "ratios.csv"}
        for mode in set(table[table["status"] == "ok"]["mode"]):
            stems = ["time", "memory"] + (["ratios"] if {"softmax", "sdpa"} & set(table["mechanism"]) else [])
            expected |= {f"{stem}_{mode.replace('+', '_')}.{ext}" for stem in stems for ext in ("png", "svg")}
        assert expected <= {p.name for p in listed if p.parent == sweep}, sweep
    assert sum(p.name == "resolution.png" for p in listed) == len(found.probes)
    for prefix in ("accuracy_imagenet_", "accuracy_glue_", "coco_ap_", "miou_ade20k_"):
        assert any(n.startswith(prefix) and n.endswith(".png") for n in names), prefix
    assert_fit_to_print(checked_figures)


def test_redrawing_gives_the_same_files(committed_copy, capsys):
    folder = discover([committed_copy]).probes[0]
    assert main(["plot", str(folder)]) == 0
    first = {p.name: p.read_bytes() for p in folder.glob("resolution.*")}
    assert main(["plot", str(folder)]) == 0
    assert {p.name: p.read_bytes() for p in folder.glob("resolution.*")} == first
    out = capsys.readouterr().out.split()
    assert out.count(str(folder / "resolution.png")) == 2


def test_plot_of_a_folder_without_results_is_one_clear_line(tmp_path, cli_error):
    assert "no scale.csv there" in cli_error(["plot", str(tmp_path)])


@pytest.fixture
def cli_error(capsys):
    def run(argv):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        return capsys.readouterr().err
    return run


def test_a_luminance_ladder_keeps_the_flagship_darkest():
    assert luminance(STYLES["set"].colour) == min(luminance(s.colour) for s in STYLES.values())


def test_the_layout_check_sees_clipped_and_overprinted_labels():
    fig, ax = plots.plt.subplots(figsize=(3, 2))
    ax.text(1.5, 0.5, "a label far outside the figure", transform=ax.transAxes)
    ax.set_xticks(np.linspace(0, 1, 40))
    ax.set_title("a title")
    ax.text(0.5, 1.02, "a title", transform=ax.transAxes, ha="center")  # printed over the title
    problems = layout_problems(fig)
    plots.plt.close(fig)
    assert any("outside the figure" in p for p in problems)
    assert any("x tick labels overlap" in p for p in problems)
    assert any("overlap" in p and "a title" in p for p in problems)
