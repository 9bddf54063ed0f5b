"""GLUE's metrics against known values, and the GLUE score."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tasks.glue import data, metrics

# ---- metrics -------------------------------------------------------------------------------------

PRED, GOLD = np.array([1, 0, 1, 1]), np.array([1, 0, 0, 1])  # TP 2, TN 1, FP 1, FN 0


@pytest.mark.parametrize("name, expected", [
    ("sst2", {"accuracy": 75.0}),
    ("cola", {"mcc": 100 * 2 / math.sqrt(12)}),  # (TP·TN − FP·FN) / √((TP+FP)(TP+FN)(TN+FP)(TN+FN))
    ("mrpc", {"f1": 80.0, "accuracy": 75.0}),  # precision 2/3, recall 1
])
def test_classification_metrics_match_known_values(name, expected):
    got = metrics.compute_metrics(data.get_task(name), PRED, GOLD)
    assert got == pytest.approx(expected)


def test_regression_metrics_are_pearson_and_spearman():
    x, y = np.array([1.0, 2, 3, 4]), np.array([1.0, 4, 9, 16])  # monotone, not linear
    got = metrics.compute_metrics(data.get_task("stsb"), x, y)
    assert got["spearman"] == pytest.approx(100.0)
    assert got["pearson"] == pytest.approx(100 * 25 / math.sqrt(5 * 129))
    assert math.isnan(metrics.compute_metrics(data.get_task("stsb"), np.ones(4), y)["pearson"])


def test_glue_score_averages_a_tasks_metrics_and_mnli_reports_both_dev_sets():
    mrpc = {"dev": {"f1": 80.0, "accuracy": 70.0}}
    assert metrics.glue_score(data.get_task("mrpc"), mrpc) == 75.0
    mnli = {"dev_matched": {"accuracy": 60.0}, "dev_mismatched": {"accuracy": 58.0}}
    row = metrics.metric_columns(data.get_task("mnli"), mnli)
    assert (row["accuracy"], row["accuracy_mm"]) == (60.0, 58.0) and math.isnan(row["f1"])
    assert metrics.glue_score(data.get_task("mnli"), mnli) == 59.0
