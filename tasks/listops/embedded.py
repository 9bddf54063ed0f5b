"""The embedded ListOps set: generated expressions written once in the LRA layout.

Without ``--data``, ``generator.generate_splits`` draws the test split, then the training split,
then the validation split (no expression in two; drawn last, the validation split changes neither of
the others) for the run's length and limits, and they are written to the cache as
``basic_train.tsv``, ``basic_val.tsv`` and ``basic_test.tsv`` (``Source<TAB>Target``, brackets kept,
no parentheses), one folder per setting; ``data.py`` then reads them like any ``--data`` folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tasks.common.cache import build_once
from tasks.listops.data import SPLIT_FILES
from tasks.listops.generator import generate_splits, length_band, to_text


@dataclass(frozen=True)
class Setting:
    """What the generated set depends on: one cache folder each."""

    seq_len: int
    max_depth: int
    max_args: int
    seed: int
    train_size: int
    test_size: int
    val_size: int

    @property
    def name(self) -> str:
        """As in the results' ``dataset`` column: the generator's limits and seed."""
        return f"generated:depth{self.max_depth}-args{self.max_args}-seed{self.seed}"

    def describe(self) -> str:
        low, high = length_band(self.seq_len)
        return (f"ListOps expressions grown to {low}-{high} tokens (operators MAX, MIN, MED, SM; depth <= "
                f"{self.max_depth}, 2-{self.max_args} arguments; seed {self.seed}): {self.train_size} train, "
                f"{self.test_size} test, {self.val_size} validation, none in two")


def embedded_dataset(setting: Setting, root: Path | None = None) -> Path:
    """The generated set in the LRA layout (default root: the cache), written on first use."""
    s = setting
    folder = (f"listops-n{s.seq_len}-depth{s.max_depth}-args{s.max_args}-seed{s.seed}-"
              f"train{s.train_size}-test{s.test_size}-val{s.val_size}")
    return build_once(folder, tuple(SPLIT_FILES.values()), lambda out: write_embedded(s, out), root)


def write_embedded(setting: Setting, folder: Path) -> None:
    s = setting
    splits = generate_splits({"test": s.test_size, "train": s.train_size, "val": s.val_size}, s.seq_len,
                             s.seed, s.max_depth,
                             s.max_args)
    for split, file in SPLIT_FILES.items():
        part = splits[split]
        lines = [f"{to_text(ids[:n])}\t{label}\n"
                 for ids, n, label in zip(part.tokens, part.lengths, part.labels, strict=True)]
        (folder / file).write_text("Source\tTarget\n" + "".join(lines), encoding="utf-8")
