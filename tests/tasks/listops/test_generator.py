"""The ListOps generator: values checked by an independent evaluator, lengths in band, determinism,
disjoint splits, brackets kept, labels spread over the ten classes."""

from __future__ import annotations

import random

import numpy as np
import pytest

from attnbench import TaskError
from tasks.listops import generator as g
from tests.tasks.listops.tiny import max_nesting, stack_value


@pytest.fixture(scope="module")
def splits() -> dict[str, g.Expressions]:
    return g.generate_splits({"test": 300, "train": 700}, 256, seed=3)


def test_an_independent_evaluator_agrees_on_1000_expressions(splits):
    checked = 0
    for part in splits.values():
        for ids, length, label in zip(part.tokens, part.lengths, part.labels, strict=True):
            assert stack_value(g.to_text(ids[:length])) == label
            checked += 1
    assert checked == 1000


def test_median_of_an_even_count_rounds_the_mean_down_as_lra():
    assert g.apply("[MED", [1, 2, 7, 9]) == 4 and g.apply("[MED", [3, 0, 8]) == 3
    assert g.apply("[SM", [9, 8, 7]) == 4 and g.apply("[MAX", [2, 5]) == 5 and g.apply("[MIN", [2, 5]) == 2


@pytest.mark.parametrize("seq_len", [16, 64, 128, 512, 2048])
def test_lengths_fall_in_the_band_and_padding_follows(seq_len):
    part = g.generate_splits({"x": 60}, seq_len, seed=1)["x"]
    low, high = g.length_band(seq_len)
    assert (low, high) == (int(np.ceil(0.8 * seq_len)), seq_len)
    assert part.tokens.shape == (60, seq_len)
    assert part.lengths.min() >= low and part.lengths.max() <= high
    for ids, length in zip(part.tokens, part.lengths, strict=True):
        assert (ids[:length] != g.PAD).all() and (ids[length:] == g.PAD).all()


def test_closing_brackets_are_tokens_and_every_operator_and_digit_occurs(splits):
    text = g.to_text(splits["train"].tokens[0][:splits["train"].lengths[0]])
    assert text.startswith("[") and text.endswith(" ]")
    used = set(np.unique(splits["train"].tokens).tolist())
    assert used == set(range(len(g.VOCAB)))  # padding, digits, the four operators, "]"
    ids = splits["train"].tokens
    opened = np.isin(ids, [g.TOKEN_ID[op] for op in g.OPERATORS]).sum(1)
    assert (opened == (ids == g.CLOSE_ID).sum(1)).all()


def test_the_same_seed_gives_the_same_data_and_another_seed_other_data():
    a = g.generate_splits({"test": 20, "train": 30}, 128, seed=5)
    b = g.generate_splits({"test": 20, "train": 30}, 128, seed=5)
    c = g.generate_splits({"test": 20, "train": 30}, 128, seed=6)
    for split in a:
        assert (a[split].tokens == b[split].tokens).all() and (a[split].labels == b[split].labels).all()
    assert not (a["train"].tokens == c["train"].tokens).all()


def test_the_test_split_does_not_depend_on_the_training_size():
    small = g.generate_splits({"test": 25, "train": 10}, 64, seed=0)["test"]
    large = g.generate_splits({"test": 25, "train": 90}, 64, seed=0)["test"]
    assert (small.tokens == large.tokens).all()


def test_no_expression_repeats_within_or_across_splits():
    parts = g.generate_splits({"test": 400, "train": 1600}, 16, seed=0)
    rows = [bytes(r) for part in parts.values() for r in part.tokens]
    assert len(set(rows)) == len(rows) == 2000


def test_repeats_drawn_are_turned_away(monkeypatch):
    """A generator that can only draw five expressions: two go to test, the other three to
    training, and asking for a sixth fails with a clear error instead of repeating one."""
    pool = [[i % 4, i, 9 - i] for i in range(5)]
    draws = iter(pool * 1000)
    monkeypatch.setattr(g, "grow", lambda *a: (list(next(draws)), 4))
    monkeypatch.setattr(g, "length_band", lambda n: (4, n))
    parts = g.generate_splits({"test": 2, "train": 3}, 16)
    test, train = ({bytes(r) for r in parts[s].tokens} for s in ("test", "train"))
    assert len(test) == 2 and len(train) == 3 and not test & train
    draws = iter(pool * 1000)
    with pytest.raises(TaskError, match="could not draw 4 distinct ListOps expressions"):
        g.generate_splits({"test": 2, "train": 4}, 16)


def test_depth_and_arguments_stay_within_the_limits():
    part = g.generate_splits({"x": 50}, 128, seed=2, max_depth=4, max_args=5)["x"]  # at most 187
    for ids, length in zip(part.tokens, part.lengths, strict=True):
        text = g.to_text(ids[:length])
        assert max_nesting(text) <= 3  # operators on levels 1-3, digits on level 4 at most
        assert stack_value(text) in range(10)
    # the defaults nest to the full depth, as LRA's expressions at these lengths do
    deep = g.generate_splits({"x": 20}, 256, seed=2)["x"]
    assert all(max_nesting(g.to_text(ids)) == 9 for ids in deep.tokens)


def test_arguments_per_operator_span_two_to_max_args():
    rng = random.Random(0)
    counts = set()
    for _ in range(30):
        root, _ = g.grow(rng, 400, 512, 10, 6)
        stack = [root]
        while stack:
            node = stack.pop()
            counts.add(len(node) - 1)
            stack += [a for a in node[1:] if isinstance(a, list)]
    assert counts == set(range(2, 7))


def test_labels_are_spread_over_the_ten_classes(splits):
    """Skewed as LRA's (0 and 9 most common) but not degenerate: every class well represented."""
    labels = np.concatenate([p.labels for p in splits.values()])
    share = np.bincount(labels, minlength=10) / len(labels)
    assert share.min() > 0.03 and share.max() < 0.3
    assert share[[0, 9]].min() > np.median(share[1:9])


@pytest.mark.parametrize("seq_len, depth, args, needle", [
    (8, 10, 10, "--seq-len must be >= 16"),
    (64, 1, 10, "--max-depth must be >= 2"),
    (64, 10, 1, "--max-args must be >= 2"),
    (2048, 3, 10, "hold at most 122 tokens"),
])
def test_impossible_limits_are_one_clear_error(seq_len, depth, args, needle):
    with pytest.raises(TaskError, match=needle):
        g.generate_splits({"x": 1}, seq_len, max_depth=depth, max_args=args)
