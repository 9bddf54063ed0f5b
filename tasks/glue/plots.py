"""GLUE's plot: dev score and training throughput per mechanism, mean ± std over seeds."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from attnbench.plots import colour, plt  # the Agg backend: files, not windows
from tasks.glue.data import TASKS


def plot_scores(table: pd.DataFrame, out: Path) -> list[Path]:
    """One figure per (GLUE task, data set, size): dev score and training throughput per mechanism,
    mean ± std over the runs in ``table``, in the project's colours."""
    written: list[Path] = []
    for (glue_task, dataset, size), rows in table.groupby(["glue_task", "dataset", "size"]):
        stats = rows.groupby("mechanism").agg(score=("score", "mean"), spread=("score", "std"),
                                              speed=("train_seq_s", "median"), runs=("score", "size"))
        stats = stats.sort_values("score", ascending=False)
        mechs = list(stats.index)
        fig, axes = plt.subplots(1, 2, figsize=(10, 0.5 * len(mechs) + 2.2))
        colours = [colour(m) for m in mechs]
        axes[0].barh(mechs, stats["score"], xerr=stats["spread"].where(stats["runs"] > 1), color=colours)
        for y, v in enumerate(stats["score"]):
            axes[0].text(v, y, f" {v:.1f}", va="center", fontsize=8)
        metric = "/".join(TASKS[glue_task].metrics) if glue_task in TASKS else "score"
        axes[0].set_xlabel(f"dev {metric} (GLUE score, %)")
        axes[1].barh(mechs, stats["speed"], color=colours)
        axes[1].set_xlabel("training throughput (sequences/s)")
        for ax in axes:
            ax.invert_yaxis()
            ax.grid(True, axis="x", alpha=0.3)
        fig.suptitle(f"GLUE {glue_task}, {size} encoder, on {dataset}", fontsize=10)
        fig.tight_layout()
        slug = str(dataset).replace("embedded ", "").split(" ")[0].replace(":", "-").replace("/", "-")
        path = out / f"accuracy_glue_{glue_task}_{slug}_{size}.png"
        out.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=150, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written

