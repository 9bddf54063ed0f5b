"""``attnbench scale --mode decode``: prefill, time per generated token and cache bytes per context n,
through the kernel sweep's workers, rounds, resume, fits and plots; --kv-heads.

Nothing here asserts a time: measurements run at tiny n only to exercise the paths.
"""

from __future__ import annotations

import json
import math
import textwrap

import pandas as pd
import pytest

from attnbench import registry
from attnbench.cli import main
from attnbench.cli.scale import default_seq
from attnbench.sweeps.base import SweepError
from attnbench.sweeps.decode import DECODE_STEPS
from attnbench.sweeps.kernel import SweepConfig, finish, run_sweep

# A decoder whose full prefill asks for 4 TiB beyond 16 tokens (out of memory under the sweep's
# cap), while its cache alone (prefill(outputs=False)) builds as linear attention's does.
PREFILL_HOG = textwrap.dedent('''
    import torch
    from attnbench import register_mechanism
    from mechanisms.linear import LinearAttention

    @register_mechanism
    class PrefillHog(LinearAttention):
        name = "prefill_hog"
        def prefill(self, x, capacity, mask=None, outputs=True):
            if outputs and x.shape[1] > 16:
                torch.ones(2**40).sum()
            return super().prefill(x, capacity, mask, outputs)
''')


@pytest.fixture
def prefill_hog(tmp_path):
    path = tmp_path / "prefill_hog.py"
    path.write_text(PREFILL_HOG)
    registry.load_module(str(path))
    yield str(path)
    registry.MECHANISMS.unregister("prefill_hog")


def decode_config(mechanisms, seq=(16, 32), **kw):
    defaults = dict(batch=2, heads=2, head_dim=8, threads=1, budget=60.0, min_run_time=0.01,
                    memory_limit_mib=2048, modes=["decode"], causal=True, retries=0)
    return SweepConfig(mechanisms=list(mechanisms), seq=list(seq), **{**defaults, **kw})


def test_decode_sweep_rows_fits_and_plots(prefill_hog, tmp_path):
    out = tmp_path / "decode"
    cfg = decode_config(["softmax", "sdpa", "linear", "swin", "set", "prefill_hog"], load=[prefill_hog],
                        options={"softmax": {"kv_heads": "1,2"}})
    table = run_sweep(cfg, out, resume=False, argv=["test"])
    rows = table.set_index(["variant", "n"])
    assert set(table["mode"]) == {"decode"} and table["causal"].all()
    assert set(table[table["mechanism"] == "set"]["status"]) == {"unavailable"}
    assert "incremental decoding is not supported: no causal form" in rows.loc[("set", 16), "message"]
    ok = table[table["status"] == "ok"]
    assert len(ok) == 2 * 6, table[["variant", "n", "status", "message"]]
    assert (ok["runs"] >= DECODE_STEPS).all() and (ok["rounds"] == 3).all()
    assert ((ok["time_ms_q1"] <= ok["time_ms_median"]) & (ok["time_ms_median"] <= ok["time_ms_q3"])).all()
    assert ok["tokens_s"].to_numpy() == pytest.approx(2 / (ok["time_ms_median"].to_numpy() * 1e-3))
    assert (ok["cache_bytes"] == ok["cache_bytes_formula"]).all() and (ok["cache_bytes"] > 0).all()
    assert ok["flops"].isna().all() and ok["floor_ms"].isna().all()  # a token's FLOPs are not declared
    # the cache holds the prompt and the generated token: n + 1 keys and values of H_kv heads, float32
    for n in (16, 32):
        for kv_heads in (1, 2):
            row = rows.loc[(f"softmax[kv_heads={kv_heads}]", n)]
            assert row["kv_heads"] == kv_heads and json.loads(row["options"]) == {"kv_heads": str(kv_heads)}
            assert row["cache_bytes"] == 2 * 2 * kv_heads * (n + 1) * 8 * 4
        assert rows.loc[("sdpa", n), "kv_heads"] == 2 and math.isnan(rows.loc[("linear", n), "kv_heads"])
        assert rows.loc[("linear", n), "cache_bytes"] == 2 * 2 * (8 * 8 + 8) * 4  # S and z, whatever n
    fitted = ok[ok["variant"] != "prefill_hog"]
    assert (fitted["prefill_status"] == "ok").all() and (fitted["prefill_ms"] > 0).all()
    hog = rows.loc[("prefill_hog", 32)]  # its prompt's outputs did not fit; its steps were timed anyway
    assert hog["status"] == "ok" and hog["prefill_status"] == "oom" and math.isnan(hog["prefill_ms"])
    assert "prefill out of memory" in hog["message"] and hog["time_ms_median"] > 0
    assert rows.loc[("prefill_hog", 16), "prefill_status"] == "ok"

    fits = finish(out, fit_min_n=0).set_index("mechanism")
    assert fits.loc["linear", "cache_exponent"] == 0
    assert fits.loc["softmax[kv_heads=1]", "cache_exponent"] == pytest.approx(math.log2(33 / 17), abs=1e-3)
    assert {"time_exponent", "prefill_exponent", "crossover_vs_softmax", "crossover_vs_sdpa"} <= set(fits)
    for stem in ("time_decode", "cache_decode", "prefill_decode", "memory_decode"):
        assert (out / f"{stem}.png").stat().st_size > 0, stem

    with pytest.raises(SweepError, match="was measured with --kv-heads None, this sweep asks for 1"):
        run_sweep(decode_config(["sdpa"], kv_heads=1), out, resume=True, argv=["test"])


def test_kv_heads_go_to_the_mechanisms_that_take_them_in_every_mode(tmp_path):
    cfg = decode_config(["softmax", "linear"], seq=(16,), modes=["fwd"], causal=False, kv_heads=1)
    table = run_sweep(cfg, tmp_path / "fwd", resume=False, argv=["test"]).set_index("mechanism")
    assert set(table["status"]) == {"ok"}
    assert table.loc["softmax", "kv_heads"] == 1
    assert json.loads(table.loc["softmax", "options"]) == {"kv_heads": "1"}
    assert math.isnan(table.loc["linear", "kv_heads"]) and json.loads(table.loc["linear", "options"]) == {}
    # K and V projected to one head of 8 channels: 2·(16·8 + 8) fewer parameters than two heads'
    assert table.loc["softmax", "params"] == (16 * 32 + 32) + (16 * 16 + 16)


@pytest.mark.parametrize("changes, message", [
    ({"kv_heads": 3, "heads": 4}, r"kv_heads=3 \(softmax\) does not divide --heads 4; valid: 1, 2, 4"),
    ({"options": {"sdpa": {"kv_heads": "3"}}, "heads": 4, "mechanisms": ["softmax", "sdpa"]},
     r"kv_heads=3 \(sdpa\) does not divide --heads 4"),
    ({"kv_heads": 1, "options": {"softmax": {"kv_heads": "1"}}}, "--kv-heads and --opt softmax.kv_heads"),
    ({"layout": "2d", "causal": False}, "--mode decode: decoding generates sequences; use --layout 1d"),
    ({"compile": True}, "--mode decode runs eager"),
    ({"modes": ["prefill"]}, "--mode prefill; valid choices: fwd, fwd\\+bwd, decode"),
])
def test_bad_decode_settings_are_refused_before_any_work(changes, message, tmp_path):
    cfg = decode_config(changes.pop("mechanisms", ["softmax"]), **changes)
    with pytest.raises(SweepError, match=message):
        run_sweep(cfg, tmp_path / "never", resume=False, argv=["test"])
    assert not (tmp_path / "never").exists()


def test_decode_from_the_command_line(tmp_path, capsys):
    assert default_seq("decode") == "1024..131072" and default_seq("fwd") == "256..16384"
    out = tmp_path / "cli"
    assert main(["scale", "--mode", "decode", "--seq", "16,32", "--mechanism", "sdpa,linear", "--heads", "2",
                 "--head-dim", "8", "--kv-heads", "1", "--min-time", "0.01", "--out", str(out)]) == 0
    table = pd.read_csv(out / "scale.csv")
    assert set(table["status"]) == {"ok"} and table["causal"].all()
    assert json.loads((out / "meta.json").read_text())["sweep"]["kv_heads"] == 1
    captured = capsys.readouterr()
    assert "ms per token" in captured.err and "tokens/s" in captured.err
    assert "cache_exponent" in captured.out
    assert main(["plot", str(out)]) == 0
    with pytest.raises(SystemExit):
        main(["scale", "--mode", "decode", "--kv-heads", "0"])
    assert "argument --kv-heads: invalid value '0'" in capsys.readouterr().err
