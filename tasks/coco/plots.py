"""COCO's plot: AP^box and AP^mask per mechanism, and training throughput against peak memory."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from attnbench.plots.style import (
    EDGE,
    colour,
    figure_groups,
    label_lines,
    make_room,
    marker_kwargs,
    ordered,
    plt,  # the Agg backend: files, not windows
    save_figure,
    seeds_text,
    variant_labels,
    whisker,
    wrap,
)
from attnbench.results.aggregate import seed_stats

METRICS = ("box_AP", "mask_AP")


def plot_results(table: pd.DataFrame, out: Path) -> list[Path]:
    """Per (data set, image size, and any other configuration that varies): AP^box and AP^mask
    bars per mechanism (mean ± std over distinct seeds, n beside each, best at the top), and
    training throughput against peak memory; PNG and SVG in ``out``. ``table``: the runs to draw
    (the harness passes the finished, unlimited ones)."""
    written: list[Path] = []
    stats = seed_stats(table, METRICS, ["peak_mem_mib", "train_img_s"])
    for key, rows, suffix in figure_groups(stats, ["dataset", "img_size"], ["mechanism", "size"],
                                           split=False):
        rows = rows.sort_values("box_AP", ascending=False).reset_index(drop=True)
        several_sizes = rows["size"].nunique() > 1 if "size" in rows else False
        within = ["mechanism", "size"] if several_sizes else ["mechanism"]
        names = [label_lines(n) for n in variant_labels(rows, ["dataset", "img_size"], within)]
        fig, (bars, cost) = plt.subplots(1, 2, figsize=(11, 0.55 * len(rows) + 2.6), layout="constrained",
                                         width_ratios=[1.2, 1])
        texts = []
        bars.set_axisbelow(True)
        for y, r in rows.iterrows():
            for dy, metric, hatch in ((-0.19, "box_AP", None), (0.19, "mask_AP", "//")):
                v, e = r[metric], r[f"{metric}_std"] if r["seeds"] > 1 else float("nan")
                bars.barh(y + dy, v, 0.36, color=colour(r["mechanism"]), edgecolor=EDGE, lw=0.6, hatch=hatch)
                if pd.notna(e):
                    whisker(bars.errorbar(v, y + dy, xerr=e, color="0.15", capsize=2.5, lw=1))
                spread = f" ± {e:.1f}" if pd.notna(e) else ""
                end = v + (e if pd.notna(e) else 0)
                texts.append(bars.text(end, y + dy, f" {v:.1f}{spread}", va="center", fontsize=7.5))
        bars.set_yticks(range(len(rows)), [f"{n}\n{seeds_text([s])}" for n, s in zip(names, rows["seeds"],
                                                                                    strict=True)], fontsize=8)
        bars.set_ylim(len(rows) - 0.5, -0.5)
        bars.set_xlim(0, max(1.0, float((rows[list(METRICS)].max()).max())) * 1.05)
        bars.set_xlabel("COCO AP (%, IoU 0.50:0.95), from 0")
        bars.legend(handles=[plt.Rectangle((0, 0), 1, 1, fc="0.75", ec=EDGE, label="box"),
                             plt.Rectangle((0, 0), 1, 1, fc="0.75", ec=EDGE, hatch="//", label="mask")],
                    fontsize=8, loc="lower right")
        bars.grid(True, axis="x", alpha=0.3)
        make_room(bars, texts)
        for i, r in rows.iterrows():
            cost.plot(r["peak_mem_mib"], r["train_img_s"], ls="", label=names[i],
                      **marker_kwargs(r["mechanism"], 9))
        cost.set_xlim(0, 1.15 * rows["peak_mem_mib"].max())
        cost.set_ylim(0, 1.15 * rows["train_img_s"].max())
        cost.set_xlabel("peak memory in training (MiB)")
        cost.set_ylabel("training images / s (mean over seeds)")
        cost.grid(True, alpha=0.3)
        handles, labels = cost.get_legend_handles_labels()
        order = [labels.index(n) for n in ordered(labels)]
        cost.legend([handles[i] for i in order], [labels[i] for i in order], fontsize=8, loc="lower right")
        dataset, img = key.get("dataset", "data"), key.get("img_size", "")
        fig.suptitle(wrap(f"Mask R-CNN on {dataset} at {img} px: AP per mechanism (mean ± std over seeds), "
                          "and its training cost", fig, 10), fontsize=10)
        stem = f"coco_ap_{dataset}_{img}{suffix}".replace(":", "-").replace("/", "-").replace(" ", "_")
        written += save_figure(fig, out, stem.replace("(", "").replace(")", ""))
    return written
