"""Bad GLUE files are one line naming the file and the line: text that is not UTF-8 (Latin-1, or
binary), a field over csv's size limit, a score that is not a finite number."""

from __future__ import annotations

import csv

import pytest

from attnbench import TaskError
from tasks.glue import data
from tests.tasks.glue.tiny import FILES, STSB, run_args, tsv, write_glue


def sst2(tmp_path, train: bytes):
    """An SST-2 folder whose train.tsv holds ``train``."""
    root = write_glue(tmp_path / "glue", {"SST-2": FILES["SST-2"]})
    (root / "SST-2" / "train.tsv").write_bytes(train)
    return root


@pytest.mark.parametrize("train, message", [
    ("sentence\tlabel\nit 's charming\t1\na caf\u00e9 film\t0\n".encode("latin-1"),
     "train.tsv, line 3: byte 0xe9 is not UTF-8 text"),
    (b"sentence\tlabel\n\x00\x89PNG" + bytes(range(128, 256)), "train.tsv, line 2: byte 0x89 is not UTF-8"),
    (("sentence\tlabel\nfine\t1\n" + "x" * (csv.field_size_limit() + 1) + "\t0\n").encode(),
     f"train.tsv, line 3: field larger than field limit ({csv.field_size_limit()})"),
])
def test_a_file_that_is_not_glue_text_is_one_line_naming_the_line(train, message, tmp_path, cli_error):
    root = sst2(tmp_path, train)
    line = cli_error(run_args(root, tmp_path))
    assert line.startswith(f"attnbench run: error: {root / 'SST-2' / 'train.tsv'}, line ") and message in line


@pytest.mark.parametrize("score", ["nan", "inf", "-inf", "NaN"])
def test_an_sts_b_score_that_is_not_finite_is_refused(score, tmp_path):
    row = ["1", "main-captions", "MSRvid", "2012test", "0001", "none", "none", "A man cuts.", "He cuts.",
           score]
    root = write_glue(tmp_path / "glue", {"STS-B": {**FILES["STS-B"], "train.tsv": tsv(STSB, row)}})
    with pytest.raises(TaskError) as exc:
        data.read_split(root / "STS-B", data.get_task("stsb"), "train")
    assert str(exc.value) == f"{root / 'STS-B' / 'train.tsv'}, line 2: score {score!r} is not a finite number"
