"""The sequence-length sweep: range parsing, fits, the CSV, failure paths, resume, compare.

Nothing here asserts a time: measurements run with tiny budgets only to exercise the paths.
"""

from __future__ import annotations

import json
import math
import textwrap

import numpy as np
import pandas as pd
import pytest

from attnbench import registry
from attnbench.cli import main
from attnbench.fit import crossover, fit_exponent, fit_table, label
from attnbench.sweep import COLUMNS, SweepConfig, SweepError, compare, finish, parse_seq, run_sweep

FAULTY = textwrap.dedent('''
    """Mechanisms that fail on purpose, to test that a sweep records failures and goes on."""
    import time
    import torch
    from torch import nn
    from attnbench import Flops, Mechanism, register_mechanism

    class _Base(Mechanism):
        complexity = "linear"
        def __init__(self, dim, num_heads, options=None):
            super().__init__(dim, num_heads, options)
            self.proj = nn.Linear(dim, dim)
        def flops(self, batch, n, grid=None):
            return Flops(matmul=2 * batch * n * self.dim * self.dim)

    @register_mechanism
    class Boom(_Base):
        name = "faulty_boom"
        def mix(self, x, grid):
            raise RuntimeError("boom at n=%d" % x.shape[1])

    @register_mechanism
    class Hog(_Base):
        name = "faulty_hog"
        def mix(self, x, grid):  # asks for 4 TiB: the sweep's memory cap turns this into an error
            return self.proj(x) + torch.ones(2**40, dtype=torch.float32).sum()

    @register_mechanism
    class Sleepy(_Base):
        name = "faulty_sleepy"
        def mix(self, x, grid):
            time.sleep(60)
            return self.proj(x)
''')


@pytest.fixture
def faulty(tmp_path):
    path = tmp_path / "faulty_mechanisms.py"
    path.write_text(FAULTY)
    registry.load_module(str(path))
    yield str(path)
    for name in ("faulty_boom", "faulty_hog", "faulty_sleepy"):
        registry._REGISTRY.pop(name, None)


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
    labels = (label(2.02), label(1.05), label(1.5), label(math.nan))
    assert labels == ("quadratic", "linear", "other", "unknown")


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
    assert (ok["runs"] >= 5).all()
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
    with pytest.raises(SweepError, match="heads=2"):
        run_sweep(small_config(["softmax"], seq=(16, 32), heads=4), out, resume=True, argv=["test"])
    table = run_sweep(small_config(["softmax"], seq=(16, 32)), out, resume=True, argv=["test"])
    assert sorted(table["n"]) == [16, 32]
    pd.testing.assert_series_equal(table.iloc[0], first.iloc[0], check_names=False)  # kept, not re-measured


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


@pytest.mark.parametrize("argv, message", [
    (["scale", "--seq", "16384..256"], "--seq '16384..256'"),
    (["scale", "--seq", "abc"], "expected a doubling range"),
    (["scale", "--mechanism", "nope"], "unknown mechanism 'nope'; valid choices"),
    (["scale", "--opt", "set.m=0"], "set.m must be >= 1"),
    (["scale", "--batch", "0", "--seq", "16"], "--batch must be >= 1"),
    (["scale", "--resume"], "--resume needs --out"),
    (["plot", "/nonexistent"], "no scale.csv there"),
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
