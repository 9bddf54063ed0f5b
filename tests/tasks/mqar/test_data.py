"""The MQAR generator: deterministic, Zoology's layout, labels that an independent reading of each
sequence confirms, power-law gaps, and test sequences never seen in training."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.mqar import data
from tasks.mqar.data import BLANK, IGNORE, Layout

LAYOUT = Layout(vocab=64, seq_len=64, kv_pairs=6)


def test_the_same_seed_gives_the_same_sequences_and_another_seed_others():
    (a, la), (b, lb) = data.splits(LAYOUT, 100, 20, seed=3)
    (c, lc), (d, ld) = data.splits(LAYOUT, 100, 20, seed=3)
    assert np.array_equal(a, c) and np.array_equal(la, lc) and np.array_equal(b, d) and np.array_equal(lb, ld)
    (e, _), _ = data.splits(LAYOUT, 100, 20, seed=4)
    assert not np.array_equal(a, e)


@pytest.mark.parametrize("filler", data.FILLERS)
def test_each_query_is_labelled_with_the_value_that_follows_its_key_in_the_pairs(filler):
    ids, labels = data.generate(LAYOUT, 300, np.random.default_rng(0), filler=filler)
    assert ids.shape == labels.shape == (300, 64) and ids.dtype == labels.dtype == np.int32
    d, context = LAYOUT.kv_pairs, LAYOUT.context
    for row, label in zip(ids, labels, strict=True):
        keys, values = row[0:context:2], row[1:context:2]
        assert len(set(keys)) == d and len(set(values)) == d  # distinct keys, distinct values
        assert ((2 <= keys) & (keys < LAYOUT.first_value)).all()
        assert ((LAYOUT.first_value <= values) & (values < LAYOUT.vocab)).all()
        bound = dict(zip(keys.tolist(), values.tolist(), strict=True))
        queries = np.flatnonzero(label != IGNORE)
        assert len(queries) == d and (queries >= context).all() and ((queries - context) % 2 == 0).all()
        assert sorted(row[queries].tolist()) == sorted(bound)  # every key asked once
        for q in queries:
            assert label[q] == bound[row[q]] - LAYOUT.first_value
        rest = np.setdiff1d(np.arange(context, LAYOUT.seq_len), queries)
        if filler == "blank":
            assert (row[rest] == BLANK).all()
        else:
            assert ((2 <= row[rest]) & (row[rest] < LAYOUT.vocab)).all() and len(set(row[rest])) > 10
    assert (labels[labels != IGNORE] < LAYOUT.num_values).all()


def test_a_small_gap_power_puts_queries_soon_after_the_pairs():
    layout = Layout(vocab=512, seq_len=512, kv_pairs=8)
    near = data.generate(layout, 400, np.random.default_rng(0), power_a=0.01)[1]
    uniform = data.generate(layout, 400, np.random.default_rng(0), power_a=1.0)[1]
    offset = lambda labels: (np.nonzero(labels != IGNORE)[1] - layout.context).mean()
    assert offset(near) < 0.5 * offset(uniform)
    assert offset(uniform) == pytest.approx(layout.slots, rel=0.1)  # uniform over 2 × slots offsets


@pytest.mark.parametrize("choices, d", [(10, 3), (8, 3)])  # whole-row rejection, and the race
def test_distinct_draws_are_distinct_and_uniform(choices, d):
    draws = data._distinct(np.random.default_rng(0), 20_000, choices, d)
    assert all(len(set(r)) == d for r in draws.tolist()) and draws.min() >= 0 and draws.max() < choices
    counts = np.bincount(draws[:, 0], minlength=choices) / len(draws)
    assert np.abs(counts - 1 / choices).max() < 0.01
    assert (draws[:, 0] < draws[:, 1]).mean() == pytest.approx(0.5, abs=0.02)  # random order


def test_no_test_sequence_occurs_in_training():
    small = Layout(vocab=8, seq_len=8, kv_pairs=2)  # few distinct sequences: many would repeat
    (train, _), (test, test_labels) = data.splits(small, 200, 200, seed=0)
    seen = {row.tobytes() for row in train}
    assert not any(row.tobytes() in seen for row in test)
    assert 0 < len(test) < 200 and len(test_labels) == len(test)  # some were dropped
    _, (test, _) = data.splits(LAYOUT, 200, 200, seed=0)
    assert len(test) == 200


def test_the_validation_split_is_a_third_stream_apart_from_training_and_test():
    small = Layout(vocab=8, seq_len=8, kv_pairs=2)
    (train, _), (test, _) = data.splits(small, 200, 200, seed=0)
    val, val_labels = data.validation_split(small, 200, 0, (train, test))
    seen = {row.tobytes() for row in (*train, *test)}
    assert not any(row.tobytes() in seen for row in val)
    assert 0 < len(val) < 200 and len(val_labels) == len(val)  # some were dropped
    # drawn from a stream of its own: the training and test splits are those of a run without one
    (train_big, _), _ = data.splits(LAYOUT, 100, 20, seed=3)
    val_big, _ = data.validation_split(LAYOUT, 50, 3, (train_big,))
    again, _ = data.validation_split(LAYOUT, 50, 3, (train_big,))
    assert len(val_big) == 50 and np.array_equal(val_big, again)
    assert not np.array_equal(val_big[:20], data.splits(LAYOUT, 100, 20, seed=3)[1][0])


@pytest.mark.parametrize("layout, message", [
    (Layout(64, 64, 0), "--kv-pairs must be >= 1"),
    (Layout(4, 64, 1), "--vocab must be >= 6"),
    (Layout(20, 64, 10), "--kv-pairs 10 needs as many distinct keys: --vocab 20 has 9; raise --vocab to "
                         ">= 22"),
    (Layout(64, 30, 8), "the pairs and one query each need --seq-len >= 32"),
])
def test_impossible_layouts_say_why(layout, message):
    assert message in layout.problem()
    assert Layout(22, 40, 10).problem() is None
