"""The MQAR task end to end on a small configuration, its sweep presets and its clear errors."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from attnbench import get_mechanism, get_task
from attnbench.cli import main
from tests.tasks.common.test_sequence import CONTRACT

SMALL = ["--seq-len", "32", "--vocab", "64", "--train-examples", "64", "--test-examples", "16",
         "--val-examples", "16", "--batch-size", "8"]


def run_args(tmp_path, *extra: str, mechanism: str = "softmax") -> list[str]:
    return ["run", "--task", "mqar", "--mechanism", mechanism, "--out", str(tmp_path / "run"),
            "--results", str(tmp_path / "mqar.csv"), *SMALL, *extra]


def test_a_smoke_run_records_the_contract_row(tmp_path):
    assert main(run_args(tmp_path, "--max-steps", "3", mechanism="set")) == 0
    row = pd.read_csv(tmp_path / "mqar.csv").iloc[0]
    assert all(column in row.index for column in CONTRACT), [c for c in CONTRACT if c not in row.index]
    assert (row["task"], row["mechanism"], row["seq_len"], row["steps"], row["limited"]) == (
        "mqar", "set", 32, 3, True)
    assert row["kv_pairs"] == 2 and row["vocab_size"] == 64  # seq_len / 16 pairs
    assert row["num_classes"] == 31 and row["chance"] == pytest.approx(100 / 31, abs=1e-3)  # the values
    assert (row["train_examples"], row["test_examples"]) == (64, 16)
    assert row["val_examples"] == 16 and 0 <= row["val_accuracy"] <= 100  # --val-examples 16
    assert 0 <= row["accuracy"] <= row["best_accuracy"] <= 100 and row["flops_per_step"] > 0
    assert row["mechanism_init"].startswith("kmeans")
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["config"]["kv_pairs"] == 2 and meta["per_token"]
    assert "2 key-value pairs" in meta["data_description"]


def test_the_sweep_presets_name_registered_mechanisms_and_lengths_that_fit():
    from tasks.mqar.data import Layout
    from tasks.mqar.task import FORM_DEFAULTS, PRESETS

    presets = get_task("mqar").sweep_presets
    assert set(presets) == {"cpu", "cuda"}
    embedded = PRESETS["embedded"]
    for kind, preset in presets.items():
        assert isinstance(preset["args"], list) and preset["seeds"], kind
        for name in preset["mechanisms"]:
            get_mechanism(name)  # unknown names raise
        args = preset["args"]
        vocab = int(args[args.index("--vocab") + 1]) if "--vocab" in args else FORM_DEFAULTS["bidirectional"][
            "vocab"]
        for n in preset["seq"]:
            assert Layout(vocab, n, max(1, n // embedded["kv_divisor"])).problem() is None, (kind, n)


@pytest.mark.parametrize("extra, message", [
    (["--kv-pairs", "9"], "--kv-pairs 9 does not fit in --seq-len 32"),
    (["--kv-pairs", "40", "--seq-len", "256"],
     "--kv-pairs 40 needs as many distinct keys: --vocab 64 has 31"),
    (["--gap-power", "0"], "argument --gap-power: invalid value '0'"),
    (["--train-examples", "0"], "argument --train-examples: invalid value '0'"),
    (["--filler", "zeros"], "argument --filler: invalid choice: 'zeros'"),
])
def test_bad_options_get_one_clear_line(extra, message, tmp_path, cli_error):
    assert message in cli_error(run_args(tmp_path, *extra))
