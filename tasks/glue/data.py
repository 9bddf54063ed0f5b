"""GLUE data: the official distribution layout, a subword tokenizer, and padded batches.

``--data DIR`` holds the nine task folders as the GLUE download script writes them
(``CoLA/``, ``SST-2/``, ``MRPC/``, ``QQP/``, ``STS-B/``, ``MNLI/``, ``QNLI/``, ``RTE/``,
``WNLI/``), each with ``train.tsv`` and ``dev.tsv`` (MNLI: ``dev_matched.tsv`` and
``dev_mismatched.tsv``). Every task's columns are found by their header names, except CoLA's,
whose files have no header (source, label, original annotation, sentence). Files are read
as tab-separated with no quoting (QQP and MNLI sentences hold stray quote characters) and a
UTF-8 byte-order mark is tolerated (MRPC's files inherit one from the Microsoft release).

Without ``--data``, the embedded set (``embedded.py``) is written once into the SST-2 layout in
the cache and read through the very same code.

Rows too short for the columns a task needs, or without a label (QQP's few broken lines), are
skipped with a warning and counted; an unknown label value, a score that is not a finite number,
and a file that is not UTF-8 tab-separated text (Latin-1, binary, a field over csv's size limit)
are errors naming the file and the line.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from torch.utils.data import Dataset, Sampler

from attnbench import TaskError


@dataclasses.dataclass(frozen=True)
class GlueTask:
    """One GLUE task: where its files are, which columns it reads, its labels and metrics."""

    name: str  # as on the command line: "sst2"
    folder: str  # as in the GLUE layout: "SST-2"
    text_a: str | int  # column name, or index for headerless files (CoLA)
    text_b: str | int | None  # the second sentence of pair tasks
    label: str | int
    labels: tuple[str, ...] | None  # the label values in class order; None: a regression score
    metrics: tuple[str, ...]  # as GLUE reports them (see glue.compute_metrics)
    dev_splits: tuple[str, ...] = ("dev",)
    header: bool = True
    min_fields: int = 0  # headerless files: fields every row must have

    @property
    def regression(self) -> bool:
        return self.labels is None

    @property
    def num_outputs(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    def columns(self) -> list[str | int]:
        return [c for c in (self.text_a, self.text_b, self.label) if c is not None]


TASKS: dict[str, GlueTask] = {t.name: t for t in (
    # CoLA: headerless; source code, label, original annotation ("*" or empty), sentence
    GlueTask("cola", "CoLA", 3, None, 1, ("0", "1"), ("mcc",), header=False, min_fields=4),
    GlueTask("sst2", "SST-2", "sentence", None, "label", ("0", "1"), ("accuracy",)),
    GlueTask("mrpc", "MRPC", "#1 String", "#2 String", "Quality", ("0", "1"), ("f1", "accuracy")),
    GlueTask("qqp", "QQP", "question1", "question2", "is_duplicate", ("0", "1"), ("f1", "accuracy")),
    GlueTask("stsb", "STS-B", "sentence1", "sentence2", "score", None, ("pearson", "spearman")),
    GlueTask("mnli", "MNLI", "sentence1", "sentence2", "gold_label",
             ("entailment", "neutral", "contradiction"), ("accuracy",),
             dev_splits=("dev_matched", "dev_mismatched")),
    GlueTask("qnli", "QNLI", "question", "sentence", "label", ("entailment", "not_entailment"),
             ("accuracy",)),
    GlueTask("rte", "RTE", "sentence1", "sentence2", "label", ("entailment", "not_entailment"),
             ("accuracy",)),
    GlueTask("wnli", "WNLI", "sentence1", "sentence2", "label", ("0", "1"), ("accuracy",)),
)}
LAYOUT = ("the official GLUE layout: DIR/<Task>/train.tsv and dev.tsv, <Task> one of "
          + ", ".join(t.folder for t in TASKS.values()) + " (MNLI: dev_matched.tsv and dev_mismatched.tsv)")


def get_task(name: str) -> GlueTask:
    """The GLUE task called ``name``, or a TaskError listing the valid names."""
    try:
        return TASKS[name]
    except KeyError:
        raise TaskError(f"unknown GLUE task {name!r}; valid choices: {', '.join(TASKS)}") from None


# ---- reading the layout ------------------------------------------------------------------------


@dataclasses.dataclass
class Examples:
    """One split: its sentences (or sentence pairs) and labels (class indices, or scores)."""

    path: Path
    text_a: list[str]
    text_b: list[str] | None
    labels: list[float] | list[int]
    skipped: int = 0  # rows too short or unlabelled

    def __len__(self) -> int:
        return len(self.labels)


def task_folder(root: Path, task: GlueTask) -> Path:
    """``root/<Task>``, or ``root`` itself when it is that task's folder; else a clear TaskError."""
    if not root.exists():
        raise TaskError(f"--data {root}: no such folder; expected {LAYOUT}")
    if not root.is_dir():
        raise TaskError(f"--data {root}: not a folder; expected {LAYOUT}")
    if root.name == task.folder and (root / "train.tsv").is_file():
        return root
    folder = root / task.folder
    if not folder.is_dir():
        present = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name in
                         {t.folder for t in TASKS.values()})
        found = f" (it holds {', '.join(present)})" if present else ""
        raise TaskError(f"--data {root}: no {task.folder}/ folder in it for --glue-task {task.name}{found}; "
                        f"expected {LAYOUT}")
    return folder


def read_split(folder: Path, task: GlueTask, split: str) -> Examples:
    """``folder/<split>.tsv`` of ``task`` as Examples; TaskError for a missing file or wrong columns."""
    path = folder / f"{split}.tsv"
    if not path.is_file():
        raise TaskError(f"no {task.folder}/{path.name} in {folder.parent}; expected {LAYOUT}")
    rows = _read_tsv(path)
    if not rows:
        raise TaskError(f"{path}: the file is empty")
    if task.header:
        header = [h.strip() for h in rows[0]]
        missing = [str(c) for c in task.columns() if c not in header]
        if missing:
            raise TaskError(f"{path}: no column {', '.join(missing)} in its header ({', '.join(header)}); "
                            f"GLUE {task.folder} has {', '.join(map(str, task.columns()))}")
        index = {c: header.index(c) for c in task.columns()}
        body, first_line = rows[1:], 2
    else:
        if len(rows[0]) != task.min_fields:  # CoLA's test.tsv, say, has a header and two columns
            raise TaskError(f"{path}: {len(rows[0])} columns in its first row; GLUE {task.folder}'s "
                            f"train and dev files have {task.min_fields} tab-separated columns and no header "
                            "(source, label, original annotation, sentence)")
        index = {c: int(c) for c in task.columns()}
        body, first_line = rows, 1
    need = max(index.values()) + 1
    text_a: list[str] = []
    text_b: list[str] = []
    labels: list = []
    skipped, first_skipped = 0, None
    for line, row in enumerate(body, start=first_line):
        raw = row[index[task.label]].strip() if len(row) >= need else ""
        if len(row) < need or raw in ("", "-"):
            skipped += 1
            first_skipped = first_skipped or line
            continue
        labels.append(_label(raw, task, path, line))
        text_a.append(row[index[task.text_a]])
        if task.text_b is not None:
            text_b.append(row[index[task.text_b]])
    if skipped:
        print(f"warning: {path}: skipped {skipped} row(s) too short or without a label (first: line "
              f"{first_skipped})", file=sys.stderr)
    if not labels:
        raise TaskError(f"{path}: no labelled rows in it")
    return Examples(path, text_a, text_b if task.text_b is not None else None, labels, skipped)


def _read_tsv(path: Path) -> list[list[str]]:
    """The rows of a GLUE file: UTF-8 (a byte-order mark tolerated), tab-separated, no quoting.
    Bytes that are not UTF-8 text, a NUL byte or a field over csv's limit are a TaskError naming
    the file and the line."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TaskError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise TaskError(f"{path}, line {line}: byte 0x{data[exc.start]:02x} is not UTF-8 text; GLUE files "
                        "are UTF-8 tab-separated text") from None
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    try:
        return list(reader)
    except csv.Error as exc:  # a NUL byte (a binary file), a field longer than csv.field_size_limit()
        raise TaskError(f"{path}, line {reader.line_num}: {exc}; GLUE files are tab-separated "
                        "text") from None


def _label(raw: str, task: GlueTask, path: Path, line: int) -> int | float:
    if task.labels is None:
        try:
            score = float(raw)
        except ValueError:
            raise TaskError(f"{path}, line {line}: score {raw!r} is not a number") from None
        if not math.isfinite(score):  # NaN would make the loss NaN
            raise TaskError(f"{path}, line {line}: score {raw!r} is not a finite number")
        return score
    try:
        return task.labels.index(raw)
    except ValueError:
        raise TaskError(f"{path}, line {line}: label {raw!r} is not one of GLUE {task.folder}'s "
                        f"{', '.join(task.labels)}") from None


def read_task(root: Path, task: GlueTask) -> tuple[Examples, dict[str, Examples]]:
    """(train split, {dev split name: dev split}) of ``task`` under ``root``."""
    folder = task_folder(root, task)
    return read_split(folder, task, "train"), {s: read_split(folder, task, s) for s in task.dev_splits}


# ---- tokenizer ---------------------------------------------------------------------------------

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD_NAMES = ("[PAD]", "<pad>")


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> Tokenizer:
    """A BERT-style uncased WordPiece tokenizer trained on ``texts``: [CLS] a [SEP] (b [SEP])."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIALS),
                                        show_progress=False)
    tok.train_from_iterator(texts, trainer, length=len(texts))
    _bert_template(tok)
    return tok


def _bert_template(tok: Tokenizer) -> None:
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])


def load_tokenizer(path: Path) -> Tokenizer:
    """A ``tokenizer.json`` (as saved by Hugging Face tokenizers) or a BERT ``vocab.txt`` (uncased)."""
    if not path.is_file():
        raise TaskError(f"--tokenizer {path}: no such file; expected a tokenizer.json or a vocab.txt")
    if path.suffix == ".json":
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception for bad files
            raise TaskError(f"--tokenizer {path}: not a Hugging Face tokenizer.json ({exc})") from None
        tok.no_padding()  # batches are padded by collate
        if tok.post_processor is None:
            _require_tokens(tok, path, ("[CLS]", "[SEP]"))
            _bert_template(tok)
    else:
        try:
            tok = Tokenizer(models.WordPiece.from_file(str(path), unk_token="[UNK]"))
        except Exception as exc:
            raise TaskError(f"--tokenizer {path}: not a WordPiece vocab.txt, one token per line "
                            f"({exc})") from None
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        _require_tokens(tok, path, ("[PAD]", "[UNK]", "[CLS]", "[SEP]"))
        _bert_template(tok)
    pad_id(tok, path)
    return tok


def _require_tokens(tok: Tokenizer, path: Path, tokens: Sequence[str]) -> None:
    missing = [t for t in tokens if tok.token_to_id(t) is None]
    if missing:
        raise TaskError(f"--tokenizer {path}: no {', '.join(missing)} token in its vocabulary")


def pad_id(tok: Tokenizer, path: Path | str = "the tokenizer") -> int:
    """The id of the padding token ([PAD] or <pad>)."""
    for name in PAD_NAMES:
        if tok.token_to_id(name) is not None:
            return tok.token_to_id(name)
    raise TaskError(f"--tokenizer {path}: no padding token ({' or '.join(PAD_NAMES)}) in its vocabulary")


# ---- encoding and batches ----------------------------------------------------------------------


class EncodedSplit(Dataset):
    """Token ids, segment ids and labels of one split, unpadded (batches pad to their longest)."""

    def __init__(self, examples: Examples, tok: Tokenizer, max_len: int) -> None:
        tok.enable_truncation(max_length=max_len, strategy="longest_first")
        inputs = (list(zip(examples.text_a, examples.text_b, strict=True)) if examples.text_b is not None
                  else examples.text_a)
        encodings = tok.encode_batch(inputs)
        self.ids = [e.ids for e in encodings]
        self.type_ids = [e.type_ids for e in encodings]
        self.truncated = sum(bool(e.overflowing) for e in encodings)
        self.labels = list(examples.labels)
        self.regression = isinstance(self.labels[0], float)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def targets(self) -> list[float] | list[int] | None:
        """Each example's class, for a smoke run's stratified sample; None for a regression's scores."""
        return None if self.regression else self.labels

    def __getitem__(self, i: int) -> tuple[list[int], list[int], float | int]:
        return self.ids[i], self.type_ids[i], self.labels[i]


class Collate:
    """Pad a batch to its longest sequence: (ids (B, N), type_ids (B, N), mask (B, N) bool, labels (B,), 0).

    ``mask`` is True at real tokens; the trailing 0 counts samples skipped (the harness's convention).
    """

    def __init__(self, pad: int, regression: bool) -> None:
        self.pad, self.regression = pad, regression

    def __call__(self, batch: list[tuple[list[int], list[int], float | int]]) -> tuple:
        n = max(len(ids) for ids, _, _ in batch)
        ids = torch.full((len(batch), n), self.pad, dtype=torch.long)
        types = torch.zeros((len(batch), n), dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.bool)
        for i, (tokens, segments, _) in enumerate(batch):
            ids[i, :len(tokens)] = torch.tensor(tokens)
            types[i, :len(segments)] = torch.tensor(segments)
            mask[i, :len(tokens)] = True
        dtype = torch.float32 if self.regression else torch.long
        labels = torch.tensor([y for _, _, y in batch], dtype=dtype)
        return ids, types, mask, labels, 0


class BucketedBatches(Sampler[list[int]]):
    """Training batches of similar lengths: each epoch the examples are shuffled, cut into pools of
    ``POOL`` batches, sorted by length within each pool, batched, and the batches shuffled again.
    Less padding, and mechanisms that run per length of real tokens see few lengths per batch.
    Batches are dealt to processes round-robin; the last partial batch is dropped. The order
    depends on (seed, epoch) only, so --resume repeats it."""

    POOL = 50

    def __init__(self, lengths: list[int], batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1) -> None:
        super().__init__()
        self.lengths, self.batch_size, self.seed = lengths, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator()
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed * 100_003 + epoch * 1009)

    def __len__(self) -> int:
        return len(self.lengths) // self.batch_size // self.world_size

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        pool = self.POOL * self.batch_size
        batches = []
        for start in range(0, len(order), pool):
            chunk = sorted(order[start:start + pool], key=self.lengths.__getitem__)
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        batches = [b for b in batches if len(b) == self.batch_size]
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=self.generator).tolist()]
        mine = shuffled[self.rank::self.world_size]
        return iter(mine[:len(self)])
