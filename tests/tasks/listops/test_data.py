"""The LRA ListOps layout (``--data DIR``): a tiny fake set in its format, read back."""

from __future__ import annotations

import pytest
import torch

from attnbench import TaskError
from tasks.listops import data
from tasks.listops.generator import CLOSE_ID, PAD, TOKEN_ID, to_text
from tests.tasks.listops.tiny import write_lra


def test_the_lra_layout_is_read_with_brackets_kept_and_parentheses_dropped(tmp_path):
    splits, cut = data.read_lra(write_lra(tmp_path / "lra"), 16)
    train, test = splits["train"], splits["test"]
    assert cut == 0 and len(train) == 2 and len(test) == 1
    assert to_text(train.tokens[0]) == "[MAX 2 9 [MIN 4 7 ] ]"
    assert to_text(train.tokens[1]) == "[SM 5 [MED 1 8 3 ] ]"
    assert train.lengths.tolist() == [8, 8] and train.labels.tolist() == [9, 8]
    assert (train.tokens[0, 8:] == PAD).all() and (train.tokens == CLOSE_ID).sum() == 4
    assert test.tokens[0, 0] == TOKEN_ID["[MIN"] and test.labels.tolist() == [3]


def test_an_expression_longer_than_seq_len_is_cut_and_counted(tmp_path):
    splits, cut = data.read_lra(write_lra(tmp_path / "lra"), 6)
    assert cut == 2 and splits["train"].lengths.tolist() == [6, 6]


def test_the_dataset_gives_long_ids_a_token_mask_and_the_label(tmp_path):
    splits, _ = data.read_lra(write_lra(tmp_path / "lra"), 12)
    ids, mask, label = data.sequence_set(splits["train"])[0]
    assert ids.dtype == torch.long and ids.shape == (12,) and mask.dtype == torch.bool
    assert mask.tolist() == [True] * 8 + [False] * 4 and int(label) == 9


@pytest.mark.parametrize("train, needle", [
    ("Source\tTarget\n[MAX 2 X ]\t2\n", "unknown ListOps token 'X'"),
    ("Source\tTarget\n[MAX 2 3 ]\t12\n", "Target must be a digit 0-9"),
    ("src\tlabel\n[MAX 2 3 ]\t3\n", "the header must be Source<TAB>Target"),
    ("Source\tTarget\n", "no expressions"),
])
def test_bad_files_are_one_clear_error(tmp_path, train, needle):
    with pytest.raises(TaskError, match=needle):
        data.read_lra(write_lra(tmp_path / "lra", train=train), 16)


def test_a_missing_file_names_the_layout(tmp_path):
    (tmp_path / "lra").mkdir()
    with pytest.raises(TaskError, match="basic_train.tsv: not found; --data expects"):
        data.read_lra(tmp_path / "lra", 16)


def test_a_file_that_is_not_utf8_text_is_one_clear_error(tmp_path):
    root = write_lra(tmp_path / "lra", train="Source\tTarget\n[MAX 2 3 ]\t3\n")
    (root / "basic_train.tsv").write_bytes(b"Source\tTarget\n\xff\xfe[MAX 2 3 ]\t3\n")
    with pytest.raises(TaskError, match="basic_train.tsv: not an LRA ListOps TSV file"):
        data.read_lra(root, 16)
