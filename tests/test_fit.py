"""The exponent fits: intervals that cover the truth, labels that claim only what they support,
noisy rows left out, same-round ratios. Synthetic data only: nothing here is measured."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from attnbench.measure.fit import Fit, fit_exponent, fit_power_law, fit_table, label, ratio_table

N = np.array([256, 512, 1024, 2048, 4096, 8192, 16384])


def test_exact_power_laws_have_a_collapsed_interval():
    for power in (1.0, 2.0):
        fit = fit_power_law(N, 3e-4 * N**power)
        assert fit.exponent == pytest.approx(power)
        assert fit.ci_low == pytest.approx(power) and fit.ci_high == pytest.approx(power)
        assert fit.r2 == pytest.approx(1.0) and fit.points == len(N)
    assert fit_exponent(N, 0.01 * N) == pytest.approx(1.0)


@pytest.mark.parametrize("power", [1.0, 2.0])
def test_interval_covers_the_true_slope_about_95_percent_of_the_time(power):
    rng = np.random.default_rng(0)
    trials, covered = 400, 0
    for _ in range(trials):
        cost = 1e-3 * N**power * np.exp(rng.normal(0, 0.15, len(N)))
        fit = fit_power_law(N, cost)
        covered += fit.ci_low <= power <= fit.ci_high
    assert 0.91 <= covered / trials <= 0.99


def test_noise_widens_the_interval_and_lowers_r2():
    rng = np.random.default_rng(1)
    quiet = fit_power_law(N, N * np.exp(rng.normal(0, 0.02, len(N))))
    loud = fit_power_law(N, N * np.exp(rng.normal(0, 0.5, len(N))))
    assert loud.ci_high - loud.ci_low > quiet.ci_high - quiet.ci_low
    assert loud.r2 < quiet.r2


def test_too_few_points_give_no_label():
    three = fit_power_law(N[:3], N[:3] ** 2.0)
    assert three.points == 3 and label(three) == "no label (3 points)"
    two = fit_power_law(N[:2], N[:2])
    assert math.isinf(two.ci_high) and label(two) == "no label (2 points)"
    one = fit_power_law(N[:1], N[:1])
    assert math.isnan(one.exponent) and label(one) == "no label (1 points)"
    assert label(fit_power_law(N[:4], N[:4] ** 2.0)) == "quadratic"


@pytest.mark.parametrize("low, high, expected", [
    (0.95, 1.05, "linear"),
    (0.60, 0.85, "linear"),         # overheads at small n: below 1, still not quadratic
    (1.00, 1.45, "linear"),         # n log n territory, wholly below the divide
    (1.85, 2.10, "quadratic"),
    (1.55, 1.90, "quadratic"),
    (0.90, 1.60, "uncertain"),      # reaches past the divide
    (1.40, 2.00, "uncertain"),
    (1.25, 1.45, "uncertain"),      # between the bands
    (-2.10, -1.80, "uncertain"),    # a decreasing time is not a finding
    (2.60, 3.10, "uncertain"),
    (0.20, 0.60, "uncertain"),      # reaches past the divide between constant and linear
    (-0.10, 0.15, "constant"),      # a recurrent decoder's time per token
    (0.05, 0.45, "constant"),
    (-0.60, -0.30, "uncertain"),
])
def test_label_rules(low, high, expected):
    assert label(Fit((low + high) / 2, low, high, 0.9, 6)).startswith(expected)


def test_uncertain_label_shows_the_interval():
    assert label(Fit(1.2, 0.62, 1.71, 0.8, 5)) == "uncertain (95% CI 0.62 to 1.71)"


def _table(noisy_at: int | None = None) -> pd.DataFrame:
    rows = []
    for n in N[:6]:
        for mech, cost in (("softmax", 1e-5 * n**2), ("lin", 0.02 * n)):
            noisy = mech == "lin" and n == noisy_at
            rows.append({"mechanism": mech, "n": n, "mode": "fwd", "status": "ok", "noisy": noisy,
                         "time_ms_median": cost * (50 if noisy else 1), "peak_mem_mib": cost})
    return pd.DataFrame(rows)


def test_fit_table_leaves_noisy_rows_out_and_says_so():
    fits = fit_table(_table(noisy_at=4096), fit_min_n=0).set_index("mechanism")
    assert fits.loc["lin", "time_exponent"] == pytest.approx(1.0)  # the 50x outlier is not in the fit
    assert fits.loc["lin", "noisy_left_out"] == 1 and fits.loc["lin", "points"] == 5
    assert fits.loc["lin", "scaling"] == "linear" and fits.loc["softmax", "scaling"] == "quadratic"
    assert fits.loc["softmax", "memory_scaling"] == "quadratic"
    assert fits.loc["lin", "time_ci_low"] <= 1.0 <= fits.loc["lin", "time_ci_high"]
    # lin (0.02 n) is faster than softmax (1e-5 n²) from n = 2048; its noisy 4096 row is no evidence
    assert fits.loc["lin", "crossover_vs_softmax"] == 2048


def test_fit_table_reads_old_tables_without_noise_flags():
    fits = fit_table(_table().drop(columns="noisy"), fit_min_n=1024).set_index("mechanism")
    assert fits.loc["softmax", "points"] == 4 and fits.loc["softmax", "scaling"] == "quadratic"


def test_ratio_table_uses_same_round_pairs_without_disturbed_rounds():
    rows = []
    for p, (a, b, disturbed) in enumerate([(1.0, 2.0, False), (1.1, 2.0, False), (3.0, 2.0, True),
                                           (1.2, 2.0, False)]):
        rows.append({"mechanism": "a", "n": 512, "mode": "fwd", "pass": p, "time_ms_median": a,
                     "disturbed": disturbed})
        rows.append({"mechanism": "b", "n": 512, "mode": "fwd", "pass": p, "time_ms_median": b,
                     "disturbed": False})
    rows.append({"mechanism": "a", "n": 512, "mode": "fwd", "pass": 9, "time_ms_median": 9.0,
                 "disturbed": False})  # a round b was not timed beside: no pair
    ratios = ratio_table(pd.DataFrame(rows)).set_index(["mechanism", "baseline"])
    a_b = ratios.loc[("a", "b")]
    assert a_b["rounds"] == 3 and a_b["ratio_median"] == pytest.approx(0.55)
    assert a_b["ratio_q1"] == pytest.approx(0.525) and a_b["ratio_q3"] == pytest.approx(0.575)
    assert ratios.loc[("b", "a"), "ratio_median"] == pytest.approx(2 / 1.1)
    assert ratio_table(pd.DataFrame()).empty
