"""A language model (``--task lm``): next-token prediction on real text with the shared encoder read
left to right.

``attnbench run --task lm --mechanism softmax --seq-len 256`` trains the long-sequence tasks' encoder
(``tasks.common.sequence``) in its causal form, every mechanism in its causal form, as a decoder: the
text (``corpus.py``) becomes token ids (``tokens.py``: bytes by default), cut into consecutive windows
of ``--seq-len`` tokens, each token's target the one after it. A mechanism without a causal form is
refused, with its reason, before anything is read.

Evaluated on the whole validation split, cut the same way: the loss (nats per token), perplexity
(its exponential), bits per byte (the summed loss over the targets' UTF-8 bytes, in bits: comparable
across tokenizers), next-token accuracy, and how much a longer context helps: ``loss_ctx_C``, the
mean loss at the positions whose context holds C / 4 + 1 … C tokens (1 … 4 for C = 4; the window's
first token predicts from itself alone), up to the window's length. Beside them, what a model that
ignores context scores: the unigram model of the training split (add-one smoothed), as
``unigram_perplexity``, and the most common token's share of the targets as ``chance``.

The accuracy sweep (``attnbench scale --task lm``) judges perplexity, lower is better: a variant's
breaking length is the smallest n at which its perplexity rises more than 10 % above softmax's
(its loss more than ln 1.1 ≈ 0.095 nats per token above).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from attnbench import TaskError, register_task
from attnbench.task import SweepScore
from attnbench.validate import int_in
from tasks.common.harness import CONTEXT_COLUMNS, COST_COLUMNS, Data
from tasks.common.sequence import SETTINGS, SequenceTask, unpack
from tasks.lm import corpus, tokens

# the upper ends of the context buckets of loss_ctx_<C>: contexts (C / 4, C], the first (0, 4]
CONTEXT_BUCKETS = (4, 16, 64, 256, 1024, 4096, 16384, 65536)
CONTEXT_LOSSES = tuple(f"loss_ctx_{c}" for c in CONTEXT_BUCKETS)

RECIPE = dict(epochs=4, lr=3e-3, weight_decay=0.01, warmup_epochs=0.2, min_lr=None, label_smoothing=0.0,
              clip_grad=1.0, ema=0.0, workers=0, eval_every=1)
PRESETS: dict[str, dict[str, Any]] = {
    # the embedded corpus, bytes, the long-sequence tasks' CPU encoder; 4,096 tokens a step at every
    # length, so that every point of a sweep takes the same steps over the same tokens (222 an epoch)
    "embedded": dict(RECIPE, size="seq-tiny", seq_len=256, tokenizer="byte", bpe_vocab=4096,
                     batch_tokens=4096),
    # --data (WikiText-103-raw, say): a BPE of 8,192 tokens, a wider encoder, one epoch of 64k-token steps
    # (not run here: written for a GPU)
    "lm": dict(RECIPE, size="seq-base", seq_len=512, tokenizer="bpe", bpe_vocab=8192, batch_tokens=65_536,
               epochs=1, lr=1e-3, warmup_epochs=0.02, dropout=0.1),
}
CAUSAL_MECHANISMS = ["softmax", "linear", "performer"]
SWEEP_PRESETS: dict[str, dict[str, Any]] = {
    # CPU: the embedded preset at three context lengths, 16x apart; on 2 cores softmax reaches a validation
    # perplexity of 4.32 at 256 bytes in its 4 epochs (unigram 24.7), about 2 minutes a point at 1 thread
    "cpu": dict(seq=[64, 256, 1024], seeds=[0], args=[], mechanisms=list(CAUSAL_MECHANISMS)),
    "cuda": dict(seq=[256, 512, 1024, 2048], seeds=[0, 1, 2], mechanisms=["sdpa", *CAUSAL_MECHANISMS[1:]],
                 args=["--amp", "bf16", "--size", "seq-base", "--epochs", "8"]),
}
PERPLEXITY = SweepScore("perplexity", "validation perplexity (per token)", higher_is_better=False,
                        margin=10.0, relative=True, floor="unigram_perplexity",
                        floor_label="unigram model (no context)", best="best_perplexity", decimals=3)

COLUMNS = ["task", "mechanism", "size", "dataset", "seq_len", "tokenizer", "perplexity", "best_perplexity",
           "val_loss", "bits_per_byte", "unigram_perplexity", *CONTEXT_LOSSES, "accuracy", "best_accuracy",
           "chance", "dropout", "epochs", "seed", "steps", "step_ms", "tokens_s", "params", "softmax_params",
           "flops_per_step", "train_seq_s", "eval_seq_s", *COST_COLUMNS, "time_budget", "options",
           "mechanism_init", "backend", "vocab_size", "num_classes", "train_examples", "val_examples",
           "train_tokens", "val_tokens", *CONTEXT_COLUMNS]
CONFIG_COLUMNS = (*(s for s in SETTINGS if s != "test_examples"), "tokenizer", "val_tokens")


class TokenWindows(Dataset):
    """Consecutive windows of ``n`` tokens of one split's ids: (ids (n,), mask (n,) all True, the next
    tokens (n,)); the last window's target is the token after it, so (len - 1) // n windows."""

    def __init__(self, ids: np.ndarray, n: int) -> None:
        self.ids, self.n = ids, n

    def __len__(self) -> int:
        return max(0, (len(self.ids) - 1) // self.n)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        piece = torch.from_numpy(self.ids[i * self.n:(i + 1) * self.n + 1].astype(np.int64))
        return piece[:-1], torch.ones(self.n, dtype=torch.bool), piece[1:]

    @property
    def tokens(self) -> int:
        """Tokens predicted over all windows."""
        return len(self) * self.n


def exp(loss: float) -> float:
    """A mean loss's perplexity; inf past what a float holds (a model far worse than guessing)."""
    return math.exp(loss) if loss < 700 else math.inf


def context_bucket(n: int) -> Tensor:
    """Each position's bucket (n,): position t predicts from a context of t + 1 tokens."""
    edges = torch.tensor(CONTEXT_BUCKETS)
    return torch.bucketize(torch.arange(1, n + 1), edges)  # the first edge >= t + 1


@register_task
class LanguageModel(SequenceTask):
    name = "lm"
    summary = ("language model: next-token prediction on real text (embedded: 2012 convention speeches), "
               "causal mechanisms; perplexity, bits per byte, loss by context length")
    presets, sweep_presets, sweep_score = PRESETS, SWEEP_PRESETS, PERPLEXITY
    columns, config_columns = COLUMNS, CONFIG_COLUMNS
    metrics, headline = ("val_loss", "perplexity", "bits_per_byte", "accuracy"), "perplexity"
    counted = ("train_examples", "val_examples")
    data_help = corpus.LAYOUT
    per_token, causal = True, True

    @classmethod
    def add_task_arguments(cls, g: argparse._ArgumentGroup) -> None:
        super().add_task_arguments(g)
        g.add_argument("--tokenizer", choices=tokens.TOKENIZERS,
                       help="byte: every UTF-8 byte a token; bpe: a byte-level BPE trained on the training "
                            f"split (cached) ({cls._defaults('tokenizer')})")
        g.add_argument("--bpe-vocab", type=int_in(257, 2**17),
                       help=f"tokens of the BPE (--tokenizer bpe) ({cls._defaults('bpe_vocab')})")
        g.add_argument("--batch-tokens", type=int_in(1, 2**24),
                       help="tokens per step: the batch is this over --seq-len sequences, so that every "
                            f"length takes the same steps over the same tokens; --batch-size overrides it "
                            f"({cls._defaults('batch_tokens')})")

    def configure(self, args: argparse.Namespace) -> None:
        super().configure(args)
        self.tokenizer, self.bpe_vocab = self.pick("tokenizer"), self.pick("bpe_vocab")
        if self.tokenizer not in tokens.TOKENIZERS:
            raise TaskError(f"--tokenizer {self.tokenizer!r}: valid choices: {', '.join(tokens.TOKENIZERS)}")
        if args.bpe_vocab is not None and self.tokenizer != "bpe":
            raise TaskError("--bpe-vocab sizes the BPE: add --tokenizer bpe")
        if args.batch_size is None:  # a batch of sequences holding --batch-tokens tokens
            self.recipe.batch_size = max(1, self.pick("batch_tokens") // self.seq_len)

    def load_data(self) -> Data:
        text = corpus.embedded_corpus() if self.args.data is None else corpus.read_corpus(
            self.args.data.expanduser())
        self.encoded = tokens.encode(text, self.tokenizer, self.bpe_vocab)
        self.vocab_size = self.num_classes = self.encoded.vocab_size
        train, valid = (TokenWindows(ids, self.seq_len) for ids in (self.encoded.train, self.encoded.valid))
        for split, windows, ids in (("training", train, self.encoded.train), ("validation", valid,
                                                                              self.encoded.valid)):
            if len(windows) == 0:
                raise TaskError(f"{text.name}: the {split} split holds {len(ids)} tokens, fewer than one "
                                f"window of --seq-len {self.seq_len} + 1; lower --seq-len")
        counts = np.bincount(self.encoded.train, minlength=self.vocab_size)
        smoothed = (counts + 1.0) / (counts.sum() + self.vocab_size - 1)  # add-one over the real ids
        smoothed[0] = 1.0  # padding: never a target
        self.unigram_nll = torch.from_numpy(-np.log(smoothed))  # (V,) nats
        self.majority = int(counts[1:].argmax()) + 1
        self.token_bytes = torch.from_numpy(self.encoded.bytes_per_token)
        return Data(text.name, train, valid, root=None if self.args.data is None else self.args.data,
                    description=f"{text.description}; {self.encoded.name} tokens: "
                                f"{len(self.encoded.train):,} train, {len(self.encoded.valid):,} validation")

    # ---- evaluation and the record --------------------------------------------------------------

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """Loss, perplexity, bits per byte, accuracy and the loss per context bucket over every window
        of the validation split; the unigram model and the majority token on the same targets."""
        n = self.seq_len
        bucket = context_bucket(n).to(self.device)  # (n,)
        bytes_per, unigram = self.token_bytes.to(self.device), self.unigram_nll.to(self.device)  # (V,) each
        per_bucket = torch.zeros(len(CONTEXT_BUCKETS), dtype=torch.float64, device=self.device)
        # summed over the targets: loss, hits, tokens, bytes, the unigram model's loss, the majority's hits
        totals = torch.zeros(6, dtype=torch.float64, device=self.device)
        windows = 0
        for batch in self.val_loader:
            ids, mask, target = unpack(self.to_device(batch))  # each (B, n)
            with self.autocast():
                logits = model(ids, torch.zeros_like(ids), mask)  # (B, n, V)
            loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), target.flatten(),
                                               reduction="none").view_as(target).double()  # (B, n)
            per_bucket.index_add_(0, bucket, loss.sum(0))
            totals += torch.stack([loss.sum(), (logits.argmax(-1) == target).sum().double(),
                                   torch.tensor(target.numel(), dtype=torch.float64, device=self.device),
                                   bytes_per[target].sum().double(), unigram[target].sum().double(),
                                   (target == self.majority).sum().double()])
            windows += len(ids)
        values = self.reduce(*totals.tolist(), *per_bucket.tolist(), windows)
        loss, hits, count, nbytes, unigram_loss, majority = values[:6]
        positions = torch.bincount(bucket, minlength=len(CONTEXT_BUCKETS)).tolist()  # per window
        windows = values[-1]
        mean = loss / count
        self.chance = 100 * majority / count
        return {"val_loss": mean, "perplexity": exp(mean), "bits_per_byte": loss / math.log(2) / nbytes,
                "accuracy": 100 * hits / count, "unigram_perplexity": exp(unigram_loss / count),
                "chance": self.chance, "items": int(windows), "val_tokens": int(count),
                **{name: (total / (p * windows) if p else math.nan)
                   for name, total, p in zip(CONTEXT_LOSSES, values[6:-1], positions, strict=True)}}

    def eval_batch_size(self) -> int:
        """The training batch: logits over the whole vocabulary at every token are the memory."""
        return self.recipe.batch_size

    def config(self) -> dict[str, Any]:
        return {**super().config(), "tokenizer": self.encoded.name}

    def row(self, metrics: dict[str, Any]) -> dict[str, Any]:
        # the shared sequence row names its loss test_loss (not a column here: this is val_loss)
        row = super().row({**metrics, "test_loss": metrics["val_loss"]})
        evaluated = [h["perplexity"] for h in self.history if math.isfinite(h.get("perplexity", math.nan))]
        return {**row, "tokenizer": self.encoded.name, "perplexity": round(metrics["perplexity"], 4),
                "best_perplexity": round(min([*evaluated, metrics["perplexity"]]), 4),
                "val_loss": round(metrics["val_loss"], 5),
                "bits_per_byte": round(metrics["bits_per_byte"], 5),
                "unigram_perplexity": round(metrics["unigram_perplexity"], 4),
                **{k: round(metrics[k], 5) for k in CONTEXT_LOSSES}, "val_tokens": metrics["val_tokens"],
                "train_tokens": len(self.encoded.train)}

    def format_scores(self, values: Mapping[str, Any]) -> str:
        return (f"perplexity {values['perplexity']:.3f}, {values['bits_per_byte']:.3f} bits/byte, "
                f"next-token accuracy {values['accuracy']:.1f} % (unigram perplexity "
                f"{values['unigram_perplexity']:.2f})")

    def describe_model(self) -> str:
        tokenizer = getattr(self, "encoded", None)
        what = tokenizer.name if tokenizer is not None else self.tokenizer
        return f"causal {self.size} decoder on {self.seq_len} tokens ({what})"

    def meta(self) -> dict[str, Any]:
        file = self.encoded.tokenizer_file
        return {**super().meta(), "tokenizer": self.encoded.name,
                "tokenizer_file": str(file) if file is not None else None,
                "context_buckets": list(CONTEXT_BUCKETS), "train_tokens": len(self.encoded.train),
                "valid_tokens": len(self.encoded.valid),
                "batch_tokens": self.recipe.batch_size * self.seq_len}
