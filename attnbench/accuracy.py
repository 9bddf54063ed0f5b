"""``attnbench scale --task T``: the accuracy sweep, accuracy against sequence length.

One model is trained and evaluated per point (mechanism variant, n, seed), each by the task's own
``attnbench run --task T --mechanism M --seq-len N --seed S …`` in a process of its own
(``attnbench.worker.run_isolated``) under the kernel sweep's memory limit and a time limit per
point: an out-of-memory, a crash or a time-out becomes a row with its status and message, and the
sweep goes on. Every point of a sweep gets the same budget: the same task arguments (the step
budget of the task's preset) or, with ``--time-budget``, the same seconds of training. Where the
points run (here, ``--jobs`` at once, Ray, Slurm) is ``attnbench.launchers``'s; with a ``--lr`` /
``--weight-decay`` grid each point trains several runs and its best by validation stands for it
(``attnbench.tuning``).

A sweep folder holds ``accuracy.csv`` (one row per point, appended atomically as each finishes:
the task's row, the variant, status, message and the sweep's context), ``meta.json`` (the sweep's
settings; ``--resume`` refuses a folder whose settings differ), ``breaking.csv`` (each variant's
breaking length: the smallest n at which its mean accuracy over seeds falls more than
``MARGIN`` points below softmax's, or sdpa's), the plots (``attnbench.accuracy_plots``), and ``points/``: each
point's run folder and log. The engine sees the task only through the task registry.

What is judged is the task's ``sweep_score`` (``attnbench.tasks.SweepScore``, recorded in meta.json):
accuracy, higher is better, for most tasks; a language model's perplexity, lower is better, broken
where it rises more than 10 % above the baseline's at the same n.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import math
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import pandas as pd

from attnbench import registry, tuning
from attnbench.interrupt import command_with, keeping
from attnbench.launchers import Launcher, LocalLauncher
from attnbench.options import Variant, variants
from attnbench.plots import slug
from attnbench.results import (
    aggregate,
    append_row,
    foreign_run,
    format_spread,
    read_meta,
    read_table,
    run_context,
    write_meta,
    write_table,
)
from attnbench.schema import stamp, stamped, upgrade_meta
from attnbench.sweep import SweepError, parse_mechanisms, parse_seq
from attnbench.tasks import ACCURACY, SweepScore, UnknownTaskError, flag_value, get_task, sweep_tasks
from attnbench.tuning import (
    GRID,
    combinations,
    mark_selected,
    run_suffix,
    tuned_view,
    value_text,
)
from attnbench.worker import Session, cap_address_space, run_isolated, start_isolated

# what a variant's accuracy is judged against: softmax, else sdpa (the same maths, fused), where swept
BASELINES = ("softmax", "sdpa")
MARGIN = ACCURACY.margin  # points of accuracy below the baseline at which a variant counts as broken
DEFAULT_LIMIT_S = 1800.0  # seconds a point may take (start, training, evaluation) under a step budget
# (a task's other columns follow these: a language model's perplexity, say)
COLUMNS = ["task", "mechanism", "variant", "options", "seq_len", "seed", "lr", "weight_decay", "status",
           "selected", "accuracy", "val_accuracy", "best_accuracy", "chance", "steps", "step_ms", "tokens_s",
           "peak_mem_mib", "params", "softmax_params", "flops_per_step", "time_budget", "message", "point_s",
           "device", "threads", "dtype", "git_commit"]
KEY = ["variant", "seq_len", "seed"]  # a point; with a grid (``attnbench.tuning``) it trains several runs
RUN_KEY = [*KEY, *GRID]  # one run
REQUIRED = [*KEY, "mechanism", "status"]  # what a folder's accuracy.csv must hold to be read (and its score)
# flags of `attnbench run` that the sweep sets itself, with what sets them instead
RESERVED = {"--task": "--task", "--mechanism": "--mechanism", "--opt": "--opt", "--seq-len": "--seq",
            "--seed": "--seeds", "--time-budget": "--time-budget", "--device": "--device",
            "--threads": "--threads", "--results": "--out", "--out": "--out", "--resume": "--resume",
            "--lr": "--lr", "--weight-decay": "--weight-decay"}
# settings a resumed sweep must share with its folder
SHARED = ("task", "args", "time_budget", "device")


@dataclasses.dataclass
class AccuracyConfig:
    """One accuracy sweep: what every point trains (task, mechanisms and their option variants,
    lengths, seeds, task arguments, budget) and the limits it runs under."""

    task: str
    mechanisms: list[str]
    seq: list[int]
    seeds: list[int]
    args: list[str] = dataclasses.field(default_factory=list)  # task arguments of every run
    # --opt, parsed with axes=True: a comma list (set.m=16,64) runs each value as a variant of its own
    options: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    time_budget: float | None = None  # seconds of training per point; None: the steps ``args`` set
    limit_s: float = DEFAULT_LIMIT_S  # seconds per point before it is recorded as a time-out
    memory_limit_mib: float | None = None
    device: str = "cpu"
    threads: int = 1
    load: list[str] = dataclasses.field(default_factory=list)
    # the tuning grid (``attnbench.tuning``): every point trains each value; empty: the task's own
    lrs: list[float] = dataclasses.field(default_factory=list)
    weight_decays: list[float] = dataclasses.field(default_factory=list)

    def validate(self) -> None:
        if not self.seeds or min(self.seeds) < 0:
            raise SweepError(f"--seeds {self.seeds}: expected seeds >= 0, e.g. 0,1,2")
        if self.time_budget is not None and not self.time_budget > 0:
            raise SweepError(f"--time-budget must be > 0 seconds, got {self.time_budget:g}")
        if not self.limit_s > 0:
            raise SweepError(f"--budget must be > 0 seconds, got {self.limit_s:g}")
        if self.threads < 1:
            raise SweepError(f"--threads must be >= 1, got {self.threads}")
        for item in self.args:
            flag = item.partition("=")[0]
            if flag in RESERVED:
                raise SweepError(f"task argument {item!r}: the sweep sets {flag} for every run; use "
                                 f"`attnbench scale {RESERVED[flag]}` instead")
        self.variants()

    def variants(self) -> list[Variant]:
        return variants(self.mechanisms, self.options)

    def grid(self) -> list[tuple[float | None, float | None]]:
        """(lr, weight_decay) of every run of a point; None: the task's own value."""
        return combinations(self.lrs, self.weight_decays)


def point_limit(time_budget: float | None) -> float:
    """Seconds a point may take before it is a time-out: ``DEFAULT_LIMIT_S``, or under a time
    budget twice the budget and 5 minutes for start-up and evaluation, where that is more."""
    return DEFAULT_LIMIT_S if time_budget is None else max(DEFAULT_LIMIT_S, 2 * time_budget + 300)


def parse_seeds(text: str) -> list[int]:
    """``0,1,2`` or ``3`` -> seeds in the order given, each once."""
    try:
        seeds = list(dict.fromkeys(int(s) for s in text.split(",")))
    except ValueError:
        raise SweepError(f"--seeds {text!r}: expected a comma list of seeds, e.g. 0,1,2") from None
    if min(seeds) < 0:
        raise SweepError(f"--seeds {text!r}: seeds must be >= 0")
    return seeds


def plan(task: str, device: str, seq: str | None = None, mechanisms: str | None = None,
         seeds: str | None = None, task_args: Sequence[str] = (), **settings: Any) -> AccuracyConfig:
    """The sweep of ``task`` on ``device``: its preset for the device, each entry the flag's value
    where one is given; ``task_args`` come after the preset's (a flag given again wins there)."""
    cls = get_task(task)
    reason = cls.unavailable_reason()
    if reason:
        raise SweepError(f"task {task!r} is {reason}")
    if not cls.sweep_presets:
        raise SweepError(f"task {task!r} has no accuracy sweep (no sweep presets); tasks with one: "
                         f"{', '.join(sweep_tasks()) or 'none'}")
    preset = cls.sweep_preset(device, task_args)
    if preset is None:
        raise SweepError(f"task {task!r} has no sweep preset for {device}; presets: "
                         f"{', '.join(cls.sweep_presets)}")
    cfg = AccuracyConfig(
        task=task, device=device,
        seq=parse_seq(seq) if seq is not None else list(preset["seq"]),
        mechanisms=parse_mechanisms(mechanisms if mechanisms is not None else ",".join(preset["mechanisms"])),
        seeds=parse_seeds(seeds) if seeds is not None else list(preset["seeds"]),
        args=[*preset.get("args", []), *task_args], **settings)
    cfg.validate()
    if len(cfg.grid()) > 1 and not getattr(cls, "validation_split", False):
        held_out = [t for t in sweep_tasks() if getattr(get_task(t), "validation_split", False)]
        raise SweepError(f"task {task!r} holds out no validation split, which picks each point's best of "
                         f"--lr/--weight-decay; tasks with one: {', '.join(held_out) or 'none'}")
    return cfg


def task_score(task: str) -> SweepScore:
    """What a sweep of ``task`` judges: the task's ``sweep_score`` (accuracy where it is not installed)."""
    try:
        return get_task(task).sweep_score
    except UnknownTaskError:
        return ACCURACY


def recorded_score(meta: dict[str, Any]) -> SweepScore:
    """The score a sweep folder's meta.json recorded, else its task's, else accuracy."""
    recorded = meta.get("score")
    if isinstance(recorded, dict):
        try:
            return SweepScore(**recorded)
        except TypeError:  # a field this version does not know: judge by the task's own
            pass
    return task_score(str(meta.get("task", meta.get("sweep", {}).get("task", ""))))


# ---- points -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Point:
    """One model to train: a mechanism variant at one length with one seed, and with a tuning grid
    one (lr, weight decay) of it (None: the task's own)."""

    variant: Variant
    n: int
    seed: int
    lr: float | None = None
    weight_decay: float | None = None

    @property
    def key(self) -> tuple[str, int, int, str, str]:
        """As ``RUN_KEY`` reads in the table."""
        return (self.variant.label, self.n, self.seed, value_text(self.lr), value_text(self.weight_decay))

    @property
    def name(self) -> str:
        """Its folder's name under ``points/``: ``set-m-16-n256-seed0``, ``…-seed0-lr0.003``."""
        return f"{slug(self.variant.label)}-n{self.n}-seed{self.seed}{run_suffix(self.lr, self.weight_decay)}"

    def describe(self) -> str:
        """How progress names it: ``set[m=16] n=256 seed=0 lr=0.003``."""
        grid = "".join(f" {k}={value_text(v)}" for k, v in (("lr", self.lr), ("wd", self.weight_decay))
                       if v is not None)
        return f"{self.variant.label} n={self.n} seed={self.seed}{grid}"


def points(cfg: AccuracyConfig) -> list[Point]:
    """Every point, length by length and seed by seed, so that all variants at a length finish
    together and the table fills from the short end; each point's runs of the grid together."""
    return [Point(v, n, seed, lr, wd) for n in cfg.seq for seed in cfg.seeds for v in cfg.variants()
            for lr, wd in cfg.grid()]


def run_argv(cfg: AccuracyConfig, point: Point, results: Path, out: Path) -> list[str]:
    """The ``attnbench`` command line of one point."""
    mech = point.variant.mechanism
    opts = [a for k, v in point.variant.options.items() for a in ("--opt", f"{mech}.{k}={v}")]
    budget = ["--time-budget", f"{cfg.time_budget:g}"] if cfg.time_budget is not None else []
    grid = [a for flag, v in (("--lr", point.lr), ("--weight-decay", point.weight_decay)) if v is not None
            for a in (flag, value_text(v))]
    return ["run", "--task", cfg.task, "--mechanism", mech, *opts, *cfg.args, *grid,
            "--seq-len", str(point.n), "--seed", str(point.seed), *budget, "--device", cfg.device,
            "--threads", str(cfg.threads), "--results", str(results), "--out", str(out)]


def _train_point(config: dict[str, Any]) -> dict[str, Any]:
    """In the point's own process: ``attnbench run …`` on the cores or GPU its launcher gave it,
    under the memory limit. The row goes to the run's ``--results`` table; an exception becomes a
    status in ``run_isolated``."""
    from attnbench import cli
    from attnbench.launchers import pin

    pin(config.get("cpus"), config.get("gpu"))  # first: before torch starts a thread or CUDA
    for spec in config["load"]:  # plug-ins the sweep loaded: the fork server has not seen them
        registry.load_module(spec)
    if config["memory_limit_mib"]:
        cap_address_space(config["memory_limit_mib"])
    sys.argv = ["attnbench", *config["argv"]]  # what the run's meta.json records as its command
    try:
        code = cli.main(config["argv"])
    except SystemExit as exc:  # a usage error: printed to the point's log
        code = exc.code
    if code:
        return {"status": "error", "message": f"attnbench run exited with status {code}"}
    return {"status": "ok", "message": ""}


def _last_line(log: Path) -> str:
    """The last line of a point's log that says something (the error, usually)."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def precision(args: Sequence[str], device: str) -> str:
    """What the runs compute in, from the task arguments' ``--amp`` (the harness's default: auto)."""
    amp = flag_value(args, "--amp") or "auto"
    if amp == "auto":
        return "float32" if device == "cpu" else "autocast (bf16, else fp16)"
    return {"off": "float32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}.get(amp, amp)


def context(cfg: AccuracyConfig) -> dict[str, Any]:
    """The sweep's context, a column each in every row: device, threads, dtype, commit, machine, versions."""
    ctx = run_context(cfg.device, cfg.threads)
    return {"device": cfg.device, "threads": cfg.threads, "dtype": precision(cfg.args, cfg.device),
            "git_commit": ctx["git_commit"], "cpu": ctx["cpu"], "cpu_count": ctx["cpu_count"],
            "gpu": ctx["gpu"], "cuda": ctx["cuda"], "python": ctx["python"], **ctx["versions"]}


@dataclasses.dataclass
class Prepared:
    """A point about to run: its folder, log and scratch table, and the command line."""

    point: Point
    folder: Path
    log: Path
    results: Path
    argv: list[str]
    start: float


@dataclasses.dataclass
class PointJob:
    """One point of a sweep, wherever a launcher runs it (``attnbench.launchers``): its folder under
    ``out/points/``, ``attnbench run`` in a process of its own, its row, failures included.
    ``prepare``, ``child_config`` and ``conclude`` are the steps; ``__call__`` runs all three here."""

    cfg: AccuracyConfig
    out: Path
    ctx: dict[str, Any]

    def base(self, point: Point) -> dict[str, Any]:
        """The columns the sweep knows of a point before it runs."""
        variant = point.variant
        return {"task": self.cfg.task, "mechanism": variant.mechanism, "variant": variant.label,
                "options": ";".join(f"{k}={v}" for k, v in sorted(variant.options.items())),
                "seq_len": point.n, "seed": point.seed, "lr": point.lr, "weight_decay": point.weight_decay,
                "time_budget": self.cfg.time_budget}

    def prepare(self, point: Point) -> Prepared | dict[str, Any]:
        """The point's fresh folder and command line; or the row of a point that cannot run here."""
        reason = registry.get_mechanism(point.variant.mechanism).unavailable_reason(self.cfg.device)
        if reason:
            return {**self.ctx, **self.base(point), "status": "unavailable", "message": reason,
                    "point_s": 0.0}
        folder = self.out / "points" / point.name
        if folder.exists():  # an interrupted earlier try: start afresh
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        log = folder / "log.txt"
        # the run's own table, in the point's folder (not /tmp: a killed sweep leaves nothing outside its
        # folder); removed with the task's plots drawn beside it once the row is read
        results = folder / ".table" / f"{self.cfg.task}.csv"
        argv = run_argv(self.cfg, point, results, folder)
        log.write_text(f"$ attnbench {shlex.join(argv)}\n")
        return Prepared(point, folder, log, results, argv, time.monotonic())

    def child_config(self, prepared: Prepared, cpus: Sequence[int] | None = None,
                     gpu: str | None = None) -> dict[str, Any]:
        """What ``_train_point`` gets in the point's process; ``cpus``, ``gpu``: what it may use alone."""
        return {"argv": prepared.argv, "load": self.cfg.load, "memory_limit_mib": self.cfg.memory_limit_mib,
                "cpus": list(cpus) if cpus is not None else None, "gpu": gpu}

    def start(self, prepared: Prepared, cpus: Sequence[int] | None = None, gpu: str | None = None) -> Session:
        """The point's process, started and not waited for (``collect`` its answer; the caller keeps
        ``cfg.limit_s`` and closes it)."""
        return start_isolated(_train_point, self.child_config(prepared, cpus, gpu), prepared.log)

    def discard(self, prepared: Prepared) -> None:
        """What a point stopped before its end leaves outside its log: its scratch table."""
        shutil.rmtree(prepared.results.parent, ignore_errors=True)

    def conclude(self, prepared: Prepared, answer: dict[str, Any]) -> dict[str, Any]:
        """The point's row from what its process answered and what its run wrote."""
        point, folder, log = prepared.point, prepared.folder, prepared.log
        try:
            table = read_table(prepared.results)
        finally:
            shutil.rmtree(prepared.results.parent, ignore_errors=True)
        seconds = round(time.monotonic() - prepared.start, 1)
        (folder / "checkpoint.pt").unlink(missing_ok=True)  # a point is never resumed: the row is what stays
        base = self.base(point)
        ended = len(table) and table.iloc[-1].get("status") in ("diverged", "oom")  # exit 1, and its row
        if (answer["status"] == "ok" or ended) and len(table):
            row = {k: v for k, v in table.iloc[-1].items() if not (isinstance(v, float) and math.isnan(v))}
            return {**self.ctx, **row, **base, "status": row.get("status", "ok"),
                    "message": row.get("message", ""), "point_s": seconds}
        message = answer.get("message", "")
        if answer["status"] == "ok":
            message = "the run finished without writing a results row"
        if answer["status"] == "error" and message.startswith("attnbench run exited"):
            message = f"{_last_line(log)} ({message.removeprefix('attnbench run ')})"
        return self.failed(point, answer["status"], message, seconds)

    def failed(self, point: Point, status: str, message: str, seconds: float = 0.0) -> dict[str, Any]:
        """The row of a point that ended without a result (its process, or the worker running it, died)."""
        return {**self.ctx, **self.base(point), "status": status, "message": message[:500],
                "point_s": seconds, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}

    def __call__(self, point: Point, cpus: Sequence[int] | None = None, gpu: str | None = None
                 ) -> dict[str, Any]:
        """Train and evaluate ``point`` from here, in a process of its own; its row."""
        prepared = self.prepare(point)
        if isinstance(prepared, dict):
            return prepared
        try:
            answer = run_isolated(_train_point, self.child_config(prepared, cpus, gpu), self.cfg.limit_s,
                                  prepared.log)
        except BaseException:
            self.discard(prepared)
            raise
        return self.conclude(prepared, answer)


def run_point(cfg: AccuracyConfig, point: Point, out: Path, ctx: dict[str, Any]) -> dict[str, Any]:
    """Train and evaluate one point in a process of its own; its row, failures included."""
    return PointJob(cfg, out, ctx)(point)


# ---- the sweep --------------------------------------------------------------------------------


class Progress:
    """One line per finished point, with the time so far and a rough ETA: the points left, each
    costing what the finished ones at its length did (a length not reached yet: the longest
    reached, scaled linearly with n), ``width`` of them at a time. Where several run at once, a
    line as each starts and, on every line, the points running then."""

    def __init__(self, todo: list[Point], log: TextIO, width: int = 1, score: SweepScore = ACCURACY) -> None:
        self.todo, self.log, self.width, self.score = todo, log, max(1, width), score
        self.start = time.monotonic()
        self.seconds: dict[int, list[float]] = {}
        self.running: dict[str, float] = {}  # point (described) -> when it started
        self.done = 0

    def eta(self) -> float:
        left = self.todo[self.done:]
        if not self.seconds:
            return math.nan
        longest = max(self.seconds)
        mean = {n: sum(s) / len(s) for n, s in self.seconds.items()}
        return sum(mean.get(p.n, mean[longest] * p.n / longest) for p in left) / self.width

    def _running(self) -> str:
        now = time.monotonic()
        return "; running: " + ", ".join(f"{name} ({dt.timedelta(seconds=round(now - t))})"
                                         for name, t in self.running.items()) if self.running else ""

    def started(self, point: Point) -> None:
        self.running[point.describe()] = time.monotonic()
        if self.width > 1:
            print(f"started {point.describe()}{self._running()}", file=self.log, flush=True)

    def report(self, point: Point, row: dict[str, Any]) -> None:
        self.done += 1
        self.running.pop(point.describe(), None)
        self.seconds.setdefault(point.n, []).append(float(row.get("point_s", 0.0)))
        elapsed = dt.timedelta(seconds=round(time.monotonic() - self.start))
        eta = self.eta()
        left = f"ETA {dt.timedelta(seconds=round(eta))}" if math.isfinite(eta) else "ETA -"
        print(f"[{self.done}/{len(self.todo)}] {point.describe()}: {describe(row, self.score)} | {elapsed} "
              f"elapsed, {left}{self._running()}", file=self.log, flush=True)


def _number(row: dict[str, Any], key: str) -> float:
    try:
        return float(row.get(key, math.nan))
    except (TypeError, ValueError):
        return math.nan


def describe(row: dict[str, Any], score: SweepScore = ACCURACY) -> str:
    """A point's result in a few words."""
    if row["status"] != "ok":
        return f"{row['status']}: {row.get('message', '')}"[:160]
    shown = lambda key: f"{_number(row, key):.{score.decimals}f}"
    parts = [f"{score.column} {shown(score.column)}"]
    if score.best and math.isfinite(_number(row, score.best)):
        parts[0] += f" (best {shown(score.best)})"
    units = (("steps", "{:.0f} steps"), ("step_ms", "{:.3g} ms/step"), ("peak_mem_mib", "{:.0f} MiB"))
    for key, fmt in units:
        if math.isfinite(_number(row, key)):
            parts.append(fmt.format(_number(row, key)))
    return ", ".join(parts) + f", {_number(row, 'point_s'):.0f} s"


def read_points(path: Path, columns: list[str] | None = None) -> pd.DataFrame:
    """A sweep's ``accuracy.csv``: the ``REQUIRED`` columns, n and seed numbers in every row and the
    accuracy in every ``ok`` one; a damaged table is a ``ResultsError`` naming it."""
    return read_table(path, columns, required=REQUIRED, numbers=["seq_len", "seed"], ok_numbers=["accuracy"],
                      kind="accuracy")


def _check_resume(cfg: AccuracyConfig, meta_path: Path, out: Path) -> None:
    """A resumed sweep must train as its folder did: same task, task arguments, budget, device and,
    for every mechanism in both, the same options."""
    old = upgrade_meta(read_meta(meta_path), "accuracy", str(meta_path)).get("sweep", {})
    mine = dataclasses.asdict(cfg)
    for key in SHARED:
        if key in old and old[key] != mine[key]:
            raise SweepError(f"--resume: {out} was swept with {key}={old[key]!r}, this sweep asks for "
                             f"{mine[key]!r}; choose another --out")
    for mech in set(old.get("mechanisms", [])) & set(cfg.mechanisms):
        before, now = old.get("options", {}).get(mech, {}), cfg.options.get(mech, {})
        if before != now:
            raise SweepError(f"--resume: {out} ran {mech} with options {before or 'none'}, this sweep asks "
                             f"for {now or 'none'}; choose another --out")


def check_sweep_out(cfg: AccuracyConfig, out: Path, resume: bool) -> None:
    """The sweep ``cfg`` may write to ``out``: its settings are sound, and ``out`` holds no other kind
    of run, no sweep unless ``resume``, and on ``resume`` one trained as ``cfg`` trains; else a
    ``SweepError``, raised before anything is printed or trained."""
    cfg.validate()
    csv, meta_path = out / "accuracy.csv", out / "meta.json"
    recorded = read_meta(meta_path)
    foreign = foreign_run(out, "accuracy.csv")
    if recorded.get("kind", "accuracy") != "accuracy":  # a kernel sweep's folder, say: keep its meta.json
        foreign = f"a {recorded['kind']} run"
    if foreign:
        raise SweepError(f"{out} holds {foreign}, not an accuracy sweep; choose another --out")
    if csv.exists() and not resume:
        raise SweepError(f"{out} already holds a sweep; pass --resume to finish it or choose another --out")
    if resume and meta_path.exists():
        _check_resume(cfg, meta_path, out)


def run_sweep(cfg: AccuracyConfig, out: Path, resume: bool, argv: list[str],
              log: TextIO | None = None, launcher: Launcher | None = None) -> pd.DataFrame:
    """Train every point not already in ``out/accuracy.csv``, where ``launcher`` runs them (default:
    here, one at a time); returns the full table."""
    log = log or sys.stderr
    check_sweep_out(cfg, out, resume)
    csv, meta_path = out / "accuracy.csv", out / "meta.json"
    recorded = read_meta(meta_path)
    meta = run_context(cfg.device, cfg.threads, argv)
    score = task_score(cfg.task)
    meta.update(kind="accuracy", task=cfg.task, dtype=precision(cfg.args, cfg.device),
                sweep=dataclasses.asdict(cfg), score=dataclasses.asdict(score))
    stamp(meta, "accuracy")
    earlier = recorded.get("commands", []) if resume else []
    meta["commands"] = [*earlier, meta["command"]]
    write_meta(meta_path, meta)
    done = read_points(csv, COLUMNS) if csv.exists() else read_table(csv, COLUMNS, kind="accuracy")
    grid = {c: done[c].map(value_text) for c in GRID}
    seen = {(str(v), int(n), int(s), lr, wd) for v, n, s, lr, wd in zip(
        done["variant"], done["seq_len"], done["seed"], grid["lr"], grid["weight_decay"], strict=True)}
    todo = [p for p in points(cfg) if p.key not in seen]
    if seen:
        print(f"resuming: {len(seen)} points already in {csv} (failures too: delete a row to run it again), "
              f"{len(todo)} to go", file=log)
    launcher = launcher or LocalLauncher()
    progress = Progress(todo, log, launcher.width, score)
    try:
        job = PointJob(cfg, out.resolve(), context(cfg))
        with contextlib.closing(launcher.run(todo, job, progress)) as finished:
            for point, row in finished:
                append_row(csv, stamped(row, "accuracy"), COLUMNS, then=mark_selected)
                progress.report(point, row)
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: the points cut short are killed, the rows stay
        rows = len(read_table(csv, COLUMNS))
        raise keeping(exc, f"kept {rows} of {len(seen) + len(todo)} points in {csv}; finish with: "
                           f"{resume_command(argv, out)}") from None
    return read_table(csv, COLUMNS, kind="accuracy")


def resume_command(argv: Sequence[str], out: Path) -> str:
    """The sweep's command line with ``--out OUT --resume``, before the task arguments after ``--``
    (after them they would be task arguments)."""
    cut = list(argv).index("--") if "--" in argv else len(argv)
    head = command_with(argv[:cut], {"--out": True, "--resume": False}, ["--out", str(out), "--resume"])
    return head + (f" {shlex.join(argv[cut:])}" if cut < len(argv) else "")


# ---- what a researcher reads ------------------------------------------------------------------


def seed_stats(table: pd.DataFrame, score: SweepScore = ACCURACY) -> pd.DataFrame:
    """Per variant and n: mean, std and count over distinct seeds of the finished points (the
    latest row of a seed stands for it) of the score (accuracy), its best evaluation, its floor
    (chance), time per step and peak memory."""
    wanted = (score.column, score.best, score.floor, "step_ms", "peak_mem_mib")
    metrics = [m for m in dict.fromkeys(wanted) if m is not None and m in table.columns]
    ok = table[table["status"] == "ok"] if "status" in table.columns else table
    return aggregate(ok, metrics, ["mechanism", "variant", "seq_len"])


def failures(table: pd.DataFrame) -> pd.DataFrame:
    """The points that did not finish (unavailable ones are not failures: they never could run)."""
    return table[~table["status"].isin(["ok", "unavailable"]) & table["status"].notna()]


def baseline_of(table: pd.DataFrame) -> str:
    """The sweep's reference: the first of ``BASELINES`` among its variants."""
    labels = set(table["variant"].dropna()) if "variant" in table.columns else set()
    return next((b for b in BASELINES if b in labels), BASELINES[0])


def breaking_lengths(table: pd.DataFrame, margin: float | None = None,
                     baseline: str | None = None, score: SweepScore = ACCURACY) -> pd.DataFrame:
    """Each variant's breaking length: the smallest n at which its mean score over seeds is worse
    than the baseline's at the same n by more than ``margin`` (default the score's: accuracy more
    than 10 points below; perplexity more than 10 % above). Lengths where the baseline did
    not finish cannot be judged (``baseline_missing_n``); failed points are left out of the means
    and listed (``failed``). ``breaking``: the length; ``none`` when it never breaks where judged;
    ``n/a: no softmax`` when the baseline finished at none of its lengths, ``n/a: no accuracy``
    when the variant finished at none (words a CSV reader does not take for missing values).
    ``gap``: how much worse, in the margin's units. ``baseline``: default ``baseline_of(table)``."""
    baseline = baseline or baseline_of(table)
    margin = score.margin if margin is None else margin
    column, mean = score.column, f"{score.column}_mean"
    stats = seed_stats(table, score) if column in table.columns else pd.DataFrame(
        columns=["variant", "seq_len", mean, "n_seeds"])
    base = stats[stats["variant"] == baseline].set_index("seq_len")[mean]
    failed = failures(table)
    labels = [v for v in dict.fromkeys(table["variant"]) if v != baseline]
    rows = []
    for label in labels:
        mine = stats[stats["variant"] == label].sort_values("seq_len")
        judged, missing, broke = [], [], None
        for r in mine.itertuples():
            n = int(r.seq_len)
            if n not in base.index or not math.isfinite(base[n]):
                missing.append(n)
                continue
            judged.append(n)
            mine_mean = getattr(r, mean)
            gap = score.worse_by(mine_mean, base[n])
            if broke is None and round(gap, 9) > margin:
                broke = {"breaking_n": n, column: mine_mean, f"baseline_{column}": base[n],
                         "gap": gap, "seeds": r.n_seeds}
        mine_failed = failed[failed["variant"] == label].sort_values("seq_len")
        rows.append({
            "variant": label, "mechanism": table[table["variant"] == label]["mechanism"].iloc[0],
            "breaking": str(broke["breaking_n"]) if broke else "none" if judged else
                        f"n/a: no {baseline}" if missing else f"n/a: no {column}",
            **(broke or {"breaking_n": math.nan, column: math.nan, f"baseline_{column}": math.nan,
                         "gap": math.nan, "seeds": math.nan}),
            "judged_n": ",".join(map(str, judged)), "baseline_missing_n": ",".join(map(str, missing)),
            "failed": ", ".join(f"n={int(r.seq_len)} seed={int(r.seed)}: {r.status}"
                                for r in mine_failed.itertuples()),
            "baseline": baseline, "margin": margin, "rule": score.rule(baseline)})
    columns = ["variant", "mechanism", "breaking", "breaking_n", column, f"baseline_{column}", "gap",
               "seeds", "judged_n", "baseline_missing_n", "failed", "baseline", "margin", "rule"]
    return pd.DataFrame(rows, columns=columns).astype({"breaking_n": "Int64", "seeds": "Int64"})


def accuracy_grid(table: pd.DataFrame, score: SweepScore = ACCURACY) -> pd.DataFrame:
    """Variants by n: mean ± std of the score over seeds with their n, or what stopped the points."""
    stats = seed_stats(table, score) if score.column in table.columns else pd.DataFrame(
        columns=["variant", "seq_len"])
    failed = failures(table)
    cells: dict[str, dict[int, str]] = {}
    for label in dict.fromkeys(table["variant"]):
        row = cells.setdefault(label, {})
        for n in sorted(table["seq_len"].dropna().unique()):
            mine = stats[(stats["variant"] == label) & (stats["seq_len"] == n)]
            bad = failed[(failed["variant"] == label) & (failed["seq_len"] == n)]["status"]
            column = score.column
            text = (format_spread(mine[f"{column}_mean"].iloc[0], mine[f"{column}_std"].iloc[0],
                                  int(mine["n_seeds"].iloc[0])) if len(mine) else "-")
            if len(bad):
                text += f" [{', '.join(f'{k} x{c}' for k, c in bad.value_counts().items())}]"
            row[int(n)] = text
    grid = pd.DataFrame.from_dict(cells, orient="index")
    grid.index.name = "variant"
    return grid


@dataclasses.dataclass
class Finished:
    """What ``finish`` wrote: the breaking lengths, and the files (``breaking.csv`` and the plots)."""

    breaking: pd.DataFrame
    paths: list[Path]


def finish(out: Path, log: TextIO | None = None) -> Finished:
    """Write ``breaking.csv`` and the plots of a sweep folder: of each point's run that stands for
    it, its best by validation where the sweep was tuned (``attnbench.tuning``), labelled so."""
    from attnbench.accuracy_plots import accuracy_sweep_plots

    meta = read_meta(out / "meta.json")
    score = recorded_score(meta)
    table = read_points(out / "accuracy.csv")
    if table.empty:
        raise SweepError(f"{out / 'accuracy.csv'} holds no points")
    tuned = tuning.label(table)
    view = tuned_view(table)
    breaking = breaking_lengths(view, score=score).assign(tuned=tuned)
    write_table(out / "breaking.csv", breaking)
    paths = accuracy_sweep_plots(view, breaking, out, meta, tuned, score)
    print(f"wrote {out / 'accuracy.csv'}, {out / 'breaking.csv'} and {len(paths)} plot files",
          file=log or sys.stderr)
    return Finished(breaking, [out / "breaking.csv", *paths])


def _text(column: pd.Series) -> pd.Series:
    """A column as the console shows it: "-" where empty."""
    return column.map(lambda v: "-" if pd.isna(v) or str(v) == "" else str(v))


def summary(out: Path) -> str:
    """The console summary: the score (accuracy) per variant and n, then the breaking lengths."""
    score = recorded_score(read_meta(out / "meta.json"))
    column, digits = score.column, score.decimals
    runs = read_table(out / "accuracy.csv", kind="accuracy")
    table, tuned = tuned_view(runs), tuning.label(runs)
    breaking = read_table(out / "breaking.csv")
    baseline = str(breaking["baseline"].iloc[0]) if len(breaking) else baseline_of(table)
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.max_colwidth", 60):
        parts = [f"{score.label} per variant and n: mean ± std over seeds (n = seeds); [failures]"
                 f"{'; ' + tuned if tuned else ''}\n{accuracy_grid(table, score).to_string()}"]
        if len(breaking):
            shown = pd.DataFrame({
                "variant": breaking["variant"], "breaking length": breaking["breaking"],
                f"{column} there vs {baseline}": [
                    f"{a:.{digits}f} vs {b:.{digits}f}" if math.isfinite(a) else "-"
                    for a, b in zip(breaking[column], breaking[f"baseline_{column}"], strict=True)],
                "judged at n": _text(breaking["judged_n"]),
                f"no {baseline} at n": _text(breaking["baseline_missing_n"]),
                "did not finish": _text(breaking["failed"])})
            parts.append(f"breaking length: {score.rule(baseline)}\n{shown.to_string(index=False)}")
        else:
            parts.append(f"no breaking lengths: nothing but {baseline} in this sweep")
    return "\n\n".join(parts)


def compare(out: Path, other: Path) -> pd.DataFrame:
    """The score (accuracy) of this sweep against a saved one, point by point (variant, n, seed);
    written to ``compare.csv``."""
    column = recorded_score(read_meta(out / "meta.json")).column
    mine, theirs = read_table(out / "accuracy.csv", kind="accuracy"), read_points(other / "accuracy.csv")
    if theirs.empty:
        raise SweepError(f"--compare {other}: no accuracy.csv there")
    mine, theirs = tuned_view(mine), tuned_view(theirs)  # each point's run that stands for it
    keep = [*KEY, "status", column, "step_ms", "peak_mem_mib"]
    mine = mine.drop_duplicates(KEY, keep="last").reindex(columns=keep)
    theirs = theirs.drop_duplicates(KEY, keep="last").reindex(columns=keep)
    both = mine.merge(theirs, on=KEY, how="outer", suffixes=("", "_before"))
    both = both.sort_values(["seq_len", "variant", "seed"])
    both[f"{column}_change"] = both[column] - both[f"{column}_before"]
    both["time_ratio"] = both["step_ms"] / both["step_ms_before"]
    both["memory_ratio"] = both["peak_mem_mib"] / both["peak_mem_mib_before"]
    result = both[[*KEY, "status", "status_before", column, f"{column}_before", f"{column}_change",
                   "time_ratio", "memory_ratio"]].reset_index(drop=True)
    write_table(out / "compare.csv", result)
    return result


def compare_text(result: pd.DataFrame, other: Path, out: Path) -> str:
    """The comparison as the console shows it: one line per point."""
    shown = result.copy()
    score = recorded_score(read_meta(out / "meta.json"))
    column, digits = score.column, score.decimals
    for c in ("status", "status_before"):
        shown[c] = shown[c].fillna("not run")
    for c in (column, f"{column}_before"):
        shown[c] = shown[c].map(lambda v: f"{v:.{digits}f}" if pd.notna(v) else "-")
    shown[f"{column}_change"] = shown[f"{column}_change"].map(
        lambda v: f"{v:+.{digits}f}" if pd.notna(v) else "-")
    for c in ("time_ratio", "memory_ratio"):
        shown[c] = shown[c].map(lambda v: f"{v:.2f}x" if pd.notna(v) else "-")
    with pd.option_context("display.width", 250, "display.max_rows", 10_000):
        return (f"compared with {other}: {column} here minus there, point by point -> {out / 'compare.csv'}\n"
                f"{shown.to_string(index=False)}")
