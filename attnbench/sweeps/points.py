"""One point of an accuracy sweep (``attnbench scale --task``): what it trains (``AccuracyConfig``,
``Point``), its folder under ``points/`` and its own process (``PointJob``), the row it leaves,
failures included, and the progress lines. Where the points run is ``attnbench.sweeps.launchers``'s;
the sweep that appends their rows is ``attnbench.sweeps.accuracy``'s.

The point's process runs ``attnbench run …`` through the ``run`` it is given (the command line's
own ``attnbench.cli.run.run_alone``): the sweep never imports the command line.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from attnbench import registry
from attnbench.measure.worker import Session, cap_address_space, run_isolated, start_isolated
from attnbench.options import Variant, variants
from attnbench.plots.style import slug
from attnbench.results.tables import read_table, run_context
from attnbench.sweeps.base import SweepError
from attnbench.sweeps.tuning import combinations, run_suffix, value_text
from attnbench.task import ACCURACY, SweepScore, flag_value

RunCommand = Callable[[Sequence[str]], int]  # ``attnbench run ARGV`` -> its exit status
DEFAULT_LIMIT_S = 1800.0  # seconds a point may take (start, training, evaluation) under a step budget
# flags of `attnbench run` that the sweep sets itself, with what sets them instead
RESERVED = {"--task": "--task", "--mechanism": "--mechanism", "--opt": "--opt", "--seq-len": "--seq",
            "--seed": "--seeds", "--time-budget": "--time-budget", "--device": "--device",
            "--threads": "--threads", "--results": "--out", "--out": "--out", "--resume": "--resume",
            "--lr": "--lr", "--weight-decay": "--weight-decay"}


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
    # the tuning grid (``attnbench.sweeps.tuning``): every point trains each value; empty: the task's own
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


def pin(cpus: Sequence[int] | None, gpu: str | None) -> None:
    """In a point's process, before torch starts a thread or CUDA: only ``gpu`` visible, only
    ``cpus`` to run on (threads started later inherit it)."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)


def _train_point(config: dict[str, Any]) -> dict[str, Any]:
    """In the point's own process: ``attnbench run …`` on the cores or GPU its launcher gave it,
    under the memory limit. The row goes to the run's ``--results`` table; an exception becomes a
    status in ``run_isolated``."""
    pin(config.get("cpus"), config.get("gpu"))  # first: before torch starts a thread or CUDA
    for spec in config["load"]:  # plug-ins the sweep loaded: the fork server has not seen them
        registry.load_module(spec)
    if config["memory_limit_mib"]:
        cap_address_space(config["memory_limit_mib"])
    sys.argv = ["attnbench", *config["argv"]]  # what the run's meta.json records as its command
    try:
        code = config["run"](config["argv"])
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
    """One point of a sweep, wherever a launcher runs it (``attnbench.sweeps.launchers``): its folder under
    ``out/points/``, ``attnbench run`` in a process of its own, its row, failures included.
    ``prepare``, ``child_config`` and ``conclude`` are the steps; ``__call__`` runs all three here."""

    cfg: AccuracyConfig
    out: Path
    ctx: dict[str, Any]
    run: RunCommand  # ``attnbench run ARGV`` in the point's process: its exit status

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
        return {"argv": prepared.argv, "run": self.run, "load": self.cfg.load,
                "memory_limit_mib": self.cfg.memory_limit_mib,
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


def run_point(cfg: AccuracyConfig, point: Point, out: Path, ctx: dict[str, Any], run: RunCommand
              ) -> dict[str, Any]:
    """Train and evaluate one point in a process of its own; its row, failures included."""
    return PointJob(cfg, out, ctx, run)(point)


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


