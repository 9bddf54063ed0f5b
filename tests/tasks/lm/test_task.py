"""The language model end to end: its evaluation against known predictors (targets aligned, losses
per context bucket, bits per byte, the unigram model), a smoke run's row, --data with a BPE, and
its one-line refusals."""

from __future__ import annotations

import json
import math
from contextlib import nullcontext

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from attnbench import get_mechanism, get_task
from attnbench.cli import main
from tasks.lm.task import CONTEXT_BUCKETS, CONTEXT_LOSSES, LanguageModel, TokenWindows, context_bucket
from tests.tasks.common.test_sequence import CONTRACT


def test_windows_are_consecutive_and_each_target_is_the_next_token():
    ids = np.arange(1, 24, dtype=np.uint16)  # 23 tokens: (23 - 1) // 5 = 4 windows of 5
    windows = TokenWindows(ids, 5)
    assert len(windows) == 4 and windows.tokens == 20
    x, mask, y = windows[3]
    assert x.tolist() == [16, 17, 18, 19, 20] and y.tolist() == [17, 18, 19, 20, 21] and mask.all()
    with pytest.raises(IndexError):
        windows[4]


def test_context_buckets_hold_a_quarter_of_the_range_up_to_their_end():
    bucket = context_bucket(70)  # position t predicts from t + 1 tokens
    assert bucket[:4].tolist() == [0] * 4 and bucket[4:16].tolist() == [1] * 12
    assert bucket[16:64].tolist() == [2] * 48 and bucket[64:].tolist() == [3] * 6
    assert CONTEXT_LOSSES[:4] == ("loss_ctx_4", "loss_ctx_16", "loss_ctx_64", "loss_ctx_256")


class Probe(LanguageModel):
    """The task's evaluation alone, on one process, over given windows."""

    device = torch.device("cpu")

    def __init__(self, ids: np.ndarray, n: int, train: np.ndarray) -> None:
        self.seq_len, self.val_loader = n, torch.utils.data.DataLoader(TokenWindows(ids, n), batch_size=3)
        counts = np.bincount(train, minlength=257)
        smoothed = (counts + 1.0) / (counts.sum() + 256)
        smoothed[0] = 1.0
        self.unigram_nll, self.majority = torch.from_numpy(-np.log(smoothed)), int(counts[1:].argmax()) + 1
        self.token_bytes = torch.ones(257, dtype=torch.int64)
        self.token_bytes[0] = 0

    def autocast(self):
        return nullcontext()

    def to_device(self, batch):
        return batch

    def reduce(self, *values, op="sum"):
        return list(values)


class NextLetter(nn.Module):
    """Knows the text "abab…": after a it says b and after b a, with probability 1 - 1e-6; else a
    uniform guess over the 257 ids."""

    def __init__(self, sure: bool) -> None:
        super().__init__()
        self.sure = sure

    def forward(self, ids, segments, mask):
        logits = torch.zeros(*ids.shape, 257)
        if self.sure:
            other = torch.where(ids == ord("a") + 1, ord("b") + 1, ord("a") + 1)
            logits.scatter_(-1, other[..., None], math.log((1 - 1e-6) / 1e-6 * 256))
        return logits


def test_evaluation_scores_a_known_predictor_exactly():
    text = np.frombuffer(b"ab" * 200, dtype=np.uint8).astype(np.uint16) + 1
    probe = Probe(text, 32, train=text)
    uniform = probe.evaluate(NextLetter(sure=False))
    assert uniform["val_loss"] == pytest.approx(math.log(257)) and uniform["perplexity"] == pytest.approx(257)
    assert uniform["bits_per_byte"] == pytest.approx(math.log2(257))
    assert uniform["items"] == 12 and uniform["val_tokens"] == 12 * 32  # (400 - 1) // 32 windows
    for name, c in zip(CONTEXT_LOSSES, CONTEXT_BUCKETS, strict=True):
        assert (uniform[name] == pytest.approx(math.log(257))) if c // 4 < 32 else math.isnan(uniform[name])
    sure = probe.evaluate(NextLetter(sure=True))
    assert sure["accuracy"] == 100.0 and abs(sure["val_loss"]) < 1e-5  # targets aligned (float32 logits)
    assert sure["chance"] == pytest.approx(50.0, abs=0.2)  # "a" as often as "b"
    # the unigram model: a and b each (200 + 1) / (400 + 256) of the time
    assert sure["unigram_perplexity"] == pytest.approx(656 / 201)


def test_the_losses_per_context_average_to_the_validation_loss(tmp_path, causal_mechanisms):
    row = smoke(tmp_path, "--seq-len", "40")
    weights = [min(40, c) - c // 4 if c > 4 else 4 for c in CONTEXT_BUCKETS if c // 4 < 40]
    losses = [row[name] for name, c in zip(CONTEXT_LOSSES, CONTEXT_BUCKETS, strict=True) if c // 4 < 40]
    mean = sum(w * v for w, v in zip(weights, losses, strict=True)) / 40
    assert mean == pytest.approx(row["val_loss"], rel=1e-4)
    assert all(math.isnan(row[name]) for name, c in zip(CONTEXT_LOSSES, CONTEXT_BUCKETS, strict=True)
               if c // 4 >= 40)


def smoke(tmp_path, *extra: str, mechanism: str = "causal_softmax") -> pd.Series:
    argv = ["run", "--task", "lm", "--mechanism", mechanism, "--out", str(tmp_path / "run"), "--results",
            str(tmp_path / "lm.csv"), "--seq-len", "32", "--max-steps", "2", "--limit-train", "64",
            "--limit-val", "8", "--batch-tokens", "128", *extra]
    assert main(argv) == 0
    return pd.read_csv(tmp_path / "lm.csv").iloc[-1]


def test_a_smoke_run_records_perplexity_bits_per_byte_and_the_contract(tmp_path, causal_mechanisms):
    row = smoke(tmp_path)
    assert all(c in row.index for c in CONTRACT), [c for c in CONTRACT if c not in row.index]
    assert (row["task"], row["dataset"], row["tokenizer"], row["seq_len"], row["steps"], row["limited"]) == (
        "lm", "embedded conventions-2012", "byte", 32, 2, True)
    assert row["batch_size"] == 4  # --batch-tokens 128 over 32 tokens
    assert (row["val_examples"], row["val_tokens"], row["vocab_size"]) == (8, 8 * 32, 257)
    assert row["perplexity"] == pytest.approx(math.exp(row["val_loss"]), rel=1e-4)
    assert row["bits_per_byte"] == pytest.approx(row["val_loss"] / math.log(2), rel=1e-4)  # a byte a token
    assert row["best_perplexity"] <= row["perplexity"] and 0 <= row["accuracy"] <= 100
    assert 1 < row["unigram_perplexity"] < 257 and row["chance"] > 5  # the space, most common byte
    assert row["train_tokens"] == 911_945 + 2 * 170 + 1 and row["status"] == "ok"
    assert "test_loss" not in row.index
    assert get_task("lm").sweep_score.column == "perplexity"


def test_data_folder_with_a_bpe(tmp_path, causal_mechanisms, monkeypatch):
    monkeypatch.setenv("ATTNBENCH_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "text"
    folder.mkdir()
    lines = [f"the {w} sat on the mat number {i}" for i, w in enumerate(["cat", "dog", "hen"] * 60)]
    (folder / "corpus.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    row = smoke(tmp_path, "--data", str(folder), "--tokenizer", "bpe", "--bpe-vocab", "300",
                "--seq-len", "16", "--limit-val", "2", "--batch-size", "4")
    assert row["tokenizer"] == "bpe-300" and row["dataset"] == "text:text" and row["vocab_size"] <= 301
    assert row["bits_per_byte"] < row["val_loss"] / math.log(2)  # more than one byte a token
    assert (tmp_path / "cache" / "lm-tokens").is_dir()


@pytest.mark.parametrize("extra, mechanism, message", [
    ([], "set", "set: causal=True is not supported: "),
    ([], "sinkformer", "sinkformer: causal=True is not supported: "),
    (["--bpe-vocab", "500"], "causal_softmax", "--bpe-vocab sizes the BPE: add --tokenizer bpe"),
    (["--tokenizer", "words"], "causal_softmax", "argument --tokenizer: invalid choice: 'words'"),
    (["--data", "/nonexistent/wikitext"], "causal_softmax",
     "argument --data: /nonexistent/wikitext: no such folder; expected WikiText"),
    (["--seq-len", "2000000"], "causal_softmax", "argument --seq-len: invalid value"),
])
def test_mistakes_get_one_clear_line_before_any_training(extra, mechanism, message, tmp_path,
                                                         causal_mechanisms, cli_error):
    argv = ["run", "--task", "lm", "--mechanism", mechanism, "--out", str(tmp_path / "run"), *extra]
    line = cli_error(argv)
    assert message in line
    if mechanism in ("set", "sinkformer"):
        assert line.endswith(get_mechanism(mechanism).causal_problem())
    assert not (tmp_path / "run").exists()


def test_bad_text_in_a_data_folder_is_one_line(tmp_path, causal_mechanisms, cli_error):
    (tmp_path / "a.txt").write_bytes(b"\xff\xfe not utf-8\n")
    line = cli_error(["run", "--task", "lm", "--mechanism", "causal_softmax", "--data", str(tmp_path),
                      "--out", str(tmp_path / "run")])
    assert "a.txt: not UTF-8 text (byte 0" in line


def test_a_validation_split_shorter_than_one_window_is_refused(tmp_path, causal_mechanisms, cli_error):
    (tmp_path / "train.txt").write_text("enough training text here\n" * 20)
    (tmp_path / "valid.txt").write_text("short\n")
    line = cli_error(["run", "--task", "lm", "--mechanism", "causal_softmax", "--data", str(tmp_path),
                      "--seq-len", "64", "--out", str(tmp_path / "run")])
    assert "the validation split holds 6 tokens, fewer than one window of --seq-len 64 + 1" in line


def test_the_accuracy_sweep_reads_perplexity(tmp_path, causal_mechanisms, capsys):
    """``scale --task lm`` end to end at smoke size: each point in a process of its own, the
    perplexity judged (lower is better) and recorded with the score in meta.json."""
    out = tmp_path / "sweep"
    assert main(["scale", "--task", "lm", "--load", causal_mechanisms, "--mechanism", "causal_softmax",
                 "--seq", "16,32", "--threads", "1", "--out", str(out), "--", "--max-steps", "1",
                 "--limit-train", "8", "--limit-val", "2", "--batch-size", "4"]) == 0
    table = pd.read_csv(out / "accuracy.csv")
    assert list(table["status"]) == ["ok", "ok"] and list(table["seq_len"]) == [16, 32]
    assert (table["perplexity"] > 1).all() and (table["unigram_perplexity"] > 1).all()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["score"]["column"] == "perplexity" and not meta["score"]["higher_is_better"]
    assert "validation perplexity (per token) per variant and n" in capsys.readouterr().out
    assert (out / "accuracy_n.png").is_file()


def test_a_run_resumed_after_its_first_epoch_ends_as_the_whole_run_does(tmp_path, causal_mechanisms,
                                                                        monkeypatch):
    from tasks.common.trainer import Trainer

    save = Trainer.save

    def keep_each_epoch(self, path, extra):
        save(self, path, extra)
        path.with_name(f"epoch{self.epoch}.pt").write_bytes(path.read_bytes())

    monkeypatch.setattr(Trainer, "save", keep_each_epoch)
    argv = ["run", "--task", "lm", "--mechanism", "causal_softmax", "--seq-len", "16", "--epochs", "2",
            "--limit-train", "8", "--limit-val", "2", "--batch-size", "4",
            "--results", str(tmp_path / "lm.csv")]
    assert main([*argv, "--out", str(tmp_path / "whole")]) == 0
    monkeypatch.setattr(Trainer, "save", save)
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / "checkpoint.pt").write_bytes((tmp_path / "whole" / "epoch1.pt").read_bytes())
    assert main([*argv, "--out", str(stopped), "--resume", str(stopped)]) == 0
    whole, resumed = pd.read_csv(tmp_path / "lm.csv").iloc[-2:].itertuples()
    assert (whole.steps, resumed.steps) == (4, 4) and resumed.epochs == 2
    assert resumed.perplexity == pytest.approx(whole.perplexity, rel=1e-5)
    assert resumed.loss_ctx_16 == pytest.approx(whole.loss_ctx_16, rel=1e-5)


def test_the_sweep_presets_fit_the_embedded_corpus_and_name_causal_mechanisms(tmp_path):
    from attnbench import Mechanism
    from tasks.lm import corpus
    from tasks.lm.task import PRESETS, SWEEP_PRESETS

    valid = len(corpus.embedded_corpus(tmp_path).valid)
    for kind, preset in SWEEP_PRESETS.items():
        assert len(preset["seq"]) >= 3, kind  # perplexity against at least three context lengths
        for n in preset["seq"]:
            assert (valid - 1) // n >= 16, (kind, n)  # validation windows at every length
            assert PRESETS["embedded"]["batch_tokens"] // n >= 1
    if get_mechanism("softmax").causal_problem() == Mechanism.no_causal_reason:
        pytest.skip("this build's built-in mechanisms declare no causal forms yet")
    named = {m for preset in SWEEP_PRESETS.values() for m in preset["mechanisms"]}
    assert not {m: get_mechanism(m).causal_problem() for m in named if get_mechanism(m).causal_problem()}
