"""Sequence classification on one shared encoder: the base of the long-sequence tasks (mqar,
listops, seqimage), whose question is how accuracy holds up as sequences grow.

Every such task trains the same model, the BERT-layout ``TextEncoder`` (``tasks.common.text_encoder``)
with the mechanism in every layer, the padding mask passed to it and ``grid=None``, with the same
hyper-parameters and seeds for every mechanism; only the mechanism changes. A subclass supplies:

    load_data() -> Data(name, train, val=test, …)   items (ids (N,) long, mask (N,) bool, target),
                                                    as tuples or dicts with those keys (``SequenceSet``
                                                    holds them as tensors, ``sequence_data`` builds
                                                    the splits, a validation split among them where
                                                    the task has one); N = ``self.seq_len``
    vocab_size, num_classes                         set in ``configure`` or ``load_data``
    per_token (ClassVar)                            False: one class id per sequence; True: a label
                                                    per position (N,), ``IGNORE`` (-100) where none
    causal                                          True: the encoder reads left to right (each
                                                    mechanism's causal form, a causal convolution;
                                                    per token only), set in ``configure``; a mechanism
                                                    without a causal form is refused before any data
    chance                                          % of guessing (default 100 / num_classes)
    presets, sweep_presets                          recipe and ``size``/``seq_len`` defaults; the
                                                    accuracy sweep's defaults per device kind

``--seq-len N`` is the length the model sees (positions, padding included); ``--dropout`` the
encoder's dropout (a preset's ``dropout``, else the size's). Loss and accuracy count only labelled
positions. Each run's row holds what the accuracy sweep
(``attnbench scale --task``) reads: accuracy (final) and best_accuracy (best evaluation) and
chance in %, steps, step_ms, tokens_s, peak memory, params beside softmax_params (the same model with
softmax attention: LRA's rule that a mechanism may not win by parameters; over 10 % more is
warned about) and flops_per_step (3 × the forward FLOPs of one global batch, FlopCounterMode: matmuls
only).

A task with a validation split (``validation_split = True``: mqar, listops, seqimage) passes it to
``sequence_data``: a split held out from training and apart from the test split, evaluated once,
after training, into ``val_accuracy`` (``val_examples`` sequences, ``--limit-val`` applies). It
scores nothing the row reports as the result; the accuracy sweep's tuning picks each point's
learning rate by it (``attnbench.sweeps.tuning``), never by the test split. Each task's docstring says
how its split is drawn.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, default_collate
from torch.utils.flop_counter import FlopCounterMode

from attnbench import TaskError, get_mechanism
from attnbench.validate import float_in, int_in
from tasks.common.harness import CONTEXT_COLUMNS, COST_COLUMNS, Data, TrainingTask
from tasks.common.subset import smoke_subset
from tasks.common.text_encoder import SIZES, build_encoder, count_parameters
from tasks.common.trainer import Loss

IGNORE = -100  # a position without a label (cross-entropy's ignore_index)
Array = Tensor | np.ndarray
Split = tuple[Array, Array | None, Array]  # one split for ``SequenceSet``: ids, mask (or None), targets
PARAMS_TOLERANCE = 0.10  # LRA: a mechanism's model may have at most ~10 % more parameters than softmax's


# the settings every sequence task's row holds (``attnbench.results.config_columns``)
SETTINGS = ("num_classes", "vocab_size", "seq_len", "dropout", "test_examples")


def sequence_table(settings: tuple[str, ...] = (), measured: tuple[str, ...] = ()
                   ) -> tuple[list[str], tuple[str, ...]]:
    """A task's (``columns``, ``config_columns``), its own ``settings`` named once: they are
    configuration, ``measured`` columns (counts of what the data held) are not; both come after
    ``seq_len``."""
    return sequence_columns(*settings, *measured), (*SETTINGS, *settings)


def sequence_columns(*own: str) -> list[str]:
    """The results table's columns, with the task's own columns (``own``) after ``seq_len``."""
    return ["task", "mechanism", "size", "dataset", "seq_len", *own, "dropout", "epochs", "seed", "accuracy",
            "best_accuracy", "chance", "test_loss", "val_accuracy", "val_loss", "steps", "step_ms",
            "tokens_s", "params", "softmax_params", "flops_per_step", "train_seq_s", "eval_seq_s",
            *COST_COLUMNS, "time_budget", "options", "mechanism_init", "backend", "vocab_size", "num_classes",
            "train_examples", "test_examples", "val_examples", *CONTEXT_COLUMNS]


class SequenceSet(Dataset):
    """Sequences held as tensors: ids (S, N), mask (S, N) bool or None (every token real), targets
    (S,) or (S, N), given as tensors or numpy arrays (shared, not copied); kept in the integer type
    given (int32 or narrower: 16k-token sets stay small) and handed out as long."""

    def __init__(self, ids: Array, mask: Array | None, targets: Array) -> None:
        ids, targets = torch.as_tensor(ids), torch.as_tensor(targets)
        mask = None if mask is None else torch.as_tensor(mask)
        shapes_agree = mask is None or mask.shape == ids.shape
        if ids.dim() != 2 or not shapes_agree or targets.shape[0] != ids.shape[0]:
            raise ValueError(f"SequenceSet: ids and mask must both be (S, N) and targets (S,) or (S, N); got "
                             f"{tuple(ids.shape)}, {None if mask is None else tuple(mask.shape)}, "
                             f"{tuple(targets.shape)}")
        self.ids, self.targets = ids, targets
        self.mask = mask.bool() if mask is not None else None

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        ids = self.ids[i].long()
        mask = self.mask[i] if self.mask is not None else torch.ones_like(ids, dtype=torch.bool)
        return ids, mask, self.targets[i].long()


def padded(rows: Sequence[Sequence[int]], n: int, pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Token lists, each at most ``n`` long, as ids (S, n) right-padded with ``pad_id`` and mask (S, n)."""
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.bool)
    for i, row in enumerate(rows):
        if len(row) > n:
            raise ValueError(f"a sequence of {len(row)} tokens does not fit in {n}")
        ids[i, :len(row)] = torch.as_tensor(row, dtype=torch.long)
        mask[i, :len(row)] = True
    return ids, mask


def unpack(batch: Any) -> tuple[Tensor, Tensor, Tensor]:
    """(ids, mask, target) of a batch of tuples or of dicts."""
    if isinstance(batch, Mapping):
        return batch["ids"], batch["mask"], batch["target"]
    ids, mask, target = batch
    return ids, mask, target


class SequenceTask(TrainingTask):
    """A sequence task on the shared encoder (see the module's docstring)."""

    sizes = list(SIZES)
    metrics, headline, unit = ("test_loss", "accuracy"), "accuracy", "seq"
    counted = ("train_examples", "test_examples")
    columns, config_columns = sequence_table()  # a task with settings of its own: sequence_table(those)
    init_samples, init_unit = 16, "sequences"
    per_token: ClassVar[bool] = False
    causal: bool = False  # a task with a causal form sets it in configure
    pad_id: ClassVar[int] = 0
    chance: float | None = None  # None: 100 / num_classes
    # the accuracy sweep's defaults: {"cpu": {...}, "cuda": {...}}, each with "seq" (list[int]),
    # "mechanisms" (list[str]), "seeds" (list[int]) and "args" (extra `run` flags, list[str])
    sweep_presets: ClassVar[dict[str, dict[str, Any]]] = {}

    vocab_size: int
    num_classes: int

    @classmethod
    def add_task_arguments(cls, g: argparse._ArgumentGroup) -> None:
        g.add_argument("--seq-len", type=int_in(2, 65536), metavar="N",
                       help="tokens per sequence the model sees, padding included "
                            f"({cls._defaults('seq_len')})")
        g.add_argument("--dropout", type=float_in(0, 1, hi_open=True),
                       help="dropout of the encoder (default: the preset's, else the size's: 0.1)")

    def configure(self, args: argparse.Namespace) -> None:
        """``self.seq_len``; subclasses call this first, then check their own options."""
        if get_mechanism(args.mechanism).needs_grid:
            raise TaskError(f"mechanism {args.mechanism!r} needs a 2-D grid of tokens; {self.name}'s tokens "
                            "are 1-D sequences")
        self.seq_len: int = self.pick("seq_len")
        if self.seq_len < 2:
            raise TaskError(f"--seq-len must be >= 2, got {self.seq_len}")
        dropout = args.dropout if args.dropout is not None else self.preset.get("dropout")
        self.dropout: float = SIZES[self.size].dropout if dropout is None else dropout

    def sequence_data(self, name: str, train: Split, test: Split, root: Path | None = None,
                      description: str = "", val: Split | None = None) -> Data:
        """The task's ``Data``: the train and test splits, each given as (ids, mask, targets), as
        ``SequenceSet``s; ``val``, the validation split (``validation``), where the task has one.
        An empty split is a TaskError now, not a division by zero after training."""
        given = [("train", train), ("test", test), *([("validation", val)] if val is not None else [])]
        for split, (ids, _, _) in given:
            if len(ids) == 0:
                raise TaskError(f"{self.name}: the {split} split of {name} holds no sequences (too few "
                                f"distinct sequences at these settings: raise the vocabulary or --seq-len)")
        self.validation = SequenceSet(*val) if val is not None else None
        return Data(name, SequenceSet(*train), SequenceSet(*test), root=root, description=description)

    def check_model(self) -> None:
        ids = torch.ones(2, 8, dtype=torch.long)
        mask = torch.ones_like(ids, dtype=torch.bool)
        mask[1, 5:] = False
        self.try_model(lambda size: build_encoder(size, self.mechanism, 16, 3, 8, self.options,
                                                  per_token=self.per_token, causal=self.causal),
                       [ids, torch.zeros_like(ids), mask],
                       "mix 1-D padded sequences" + (" causally" if self.causal else ""))

    def run_name(self) -> str:
        return f"{self.name}-{self.mechanism}-{self.size}-n{self.seq_len}"

    def describe_model(self) -> str:
        return f"{self.size} encoder on {self.seq_len} tokens"

    # ---- model and loss -------------------------------------------------------------------------

    def encoder(self, mechanism: str, options: Mapping[str, Any] | None = None,
                causal: bool | None = None) -> nn.Module:
        """The task's encoder with ``mechanism`` (causal: the task's form unless given)."""
        causal = self.causal if causal is None else causal
        return build_encoder(self.size, mechanism, self.vocab_size, self.num_classes, self.seq_len, options,
                             self.pad_id, per_token=self.per_token, causal=causal)

    def build_model(self) -> nn.Module:
        model = self.encoder(self.mechanism, self.options)
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = self.dropout
        with torch.device("meta"):  # counted without memory; the causal form has the same parameters
            self.softmax_params = count_parameters(self.encoder("softmax", causal=False))
        params = count_parameters(model)
        if params > (1 + PARAMS_TOLERANCE) * self.softmax_params:
            self.log(f"warning: {self.mechanism}'s model has {params:,} parameters, "
                     f"{params / self.softmax_params - 1:.0%} more than softmax's {self.softmax_params:,} "
                     f"(LRA allows about {PARAMS_TOLERANCE:.0%})")
        return model

    def logits(self, net: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
        """(logits, targets) at the labelled positions: (B, classes) and (B,), or per token (P, classes)
        and (P,) at the P positions whose label is not ``IGNORE``."""
        ids, mask, target = unpack(batch)
        segments = torch.zeros_like(ids)
        if not self.per_token:
            return net(ids, segments, mask), target
        at = target != IGNORE
        return net(ids, segments, mask, at), target[at]

    def loss(self, net: nn.Module, batch: Any) -> Loss:
        logits, target = self.logits(net, batch)
        loss = nn.functional.cross_entropy(logits.float(), target,
                                           label_smoothing=self.recipe.label_smoothing)
        return loss, len(unpack(batch)[0])

    def config(self) -> dict[str, Any]:
        return {"seq_len": self.seq_len, "vocab_size": self.vocab_size, "num_classes": self.num_classes,
                "dropout": self.dropout}

    def init_inputs(self, model: nn.Module) -> tuple[nn.Module, tuple[Tensor, Tensor, Tensor]]:
        """A seeded sample of training sequences: (ids, segments, mask), each (B, N)."""
        train = self.data.train
        pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.recipe.seed))
        ids, mask, _ = unpack(default_collate([train[i] for i in pick[:self.init_samples].tolist()]))
        device = next(model.parameters()).device
        return model, (ids.to(device), torch.zeros_like(ids, device=device), mask.to(device))

    # ---- evaluation and the record --------------------------------------------------------------

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """Accuracy (%) and mean loss over the labelled positions of the whole test split."""
        return self.score(model, self.val_loader)

    def score(self, model: nn.Module, loader: Iterable) -> dict[str, Any]:
        """Accuracy (%) and mean loss over the labelled positions of ``loader``'s sequences."""
        hits = scored = loss_sum = sequences = 0.0
        for batch in loader:
            batch = self.to_device(batch)
            with self.autocast():
                logits, target = self.logits(model, batch)
            logits = logits.float()
            loss_sum += nn.functional.cross_entropy(logits, target, reduction="sum").item()
            hits += (logits.argmax(-1) == target).sum().item()
            scored += len(target)
            sequences += len(unpack(batch)[0])
        hits, scored, loss_sum, sequences = self.reduce(hits, scored, loss_sum, sequences)
        return {"accuracy": 100 * hits / scored, "test_loss": loss_sum / scored, "items": int(sequences)}

    def validate(self) -> dict[str, Any]:
        """The final model on the validation split (``--limit-val`` applies), or nothing where the
        task has none: ``val_accuracy`` (%), ``val_loss``, ``val_examples``."""
        held_out = getattr(self, "validation", None)
        if held_out is None:
            return {}
        model = self.trainer.model
        was_training = model.training
        model.eval()
        held_out, _ = smoke_subset(held_out, self.limits.limit_val, self.recipe.seed, "validation")
        loader = self.make_eval_loader(held_out, None)
        try:
            with torch.no_grad():
                scores = self.score(model, loader)
        finally:
            model.train(was_training)
        return {"val_accuracy": round(scores["accuracy"], 3), "val_loss": round(scores["test_loss"], 4),
                "val_examples": scores["items"]}

    def chance_percent(self) -> float:
        return self.chance if self.chance is not None else 100 / self.num_classes

    @torch.no_grad()
    def flops_per_step(self) -> int:
        """3 × the forward FLOPs of one global batch (backward ≈ 2 × forward), counted on one training
        sequence by FlopCounterMode (matmuls and attention kernels, not elementwise work)."""
        model = self.trainer.model
        was_training = model.training
        model.eval()
        batch = self.to_device(default_collate([self.data.train[0]]))
        try:
            with FlopCounterMode(display=False) as counter:
                self.logits(model, batch)
        finally:
            model.train(was_training)
        return 3 * counter.get_total_flops() * self.recipe.batch_size * self.dist.world_size

    def row(self, metrics: dict[str, Any]) -> dict[str, Any]:
        steps = self.trainer.steps
        train_s = sum(h["train_s"] for h in self.history)
        tokens = steps * self.recipe.batch_size * self.dist.world_size * self.seq_len
        evaluated = [h["accuracy"] for h in self.history if math.isfinite(h.get("accuracy", math.nan))]
        return {"seq_len": self.seq_len, "accuracy": round(metrics["accuracy"], 3),
                "best_accuracy": round(max([*evaluated, metrics["accuracy"]]), 3),
                "chance": round(self.chance_percent(), 3), "test_loss": round(metrics["test_loss"], 4),
                "steps": steps, "step_ms": round(1000 * train_s / steps, 2) if steps else math.nan,
                "tokens_s": round(tokens / train_s, 1) if train_s > 0 else math.nan,
                "softmax_params": self.softmax_params, "flops_per_step": self.flops_per_step(),
                "vocab_size": self.vocab_size, "num_classes": self.num_classes, "dropout": self.dropout,
                **self.validate()}

    def format_scores(self, values: Mapping[str, Any]) -> str:
        return f"accuracy {values['accuracy']:.2f} % (chance {self.chance_percent():.3g} %)"

    def meta(self) -> dict[str, Any]:
        return {"seq_len": self.seq_len, "vocab_size": self.vocab_size, "num_classes": self.num_classes,
                "chance": self.chance_percent(), "per_token": self.per_token, "causal": self.causal,
                "softmax_params": self.softmax_params}
