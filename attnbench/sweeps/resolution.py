"""``attnbench resolution``: how large an image each mechanism can train on, and at what cost.

Dense tasks (detection, segmentation) are where attention's cost in the number of tokens
bites: a side of s pixels gives (s/4)² tokens at the first stage. For one such task and each
mechanism, one synthetic training step (forward, backward, optimiser step; the task's
``train_step``) runs in a process of its own (``attnbench.measure.worker``) at growing sides: the
task's training side first, then doubling until a step runs out of memory under
``--memory-limit``, fails or exceeds its time budget, then bisecting to ``--granularity``
pixels. Every tried side is a row of ``resolution.csv``; ``summary.csv`` has, per mechanism,
the cost at the training side and the largest side that trained.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from attnbench import registry
from attnbench.measure.timing import cpu_peak_mib, cuda_peak_mib, is_out_of_memory, time_step
from attnbench.measure.worker import cap_address_space, fix_malloc, run_isolated
from attnbench.plots.resolution import resolution_plots
from attnbench.results.schema import SchemaError, upgrade_meta
from attnbench.results.tables import (
    ResultsError,
    read_meta,
    read_table,
    write_table,
)
from attnbench.sweeps.base import SweepError, SweepFolder
from attnbench.task import get_task

COLUMNS = ["task", "mechanism", "size", "side", "images", "status", "message", "step_ms", "img_s",
           "peak_mem_mib", "device", "threads", "memory_limit_mib", "budget_s", "options", "backend"]
SUMMARY_COLUMNS = ["task", "mechanism", "size", "train_side", "train_step_ms", "train_img_s",
                   "train_peak_mem_mib", "largest_side", "largest_peak_mem_mib", "first_failed_side",
                   "failure", "memory_limit_mib", "budget_s", "max_side"]


def read_probe(path: Path) -> pd.DataFrame:
    """A probe's ``resolution.csv``: the side a number in every row, step time and memory in every
    ``ok`` one; a damaged table is a ``ResultsError`` naming it."""
    return read_table(path, COLUMNS, numbers=["side"], ok_numbers=["step_ms", "peak_mem_mib"],
                      required=["task", "mechanism", "size", "side", "status", "memory_limit_mib"],
                      kind="resolution")


class ResolutionError(SweepError):
    """A probe request that cannot be run as asked; printed as one line."""


@dataclasses.dataclass
class ProbeConfig:
    task: str
    mechanisms: list[str]
    size: str
    start: int  # the task's training side, unless given
    max_side: int
    granularity: int
    memory_limit_mib: float | None  # CPU only; CUDA runs out of device memory by itself
    budget: float  # seconds per side, model building included
    threads: int
    device: str
    options: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    min_run_time: float = 0.2
    load: list[str] = dataclasses.field(default_factory=list)  # plug-in modules the child imports too

    def validate(self) -> None:
        if self.granularity < 1:
            raise ResolutionError(f"--granularity must be >= 1 pixel, got {self.granularity}")
        if self.start < self.granularity or self.start % self.granularity:
            raise ResolutionError(f"--start-side {self.start} must be a positive multiple of --granularity "
                                  f"{self.granularity}")
        if self.max_side < self.start:
            raise ResolutionError(f"--max-side {self.max_side} is below the start side {self.start}")
        if self.budget <= 0:
            raise ResolutionError(f"--budget must be > 0 seconds, got {self.budget}")
        if self.memory_limit_mib is not None and self.memory_limit_mib <= 0:
            raise ResolutionError(f"--memory-limit must be > 0 MiB, got {self.memory_limit_mib:g}")


def measure_step(config: dict[str, Any]) -> dict[str, Any]:
    """In the child: build the task's step at ``side``, time it, then measure its peak memory."""
    import torch

    for spec in config.get("load", []):  # a forked child: plug-in tasks and mechanisms again
        registry.load_module(spec)
    torch.manual_seed(0)
    torch.set_num_threads(config["threads"])
    device = torch.device(config["device"])
    backend = registry.get_mechanism(config["mechanism"]).backend(config["device"])
    result: dict[str, Any] = {"backend": backend}
    try:
        step, images = get_task(config["task"]).train_step(
            config["mechanism"], config["side"], config["size"], config["options"], config["device"])
        result["images"] = images
        if device.type == "cpu" and config.get("memory_limit_mib"):
            cap_address_space(config["memory_limit_mib"])  # from here on: the step's own memory
        timing = time_step(step, config["threads"], config["min_run_time"], min_runs=2)
        fix_malloc()
        if device.type == "cuda":
            peak = cuda_peak_mib(step, device, warm=True)
        else:
            peak = cpu_peak_mib(step, warm=True)
    except Exception as exc:  # an out-of-memory is the answer we are looking for, not a crash
        status = "oom" if is_out_of_memory(exc) else "error"
        return {**result, "status": status, "message": f"{type(exc).__name__}: {exc}"[:500]}
    return {**result, "status": "ok", "message": "", "step_ms": timing.median_ms,
            "img_s": images / (timing.median_ms / 1e3), "peak_mem_mib": peak}


def _row(cfg: ProbeConfig, mechanism: str, side: int, **measured: Any) -> dict[str, Any]:
    return {"task": cfg.task, "mechanism": mechanism, "size": cfg.size, "side": side, "device": cfg.device,
            "threads": cfg.threads, "memory_limit_mib": cfg.memory_limit_mib, "budget_s": cfg.budget,
            "options": json.dumps(cfg.options.get(mechanism, {}), sort_keys=True), **measured}


def try_side(cfg: ProbeConfig, mechanism: str, side: int, log_path: Path | None) -> dict[str, Any]:
    """One side of one mechanism, in its own process; failures are statuses."""
    reason = registry.get_mechanism(mechanism).unavailable_reason(cfg.device)
    if reason:
        return _row(cfg, mechanism, side, status="unavailable", message=reason)
    payload = {"task": cfg.task, "mechanism": mechanism, "side": side, "size": cfg.size,
               "options": cfg.options.get(mechanism, {}), "device": cfg.device, "threads": cfg.threads,
               "memory_limit_mib": cfg.memory_limit_mib, "min_run_time": cfg.min_run_time, "load": cfg.load}
    return _row(cfg, mechanism, side, **run_isolated(measure_step, payload, cfg.budget, log_path))


def sides_to_try(cfg: ProbeConfig, outcome: dict[int, bool]) -> int | None:
    """The next side to try given the outcomes so far (side -> trained?), or None when done.

    Doubling from the start side until a failure or past ``max_side``; then bisection between
    the largest success and the smallest failure, to ``granularity`` pixels.
    """
    good = [s for s, ok in outcome.items() if ok]
    bad = [s for s, ok in outcome.items() if not ok]
    if not outcome:
        return cfg.start
    if not good:
        return None  # the training side itself does not train
    largest = max(good)
    if not bad:
        nxt = largest * 2
        return min(nxt, cfg.max_side) if largest < cfg.max_side else None
    smallest_bad = min(bad)
    mid = (largest + smallest_bad) // 2 // cfg.granularity * cfg.granularity
    return mid if largest < mid < smallest_bad else None


# what must match for ``--resume`` to continue a probe: all but the mechanisms (more may be added)
RESUME_KEYS = ("task", "size", "start", "max_side", "granularity", "memory_limit_mib", "budget", "threads",
               "device", "options", "min_run_time")


def recorded_probe(out: Path) -> dict[str, Any]:
    """The probe settings of the folder ``out`` (its meta.json), for ``--resume``."""
    try:
        return dict(upgrade_meta(read_meta(out / "meta.json"), "resolution", str(out / "meta.json"))["probe"])
    except (ResultsError, SchemaError, KeyError, TypeError) as e:
        raise ResolutionError(f"cannot resume {out}: its meta.json holds no probe ({e})") from None


class ProbeFolder(SweepFolder):
    """A resolution probe's folder: ``resolution.csv``, and ``summary.csv`` and the plot once done."""

    table, columns, kind, error = "resolution.csv", COLUMNS, "a resolution probe", ResolutionError
    schema = "resolution"
    already = "{out} already holds a probe; choose another --out, or continue it with --resume"

    def check_resume(self) -> None:
        """Resumed with the same settings (all but the mechanisms: more may be added)."""
        if not self.csv.exists():
            return
        before, now = recorded_probe(self.out), dataclasses.asdict(self.cfg)
        differ = [k for k in RESUME_KEYS if before.get(k) != now[k]]
        if differ:
            raise ResolutionError(f"cannot resume {self.out}: it was probed with other settings ("
                                  + ", ".join(f"{k} {before.get(k)!r}, not {now[k]!r}" for k in differ) + ")")
        read_probe(self.csv)  # a damaged table: now, in one line


def check_probe_out(cfg: ProbeConfig, out: Path, resume: bool) -> None:
    """The probe ``cfg`` may write to ``out`` (``SweepFolder.check``); else a ``ResolutionError``."""
    ProbeFolder(cfg, out).check(resume)


def probe(cfg: ProbeConfig, out: Path, argv: list[str], log=None, resume: bool = False) -> pd.DataFrame:
    """Probe every mechanism; rows land in ``out/resolution.csv`` as they are measured. With
    ``resume`` the sides already in it are not measured again: the search picks up where it stopped."""
    log = log or sys.stderr
    folder = ProbeFolder(cfg, out)
    folder.check(resume)
    csv = folder.csv
    done = pd.DataFrame(columns=COLUMNS)
    if csv.exists():
        done = read_probe(csv)
        print(f"resuming: {len(done)} sides already in {csv}", file=log)
    meta = folder.meta(argv, resume, probe=dataclasses.asdict(cfg))
    folder.write_meta(meta)
    try:
        for mechanism in cfg.mechanisms:
            tried = done[done["mechanism"] == mechanism]
            if (tried["status"] == "unavailable").any():
                continue
            outcome: dict[int, bool] = {int(r.side): r.status == "ok" for r in tried.itertuples()}
            while (side := sides_to_try(cfg, outcome)) is not None:
                print(f"{mechanism} at {side}x{side} ...", end="", file=log, flush=True)
                row = try_side(cfg, mechanism, side, out / "worker.log")
                outcome[side] = row["status"] == "ok"
                shown = (f"{row['step_ms'] / 1e3:.2f} s/step, {row['img_s']:.2f} img/s, "
                         f"{row['peak_mem_mib']:.0f} MiB" if outcome[side]
                         else f"{row['status']}: {row.get('message', '')}"[:140])
                print(f" {shown}", file=log, flush=True)
                folder.append([row])
                if row["status"] == "unavailable":
                    break
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: the rows so far stay, and --resume goes on
        print(file=log)  # end the line of the side cut short
        raise folder.interrupted(exc, argv, note=", without summary or plot", verb="resume") from None
    table = folder.read(COLUMNS)
    write_table(out / "summary.csv", summarise(table, cfg))

    title = (f"{cfg.task}, {cfg.size} backbone: one training step at growing image sides — {meta.get('cpu')}"
             f"{', ' + meta['gpu'] if meta.get('gpu') else ''}, {cfg.device}, {cfg.threads} threads")
    resolution_plots(table, out, title, cfg.memory_limit_mib)
    return table


def summarise(table: pd.DataFrame, cfg: ProbeConfig) -> pd.DataFrame:
    """Per mechanism: the cost at the training side, the largest side that trained, and why the
    next one up did not."""
    rows = []
    for mechanism, runs in table.groupby("mechanism", sort=False):
        ok, failed = runs[runs["status"] == "ok"], runs[runs["status"] != "ok"]
        at_start = runs[runs["side"] == cfg.start].iloc[0] if (runs["side"] == cfg.start).any() else None
        trained = at_start is not None and at_start["status"] == "ok"
        largest = ok.loc[ok["side"].idxmax()] if len(ok) else None
        first_bad = failed.loc[failed["side"].idxmin()] if len(failed) else None
        rows.append({
            "task": cfg.task, "mechanism": mechanism, "size": cfg.size, "train_side": cfg.start,
            "train_step_ms": at_start["step_ms"] if trained else float("nan"),
            "train_img_s": at_start["img_s"] if trained else float("nan"),
            "train_peak_mem_mib": at_start["peak_mem_mib"] if trained else float("nan"),
            "largest_side": int(largest["side"]) if largest is not None else float("nan"),
            "largest_peak_mem_mib": largest["peak_mem_mib"] if largest is not None else float("nan"),
            "first_failed_side": int(first_bad["side"]) if first_bad is not None else float("nan"),
            "failure": (f"{first_bad['status']}: {first_bad['message']}"[:200] if first_bad is not None
                        else f"none up to --max-side {cfg.max_side}"),
            "memory_limit_mib": cfg.memory_limit_mib, "budget_s": cfg.budget, "max_side": cfg.max_side})
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
