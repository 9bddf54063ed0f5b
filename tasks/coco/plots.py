"""COCO's plot: AP^box and AP^mask per mechanism, and training throughput against peak memory."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from attnbench.plots import colour, plt  # the Agg backend: files, not windows


def plot_results(table: pd.DataFrame, out: Path) -> list[Path]:
    """Per (data set, image size): AP^box and AP^mask bars per mechanism (the latest run of each
    mechanism and size), and training throughput against peak memory; PNG and SVG in ``out``.
    ``table``: the runs to draw (the harness passes the finished, unlimited ones)."""
    written: list[Path] = []
    for (dataset, img), rows in table.groupby(["dataset", "img_size"]):
        latest = rows.groupby(["mechanism", "size"]).tail(1).reset_index(drop=True)
        fig, (bars, cost) = plt.subplots(1, 2, figsize=(11, 4.2))
        for i, r in latest.iterrows():
            c = colour(r["mechanism"])
            bars.bar(i - 0.2, r["box_AP"], 0.38, color=c, edgecolor="black")
            bars.bar(i + 0.2, r["mask_AP"], 0.38, color=c, edgecolor="black", hatch="//", alpha=0.7)
            for dx, v in ((-0.2, r["box_AP"]), (0.2, r["mask_AP"])):
                bars.annotate(f"{v:.1f}", (i + dx, v), ha="center", va="bottom", fontsize=8)
            cost.scatter(r["peak_mem_mib"], r["train_img_s"], s=80, color=c, edgecolor="black")
            cost.annotate(f"  {r['mechanism']} ({r['size']})", (r["peak_mem_mib"], r["train_img_s"]),
                          fontsize=8, va="center")
        bars.set_xticks(range(len(latest)), [f"{m}\n{s}" for m, s in zip(latest["mechanism"], latest["size"],
                                                                          strict=True)])
        bars.set_ylabel("COCO AP (%, IoU 0.50:0.95)")
        bars.legend(handles=[plt.Rectangle((0, 0), 1, 1, fc="0.7", ec="black", label="box"),
                             plt.Rectangle((0, 0), 1, 1, fc="0.7", ec="black", hatch="//", label="mask")],
                    fontsize=8)
        cost.set_xlim(0, 1.3 * latest["peak_mem_mib"].max())  # room for the labels
        cost.set_ylim(0, 1.15 * latest["train_img_s"].max())
        cost.set_xlabel("peak memory in training (MiB)")
        cost.set_ylabel("training images / s")
        for ax in (bars, cost):
            ax.grid(True, axis="y", alpha=0.3)
        fig.suptitle(f"coco: Mask R-CNN on {dataset} at {img} px (latest run per mechanism)", fontsize=10)
        fig.tight_layout()
        stem = f"coco_ap_{dataset}_{img}".replace(":", "-").replace("/", "-").replace(" ", "_")
        stem = stem.replace("(", "").replace(")", "")
        for suffix in (".png", ".svg"):
            path = out / f"{stem}{suffix}"
            fig.savefig(path, dpi=150 if suffix == ".png" else None, bbox_inches="tight")
            written.append(path)
        plt.close(fig)
    return written
