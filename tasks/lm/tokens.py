"""Text to token ids for the language model: bytes, or a byte-level BPE trained on the training split.

``byte``: each UTF-8 byte is a token (256 of them). ``bpe``: Hugging Face ``tokenizers``' byte-level
BPE (GPT-2's pre-tokenisation, every byte in the initial alphabet, no special tokens) trained on
the training split to ``--bpe-vocab`` tokens, then both splits encoded with it; the tokenizer and
the encoded splits are cached under ``$ATTNBENCH_CACHE/lm-tokens/`` by what was read (paths, sizes,
modification times) and the vocabulary size, so a second run reads them back. Either way the
model's ids are the tokenizer's plus one: 0 is padding and never occurs (the encoder's padding
row), so the model's vocabulary is 257, or the BPE's size + 1.

``bytes_per_token`` gives the UTF-8 bytes each id stands for (1 for bytes; a BPE token's length in
its byte-level alphabet, one character per byte), so that bits per byte can be counted exactly
whatever the tokenizer: the sum over the evaluated targets of the loss, over their bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from tasks.common.cache import build_once, cache_root
from tasks.lm.corpus import Corpus

TOKENIZERS = ("byte", "bpe")
CHUNK_BYTES = 1 << 20  # text handed to the BPE at once, cut at line breaks
BATCH_CHUNKS = 16  # chunks encoded together (tokenizers' threads), their encodings then let go


@dataclasses.dataclass(frozen=True)
class Encoded:
    """Both splits as model ids (1-D, uint16 or int32), the vocabulary and each id's bytes."""

    train: np.ndarray
    valid: np.ndarray
    vocab_size: int  # padding included
    bytes_per_token: np.ndarray  # (vocab_size,) int64, 0 for padding
    name: str  # "byte", "bpe-4096"
    tokenizer_file: Path | None = None  # the trained BPE's tokenizer.json


def _ids(values: np.ndarray, vocab_size: int) -> np.ndarray:
    """Token ids in the narrowest type that holds them."""
    return values.astype(np.uint16 if vocab_size <= 2**16 else np.int32)


def encode(corpus: Corpus, tokenizer: str, bpe_vocab: int, cache: Path | None = None) -> Encoded:
    """The corpus as model ids with ``tokenizer`` (``byte`` or ``bpe`` of ``bpe_vocab`` tokens)."""
    if tokenizer == "byte":
        per_byte = np.ones(257, dtype=np.int64)
        per_byte[0] = 0
        to_ids = lambda data: np.frombuffer(data, dtype=np.uint8).astype(np.uint16) + 1
        return Encoded(to_ids(corpus.train), to_ids(corpus.valid), 257, per_byte, "byte")
    folder = build_once(_key(corpus, bpe_vocab), ("tokenizer.json", "train.npy", "valid.npy"),
                        lambda out: _write_bpe(corpus, bpe_vocab, out), (cache or cache_root()) / "lm-tokens")
    from tokenizers import Tokenizer

    trained = Tokenizer.from_file(str(folder / "tokenizer.json"))
    vocab_size = trained.get_vocab_size() + 1
    lengths = np.zeros(vocab_size, dtype=np.int64)
    for token, i in trained.get_vocab().items():
        lengths[i + 1] = len(token)  # byte-level alphabet: one character per byte
    return Encoded(np.load(folder / "train.npy"), np.load(folder / "valid.npy"), vocab_size, lengths,
                   f"bpe-{bpe_vocab}", folder / "tokenizer.json")


def _key(corpus: Corpus, bpe_vocab: int) -> str:
    """What the cached BPE depends on: the files read (path, size, time) and the vocabulary size."""
    parts = [f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in corpus.files]
    digest = hashlib.sha256("\n".join([*parts, str(bpe_vocab)]).encode()).hexdigest()[:16]
    return f"bpe{bpe_vocab}-{digest}"


def _chunks(data: bytes) -> Iterator[str]:
    """The text in pieces of about ``CHUNK_BYTES``, each ending at a line break (or the end)."""
    start = 0
    while start < len(data):
        end = data.find(b"\n", start + CHUNK_BYTES)
        end = len(data) if end < 0 else end + 1
        yield data[start:end].decode("utf-8")
        start = end


def _write_bpe(corpus: Corpus, bpe_vocab: int, out: Path) -> None:
    """Train the byte-level BPE on the training split; write it and both splits' model ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=bpe_vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=False)
    bpe.train_from_iterator(_chunks(corpus.train), trainer)
    bpe.save(str(out / "tokenizer.json"))
    vocab_size = bpe.get_vocab_size() + 1
    for split, data in (("train", corpus.train), ("valid", corpus.valid)):
        pieces, batch = [], []
        for chunk in [*_chunks(data), None]:  # None: the end
            if chunk is not None:
                batch.append(chunk)
            if batch and (chunk is None or len(batch) == BATCH_CHUNKS):
                pieces += [_ids(np.asarray(e.ids, dtype=np.int64) + 1, vocab_size)
                           for e in bpe.encode_batch(batch)]
                batch = []
        np.save(out / f"{split}.npy", np.concatenate(pieces))
    (out / "source.json").write_text(json.dumps({"files": [str(p) for p in corpus.files],
                                                 "bpe_vocab": bpe_vocab}, indent=1))
