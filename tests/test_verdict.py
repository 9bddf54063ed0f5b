"""The report's verdict tables, worked out by hand on small sweeps: the fronts at each length for a
score where higher is better and one where lower is, the breaking lengths, and a kernel sweep's
exponents and crossovers per mode (``decode`` too) and causal setting."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from attnbench.report.page import Cards, build, render_markdown
from attnbench.report.verdict import accuracy_verdict, kernel_verdict

# variant → n → (score per seed, step_ms, peak_mem_mib); None: the point ran out of memory
POINTS = {
    "softmax": {64: ((88.0, 92.0), 10.0, 100.0), 128: None},
    "linear": {64: ((80.0, 80.0), 5.0, 50.0), 128: ((60.0, 60.0), 10.0, 100.0)},
    "set": {64: ((70.0, 70.0), 8.0, 40.0), 128: ((64.0, 66.0), 16.0, 80.0)},
}


def accuracy_sweep(folder: Path, score: str = "accuracy") -> Path:
    folder.mkdir(parents=True)
    rows = []
    for variant, by_n in POINTS.items():
        for n, point in by_n.items():
            for seed in (0, 1):
                if point is None:
                    rows.append({"task": "mqar", "mechanism": variant, "variant": variant, "seq_len": n,
                                 "seed": seed, "status": "oom"})
                    continue
                scores, step_ms, mem = point
                rows.append({"task": "mqar", "mechanism": variant, "variant": variant, "seq_len": n,
                             "seed": seed, "status": "ok", score: scores[seed], "step_ms": step_ms,
                             "peak_mem_mib": mem})
    pd.DataFrame(rows).to_csv(folder / "accuracy.csv", index=False)
    pd.DataFrame({"variant": ["linear", "set"], "mechanism": ["linear", "set"], "breaking": ["128", "none"],
                  "baseline": ["softmax", "softmax"], "margin": [10.0, 10.0]}).to_csv(
        folder / "breaking.csv", index=False)
    return folder


def test_the_fronts_at_each_length_and_the_breaking_lengths(tmp_path):
    verdict = accuracy_verdict(accuracy_sweep(tmp_path / "acc"))
    cells = verdict.frame.set_index("variant")
    # n = 64, by time: linear (5 ms, 80) then softmax (10 ms, 90); set (8 ms, 70) is beaten by linear.
    # by memory: set (40 MiB, 70), linear (50, 80), softmax (100, 90): each better than the cheaper.
    # n = 128 (softmax out of memory): time: linear (10, 60), set (16, 65); memory: set (80, 65) alone.
    assert cells.loc["softmax"].tolist() == ["90 T M", "oom", "baseline"]
    assert cells.loc["linear"].tolist() == ["80 T M", "60 T", "128"]
    assert cells.loc["set"].tolist() == ["70 M", "65 T M", "never"]
    assert list(verdict.frame.columns) == ["variant", "n = 64", "n = 128", "breaks at n"]
    assert "mean over 2 seeds" in verdict.note and "mqar" in verdict.note
    assert any("higher is better" in line and "10 points short of softmax" in line for line in verdict.legend)


def test_a_score_where_lower_is_better_turns_the_fronts_round(tmp_path):
    verdict = accuracy_verdict(accuracy_sweep(tmp_path / "lm", score="perplexity"))
    cells = verdict.frame.set_index("variant")
    # n = 64 by time: linear (5 ms, 80) first; set (8 ms, 70) lower, on it; softmax (10 ms, 90) is not.
    # by memory: set (40 MiB, 70) first and lowest: nothing after it beats it.
    assert cells.loc["softmax", "n = 64"] == "90"
    assert cells.loc["linear", "n = 64"] == "80 T"
    assert cells.loc["set", "n = 64"] == "70 T M"
    assert any("perplexity: lower is better" in line for line in verdict.legend)


def kernel_sweep(folder: Path, settings: tuple[bool, ...] = (False, True)) -> Path:
    """softmax ∝ n² and linear ∝ n forward (linear twice as slow per token: it overtakes from 2048),
    softmax ∝ n and linear constant in decode; at each causal setting (causal: half the time)."""
    folder.mkdir(parents=True)
    rows = []
    for causal in settings:
        share = 0.5 if causal else 1.0
        for n in (1024, 2048, 4096, 8192):
            times = {("softmax", "fwd"): 1e-6 * n * n, ("linear", "fwd"): 2e-3 * n,
                     ("softmax", "decode"): 1e-4 * n, ("linear", "decode"): 0.3}
            for (mechanism, mode), ms in times.items():
                rows.append({"mechanism": mechanism, "n": n, "mode": mode, "causal": causal, "status": "ok",
                             "time_ms_median": share * ms, "peak_mem_mib": float(n), "message": ""})
    pd.DataFrame(rows).to_csv(folder / "scale.csv", index=False)
    return folder


def test_exponents_and_crossovers_per_mode_and_causal_setting(tmp_path):
    verdict = kernel_verdict(kernel_sweep(tmp_path / "scale"), 1024)
    frame = verdict.frame
    assert list(frame.columns) == ["mechanism", "causal", "k ± 95 %", "vs softmax"]  # no sdpa swept
    rows = {(r.mechanism, r.causal): r for r in frame.itertuples(index=False)}
    assert len(rows) == 4  # one row per mechanism and setting, a cell per mode: fwd / decode
    for causal in (False, True):
        assert rows["softmax", causal][2] == "2.00 ± 0.00 / 1.00 ± 0.00"
        assert rows["linear", causal][2] == "1.00 ± 0.00 / 0.00 ± 0.00"
        # fwd: 4.1 ms against softmax's 4.19 at 2048; decode: 0.3 ms against 0.2048 at 2048, 0.41 at 4096
        assert rows["linear", causal][3] == "2048 / 4096"
        assert rows["softmax", causal][3] == "— / —"
    assert "fwd / decode in each cell" in verdict.note and "k from 1024" in verdict.note


def test_a_mechanism_that_ran_nowhere_is_named_not_tabled(tmp_path):
    folder = kernel_sweep(tmp_path / "scale", (True,))
    table = pd.read_csv(folder / "scale.csv")
    gone = [{"mechanism": "set", "n": n, "mode": mode, "causal": True, "status": "unavailable",
             "message": "no causal form"} for n in (1024, 2048) for mode in ("fwd", "decode")]
    pd.concat([table, pd.DataFrame(gone)]).to_csv(folder / "scale.csv", index=False)
    verdict = kernel_verdict(folder, 1024)
    assert sorted(verdict.frame["mechanism"]) == ["linear", "softmax"]
    assert "1 not run here" in verdict.note


def test_the_report_opens_with_the_verdict_in_both_formats(tmp_path):
    accuracy_sweep(tmp_path / "runs" / "acc")
    kernel_sweep(tmp_path / "runs" / "scale", (True,))
    report = build([tmp_path / "runs"])
    anchors = [s.anchor for s in report.sections]
    assert anchors[:3] == ["verdict", "verdict-accuracy", "verdict-kernel"]
    assert anchors[-1] == "contexts"  # the run contexts close the report
    cards = [b for s in report.sections[1:3] for b in s.blocks if isinstance(b, Cards)]
    assert [t.caption.split(":")[0] for c in cards for t in c.tables] == ["acc", "scale"]
    text = render_markdown(report, tmp_path / "report.md")
    first = text.index("## Verdict")
    assert first < text.index("## Kernel sweeps") < text.index("## Run contexts")
    assert text.index("| variant | n = 64 | n = 128 | breaks at n |") > first
    assert "| linear | 80 T M | 60 T | 128 |" in text
    assert "| mechanism | k ± 95 % | vs softmax |" in text  # one causal setting: no column
    assert "fwd / decode in each cell, causal" in text
