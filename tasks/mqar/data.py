"""MQAR sequences, generated: multi-query associative recall after Zoology (Arora et al. 2023), in
two forms.

**Causal** (``form="causal"``): Zoology's ``multiquery_ar`` construction, read left to right. With
Zoology's vocabulary V, keys are Zoology's ids 1 … V/2 - 1 and values V/2 … V - 1 (V/2 = V // 2), 0
the filler. A sequence of ``n`` tokens opens with ``d`` key-value pairs (k1 v1 k2 v2 …; keys
distinct, values distinct, drawn uniformly), then places a query of each key at an even offset of
the rest, ``context + 2 g``, at ``d`` gaps ``g`` in [0, slots) drawn without replacement with
probability proportional to ``(g + 1) ** (power_a - 1)`` (a power law: most queries come soon after
the pairs, ``power_a = 1`` is uniform), the j-th key at the j-th gap drawn. The target of the token
at a query is the next token Zoology defines there: the value bound to that key; every other
position is ``IGNORE``. The token after a query is filler, not the value: the value must be
recalled from the pairs. Zoology's ``random_non_queries`` (``filler="random"``, this form's default)
replaces every filler 0 by a token drawn uniformly from the whole vocabulary [0, V), so keys and
values also occur as filler; ``filler="blank"`` keeps the 0s. Zoology asserts V > n; so does this
form. attnbench shifts every id up by one, so that 0 stays padding (never used: every sequence is
full): the model's vocabulary is V + 1, Zoology's id z is attnbench's z + 1, and the labels are
token ids (next-token prediction over the whole vocabulary, as Zoology's loss).

**Bidirectional** (``form="bidirectional"``, attnbench's first form and the default): the same
pairs, queries and gap law, read by an encoder that sees the whole sequence; at each query the
model names the value bound to its key, and the label is the value's class (its index among the
values). Token ids: 0 pads, 1 is the blank filler, keys are 2 … 2 + K - 1 and values the rest,
K = (vocab - 2) // 2; ``filler="random"`` fills the gaps with random keys and values.

Numpy, vectorised: sampling without replacement is a top-d over exponential race times
(Efraimidis & Spirakis: the d smallest of Exp(1) / weight, which is successive sampling, each draw
in proportion to the weights left; Zoology draws with ``np.random.choice(replace=False, p=…)``,
whose first draw has the same law), or whole-row rejection for the keys.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from tasks.common.sequence import IGNORE

PAD, BLANK, FIRST_KEY = 0, 1, 2  # causal form: Zoology's filler 0 and first key 1, shifted up by one
FILLERS = ("blank", "random")
FORMS = ("bidirectional", "causal")
_CHUNK = 1 << 22  # random numbers drawn at once (memory bound for long sequences)


@dataclasses.dataclass(frozen=True)
class Layout:
    """The vocabulary's halves and the sequence's sections for one configuration. ``vocab`` is
    attnbench's vocabulary in the bidirectional form, Zoology's ``vocab_size`` V in the causal one
    (whose model vocabulary is V + 1: ``tokens``)."""

    vocab: int
    seq_len: int
    kv_pairs: int
    form: str = "bidirectional"

    @property
    def causal(self) -> bool:
        return self.form == "causal"

    @property
    def tokens(self) -> int:
        """Token ids the model embeds (padding included)."""
        return self.vocab + 1 if self.causal else self.vocab

    @property
    def num_keys(self) -> int:
        return self.vocab // 2 - 1 if self.causal else (self.vocab - FIRST_KEY) // 2

    @property
    def first_value(self) -> int:
        return FIRST_KEY + self.num_keys

    @property
    def num_values(self) -> int:
        return self.tokens - self.first_value

    @property
    def context(self) -> int:
        """Tokens of the key-value section."""
        return 2 * self.kv_pairs

    @property
    def slots(self) -> int:
        """Even offsets after the pairs where a query may sit (Zoology's ``space``)."""
        return (self.seq_len - self.context) // 2

    def problem(self) -> str | None:
        """Why these numbers cannot make MQAR sequences, or None."""
        if self.form not in FORMS:
            return f"--form {self.form!r}: valid choices: {', '.join(FORMS)}"
        if self.kv_pairs < 1:
            return f"--kv-pairs must be >= 1, got {self.kv_pairs}"
        if self.causal and self.vocab <= self.seq_len:
            return (f"--vocab {self.vocab} must exceed --seq-len {self.seq_len} in the causal form "
                    "(Zoology's multiquery_ar asserts vocab_size > input_seq_len)")
        if self.vocab < 6:
            return f"--vocab must be >= 6 (pad, blank, keys, values), got {self.vocab}"
        if self.kv_pairs > self.num_keys:  # the value half is as large or one larger
            return (f"--kv-pairs {self.kv_pairs} needs as many distinct keys: --vocab {self.vocab} has "
                    f"{self.num_keys}; raise --vocab to >= {2 * self.kv_pairs + 2}")
        if self.kv_pairs > self.slots:
            return (f"--kv-pairs {self.kv_pairs} does not fit in --seq-len {self.seq_len}: the pairs and one "
                    f"query each need --seq-len >= {4 * self.kv_pairs}")
        return None


def gap_weights(slots: int, power_a: float) -> np.ndarray:
    """Zoology's law of a query's gap g = 0 … slots - 1 (its offset after the pairs is 2 g), not
    normalised: p(g) ∝ (g + 1) ** (power_a - 1)."""
    return np.arange(1, slots + 1, dtype=np.float64) ** (power_a - 1)


def generate(layout: Layout, count: int, rng: np.random.Generator, power_a: float = 0.01,
             filler: str = "blank") -> tuple[np.ndarray, np.ndarray]:
    """``count`` sequences: ids (count, n) int32 and labels (count, n) int32, ``IGNORE`` but at the
    queries, where it is the value: its class in [0, num_values) in the bidirectional form, its token
    id in the causal one (the next token Zoology defines there); int32 keeps 16k-token sets small."""
    d, n = layout.kv_pairs, layout.seq_len
    keys = FIRST_KEY + _distinct(rng, count, layout.num_keys, d)  # (count, d)
    values = layout.first_value + _distinct(rng, count, layout.num_values, d)
    gaps = _weighted_distinct(rng, count, gap_weights(layout.slots, power_a), d)  # (count, d): j-th, key j
    if filler == "blank":
        ids = np.full((count, n), BLANK, dtype=np.int32)
    else:  # causal: Zoology's ids 0 … V - 1, the filler included; bidirectional: keys and values
        ids = rng.integers(BLANK if layout.causal else FIRST_KEY, layout.tokens, size=(count, n),
                           dtype=np.int32)
    ids[:, 0:layout.context:2], ids[:, 1:layout.context:2] = keys, values
    queries = layout.context + 2 * gaps
    np.put_along_axis(ids, queries, keys, axis=1)
    labels = np.full((count, n), IGNORE, dtype=np.int32)
    np.put_along_axis(labels, queries, values if layout.causal else values - layout.first_value, axis=1)
    return ids, labels


def _rows_per_chunk(width: int) -> int:
    return max(1, _CHUNK // max(1, width))


def _weighted_distinct(rng: np.random.Generator, rows: int, weights: np.ndarray, d: int) -> np.ndarray:
    """(rows, d) indices into ``weights`` drawn without replacement, in the order drawn: the d
    smallest race times Exp(1) / weight, sorted (Efraimidis & Spirakis)."""
    out = np.empty((rows, d), dtype=np.int64)
    w = weights.astype(np.float32)
    step = _rows_per_chunk(len(w))
    for start in range(0, rows, step):
        race = rng.standard_exponential((min(step, rows - start), len(w)), dtype=np.float32) / w
        first = np.argpartition(race, d - 1, axis=1)[:, :d]  # the d first, unordered
        order = np.take_along_axis(race, first, axis=1).argsort(axis=1)
        out[start:start + len(race)] = np.take_along_axis(first, order, axis=1)
    return out


def _distinct(rng: np.random.Generator, rows: int, choices: int, d: int) -> np.ndarray:
    """(rows, d) distinct integers of [0, choices) per row, uniformly in random order: rows drawn
    with replacement and drawn again while they repeat a value (few collide when d² ≤ choices),
    else the race of ``_weighted_distinct`` with equal weights."""
    if d * d > choices:
        return _weighted_distinct(rng, rows, np.ones(choices), d)
    out = rng.integers(0, choices, size=(rows, d))
    again = np.arange(rows)
    while len(again):
        ordered = np.sort(out[again], axis=1)
        again = again[(ordered[:, 1:] == ordered[:, :-1]).any(axis=1)]
        out[again] = rng.integers(0, choices, size=(len(again), d))
    return out


def row_hashes(ids: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each row (S,): equal rows hash alike (a collision of unequal rows is checked)."""
    weights = np.random.default_rng(12345).integers(1, 2**62, size=ids.shape[1], dtype=np.int64) | 1
    step = _rows_per_chunk(ids.shape[1])
    # int64 arithmetic wraps around: a hash modulo 2**64
    return np.concatenate([(ids[i:i + step] * weights).sum(axis=1) for i in range(0, max(1, len(ids)), step)])


def drop_seen(test: np.ndarray, train: np.ndarray) -> np.ndarray:
    """Indices of the rows of ``test`` that are not rows of ``train`` (by hash, confirmed exactly)."""
    seen: dict[int, list[int]] = {}
    for i, h in enumerate(row_hashes(train).tolist()):
        seen.setdefault(h, []).append(i)
    keep = [i for i, h in enumerate(row_hashes(test).tolist())
            if not any(np.array_equal(test[i], train[j]) for j in seen.get(h, ()))]
    return np.asarray(keep, dtype=np.int64)


def validation_split(layout: Layout, count: int, seed: int, seen: Sequence[np.ndarray], power_a: float = 0.01,
                     filler: str = "blank") -> tuple[np.ndarray, np.ndarray]:
    """(ids, labels) of the validation split: ``count`` sequences from a third stream of ``seed``
    (the training and test splits keep theirs, so they do not change), less those among ``seen``
    (the training and test sequences)."""
    ids, labels = generate(layout, count, np.random.default_rng([seed, 2]), power_a, filler)
    keep = drop_seen(ids, np.concatenate(list(seen)))
    return ids[keep], labels[keep]


def splits(layout: Layout, train: int, test: int, seed: int, power_a: float = 0.01,
           filler: str = "blank") -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((ids, labels) of the training split, (ids, labels) of the test split): each from its own
    stream of ``seed``; a test sequence that also occurs in training is left out."""
    train_ids, train_labels = generate(layout, train, np.random.default_rng([seed, 0]), power_a, filler)
    test_ids, test_labels = generate(layout, test, np.random.default_rng([seed, 1]), power_a, filler)
    keep = drop_seen(test_ids, train_ids)
    return (train_ids, train_labels), (test_ids[keep], test_labels[keep])
