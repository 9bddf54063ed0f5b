"""ListOps data: the Long Range Arena files (``--data DIR``) and the examples the model reads.

LRA ships ListOps as ``DIR/basic_train.tsv``, ``basic_val.tsv`` and ``basic_test.tsv``: a header
``Source<TAB>Target``, then one expression a line, printed with the parentheses of its binary
tree (``( ( ( [MAX 2 ) 9 ) ] )``) and its value. The parentheses carry nothing the brackets do
not, and are dropped (as LRA's own pipeline drops them); every other whitespace-separated piece
is a token of ``generator.VOCAB``, ``]`` included. Training reads ``basic_train.tsv``, evaluation
``basic_test.tsv`` (LRA reports test accuracy), and ``basic_val.tsv`` is the validation split: scored
once after training (``val_accuracy``), it is what the accuracy sweep tunes the learning rate on,
never the test split. An expression longer than ``--seq-len`` is cut to it, as LRA cuts at its
``max_length``, and counted.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from attnbench import TaskError
from tasks.common.sequence import SequenceSet
from tasks.listops.generator import NUM_CLASSES, PAD, TOKEN_ID, Expressions

SPLIT_FILES = {"train": "basic_train.tsv", "val": "basic_val.tsv", "test": "basic_test.tsv"}
LAYOUT = ("the Long Range Arena ListOps files: DIR/basic_train.tsv, basic_val.tsv and basic_test.tsv "
          "(columns Source, Target)")
DROPPED = ("(", ")")


def encode(source: str, where: str) -> list[int]:
    """The token ids of one printed expression, parentheses dropped."""
    ids = []
    for piece in source.split():
        if piece in DROPPED:
            continue
        if piece not in TOKEN_ID or TOKEN_ID[piece] == PAD:
            raise TaskError(f"{where}: unknown ListOps token {piece!r}; expected digits, "
                            "[MAX [MIN [MED [SM, ] and parentheses")
        ids.append(TOKEN_ID[piece])
    if not ids:
        raise TaskError(f"{where}: empty Source")
    return ids


def read_split(path: Path, seq_len: int) -> tuple[Expressions, int]:
    """(expressions, how many were cut to ``seq_len``) of one LRA file."""
    if not path.is_file():
        raise TaskError(f"{path}: not found; --data expects {LAYOUT}")
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.reader(f, delimiter="\t")
            header = next(reader, None)
            if header is None or header[:2] != ["Source", "Target"]:
                raise TaskError(f"{path}: the header must be Source<TAB>Target, got {header}")
            rows = [(i, row) for i, row in enumerate(reader, start=2) if row]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise TaskError(f"{path}: not an LRA ListOps TSV file ({' '.join(str(exc).split())[:120]})") from None
    if not rows:
        raise TaskError(f"{path}: no expressions")
    tokens = np.zeros((len(rows), seq_len), dtype=np.uint8)
    lengths = np.zeros(len(rows), dtype=np.int64)
    labels = np.zeros(len(rows), dtype=np.int64)
    cut = 0
    for n, (line, row) in enumerate(rows):
        where = f"{path}:{line}"
        if len(row) < 2:
            raise TaskError(f"{where}: expected two tab-separated columns (Source, Target)")
        ids = encode(row[0], where)
        try:
            labels[n] = int(row[1])
        except ValueError:
            raise TaskError(f"{where}: Target must be a digit 0-9, got {row[1]!r}") from None
        if not 0 <= labels[n] < NUM_CLASSES:
            raise TaskError(f"{where}: Target must be a digit 0-9, got {row[1]!r}")
        cut += len(ids) > seq_len
        ids = ids[:seq_len]
        tokens[n, :len(ids)] = ids
        lengths[n] = len(ids)
    return Expressions(tokens, lengths, labels), cut


def read_lra(root: Path, seq_len: int) -> tuple[dict[str, Expressions], int]:
    """({"train": …, "val": …, "test": …}, expressions cut to ``seq_len``) of an LRA ListOps folder."""
    if not root.is_dir():
        raise TaskError(f"--data {root}: not a folder; expected {LAYOUT}")
    splits, cut = {}, 0
    for split, name in SPLIT_FILES.items():
        splits[split], n = read_split(root / name, seq_len)
        cut += n
    return splits, cut


def sequence_set(expressions: Expressions) -> SequenceSet:
    """One split as the model reads it: ids (S, N) long, mask (S, N) True on tokens, labels (S,)."""
    ids = torch.from_numpy(expressions.tokens).long()
    mask = torch.arange(ids.shape[1]) < torch.from_numpy(expressions.lengths)[:, None]
    return SequenceSet(ids, mask, torch.from_numpy(expressions.labels))
