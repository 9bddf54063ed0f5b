"""The training harness every task shares: one epoch loop, in the shape of torchvision's
``references/classification/train.py``.

A task subclasses ``TrainingTask`` and supplies only what is its own:

    load_data()          -> Data(name, train, val, collate)   its data sets (val: one, or named splits)
    build_model()        -> nn.Module                          its model, mechanism inside
    loss(net, batch)     -> (loss, items)                      one training batch (on the device)
    evaluate(model)      -> {metric: value, "items": n}        its metrics over all of val (no_grad)
    row(metrics)         -> {column: value}                    its own columns of the results row

plus class attributes (``name``, ``summary``, ``presets``, ``metrics``, …) and, where it has
them, its own options (``add_task_arguments``, ``configure``), a pre-flight model check
(``check_model``), the inputs that initialise mechanisms from data (``init_inputs``), plots.

The harness does the rest, once for every task: the command line of the recipe, presets and
their overrides; mechanism and option checks before any data is read; torchrun's process group
(``tasks.common.distributed``); seeding; data loaders sharded over processes, with the smoke-run
limits ``--max-steps``, ``--limit-train`` and ``--limit-val``, and a training-time budget
(``--time-budget``, for equal-time comparisons: not a limit); the epochs, each a training pass
(``tasks.common.trainer.Trainer``) and an evaluation when due (``--eval-every``), timed, with an
EMA evaluation where ``--ema`` is on; peak memory; the history, a checkpoint after every epoch and
``--resume`` (the run's settings recorded for it: ``attnbench.results.run_record``); progress and logging
from rank 0; ``meta.json``; and one results row whose shared columns (what ran, where, how fast, in
how much memory, whether it was limited, how it ended) every task has: a run that diverges or runs
out of memory ends with one line and a row with status ``diverged`` or ``oom`` (exit status 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from attnbench import Mechanism, get_mechanism, parse_mechanism_options
from attnbench.interrupt import command_with, keeping
from attnbench.measure.timing import MIB, is_out_of_memory, proc_status_mib, reset_cpu_peak
from attnbench.results.run_record import mark_finished, settings_of
from attnbench.results.schema import stamp, stamped
from attnbench.results.tables import (
    ResultsError,
    append_row,
    local_table,
    new_run_dir,
    read_table,
    run_context,
    table_lock,
    write_meta,
    write_table,
)
from attnbench.task import Task, TaskError, finished_runs
from attnbench.validate import (
    MAX_SECONDS,
    MAX_THREADS,
    SEED_MAX,
    existing_dir,
    existing_path,
    float_in,
    int_in,
    output_dir,
    output_file,
)
from tasks.common import trainer as training
from tasks.common.distributed import (
    Dist,
    all_reduce,
    barrier,
    broadcast_object,
    setup_distributed,
    teardown_distributed,
    use_cuda,
)
from tasks.common.init_from_data import describe_init, init_mechanisms_from_data
from tasks.common.subset import smoke_subset
from tasks.common.trainer import AMP_CHOICES, Loss, Recipe, Trainer, to_device

# What a preset leaves out; ``lr=None`` scales ``lr_per_images`` = (lr, images) linearly with the
# images of one step, ``min_lr=None`` is 1 % of the peak.
RECIPE_DEFAULTS: dict[str, Any] = dict(
    epochs=1, batch_size=32, lr=1e-3, lr_per_images=None, weight_decay=0.05, warmup_epochs=0.0,
    min_lr=None, label_smoothing=0.0, clip_grad=1.0, ema=0.0, workers=0, eval_every=1)

# Runs of shared columns that every task's table holds, in this order, amid its own columns.
COST_COLUMNS = ["peak_mem_mib", "train_mem_mib", "wall_s", "batch_size", "world_size", "device", "threads",
                "amp"]
CONTEXT_COLUMNS = ["status", "message", "run_dir", "date", "git_commit", "torch", "cpu", "gpu"]
# appended to every table: the smoke-run limits, the rule that chose a limited split's examples
# (``tasks.common.subset``; empty where no split was cut), and the training-time budget (not a limit:
# equal time is a fair budget, so it never marks a run `limited`)
LIMIT_COLUMNS = ["limited", "max_steps", "limit_train", "limit_val", "subset", "time_budget"]


@dataclasses.dataclass
class Data:
    """A task's data: its name in the results, the training split and the evaluation split(s)."""

    name: str
    train: Dataset
    val: Dataset | Mapping[str, Dataset]  # several named splits: MNLI's matched and mismatched
    collate: Callable | None = None
    root: Path | None = None  # the folder it was read from (meta.json)
    description: str = ""  # what it is (meta.json); default: the folder


@dataclasses.dataclass(frozen=True)
class Limits:
    """A smoke run: stop after ``max_steps`` optimiser steps, keep a seeded sample of each split
    (``tasks.common.subset``: stratified by class where the data say each example's class)."""

    max_steps: int | None = None
    limit_train: int | None = None
    limit_val: int | None = None

    @property
    def any(self) -> bool:
        return any(v is not None for v in dataclasses.astuple(self))

    def validate(self) -> None:
        for name, value in dataclasses.asdict(self).items():
            if value is not None and value < 1:
                raise TaskError(f"--{name.replace('_', '-')} must be >= 1, got {value}")

    def columns(self) -> dict[str, Any]:
        return {"limited": self.any, **dataclasses.asdict(self)}


class TrainingTask(Task):
    """A task trained and evaluated by the shared harness (see the module's docstring)."""

    # ---- what a task declares -------------------------------------------------------------------
    presets: ClassVar[dict[str, dict[str, Any]]] = {"embedded": {}}  # recipe and task defaults
    metrics: ClassVar[tuple[str, ...]] = ()  # evaluate()'s keys kept per epoch in history.csv
    headline: ClassVar[str | None] = None  # the metric an EMA evaluation reports as <headline>_ema
    columns: ClassVar[list[str] | None] = None  # the results table's columns, in order (None: the row's)
    unit: ClassVar[str] = "seq"  # what the speed columns count: train_<unit>_s, eval_<unit>_s
    counted: ClassVar[tuple[str, str]] = ("train_examples", "val_examples")  # row columns: split sizes
    data_help: ClassVar[str | None] = None  # --data's help (the layout it reads); None: no --data
    init_samples: ClassVar[int] = 0  # training samples that initialise mechanisms (0: no --mechanism-init)
    init_unit: ClassVar[str] = "samples"
    # The resolution probe (``attnbench resolution``) of a dense task, which also sets ``train_side``:
    # probe_step(mechanism, side, size, options, device=…) -> one training step on 2 synthetic images.
    probe_step: ClassVar[Callable[..., Callable[[], None]] | None] = None

    @classmethod
    def train_step(cls, mechanism: str, side: int, size: str, options: dict[str, Any],
                   device: str) -> tuple[Callable[[], None], int]:
        if cls.probe_step is None:
            return super().train_step(mechanism, side, size, options, device)
        return cls.probe_step(mechanism, side, size, options, device=device), 2

    # ---- what a task implements ---------------------------------------------------------------

    @classmethod
    def add_task_arguments(cls, group: argparse._ArgumentGroup) -> None:
        """The task's own options of ``attnbench run``."""

    def configure(self, args: argparse.Namespace) -> None:
        """Check and resolve the task's own options (``self.pick(key)``: the flag, else the preset);
        a mistake is a ``TaskError``. Runs before any process group or data exists."""

    def check_model(self) -> None:
        """Fail early on options the model cannot take (see ``try_model``)."""

    def load_data(self) -> Data:
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def loss(self, net: nn.Module, batch: Any) -> Loss:
        """(loss, items) of one training batch; the loss may be named parts, which are summed."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """The task's metrics over the whole evaluation split(s), all processes together, and
        ``items``: how many examples that was (``skipped``: how many failed to load). Runs in eval
        mode under ``torch.no_grad``; the harness times it."""
        raise NotImplementedError

    def row(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """The task's own columns of the results row (the harness adds the shared ones)."""
        return {k: metrics[k] for k in self.metrics if k in metrics}

    def config(self) -> dict[str, Any]:
        """What a resumed run must share with its checkpoint, beyond task, mechanism, size,
        options and data set."""
        return {}

    def init_inputs(self, model: nn.Module) -> tuple[nn.Module, tuple[Any, ...]]:
        """(module, inputs): ``module(*inputs)`` carries ``init_samples`` training samples to the
        mechanisms that initialise from data."""
        raise NotImplementedError

    def initialise(self, model: nn.Module) -> None:
        """Before training a new run (not a resumed one): mechanisms from data, where asked and
        where they can be; rank 0 alone (DistributedDataParallel copies its weights to the others)."""
        if self.init_samples == 0 or self.args.mechanism_init != "data":
            return
        if not any(hasattr(m, "init_from_data") for m in model.modules() if isinstance(m, Mechanism)):
            return
        self.facts["mechanism_init"] = "data"
        if self.dist.is_main:
            module, inputs = self.init_inputs(model)
            self.facts["mechanism_init"] = describe_init(init_mechanisms_from_data(module, *inputs))

    def choose_preset(self, args: argparse.Namespace) -> str:
        """The task's own preset with --data, else ``embedded`` (or the only preset there is)."""
        if getattr(args, "data", None) is not None and self.name in self.presets:
            return self.name
        return "embedded" if "embedded" in self.presets else next(iter(self.presets))

    def run_name(self) -> str:
        return f"{self.name}-{self.mechanism}-{self.size}" if self.size else f"{self.name}-{self.mechanism}"

    def describe_model(self) -> str:
        """The model in a few words, for the log and the summary line."""
        return f"{self.size} model" if self.size else "model"

    def meta(self) -> dict[str, Any]:
        """The task's own facts for meta.json."""
        return {}

    def format_scores(self, values: Mapping[str, Any]) -> str:
        """Metrics (of an evaluation, or of the results row) for the log and the summary line."""
        return ", ".join(f"{k} {values[k]:.2f}" for k in self.metrics
                         if isinstance(values.get(k), (int, float)) and math.isfinite(values[k]))

    def plot(self, table: pd.DataFrame, out: Path) -> list[Path]:
        """Redraw the task's plots from its results table (finished, unlimited runs only)."""
        return []

    def eval_batch_size(self) -> int:
        return 2 * self.recipe.batch_size

    def make_train_loader(self, dataset: Dataset, collate: Callable | None) -> DataLoader:
        """Shuffled, sharded over processes (DistributedSampler, also for one), last partial batch
        dropped; data order and augmentation depend on (seed, epoch, rank) only."""
        batch, dist = self.recipe.batch_size, self.dist
        sampler = DistributedSampler(dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=True,
                                     seed=self.recipe.seed, drop_last=True)
        if len(sampler) < batch:
            raise TaskError(f"the training set has {len(dataset)} examples: fewer than one batch of "
                            f"{batch} per process; lower --batch-size")
        return DataLoader(dataset, batch, sampler=sampler, num_workers=self.recipe.workers,
                          collate_fn=collate, drop_last=True, pin_memory=dist.device.type == "cuda",
                          generator=torch.Generator(), worker_init_fn=_seed_worker)

    def make_eval_loader(self, dataset: Dataset, collate: Callable | None) -> DataLoader:
        """Every example exactly once over all processes (rank r takes r, r + world, …): exact metrics."""
        shard = range(self.dist.rank, len(dataset), self.dist.world_size)
        return DataLoader(dataset, self.eval_batch_size(), sampler=shard, num_workers=self.recipe.workers,
                          collate_fn=collate, pin_memory=self.dist.device.type == "cuda")

    # ---- the command line -----------------------------------------------------------------------

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        if cls.name in cls.presets and "embedded" in cls.presets:
            g = parser.add_argument_group(f"{cls.name} (defaults: preset `{cls.name}` with --data, else "
                                          "`embedded`)")
        else:
            g = parser.add_argument_group(f"{cls.name} (defaults: preset `{next(iter(cls.presets))}`)")
        if cls.data_help:
            g.add_argument("--data", type=existing_dir.expecting(cls.data_help), metavar="DIR",
                           help=f"{cls.data_help} (default: the embedded data set, written once under "
                                "$ATTNBENCH_CACHE, else ~/.cache/attnbench)")
        if cls.sizes:
            g.add_argument("--size", choices=list(cls.sizes), help=f"model size ({cls._defaults('size')})")
        cls.add_task_arguments(g)
        if cls.init_samples:
            g.add_argument("--mechanism-init", choices=("data", "random"), default="data",
                           help="data: mechanisms with init_from_data (SeT: k-means anchors and references) "
                                f"start from the tokens of {cls.init_samples} training {cls.init_unit} "
                                "(default)")
        g.add_argument("--eval-every", type=int_in(0, 10_000),
                       help=f"evaluate every N epochs, and after the last; 0: after the last only "
                            f"({cls._defaults('eval_every')})")
        t = parser.add_argument_group("training (defaults: the task's preset)")
        t.add_argument("--epochs", type=int_in(1, 10_000), help="training epochs")
        t.add_argument("--batch-size", type=int_in(1, 65_536), help="examples per process and step")
        t.add_argument("--lr", type=float_in(0, 10, lo_open=True),
                       help="peak learning rate of AdamW (absolute, not scaled)")
        t.add_argument("--weight-decay", type=float_in(0, 10), help="AdamW weight decay on weight matrices")
        t.add_argument("--warmup-epochs", type=float_in(0, 10_000),
                       help="linear warm-up before the cosine decay")
        t.add_argument("--min-lr", type=float_in(0, 10), help="learning rate at the end of the cosine")
        t.add_argument("--label-smoothing", type=float_in(0, 1, hi_open=True),
                       help="label smoothing of the cross-entropy")
        t.add_argument("--clip-grad", type=float_in(0, 1e6), help="clip the gradient norm to this (0: off)")
        t.add_argument("--ema", type=float_in(0, 1, hi_open=True),
                       help="EMA decay of the weights, also evaluated (0: off)")
        t.add_argument("--amp", choices=AMP_CHOICES, default="auto",
                       help="mixed precision: auto = bf16 (or fp16) on CUDA, off on the CPU (default auto)")
        t.add_argument("--seed", type=int_in(0, SEED_MAX), default=0,
                       help="seed of initialisation, data order and augmentation")
        t.add_argument("--workers", type=int_in(0, 64), help="data-loading processes per training process")
        t.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="auto = cuda when available, else cpu (default auto)")
        t.add_argument("--threads", type=int_in(1, MAX_THREADS),
                       help="CPU threads of torch (default: torch's default here)")
        t.add_argument("--out", type=output_dir,
                       help="run folder (default: results/runs/<time>-<task>-..., git-ignored)")
        t.add_argument("--results", type=output_file,
                       help=f"results table to append to (default: results/local/{cls.name}.csv, "
                            "git-ignored; the committed reference tables are in results/reference/)")
        t.add_argument("--resume", type=existing_path, metavar="RUN_DIR|CHECKPOINT",
                       help="continue a run from its checkpoint.pt (written after every epoch)")
        t.add_argument("--time-budget", type=float_in(0, MAX_SECONDS, lo_open=True), metavar="SECONDS",
                       help="stop training once it has taken this long (training time, evaluations not "
                            "counted), then evaluate as usual: equal-time comparisons; the warm-up and "
                            "the cosine decay follow the training time (default: no budget)")
        s = parser.add_argument_group("smoke runs (the row records `limited`; plots leave such runs out)")
        s.add_argument("--max-steps", type=int_in(1, 10**9), metavar="N",
                       help="stop training after N optimiser steps")
        s.add_argument("--limit-train", type=int_in(1, 10**9), metavar="N",
                       help="train on N examples only: a sample drawn from --seed, stratified by class "
                            "where the data have classes")
        s.add_argument("--limit-val", type=int_in(1, 10**9), metavar="N",
                       help="evaluate on N examples only, drawn as for --limit-train")

    @classmethod
    def _defaults(cls, key: str) -> str:
        """"default: mini with --data, micro without", or "default: 3"."""
        values = {name: {**RECIPE_DEFAULTS, **p}.get(key) for name, p in cls.presets.items()}
        if cls.name in values and "embedded" in values and values[cls.name] != values["embedded"]:
            return f"default: {values[cls.name]} with --data, {values['embedded']} without"
        return f"default: {values.get('embedded', next(iter(values.values())))}"

    # ---- what to run: everything resolved and checked before any process or data exists ---------

    def pick(self, key: str) -> Any:
        """The command line's value of ``key`` where given, else the preset's."""
        value = getattr(self.args, key, None)
        return self.preset[key] if value is None else value

    def plan(self, args: argparse.Namespace) -> None:
        """Presets filled in, user mistakes turned into TaskErrors with one clear line each."""
        self.args, self.mechanism = args, args.mechanism
        mech = get_mechanism(args.mechanism)
        self.device_type = "cuda" if use_cuda(args.device) else "cpu"
        reason = mech.unavailable_reason(self.device_type)
        if reason:
            raise TaskError(f"mechanism {args.mechanism!r} cannot run on {self.device_type} here: {reason}")
        options = getattr(args, "mechanism_options", None)
        if options is None:  # called without the CLI, which parses and validates --opt
            options = parse_mechanism_options(args.opt)
        others = sorted(set(options) - {args.mechanism})
        if others:
            raise TaskError(f"--opt {others[0]}.…: options of {', '.join(others)} do not apply to "
                            f"--mechanism {args.mechanism}")
        self.options: dict[str, str] = options.get(args.mechanism, {})
        if args.threads is not None and args.threads < 1:
            raise TaskError(f"--threads must be >= 1, got {args.threads}")
        self.preset_name = self.choose_preset(args)
        preset = {**RECIPE_DEFAULTS, **self.presets[self.preset_name]}
        if preset["lr"] is None and args.lr is None:  # the linear scaling rule
            base, images = preset["lr_per_images"]
            world = int(os.environ.get("WORLD_SIZE", "1"))
            preset["lr"] = base * (args.batch_size or preset["batch_size"]) * world / images
        if preset["min_lr"] is None:  # the cosine ends at 1 % of the peak
            preset["min_lr"] = (args.lr or preset["lr"]) / 100
        self.preset = preset
        values = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(Recipe)}
        self.recipe = Recipe(**{k: preset[k] if v is None else v for k, v in values.items()})
        self.recipe.validate()
        training.amp_dtype(self.recipe.amp, torch.device(self.device_type))  # --amp fp16 on a CPU: now
        self.eval_every = self.pick("eval_every")
        if self.eval_every < 0:
            raise TaskError(f"--eval-every must be >= 0 (0: after the last epoch only), "
                            f"got {self.eval_every}")
        self.limits = Limits(args.max_steps, args.limit_train, args.limit_val)
        self.limits.validate()
        if args.results is not None:  # a table the row cannot join is refused now, not after training
            try:
                read_table(Path(args.results), kind="task")
            except ResultsError as exc:
                raise TaskError(f"--results {exc}") from None
        self.time_budget: float | None = getattr(args, "time_budget", None)
        if self.time_budget is not None and not self.time_budget > 0:
            raise TaskError(f"--time-budget must be > 0 seconds, got {self.time_budget}")
        self.size: str | None = self.pick("size") if self.sizes else None
        self.configure(args)
        self.check_model()

    def try_model(self, build: Callable[[str], nn.Module], inputs: Sequence[Any], doing: str) -> None:
        """Bad options fail here, once, before any data is read: ``build(size)`` of the run's size
        on the meta device (no memory), and of the smallest size running ``inputs`` once."""
        with torch.device("meta"):
            build(self.size)
        probe = build(self.sizes[0]).eval().to(self.device_type)
        try:
            with torch.no_grad():
                probe(*to_device(tuple(inputs), torch.device(self.device_type)))
        except ValueError as exc:  # the mechanism refuses this input, e.g. a 2-D prior without a grid
            raise TaskError(f"--mechanism {self.mechanism} with these options cannot {doing}: "
                            f"{exc}") from None

    # ---- the run ------------------------------------------------------------------------------

    def run(self, args: argparse.Namespace) -> int:
        self.plan(args)
        self.dist = setup_distributed(args.device)
        try:
            return self.train_and_evaluate()
        except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: say what is kept, and how to go on
            raise keeping(exc, self.kept_when_interrupted()) from None
        except TaskError as exc:  # bad data met in a loader worker: its own line, as with --workers 0
            message = worker_message(exc)
            if message is None:
                raise
            raise TaskError(message) from None
        except Exception as exc:  # a run that diverged or ran out of memory still gets its row
            failure = failure_status(exc)
            if failure is None:
                raise
        finally:
            teardown_distributed()
        return self.record_failure(*failure)  # here, once the traceback and its tensors are gone

    def kept_when_interrupted(self) -> str:
        """What a run stopped before its end leaves, and the command that continues it (one line)."""
        argv = ["attnbench", *sys.argv[1:]]
        run_dir = getattr(self, "run_dir", None)
        saved = getattr(getattr(self, "trainer", None), "saved_epoch", 0)
        if run_dir is None or not saved:
            where = f" (its run folder {run_dir})" if run_dir is not None else ""
            return (f"no epoch had finished, so there is no checkpoint to resume{where}; start again with: "
                    f"{command_with(argv, {}, [])}")
        resume = command_with(argv, {"--out": True, "--resume": True}, ["--resume", str(run_dir)])
        return (f"kept {run_dir} with its checkpoint after epoch {saved}/{self.recipe.epochs}; "
                f"resume with: {resume}")

    @property
    def device(self) -> torch.device:
        return self.dist.device

    def autocast(self) -> AbstractContextManager:
        return self.trainer.autocast()

    def to_device(self, batch: Any) -> Any:
        return to_device(batch, self.device)

    def reduce(self, *values: float, op: str = "sum") -> list[float]:
        """``values`` summed (or ``op="max"``) over all processes, for exact metrics in ``evaluate``."""
        return all_reduce(values, self.dist, op)

    def log(self, message: str) -> None:
        """One line on stderr, from rank 0 only."""
        if self.dist.is_main:
            print(message, file=sys.stderr, flush=True)

    def set_up(self) -> None:
        """Run folder and checkpoint, data, model, initialisation, loaders, trainer, resume."""
        args, recipe, dist = self.args, self.recipe, self.dist
        self.resumed: dict[str, Any] | None = None
        if args.resume is not None:
            self.run_dir, self.resumed = training.load_checkpoint(args.resume)
        elif args.out is not None:
            self.run_dir = args.out
        else:  # rank 0's name (time, token) on every rank
            self.run_dir = Path(broadcast_object(str(new_run_dir(self.run_name(), recipe.seed)), dist))
        self.table = Path(args.results) if args.results is not None else local_table(self.name)
        self.settings = {**settings_of(args), "results": str(self.table.resolve())}  # for --resume DIR
        seed_everything(recipe.seed)
        self.data = self.load_data()
        model = self.build_model()
        self.params = sum(p.numel() for p in model.parameters())
        self.run_config = {"task": self.name, "mechanism": self.mechanism, "size": self.size,
                           "options": self.options, "dataset": self.data.name, **self.config()}
        if self.resumed is not None:
            training.check_resumable(self.resumed, self.run_config, recipe, args.resume)
        self.facts: dict[str, Any] = {"mechanism_init": "random"}
        if self.resumed is None:
            self.initialise(model)
        self.limit_data()
        self.train_loader = self.make_train_loader(self.train_set, self.data.collate)
        self.val_loader = ({k: self.make_eval_loader(v, self.data.collate) for k, v in self.val_sets.items()}
                           if isinstance(self.val_sets, Mapping) else
                           self.make_eval_loader(self.val_sets, self.data.collate))
        self.trainer = Trainer(model, recipe, dist, len(self.train_loader), self.time_budget)
        torch.manual_seed(recipe.seed * 7919 + dist.rank)  # dropout, stochastic depth… differ per rank
        self.previous_wall = 0.0
        if self.resumed is not None:
            self.trainer.load(self.resumed)  # weights, optimiser, schedule, RNG, history
            self.previous_wall = self.resumed.get("wall_s", 0.0)
            legacy = {"mechanism_init": self.resumed.get("mechanism_init", "random")}  # before "facts"
            self.facts = dict(self.resumed.get("facts", legacy))
            self.log(f"resuming {self.run_dir} after epoch {self.trainer.epoch}/{recipe.epochs}")

    def limit_data(self) -> None:
        """The splits trained and evaluated on: each a seeded sample where --limit-train/--limit-val cut
        it, the same on every process and every resume (``tasks.common.subset``); ``self.subset``
        says which rule chose them ("" where nothing was cut)."""
        seed, val, limit = self.recipe.seed, self.data.val, self.limits.limit_val
        self.train_set, rule = smoke_subset(self.data.train, self.limits.limit_train, seed, "train")
        rules = {"train": rule}
        if isinstance(val, Mapping):
            self.val_sets = {}
            for name, split in val.items():
                self.val_sets[name], rules[name] = smoke_subset(split, limit, seed, f"val:{name}")
        else:
            self.val_sets, rules["val"] = smoke_subset(val, limit, seed, "val")
        cut = {name: rule for name, rule in rules.items() if rule}
        self.subset = (next(iter(cut.values())) if len(set(cut.values())) == 1
                       else ", ".join(f"{name} {rule}" for name, rule in cut.items()))

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.trainer.history

    def split_sizes(self) -> tuple[int, int]:
        """Examples trained on and evaluated on (after the limits)."""
        val = self.val_sets.values() if isinstance(self.val_sets, Mapping) else [self.val_sets]
        return len(self.train_set), sum(len(v) for v in val)

    def timed_evaluation(self, model: nn.Module) -> dict[str, Any]:
        """``evaluate(model)`` in eval mode without gradients, and its speed (all processes)."""
        model.eval()
        start = time.perf_counter()
        with torch.no_grad():
            metrics = dict(self.evaluate(model))
        (seconds,) = all_reduce([time.perf_counter() - start], self.dist, op="max")
        metrics["eval_s"] = seconds
        metrics[f"eval_{self.unit}_s"] = metrics["items"] / seconds if seconds > 0 else math.nan
        return metrics

    def train_and_evaluate(self) -> int:
        """Train to the last epoch (from the checkpoint when resuming), evaluate, record."""
        started = time.perf_counter()
        args, recipe, dist = self.args, self.recipe, self.dist
        if args.threads:
            torch.set_num_threads(args.threads)
        self.set_up()
        trainer = self.trainer
        self.write_meta()
        n_train, n_val = self.split_sizes()
        limits = f" (smoke run: {self.limits_text()})" if self.limits.any else ""
        self.log(f"{self.label()}: {self.mechanism} in {self.describe_model()} ({millions(self.params)} "
                 f"parameters), {self.data.name}: {n_train} train / {n_val} val; {recipe.epochs} epochs of "
                 f"{len(self.train_loader)} steps × {recipe.batch_size} × {dist.world_size} process(es) on "
                 f"{dist.device}{limits} -> {self.run_dir}")
        reset_peak_memory(dist.device)
        before = current_memory_mib(dist.device)  # model, data index, loaders: not the training's
        speed, max_steps, budget = f"{self.unit}_s", self.limits.max_steps, self.time_budget
        metrics: dict[str, Any] = {}
        for epoch in range(trainer.epoch, recipe.epochs):
            set_epoch(self.train_loader, epoch, recipe.seed, dist)
            desc = f"epoch {epoch + 1}/{recipe.epochs}"
            loader = (self.train_loader if budget is None
                      else until(self.train_loader, budget - trainer.trained_s, dist))
            stats = trainer.train_epoch(loader, self.loss, desc, max_steps)
            out_of_time = budget is not None and trainer.trained_s >= budget  # a resumed run's too
            stopped = (max_steps is not None and trainer.steps >= max_steps) or out_of_time
            due = (stopped or epoch + 1 == recipe.epochs
                   or (self.eval_every > 0 and (epoch + 1) % self.eval_every == 0))
            metrics = self.timed_evaluation(trainer.model) if due else {}
            ema = self.timed_evaluation(trainer.ema.module) if due and trainer.ema is not None else {}
            peak = peak_memory_mib(dist.device)
            peak, above = all_reduce([peak, peak - before], dist, op="max")
            trainer.epoch = epoch + 1
            entry = {"epoch": epoch + 1, "steps": trainer.steps, "train_loss": stats.loss, "lr": stats.lr,
                     f"train_{speed}": stats.items_per_s, "train_s": stats.seconds, **stats.parts,
                     **{k: metrics.get(k, math.nan) for k in self.metrics},
                     **({f"{self.headline}_ema": ema.get(self.headline, math.nan)} if self.headline else {}),
                     f"eval_{speed}": metrics.get(f"eval_{speed}", math.nan),
                     "peak_mem_mib": peak, "train_mem_mib": above,
                     "skipped": stats.skipped + metrics.get("skipped", 0)}
            trainer.history.append(entry)
            wall = self.previous_wall + time.perf_counter() - started
            trainer.save(self.run_dir / "checkpoint.pt",
                         {"config": self.run_config, "wall_s": wall, "facts": self.facts,
                          "settings": self.settings})
            self.write_history()
            scores = (f" | {self.format_scores(metrics)} ({metrics['eval_s']:.0f} s)" if metrics else "")
            if ema:
                scores += f", EMA {self.headline} {ema[self.headline]:.2f}"
            self.log(f"{desc}: train loss {stats.loss:.4f}, {stats.items_per_s:.1f} {self.unit}/s, "
                     f"{stats.seconds:.0f} s{scores}")
            if stopped:
                why = f"--time-budget {budget:g} s" if out_of_time else f"--max-steps {max_steps}"
                self.log(f"stopped after {trainer.steps} optimiser steps ({why})")
                break
        if not metrics:  # resumed a finished run: evaluate its weights once more
            metrics = self.timed_evaluation(trainer.model)
            self.write_history()  # killed after its last checkpoint: the epoch's line may be missing
        row = self.result_row(metrics, self.previous_wall + time.perf_counter() - started)
        table = self.table
        if dist.is_main:
            append_row(table, stamped(row, "task"),
                       list(dict.fromkeys([*(self.columns or row), *LIMIT_COLUMNS])))
            mark_finished(self.run_dir, table)  # `--resume` of this folder now answers where its row is
            with table_lock(table):  # runs sharing the table redraw its plots in turn, each from every row
                plots = self.plot(finished_runs(read_table(table, kind="task")), table.parent)
            print(self.summary_line(row, table) + (f"; plot {plots[0]}" if plots else ""))
        barrier(dist)
        return 0

    # ---- what is recorded -----------------------------------------------------------------------

    def label(self) -> str:
        """How the log and the summary line name the task."""
        return self.name

    def limits_text(self) -> str:
        return ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in dataclasses.asdict(self.limits).items()
                         if v is not None)

    def write_history(self) -> None:
        """history.csv: every epoch so far, from the history the checkpoint holds, written whole (a run
        killed between its checkpoint and this line gets the epoch's line when it is resumed)."""
        if self.dist.is_main and self.history:
            write_table(self.run_dir / "history.csv", pd.DataFrame(self.history))

    def write_meta(self) -> None:
        """meta.json: the run's context (device, versions, commit, command) plus its facts."""
        if not self.dist.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        meta = run_context(str(self.device), torch.get_num_threads(), ["attnbench", *sys.argv[1:]])
        root = str(self.data.root.resolve()) if self.data.root is not None else None
        n_train, n_val = self.split_sizes()
        meta.update(task=self.name, preset=self.preset_name, config=self.run_config,
                    recipe=dataclasses.asdict(self.recipe), eval_every=self.eval_every,
                    limits={**dataclasses.asdict(self.limits), "subset": self.subset},
                    world_size=self.dist.world_size, data_path=root,
                    data_description=self.data.description or root, params=self.params,
                    backend=get_mechanism(self.mechanism).backend(str(self.device)), settings=self.settings)
        meta.update({**dict(zip(self.counted, (n_train, n_val), strict=True)), **self.facts, **self.meta()})
        write_meta(self.run_dir / "meta.json", stamp(meta, "task"))

    def result_row(self, metrics: dict[str, Any], wall: float) -> dict[str, Any]:
        """One tidy row: what ran, on what, how well, how fast, with the run's context; the
        columns the task declares (``columns``) and the limits."""
        history, speed = self.history, f"{self.unit}_s"
        eval_speed = steady_median(history, f"eval_{speed}")
        row = {
            "task": self.name, "mechanism": self.mechanism, "size": self.size, "dataset": self.data.name,
            "epochs": self.trainer.epoch, "seed": self.recipe.seed, "params": self.params,
            f"train_{speed}": round(steady_median(history, f"train_{speed}"), 2),
            f"eval_{speed}": round(eval_speed if math.isfinite(eval_speed) else metrics[f"eval_{speed}"], 2),
            **dict(zip(self.counted, self.split_sizes(), strict=True)),
            "skipped_images": history[-1]["skipped"] if history else 0,
            f"{self.headline}_ema": history[-1].get(f"{self.headline}_ema", math.nan) if history
            else math.nan,
            **self.facts,
            "peak_mem_mib": round(max((h["peak_mem_mib"] for h in history), default=math.nan), 1),
            "train_mem_mib": round(max((h["train_mem_mib"] for h in history), default=math.nan), 1),
            "wall_s": round(wall, 1), **self.row(metrics), **self.outcome_columns("ok")}
        return self.declared(row)

    def failure_row(self, status: str, message: str) -> dict[str, Any]:
        """The row of a run that ended without a result (``failure_status``): what ran, how far it
        got, and why it stopped; its metrics are left empty."""
        trainer, data = getattr(self, "trainer", None), getattr(self, "data", None)
        row = {"task": self.name, "mechanism": self.mechanism, "size": self.size,
               "dataset": data.name if data is not None else None,
               "epochs": trainer.epoch if trainer is not None else 0, "seed": self.recipe.seed,
               "params": getattr(self, "params", None), **self.outcome_columns(status, message)}
        return self.declared(row)

    def outcome_columns(self, status: str, message: str = "") -> dict[str, Any]:
        """The columns every row has, whatever the outcome: the set-up, where it ran, how it ended."""
        ctx = run_context(str(self.device), torch.get_num_threads())
        return {"batch_size": self.recipe.batch_size, "world_size": self.dist.world_size,
                "device": str(self.device), "threads": torch.get_num_threads(), "amp": self.recipe.amp,
                "options": ";".join(f"{k}={v}" for k, v in sorted(self.options.items())),
                "backend": get_mechanism(self.mechanism).backend(str(self.device)), "status": status,
                "message": message, "run_dir": str(getattr(self, "run_dir", "")), "date": ctx["date"],
                "git_commit": ctx["git_commit"], "torch": ctx["versions"]["torch"], "cpu": ctx["cpu"],
                "gpu": ctx["gpu"], **self.limits.columns(), "subset": getattr(self, "subset", ""),
                "time_budget": self.time_budget}

    def declared(self, row: dict[str, Any]) -> dict[str, Any]:
        """``row`` cut to the columns the task declares (``columns``) and the limits."""
        if self.columns is None:
            return row
        keep = {*self.columns, *LIMIT_COLUMNS}
        return {k: v for k, v in row.items() if k in keep}

    def record_failure(self, status: str, message: str) -> int:
        """Append the row of a run that ended early and say why in one line; exit status 1."""
        doing = "training or evaluating" if hasattr(self, "trainer") else "building the model"
        if status == "oom":
            message = f"out of memory while {doing}: {message}"
        if self.dist.is_main:
            table = getattr(self, "table", None) or (
                Path(self.args.results) if self.args.results is not None else local_table(self.name))
            row = self.failure_row(status, message)
            append_row(table, stamped(row, "task"),
                       list(dict.fromkeys([*(self.columns or row), *LIMIT_COLUMNS])))
            print(f"attnbench run: error: {message} (status {status}; its row is in {table})",
                  file=sys.stderr)
        return 1

    def summary_line(self, row: dict[str, Any], table: Path) -> str:
        """The one line a run prints on stdout."""
        r, speed = row, f"{self.unit}_s"
        limited = f" | LIMITED ({self.limits_text()})" if self.limits.any else ""
        return (f"{self.label()} | {r['mechanism']} | {self.describe_model()} | {r['dataset']}: "
                f"{self.format_scores(r)} after {r['epochs']} epochs | {millions(r['params'])} params | "
                f"train {r[f'train_{speed}']:.1f} {self.unit}/s, "
                f"eval {r[f'eval_{speed}']:.1f} {self.unit}/s | "
                f"peak {r['peak_mem_mib']:.0f} MiB | {r['wall_s']:.0f} s{limited} -> {table}, {self.run_dir}")


# ---- helpers ------------------------------------------------------------------------------------


def failure_status(exc: BaseException) -> tuple[str, str] | None:
    """(status, message) of an error that ends a run with a row rather than a traceback: a loss that
    is not finite (``diverged``), memory run out of while building or in a step (``oom``); else None."""
    if isinstance(exc, training.Diverged):
        return "diverged", f"training diverged: {exc}"
    if is_out_of_memory(exc) and not isinstance(exc, TaskError):
        return "oom", " ".join(str(exc).split())[:300] or type(exc).__name__
    return None


def worker_message(exc: BaseException) -> str | None:
    """The message of an error raised in a DataLoader worker, which PyTorch raises again in the main
    process as the same type around its traceback ("Caught TaskError in DataLoader worker process 0.
    Original Traceback …", ending ``module.TaskError: message``); None for an error of this process."""
    text = str(exc)
    if not (text.startswith("Caught ") and "\nOriginal Traceback" in text):
        return None
    last = text.rstrip().splitlines()[-1]  # "attnbench.task.TaskError: <the message>"
    name, colon, message = last.partition(": ")
    return message if colon and name.endswith(type(exc).__name__) else last


def millions(count: int) -> str:
    return f"{count / 1e6:.2f}M" if count >= 10_000 else f"{count:,}"


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch (all devices) from one seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _seed_worker(worker_id: int) -> None:
    """NumPy and ``random`` in a loader worker follow torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def set_epoch(loader: DataLoader, epoch: int, seed: int, dist: Dist) -> None:
    """Data order and augmentation of ``epoch`` depend on (seed, epoch, rank) only: resume repeats them."""
    for sampler in (loader.sampler, loader.batch_sampler):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
    if loader.generator is not None:
        loader.generator.manual_seed(seed * 100_003 + epoch * 1009 + dist.rank)


def until(loader: Iterable, seconds: float, dist: Dist) -> Iterator:
    """The batches of ``loader`` until ``seconds`` have passed since the first was asked for, the
    first always (an epoch trains at least one step); all processes stop at the same batch (the
    slowest decides)."""
    start = time.perf_counter()
    for i, batch in enumerate(loader):
        (elapsed,) = all_reduce([time.perf_counter() - start], dist, op="max")
        if i > 0 and elapsed >= seconds:
            return
        yield batch


def steady_median(history: Sequence[dict[str, Any]], key: str) -> float:
    """Median of ``key`` over the epochs after the first, which pays for warm-up (NaN: not measured)."""
    steady = history[1:] if len(history) > 1 else history
    values = [h[key] for h in steady if math.isfinite(h.get(key, math.nan))]
    return float(np.median(values)) if values else math.nan


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_cpu_peak()


def current_memory_mib(device: torch.device) -> float:
    """CUDA: tensor memory allocated now. CPU: the process's resident set now (VmRSS). MiB."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / MIB
    return proc_status_mib("VmRSS")


def peak_memory_mib(device: torch.device) -> float:
    """CUDA: peak allocated tensor memory. CPU: the process's peak resident set (VmHWM). MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MIB
    return proc_status_mib("VmHWM")
