"""The sequence-length sweep: range parsing, fits, the CSV, failure paths, resume, compare.

Nothing here asserts a time: measurements run with tiny budgets only to exercise the paths.
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from attnbench import registry
from attnbench.cli import main
from attnbench.measure.fit import crossover, fit_exponent, fit_power_law, fit_table, label
from attnbench.sweeps.base import SweepError, parse_seq
from attnbench.sweeps.kernel import COLUMNS, SweepConfig, compare, finish, run_sweep, summary

FAULTY = str(Path(__file__).with_name("faulty_mechanisms.py"))  # loaded with --load, never imported

# Mechanisms whose cost is known exactly: a busy wait of BASE_S * (n / 256) ** power seconds,
# whatever the machine. `hog_n` makes the quadratic one start busy processes (three per core,
# for as long as its worker lives) when it is built at that n: the whole machine slows down.
KNOWN = textwrap.dedent('''
    """Fake mechanisms of exactly known cost, for the fault-injection test of the sweep."""
    import dataclasses
    import os
    import subprocess
    import sys
    import time
    from attnbench import Flops, Mechanism, register_mechanism

    BASE_S = 0.0002
    HOG = "import os, time\\nppid, end = os.getppid(), time.time() + 120\\n" \\
          "while time.time() < end and os.getppid() == ppid: pass"

    @dataclasses.dataclass(frozen=True)
    class KnownOptions:
        hog_n: int = 0

    def spin(seconds):
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    class _Known(Mechanism):
        Options = KnownOptions
        power = 1
        def __init__(self, dim, num_heads, options=None):
            super().__init__(dim, num_heads, options)
            self.hogs = None
        def flops(self, batch, n, grid=None):
            return Flops(matmul=2 * batch * n ** self.power)
        def mix(self, x, grid):
            n = x.shape[1]
            if n == self.options.hog_n and self.hogs is None:
                self.hogs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(3 * os.cpu_count())]
                time.sleep(0.5)  # let them start spinning
            spin(BASE_S * (n / 256) ** self.power)
            return x

    @register_mechanism
    class KnownLinear(_Known):
        name = "known_linear"
        complexity = "linear"
        power = 1

    @register_mechanism
    class KnownQuadratic(_Known):
        name = "known_quadratic"
        complexity = "quadratic"
        power = 2
''')


@pytest.fixture
def faulty():
    registry.load_module(FAULTY)
    yield FAULTY
    registry.MECHANISMS.unregister_module("faulty_mechanisms")


@pytest.fixture
def known(tmp_path):
    path = tmp_path / "known_mechanisms.py"
    path.write_text(KNOWN)
    registry.load_module(str(path))
    yield str(path)
    for name in ("known_linear", "known_quadratic"):
        registry.MECHANISMS.unregister(name)


def small_config(mechanisms, seq=(16, 32), **kw):
    defaults = dict(batch=1, heads=2, head_dim=8, threads=1, budget=60.0, min_run_time=0.01,
                    memory_limit_mib=2048)
    return SweepConfig(mechanisms=list(mechanisms), seq=list(seq), modes=["fwd"], **{**defaults, **kw})


# ---- parsing -----------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("256..16384", [256, 512, 1024, 2048, 4096, 8192, 16384]),
    ("256..1000", [256, 512]),
    ("1024,256, 4096", [256, 1024, 4096]),
    ("512", [512]),
    ("7..7", [7]),
])
def test_parse_seq(text, expected):
    assert parse_seq(text) == expected


@pytest.mark.parametrize("text", ["16384..256", "abc", "", "0..4", "256..", "1,,2", "-5", "2..99999999999"])
def test_parse_seq_rejects_malformed_ranges(text):
    with pytest.raises(SweepError, match="--seq"):
        parse_seq(text)


# ---- fits --------------------------------------------------------------------------------

def test_fit_recovers_exponents_of_synthetic_data():
    n = np.array([256, 512, 1024, 2048, 4096])
    assert fit_exponent(n, 3e-6 * n**2) == pytest.approx(2.0)
    assert fit_exponent(n, 0.01 * n) == pytest.approx(1.0)
    assert math.isnan(fit_exponent(n[:1], n[:1]))
    some = np.array([1.0, 1.3, 0.8, 1.2, 0.9])  # ±30 %: still linear, within a wider interval
    much = np.array([1.0, 3.0, 0.4, 2.5, 0.5])  # the interval spans -0.7 to 2.25: no claim
    costs = (3e-6 * n**2, 0.01 * n, 0.01 * n**1.5, 0.01 * n * some, 0.01 * n * much)
    labels = [label(fit_power_law(n, c)) for c in costs]
    assert labels == ["quadratic", "linear", "uncertain (95% CI 1.50 to 1.50)", "linear",
                      "uncertain (95% CI -0.70 to 2.25)"]


def synthetic_table():
    rows = []
    for n in (256, 512, 1024, 2048, 4096):
        rows.append({"mechanism": "softmax", "n": n, "mode": "fwd", "status": "ok",
                     "time_ms_median": 1e-5 * n**2, "peak_mem_mib": 1e-4 * n**2})
        rows.append({"mechanism": "lin", "n": n, "mode": "fwd", "status": "ok",
                     "time_ms_median": 0.02 * n, "peak_mem_mib": 0.001 * n})
    rows.append({"mechanism": "softmax", "n": 8192, "mode": "fwd", "status": "oom",
                 "time_ms_median": math.nan, "peak_mem_mib": math.nan})
    rows.append({"mechanism": "lin", "n": 8192, "mode": "fwd", "status": "ok",
                 "time_ms_median": 0.02 * 8192, "peak_mem_mib": 0.001 * 8192})
    return pd.DataFrame(rows)


def test_fit_table_and_crossover_on_synthetic_data():
    table = synthetic_table()
    # lin is slower until 0.02 n < 1e-5 n², i.e. n > 2000; softmax's OOM at 8192 counts as a loss
    assert crossover(table, "lin", "softmax", "fwd") == 2048
    fits = fit_table(table, fit_min_n=0).set_index("mechanism")
    assert fits.loc["softmax", "time_exponent"] == pytest.approx(2.0)
    assert fits.loc["lin", "memory_exponent"] == pytest.approx(1.0)
    assert fits.loc["softmax", "scaling"] == "quadratic" and fits.loc["lin", "scaling"] == "linear"
    assert fits.loc["lin", "crossover_vs_softmax"] == 2048
    assert fits.loc["softmax", "largest_ok_n"] == 4096


# ---- the sweep itself --------------------------------------------------------------------

def test_sweep_writes_the_tidy_csv_and_records_failures(faulty, tmp_path):
    out = tmp_path / "run"
    cfg = small_config(["softmax", "set", "faulty_boom", "faulty_hog", "faulty_sleepy", "xformers"],
                       budget=6.0, load=[faulty], seq=(16,))
    table = run_sweep(cfg, out, resume=False, argv=["test"])
    assert list(table.columns[: len(COLUMNS)]) == COLUMNS
    assert len(table) == 6
    status = table.groupby("mechanism")["status"].agg(set).to_dict()
    assert status["softmax"] == {"ok"} and status["set"] == {"ok"}
    assert status["faulty_boom"] == {"error"} and status["faulty_hog"] == {"oom"}
    assert status["faulty_sleepy"] == {"timeout"} and status["xformers"] == {"unavailable"}
    boom = table[table["mechanism"] == "faulty_boom"].iloc[0]
    assert "RuntimeError: boom at n=16" in boom["message"]
    ok = table[table["status"] == "ok"]
    assert (ok["time_ms_median"] > 0).all() and (ok["peak_mem_mib"] >= 0).all() and (ok["gflops"] > 0).all()
    assert (ok["runs"] >= 5).all() and (ok["rounds"] == 3).all() and (ok["attempts"] >= 1).all()
    assert (ok["machine_gflops"] > 0).all() and (ok["machine_gbs"] > 0).all() and (ok["floor_ms"] > 0).all()
    assert (ok["floor_fraction"] > 0).all() and (ok["machine_slowdown"] > 0).all()
    assert set(ok["noisy"]) <= {True, False} and not ok["compiled"].any()
    rounds = pd.read_csv(out / "rounds.csv")
    first = rounds[rounds["attempt"] == 0]
    # interleaved: each pass (A B …) timed every measured mechanism once, one pass after the other
    assert first.groupby("pass")["mechanism"].agg(sorted).map(tuple).unique().tolist() == [("set", "softmax")]
    assert first["pass"].nunique() == 3
    meta = json.loads((out / "meta.json").read_text())
    for key in ("cpu", "threads", "git_commit", "date", "command", "versions"):
        assert key in meta
    assert set(meta["versions"]) >= {"torch", "natten", "xformers"}
    run_sweep(small_config(["softmax", "set"], seq=(16, 512, 1024)), out, resume=True, argv=["test"])
    fits = finish(out, fit_min_n=0)
    assert set(fits["mechanism"]) >= {"softmax", "set"}
    for stem in ("time_fwd", "memory_fwd", "ratios_fwd"):
        assert (out / f"{stem}.png").stat().st_size > 0 and (out / f"{stem}.svg").exists()


def test_resume_measures_only_what_is_missing(tmp_path):
    out = tmp_path / "run"
    run_sweep(small_config(["softmax"], seq=(16,)), out, resume=False, argv=["test"])
    first = pd.read_csv(out / "scale.csv")
    with pytest.raises(SweepError, match="--resume"):
        run_sweep(small_config(["softmax"], seq=(16, 32)), out, resume=False, argv=["test"])
    with pytest.raises(SweepError, match="was measured with --heads 2, this sweep asks for 4"):
        run_sweep(small_config(["softmax"], seq=(16, 32), heads=4), out, resume=True, argv=["test"])
    table = run_sweep(small_config(["softmax"], seq=(16, 32)), out, resume=True, argv=["test"])
    assert sorted(table["n"]) == [16, 32]
    pd.testing.assert_series_equal(table.iloc[0], first.iloc[0], check_names=False)  # kept, not re-measured


def test_causal_sweep_passes_causal_to_each_call_and_records_refusals(faulty, tmp_path):
    """`scale --causal`, forward and forward+backward: causal reaches the mechanism's call in the
    worker, FLOPs are the causal count, every row says causal, and a mechanism without a causal
    form is a row `unavailable` with its reason while the sweep goes on."""
    from attnbench import build_mechanism
    from attnbench.mechanism import count_flops

    out = tmp_path / "causal"
    cfg = small_config(["softmax", "linear", "set", "faulty_causal_only"], seq=(16,), load=[faulty],
                       causal=True, rounds=1, retries=0)
    cfg.modes = ["fwd", "fwd+bwd"]
    table = run_sweep(cfg, out, resume=False, argv=["test"]).set_index(["mechanism", "mode"])
    assert len(table) == 8 and table["causal"].all()
    for mode in ("fwd", "fwd+bwd"):
        for name in ("softmax", "linear", "faulty_causal_only"):  # the last one raises without causal
            assert table.loc[(name, mode), "status"] == "ok", table.loc[(name, mode), "message"]
        refused = table.loc[("set", mode)]
        assert refused["status"] == "unavailable"
        assert refused["message"].startswith("causal=True is not supported: SeT's transport plan")
        factor = 3 if mode == "fwd+bwd" else 1
        linear = count_flops(build_mechanism("linear", 16, 2), 1, 16, causal=True)
        assert linear != count_flops(build_mechanism("linear", 16, 2), 1, 16)
        assert table.loc[("linear", mode), "flops_matmul"] == linear.matmul * factor
        plugin = table.loc[("faulty_causal_only", mode)]  # its flops takes no causal: not counted
        assert math.isnan(plugin["flops"]) and "FLOPs not counted" in plugin["message"]
    assert json.loads((out / "meta.json").read_text())["sweep"]["causal"] is True
    without_causal = small_config(["softmax"], seq=(16,), rounds=1, retries=0)
    without_causal.modes = cfg.modes
    with pytest.raises(SweepError, match="was measured with --causal True, this sweep asks for False"):
        run_sweep(without_causal, out, resume=True, argv=["test"])
    plain = run_sweep(small_config(["faulty_causal_only"], seq=(16,), load=[faulty]), tmp_path / "plain",
                      resume=False, argv=["test"]).iloc[0]
    assert plain["status"] == "error" and "called without causal=True" in plain["message"]
    assert not plain["causal"]


def test_a_folder_from_before_causal_resumes_only_without_it(tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    (out / "meta.json").write_text(json.dumps({"sweep": {"batch": 1, "heads": 2}}))  # no causal key
    with pytest.raises(SweepError, match="was measured with --causal False, this sweep asks for True"):
        run_sweep(small_config(["softmax"], seq=(16,), causal=True), out, resume=True, argv=["test"])


def test_compare_flags_regressions(tmp_path):
    base = tmp_path / "before"
    base.mkdir()
    now = tmp_path / "now"
    now.mkdir()
    row = dict(mechanism="softmax", n=256, mode="fwd", batch=1, heads=4, head_dim=32, dtype="float32",
               device="cpu", status="ok", time_ms_iqr=0.1, peak_mem_mib=10.0)
    pd.DataFrame([{**row, "time_ms_median": 10.0}, {**row, "n": 512, "time_ms_median": 40.0}]).to_csv(
        base / "scale.csv", index=False)
    pd.DataFrame([{**row, "time_ms_median": 10.2}, {**row, "n": 512, "time_ms_median": 60.0}]).to_csv(
        now / "scale.csv", index=False)
    result = compare(now, base).set_index("n")
    assert not result.loc[256, "regression"] and result.loc[512, "regression"]
    assert result.loc[512, "time_ratio"] == pytest.approx(1.5)
    assert not result["noisy"].any()  # tables from before the noise flags read as clean
    noisy = pd.read_csv(now / "scale.csv").assign(noisy=[False, True])
    noisy.to_csv(now / "scale.csv", index=False)
    result = compare(now, base).set_index("n")
    assert result.loc[512, "noisy"] and not result.loc[512, "regression"]  # noise is not a regression


@pytest.mark.parametrize("argv, message", [
    (["scale", "--seq", "16384..256"], "--seq '16384..256'"),
    (["scale", "--seq", "abc"], "expected a doubling range"),
    (["scale", "--mechanism", "nope"], "unknown mechanism 'nope'; valid choices"),
    (["scale", "--opt", "set.m=0"], "set.m=0 must be an int in [1, 4096]"),
    (["scale", "--batch", "0", "--seq", "16"], "argument --batch: invalid value '0'; valid: an int in"),
    (["scale", "--resume"], "--resume needs --out"),
    (["scale", "--rounds", "0", "--seq", "16"], "argument --rounds: invalid value '0'; valid: an int in"),
    (["scale", "--retries", "-1", "--seq", "16"], "argument --retries: invalid value '-1'"),
    (["scale", "--max-spread", "0", "--seq", "16"], "argument --max-spread: invalid value '0'"),
    (["plot", "/nonexistent"], "argument run_dir: /nonexistent: no such folder"),
    (["scale", "--causal", "--layout", "2d", "--seq", "16", "--threads", "1"],
     "--causal: causal attention is defined on sequences; use --layout 1d"),
    (["scale", "--task", "mqar", "--causal"], "--causal: for the kernel sweep"),
])
def test_scale_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_scale_command_end_to_end(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["scale", "--seq", "16,32", "--mechanism", "softmax,set", "--heads", "2", "--head-dim", "8",
                 "--min-time", "0.01", "--opt", "set.m=4", "--out", str(out)]) == 0
    table = pd.read_csv(out / "scale.csv")
    assert len(table) == 4 and set(table["status"]) == {"ok"}
    assert json.loads(table[table["mechanism"] == "set"]["options"].iloc[0]) == {"m": "4"}
    captured = capsys.readouterr()
    assert "[4/4" in captured.err and "time_exponent" in captured.out
    assert main(["plot", str(out)]) == 0


def test_compiled_sweep_records_compile_time_apart_and_compile_errors(faulty, tmp_path):
    out = tmp_path / "compiled"
    cfg = small_config(["softmax", "linear", "faulty_uncompilable"], seq=(32,), load=[faulty], compile=True,
                       rounds=2, retries=0, budget=600.0)
    table = run_sweep(cfg, out, resume=False, argv=["test"]).set_index("mechanism")
    assert table["compiled"].all()
    for name in ("softmax", "linear"):
        assert table.loc[name, "status"] == "ok", table.loc[name, "message"]
        assert table.loc[name, "compile_s"] >= 0 and table.loc[name, "time_ms_median"] > 0
    assert table.loc["faulty_uncompilable", "status"] == "compile-error"
    assert "graph_break" in table.loc["faulty_uncompilable", "message"]
    with pytest.raises(SweepError, match="--compile True"):  # eager and compiled never mix in one folder
        run_sweep(small_config(["softmax"], seq=(64,)), out, resume=True, argv=["test"])


def test_fault_injection_flags_disturbed_rows_and_never_labels_wrongly(known, tmp_path, monkeypatch):
    """Exactly linear and quadratic fakes; the machine slowed at n = 512 (busy processes started by
    the quadratic fake), and every call of odd rounds of the linear fake stalled at n = 2048."""
    monkeypatch.setenv("ATTNBENCH_STALL", "known_linear@2048=0.02")
    out = tmp_path / "faults"
    cfg = small_config(["known_linear", "known_quadratic"], seq=(256, 512, 1024, 2048, 4096, 8192),
                       load=[known], options={"known_quadratic": {"hog_n": "512"}}, min_run_time=0.05,
                       retries=1, settle_s=0.5)
    table = run_sweep(cfg, out, resume=False, argv=["test"])
    assert set(table["status"]) == {"ok"}
    rows = table.set_index(["mechanism", "n"])
    for name in ("known_linear", "known_quadratic"):  # the probe saw the busy machine at 512
        assert rows.loc[(name, 512), "noisy"], rows.loc[(name, 512), "message"]
        assert "slower than its best (probe)" in rows.loc[(name, 512), "message"]
        assert rows.loc[(name, 512), "attempts"] == 2  # measured again, still disturbed
    stalled = rows.loc[("known_linear", 2048)]
    assert stalled["noisy"] and "runs spread" in stalled["message"], stalled["message"]
    fits = finish(out, fit_min_n=0).set_index("mechanism")
    linear, quadratic = fits.loc["known_linear"], fits.loc["known_quadratic"]
    assert linear["noisy_left_out"] >= 2 and quadratic["noisy_left_out"] >= 1
    # right or uncertain, never wrong (on a busy machine more rows may be flagged and left out)
    assert linear["scaling"] == "linear" or linear["scaling"].startswith(("uncertain", "no label"))
    assert quadratic["scaling"] == "quadratic" or quadratic["scaling"].startswith(("uncertain", "no label"))
    if linear["scaling"] == "linear":
        assert linear["time_ci_low"] <= 1.0 + 0.1 and linear["time_ci_high"] >= 1.0 - 0.1
    text = summary(out, fits.reset_index())
    assert "MACHINE NOISY" in text and "known_linear n=2048 fwd" in text and "95%_CI" in text
    ratios = pd.read_csv(out / "ratios.csv")
    pair = ratios[(ratios["mechanism"] == "known_quadratic") & (ratios["baseline"] == "known_linear")]
    assert len(pair) and (pair["ratio_q1"] <= pair["ratio_median"]).all()
