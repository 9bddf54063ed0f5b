"""GLUE's plot: dev score and training throughput per mechanism, mean ± std over seeds."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from attnbench.plots.style import (
    figure_groups,
    label_lines,
    plt,  # the Agg backend: files, not windows
    save_figure,
    seeds_text,
    sorted_bars,
    variant_labels,
    wrap,
)
from attnbench.results.aggregate import seed_stats
from tasks.glue.data import TASKS


def chance(glue_task: str) -> float:
    """The dev score of guessing: 100 / classes for accuracy alone, 0 for F1, MCC and correlations."""
    task = TASKS.get(glue_task)
    if task is None or task.metrics != ("accuracy",) or not task.labels:
        return 0.0
    return 100.0 / len(task.labels)


def plot_scores(table: pd.DataFrame, out: Path) -> list[Path]:
    """One figure per (GLUE task, data set, size, and any other configuration that varies): dev
    score bars from chance and training throughput bars from 0, each sorted best first, mean ±
    std over distinct seeds with n beside each."""
    written: list[Path] = []
    stats = seed_stats(table, ["score"], ["train_seq_s"])
    by = ["glue_task", "dataset", "size"]
    for key, rows, suffix in figure_groups(stats, by, ["mechanism"], split=False):
        glue_task, dataset = key.get("glue_task", "glue"), key.get("dataset", "data")
        size = key.get("size", "")
        mechs = list(rows["mechanism"])
        labels = [label_lines(label) for label in variant_labels(rows, by, ["mechanism"])]
        lines = max(label.count("\n") + 1 for label in labels)
        height = (0.26 + 0.16 * lines) * len(mechs) + 2.3
        fig, axes = plt.subplots(1, 2, figsize=(12 if lines > 1 else 11, height), layout="constrained")
        spread = rows["score_std"].where(rows["seeds"] > 1)
        floor = chance(glue_task)
        sorted_bars(axes[0], mechs, list(rows["score"]), list(rows["score"] - spread.fillna(0)),
                    list(rows["score"] + spread.fillna(0)), base=floor, best="high",
                    fmt=lambda v: f"{v:.1f}", labels=labels,
                    notes=[(f"± {e:.1f} " if pd.notna(e) else "") + f"({seeds_text([n])})"
                           for e, n in zip(spread, rows["seeds"], strict=True)])
        metric = "/".join(TASKS[glue_task].metrics) if glue_task in TASKS else "score"
        axes[0].set_xlabel(f"dev {metric} (GLUE score, %), bars from chance ({floor:.3g})" if floor else
                           f"dev {metric} (GLUE score, %)")
        sorted_bars(axes[1], mechs, list(rows["train_seq_s"]), best="high", fmt=lambda v: f"{v:.0f}",
                    labels=labels)
        axes[1].set_xlabel("training throughput (sequences/s, mean over seeds)")
        for ax in axes:
            ax.grid(True, axis="x", alpha=0.3)
        fig.suptitle(wrap(f"GLUE {glue_task}, BERT-{size} encoder, on {dataset}: mean ± std over seeds",
                          fig, 10), fontsize=10)
        slug = str(dataset).replace("embedded ", "").split(" ")[0].replace(":", "-").replace("/", "-")
        written += save_figure(fig, out, f"accuracy_glue_{glue_task}_{slug}_{size}{suffix}")
    return written
