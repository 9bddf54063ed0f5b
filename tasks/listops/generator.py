"""ListOps expressions grown to a target length, and their vocabulary.

ListOps (Nangia & Bowman 2018, as Long Range Arena builds it): nested prefix expressions over the
digits 0-9 with four operators, each closed by ``]``; the label is the value, one of 10 classes.

    [MAX 4 3 [MIN 2 3 ] 1 0 [MED 1 5 8 9 2 ] ]   ->   5

- ``[MAX`` and ``[MIN``: the largest and smallest argument; ``[MED``: the median, the lower middle
  value's and the upper's mean rounded down when the count is even (LRA's ``int(np.median(...))``);
  ``[SM``: the sum modulo 10.
- An operator takes 2 to ``max_args`` arguments; the root is an operator at level 1 and a digit
  sits at most at level ``max_depth`` (LRA's depth: at most ``max_depth - 1`` nested operators).
- Length counts tokens: one per operator, digit and ``]`` (LRA's own count).

LRA draws a tree (each node below ``max_depth`` an operator with probability 1/4, else a digit)
and rejects it unless its length falls in a range: at 2,000 tokens most trees are wasted. Here an
expression is grown instead, to a target length drawn uniformly from the band
``[ceil(0.8 N), N]``: starting from a root operator, a digit is repeatedly replaced by a new
operator over fresh digits until the length reaches the target. Every operator is uniform over the
four, its argument count uniform over ``2..max_args`` (the last one cut so the length stays within
``N``), every digit uniform over 0-9. The digit replaced is first one of the newest operator's
(a spine down to level ``max_depth``, as every tree LRA accepts at these lengths reaches it), then
one drawn uniformly from all digits above level ``max_depth``. The labels come out skewed as
LRA's do (0 and 9, the MIN and MAX of many values, are the most common).

Generation is deterministic in its seed (``random.Random``, whose sequence Python keeps stable).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np

from attnbench import TaskError

# Token ids: 0 pads, then the digits, the operators and the closing bracket, which is a token of its
# own (LRA's first tokenizer dropped it, leaving the nesting ambiguous: LRA issue #20).
PAD = 0
DIGITS = tuple(str(d) for d in range(10))
OPERATORS = ("[MAX", "[MIN", "[MED", "[SM")
CLOSE = "]"
VOCAB = ("<pad>", *DIGITS, *OPERATORS, CLOSE)
TOKEN_ID = {token: i for i, token in enumerate(VOCAB)}
DIGIT_ID = 1  # the id of "0"; digit d is DIGIT_ID + d
OPERATOR_ID = 1 + len(DIGITS)  # the id of the first operator
CLOSE_ID = TOKEN_ID[CLOSE]
NUM_CLASSES = 10

MIN_FRACTION = 0.8  # lengths fall in [ceil(MIN_FRACTION * N), N]
MIN_SEQ_LEN = 16  # below this the band is too narrow to land in


def length_band(seq_len: int) -> tuple[int, int]:
    """The lowest and highest token length of an expression for sequences of ``seq_len`` tokens."""
    return math.ceil(MIN_FRACTION * seq_len), seq_len


def capacity(max_depth: int, max_args: int) -> int:
    """The longest expression these limits allow: every operator full, down to ``max_depth``."""
    longest = 1  # a digit at level max_depth
    for _ in range(max_depth - 1):
        longest = 2 + max_args * longest
    return longest


def check_limits(seq_len: int, max_depth: int, max_args: int) -> None:
    """A ``TaskError`` naming the problem when no expression of these limits fits the band."""
    if seq_len < MIN_SEQ_LEN:
        raise TaskError(f"--seq-len must be >= {MIN_SEQ_LEN} for ListOps, got {seq_len}")
    if max_depth < 2:
        raise TaskError(f"--max-depth must be >= 2 (an operator over digits), got {max_depth}")
    if max_args < 2:
        raise TaskError(f"--max-args must be >= 2, got {max_args}")
    low, _ = length_band(seq_len)
    if capacity(max_depth, max_args) < low:
        raise TaskError(f"ListOps expressions of --max-depth {max_depth} and --max-args {max_args} hold at "
                        f"most {capacity(max_depth, max_args)} tokens; --seq-len {seq_len} needs {low} or "
                        "more")


# A node is a list: [operator index, argument, argument, …]; an argument is a digit (int) or a node.
Node = list


def grow(rng: random.Random, target: int, seq_len: int, max_depth: int, max_args: int) -> tuple[Node, int]:
    """(root, token length): an expression grown until its length reaches ``target`` (see the
    module's docstring), never longer than ``seq_len``; shorter only when the limits run out."""
    def new_operator(level: int, room: int) -> Node:
        args = min(rng.randint(2, max_args), room)
        node = [rng.randrange(len(OPERATORS)), *(rng.randrange(10) for _ in range(args))]
        if level + 1 < max_depth:  # its digits can become operators
            slots = [(node, i, level + 1) for i in range(1, args + 1)]
            open_slots.extend(slots)
            newest[:] = slots
        else:
            newest.clear()
        return node

    open_slots: list[tuple[Node, int, int]] = []  # (node, argument index, level of that argument)
    newest: list[tuple[Node, int, int]] = []  # the newest operator's, while the spine grows
    root = new_operator(1, seq_len - 2)
    length = len(root) + 1
    while length < target and seq_len - length >= 3:
        if newest:  # the spine: one of the newest operator's digits
            slot = newest[rng.randrange(len(newest))]
        else:
            if not open_slots:
                break
            pick = rng.randrange(len(open_slots))
            open_slots[pick], open_slots[-1] = open_slots[-1], open_slots[pick]
            slot = open_slots.pop()
            if not isinstance(slot[0][slot[1]], int):  # already replaced while the spine grew
                continue
        node, index, level = slot
        child = new_operator(level, seq_len - length - 1)  # adds the operator, k digits, "]"; drops one
        node[index] = child
        length += len(child)
    return root, length


def serialize(root: Node, out: list[int]) -> int:
    """Append the expression's token ids to ``out``; return its value."""
    out.append(OPERATOR_ID + root[0])
    values = []
    for arg in root[1:]:
        if isinstance(arg, int):
            out.append(DIGIT_ID + arg)
            values.append(arg)
        else:
            values.append(serialize(arg, out))
    out.append(CLOSE_ID)
    return apply(OPERATORS[root[0]], values)


def apply(operator: str, values: list[int]) -> int:
    """The value of one operator over its arguments' values."""
    if operator == "[MAX":
        return max(values)
    if operator == "[MIN":
        return min(values)
    if operator == "[SM":
        return sum(values) % 10
    ordered = sorted(values)  # [MED
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) // 2


@dataclass
class Expressions:
    """Encoded expressions, padded: ``tokens`` (M, N) uint8 (``PAD`` after each one's length),
    ``lengths`` (M,) and ``labels`` (M,) int64."""

    tokens: np.ndarray
    lengths: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def generate_splits(sizes: dict[str, int], seq_len: int, seed: int = 0, max_depth: int = 10,
                    max_args: int = 10) -> dict[str, Expressions]:
    """Splits of distinct expressions, in band for ``seq_len``, drawn in the order of ``sizes``
    from one seeded stream; no expression appears twice, in one split or across them (put the test
    split first: it then does not depend on the others' sizes)."""
    check_limits(seq_len, max_depth, max_args)
    low, high = length_band(seq_len)
    high = min(high, capacity(max_depth, max_args))
    rng = random.Random(seed)
    seen: set[bytes] = set()
    splits = {}
    for name, size in sizes.items():
        tokens = np.zeros((size, seq_len), dtype=np.uint8)
        lengths = np.zeros(size, dtype=np.int64)
        labels = np.zeros(size, dtype=np.int64)
        count, tries = 0, 0
        while count < size:
            tries += 1
            if tries > 2 * size + 1000:
                raise TaskError(f"could not draw {size} distinct ListOps expressions of {low}-{high} tokens "
                                f"(--max-depth {max_depth}, --max-args {max_args}); raise the limits or "
                                "--seq-len")
            root, length = grow(rng, rng.randint(low, high), seq_len, max_depth, max_args)
            if length < low:
                continue
            ids: list[int] = []
            label = serialize(root, ids)
            key = bytes(ids)
            if key in seen:
                continue
            seen.add(key)
            tokens[count, :length] = ids
            lengths[count], labels[count] = length, label
            count += 1
        splits[name] = Expressions(tokens, lengths, labels)
    return splits


def depth(root: Node) -> int:
    """Levels of the expression: 2 for an operator over digits."""
    return 1 + max((depth(a) if isinstance(a, list) else 1) for a in root[1:])


def to_text(ids: np.ndarray | list[int]) -> str:
    """The tokens as text, padding left out: ``[MAX 4 [MIN 2 3 ] ]``."""
    return " ".join(VOCAB[int(i)] for i in ids if int(i) != PAD)
