"""ADE20K's plot: mIoU against forward GFLOPs and against peak training memory per mechanism."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from attnbench.plots import colour, plt  # the Agg backend: files, not windows


def plot_results(table: pd.DataFrame, out: Path) -> list[Path]:
    """mIoU against forward GFLOPs and against peak memory, one colour per mechanism, one figure per
    (data set, size, crop): ``miou_ade20k_<dataset>_<size>_<crop>.png``; the latest row of each
    mechanism stands for it."""
    written: list[Path] = []
    for (dataset, size, crop), rows in table.groupby(["dataset", "size", "crop_size"]):
        latest = rows.groupby("mechanism").tail(1)
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
        for ax, column, label in ((axes[0], "gflops", f"forward GFLOPs per {crop}² image (2 per MAC)"),
                                  (axes[1], "peak_mem_mib", "peak training memory (MiB)")):
            for r in latest.itertuples():
                big = r.mechanism == "set"
                ax.plot(getattr(r, column), r.miou, "o", color=colour(r.mechanism), ms=9 if big else 7)
                ax.annotate(f" {r.mechanism}", (getattr(r, column), r.miou), fontsize=8, va="center")
            ax.set_xlabel(label)
            ax.grid(True, alpha=0.3)
        axes[0].set_ylabel("mIoU (%), single scale")
        fig.suptitle(f"ade20k on {dataset}: SeTformer-{size} + UperNet, {crop}² crops", fontsize=10)
        fig.tight_layout()
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(dataset)).strip("-")
        path = out / f"miou_ade20k_{slug}_{size}_{crop}.png"
        fig.savefig(path, dpi=150, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written
