"""GLUE's metrics, as the leaderboard reports them (× 100): Matthews correlation (CoLA), accuracy,
F1 of the positive class (MRPC, QQP), Pearson and Spearman correlation (STS-B); a task's GLUE
score is the mean of its metrics over its dev splits."""

from __future__ import annotations

import math
import statistics
from typing import Any

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from tasks.glue.data import GlueTask

METRIC_COLUMNS = ["accuracy", "accuracy_mm", "f1", "mcc", "pearson", "spearman"]


def compute_metrics(task: GlueTask, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """GLUE's metrics of one dev split, × 100 as the leaderboard shows them: predictions are class
    indices (classification) or scores (STS-B)."""
    out: dict[str, float] = {}
    for name in task.metrics:
        if name == "accuracy":
            out[name] = 100 * accuracy_score(labels, predictions)
        elif name == "f1":  # of the positive class (paraphrase, duplicate), as GLUE
            out[name] = 100 * f1_score(labels, predictions, zero_division=0.0)
        elif name == "mcc":
            out[name] = 100 * matthews_corrcoef(labels, predictions)
        elif name == "pearson":
            out[name] = 100 * _nan_if_constant(pearsonr, predictions, labels)
        elif name == "spearman":
            out[name] = 100 * _nan_if_constant(spearmanr, predictions, labels)
        else:
            raise ValueError(f"unknown GLUE metric {name!r}")
    return out


def _nan_if_constant(fn: Any, a: np.ndarray, b: np.ndarray) -> float:
    """A correlation, or NaN where it is undefined (a constant input)."""
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(fn(a, b)[0])


def glue_score(task: GlueTask, metrics: dict[str, dict[str, float]]) -> float:
    """The task's GLUE score: the mean of its metrics over its dev splits (MRPC: F1 and accuracy)."""
    return statistics.fmean(v for split in metrics.values() for v in split.values())


def metric_columns(task: GlueTask, metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """The results table's metric columns; MNLI's mismatched accuracy is ``accuracy_mm``."""
    row = dict.fromkeys(METRIC_COLUMNS, math.nan)
    for split, values in metrics.items():
        for name, value in values.items():
            row["accuracy_mm" if split == "dev_mismatched" else name] = round(value, 3)
    return row
