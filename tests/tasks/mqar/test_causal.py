"""MQAR's causal form against Zoology's ``multiquery_ar`` construction (read there, written anew
here as properties): the layout, the vocabulary's mapping, the next-token targets, the filler and
the power law of the query gaps; then the task end to end with a mechanism that has a causal form."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from attnbench import Mechanism, get_mechanism, get_task
from attnbench.cli import main
from attnbench.task import flag_value
from tasks.mqar import data
from tasks.mqar.data import BLANK, FIRST_KEY, IGNORE, Layout

V, N, D = 64, 48, 5  # Zoology's vocab_size, input_seq_len, num_kv_pairs
CAUSAL = Layout(V, N, D, "causal")


def test_the_vocabulary_is_zoologys_shifted_up_by_one():
    """Zoology: filler 0, keys 1 … V/2 - 1, values V/2 … V - 1; here each id + 1, 0 left to padding."""
    assert CAUSAL.tokens == V + 1
    assert (FIRST_KEY, FIRST_KEY + CAUSAL.num_keys - 1) == (1 + 1, V // 2 - 1 + 1)
    assert (CAUSAL.first_value, CAUSAL.tokens - 1) == (V // 2 + 1, V - 1 + 1)
    assert CAUSAL.num_values == V - V // 2 and BLANK == 0 + 1
    odd = Layout(65, N, D, "causal")  # V // 2 splits an odd vocabulary as Zoology does
    assert (odd.num_keys, odd.first_value, odd.num_values) == (31, 33, 33)


@pytest.mark.parametrize("filler", data.FILLERS)
def test_pairs_first_then_each_key_queried_once_with_the_value_it_was_given_as_target(filler):
    ids, labels = data.generate(CAUSAL, 400, np.random.default_rng(0), filler=filler)
    assert ids.shape == labels.shape == (400, N)
    context = 2 * D
    for row, label in zip(ids, labels, strict=True):
        keys, values = row[0:context:2], row[1:context:2]
        assert len(set(keys.tolist())) == D and len(set(values.tolist())) == D
        assert ((FIRST_KEY <= keys) & (keys < CAUSAL.first_value)).all()
        assert ((CAUSAL.first_value <= values) & (values <= V)).all()
        queries = np.flatnonzero(label != IGNORE)
        assert len(queries) == D and (queries >= context).all() and ((queries - context) % 2 == 0).all()
        assert queries.max() <= N - 2  # Zoology's last gap: context + 2 (slots - 1)
        assert sorted(row[queries].tolist()) == sorted(keys.tolist())  # every key asked once
        for q in queries:
            where = np.flatnonzero(row[:context:2] == row[q])[0] * 2  # the key earlier in the pairs
            assert where < q and label[q] == row[where + 1]  # the target: the value right after it
        assert (label[:context] == IGNORE).all()


def test_the_queries_take_the_keys_in_the_order_their_gaps_were_drawn():
    """Zoology puts the j-th key at the j-th gap drawn: with a steep law the first key's query comes
    soonest most often."""
    ids, labels = data.generate(Layout(512, 256, 8, "causal"), 2000, np.random.default_rng(1), power_a=0.01)
    first_key, at = ids[:, 0], np.argmax(labels != IGNORE, axis=1)
    assert (ids[np.arange(len(ids)), at] == first_key).mean() > 0.2  # uniform order would give 1/8


def test_random_filler_is_uniform_over_zoologys_whole_vocabulary():
    ids, labels = data.generate(CAUSAL, 3000, np.random.default_rng(2), filler="random")
    filler = ids[:, 2 * D:][labels[:, 2 * D:] == IGNORE]  # the non-query positions after the pairs
    counts = np.bincount(filler, minlength=V + 1)
    assert counts[0] == 0  # padding never occurs
    expected = len(filler) / V  # Zoology: randint(vocab_size) over ids 0 … V - 1, here 1 … V
    chi2 = ((counts[1:] - expected) ** 2 / expected).sum()
    assert chi2 < 120, chi2  # 63 degrees of freedom: p < 1e-5 past 120
    blank, blank_labels = data.generate(CAUSAL, 50, np.random.default_rng(2), filler="blank")
    rest = blank[:, 2 * D:][blank_labels[:, 2 * D:] == IGNORE]
    assert (rest == BLANK).all()  # Zoology's random_non_queries=False: the 0s stay


@pytest.mark.parametrize("power_a", [0.01, 0.3, 1.0])
def test_query_gaps_follow_zoologys_power_law(power_a):
    """The first gap drawn follows p(g) ∝ (g + 1)^(a - 1) exactly; all gaps together follow the law
    of Zoology's draw without replacement (numpy's choice, per sequence) within sampling noise."""
    layout = Layout(256, 2 * D + 2 * 30, D, "causal")  # 30 slots
    rows = 6000
    ids, labels = data.generate(layout, rows, np.random.default_rng(3), power_a=power_a)
    gaps = (np.flatnonzero(labels.ravel() != IGNORE) % layout.seq_len - layout.context) // 2
    gaps = gaps.reshape(rows, D)  # each row's gaps, in position order
    assert (np.diff(gaps, axis=1) > 0).all()  # distinct
    law = np.arange(1, layout.slots + 1) ** (power_a - 1)  # Zoology's p, normalised
    law /= law.sum()
    first_query = np.argmax((labels != IGNORE) & (ids == ids[:, :1]), axis=1)  # the first key's
    first = np.bincount((first_query - layout.context) // 2, minlength=layout.slots) / rows
    assert 0.5 * np.abs(first - law).sum() < 0.04  # total variation from the law
    reference = np.random.default_rng(4)
    theirs = np.stack([reference.choice(layout.slots, D, replace=False, p=law) for _ in range(rows)])
    mine_all = np.bincount(gaps.ravel(), minlength=layout.slots) / gaps.size
    theirs_all = np.bincount(theirs.ravel(), minlength=layout.slots) / theirs.size
    assert 0.5 * np.abs(mine_all - theirs_all).sum() < 0.03


@pytest.mark.parametrize("layout, message", [
    (Layout(48, 48, 3, "causal"), "--vocab 48 must exceed --seq-len 48 in the causal form"),
    (Layout(20, 16, 10, "causal"),
     "--kv-pairs 10 needs as many distinct keys: --vocab 20 has 9; raise --vocab to >= 22"),
    (Layout(64, 20, 8, "causal"), "the pairs and one query each need --seq-len >= 32"),
])
def test_impossible_causal_layouts_say_why(layout, message):
    assert message in layout.problem()
    assert Layout(22, 21, 5, "causal").problem() is None


def test_flag_values_are_read_as_argparse_reads_them():
    assert flag_value(["--epochs", "2", "--form", "causal"], "--form") == "causal"
    assert flag_value(["--form=causal", "--form", "bidirectional"], "--form") == "bidirectional"
    assert flag_value(["--form"], "--form") is None and flag_value([], "--form") is None


# ---- the task ---------------------------------------------------------------------------------

SMALL = ["--seq-len", "32", "--vocab", "64", "--train-examples", "64", "--test-examples", "16",
         "--batch-size", "8"]


def run_args(tmp_path, *extra: str, mechanism: str = "causal_softmax") -> list[str]:
    return ["run", "--task", "mqar", "--form", "causal", "--mechanism", mechanism, "--out",
            str(tmp_path / "run"), "--results", str(tmp_path / "mqar.csv"), *SMALL, *extra]


def test_a_causal_smoke_run_records_its_form(tmp_path, causal_mechanisms):
    assert main(run_args(tmp_path, "--max-steps", "2")) == 0
    row = pd.read_csv(tmp_path / "mqar.csv").iloc[0]
    assert (row["form"], row["filler"], row["steps"], row["limited"], row["status"]) == (
        "causal", "random", 2, True, "ok")
    assert (row["vocab_size"], row["num_classes"]) == (65, 65)  # next token over Zoology's ids + padding
    assert row["chance"] == pytest.approx(100 / 32, abs=1e-3)  # guessing among the 32 values
    assert 0 <= row["accuracy"] <= 100 and row["params"] == row["softmax_params"]
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["causal"] and meta["config"]["form"] == "causal"
    assert "form" in get_task("mqar").config_columns


def test_the_bidirectional_form_stays_the_default(tmp_path):
    argv = ["run", "--task", "mqar", "--mechanism", "softmax", "--out", str(tmp_path / "run"),
            "--results", str(tmp_path / "mqar.csv"), *SMALL, "--max-steps", "1"]
    assert main(argv) == 0
    row = pd.read_csv(tmp_path / "mqar.csv").iloc[0]
    assert (row["form"], row["filler"], row["num_classes"]) == ("bidirectional", "blank", 31)


@pytest.mark.parametrize("extra, mechanism, message", [
    ([], "set", "set: causal=True is not supported: "),
    ([], "nystromformer", "nystromformer: causal=True is not supported: "),
    (["--vocab", "32"], "causal_softmax", "--vocab 32 must exceed --seq-len 32 in the causal form"),
    (["--form", "sideways"], "causal_softmax", "argument --form: invalid choice: 'sideways'"),
])
def test_causal_mistakes_get_one_clear_line_before_any_training(extra, mechanism, message, tmp_path,
                                                                 causal_mechanisms, cli_error):
    line = cli_error(run_args(tmp_path, *extra, mechanism=mechanism))
    assert message in line
    if mechanism in ("set", "nystromformer"):
        assert line.endswith(get_mechanism(mechanism).causal_problem())
    assert not (tmp_path / "run").exists()


def test_the_causal_sweep_presets_are_chosen_by_form_and_fit():
    from tasks.mqar.task import CAUSAL_SWEEP_PRESETS, FORM_DEFAULTS, PRESETS

    mqar = get_task("mqar")
    for kind in ("cpu", "cuda"):
        assert mqar.sweep_preset(kind, ["--form", "causal"]) is CAUSAL_SWEEP_PRESETS[kind]
        assert mqar.sweep_preset(kind, []) is mqar.sweep_presets[kind]
        preset = CAUSAL_SWEEP_PRESETS[kind]
        vocab = int(flag_value(preset["args"], "--vocab") or FORM_DEFAULTS["causal"]["vocab"])
        for n in preset["seq"]:
            layout = Layout(vocab, n, max(1, n // PRESETS["embedded"]["kv_divisor"]), "causal")
            assert layout.problem() is None, (kind, n)


def test_the_causal_presets_hold_only_mechanisms_with_a_causal_form():
    from tasks.mqar.task import CAUSAL_SWEEP_PRESETS

    named = {m for preset in CAUSAL_SWEEP_PRESETS.values() for m in preset["mechanisms"]}
    refused = {m: get_mechanism(m).causal_problem() for m in sorted(named)}
    if get_mechanism("softmax").causal_problem() == Mechanism.no_causal_reason:
        pytest.skip("this build's built-in mechanisms declare no causal forms yet")
    assert not {m: why for m, why in refused.items() if why}, refused
