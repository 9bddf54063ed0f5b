"""ADE20K's plot: mIoU against forward GFLOPs and against peak training memory per mechanism."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from attnbench.plots.style import figure_groups, save_figure, slug
from attnbench.plots.task_tables import score_against_cost
from attnbench.results.aggregate import seed_stats


def plot_results(table: pd.DataFrame, out: Path) -> list[Path]:
    """mIoU against forward GFLOPs and against peak memory, one style per mechanism, one figure per
    (data set, size, crop, and any other configuration that varies):
    ``miou_ade20k_<dataset>_<size>_<crop>.png`` and ``.svg``. Each point is the mean over distinct
    seeds (error bars: their std, n in the legend); the mIoU axis starts at 0 unless every point
    has error bars, so a gap within seed noise is never stretched over the whole height."""
    written: list[Path] = []
    stats = seed_stats(table, ["miou"], ["gflops", "peak_mem_mib"])
    for key, rows, suffix in figure_groups(stats, ["dataset", "size", "crop_size"], ["mechanism"]):
        dataset, size, crop = key.get("dataset", "data"), key.get("size", ""), key.get("crop_size", "")
        fig = score_against_cost(
            rows, "miou", "mIoU (%), single scale",
            [("gflops", f"forward GFLOPs per {crop}² image (2 per MAC)", 1.0),
             ("peak_mem_mib", "peak training memory (MiB)", 1.0)],
            0.0, None, f"UperNet on SeTformer-{size}, {dataset}, {crop}² crops: mIoU against cost",
            "mean ± std over seeds")
        written += save_figure(fig, out, f"miou_ade20k_{slug(dataset)}_{size}_{crop}{suffix}")
    return written
