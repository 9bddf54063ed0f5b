"""What the ListOps tests share: an evaluator independent of the generator, and a tiny set of
LRA's files."""

from __future__ import annotations

import statistics
from pathlib import Path

# As LRA prints them: the parentheses of its binary tree around operator and arguments.
TRAIN = ("Source\tTarget\n"
         "( ( ( ( [MAX 2 ) 9 ) [MIN 4 7 ] ) ] )\t9\n"
         "( ( ( [SM 5 ) ( ( ( [MED 1 ) 8 ) 3 ] ) ) ] )\t8\n")
TEST = "Source\tTarget\n( ( ( [MIN 6 ) 3 ) ] )\t3\n"


def write_lra(root: Path, train: str = TRAIN, test: str = TEST) -> Path:
    """``root`` holding basic_train.tsv, basic_val.tsv and basic_test.tsv in LRA's format."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "basic_train.tsv").write_text(train, encoding="utf-8")
    (root / "basic_test.tsv").write_text(test, encoding="utf-8")
    (root / "basic_val.tsv").write_text(test, encoding="utf-8")
    return root


def stack_value(text: str) -> int:
    """The value of a printed expression by a stack machine over its text: a different route from
    the generator's recursion over its tree, with the median taken as LRA takes it."""
    rules = {"[MAX": max, "[MIN": min, "[SM": lambda v: sum(v) % 10,
             "[MED": lambda v: int(statistics.median(v))}
    stack: list[tuple[str, list[int]]] = []
    result = None
    for token in text.split():
        if token in rules:
            stack.append((token, []))
        elif token == "]":
            op, args = stack.pop()
            value = rules[op](args)
            if stack:
                stack[-1][1].append(value)
            else:
                assert result is None, "two expressions in one sequence"
                result = value
        else:
            assert stack, f"a digit outside any operator: {text}"
            stack[-1][1].append(int(token))
    assert not stack and result is not None, f"unbalanced expression: {text}"
    return result


def max_nesting(text: str) -> int:
    """Operators open at once, at most (the depth minus the digits' level)."""
    deepest = open_now = 0
    for token in text.split():
        open_now += token.startswith("[")
        open_now -= token == "]"
        deepest = max(deepest, open_now)
    return deepest
