"""``attnbench scale``: the sequence-length sweep.

At each n (and mode) every mechanism is built once, in a worker process of its own
(``attnbench.measure.worker.Session``), and then timed in interleaved rounds, A B C A B C …, so that a
burst of load hits all of them rather than one; the machine probe (``attnbench.measure.probe``) is
read before the sweep and between rounds, in a process of its own. A configuration whose
rounds the probe saw slowed by more than ``max_slowdown``, or whose runs spread more than
``max_spread`` of their median, is measured again (at most ``retries`` times); one that never
measured cleanly is kept and flagged ``noisy`` with the reason, and the fits leave it out.
Memory is a separate step after the timing. Rows (failures included) are appended to
``scale.csv`` and rounds to ``rounds.csv`` as each n finishes; at the end come the fit table,
the same-round ratios (``ratios.csv``) and the plots. Mechanism options given as lists
(``--opt set.m=16,64``) are variants (``set[m=16]``), each measured, fitted and drawn as a
mechanism of its own (the ``variant`` column). ``causal`` runs every mechanism's causal form; one
without a causal form is a row ``unavailable`` with its reason, and the sweep goes on.

The mode ``decode`` measures generation instead, through the same folder, workers and rounds: what
is its own lives in ``attnbench.sweeps.decode``. ``kv_heads`` (grouped-query heads) goes to the
mechanisms that take it, in every mode.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from attnbench import registry
from attnbench.measure.fit import fit_table, ratio_table
from attnbench.measure.probe import MachineState, Reading, floor_ms, median_reading
from attnbench.measure.timing import quartiles
from attnbench.measure.worker import STALL_ENV, Configuration, ProbeHandler, Session
from attnbench.options import Variant, variants
from attnbench.plots.kernel import scaling_plots, sweep_title
from attnbench.results.aggregate import BASELINES
from attnbench.results.tables import (
    flag,
    new_run_dir,
    read_meta,
    read_table,
    write_table,
)
from attnbench.sweeps import decode
from attnbench.sweeps.base import SweepError, SweepFolder

COLUMNS = ["mechanism", "variant", "n", "mode", "batch", "heads", "head_dim", "dtype", "device", "threads",
           "layout", "causal", "kv_heads", "options", "backend", "compiled", "time_ms_median", "time_ms_iqr",
           "time_ms_q1", "time_ms_q3", "runs", "rounds", "attempts", "spread", "noisy", "peak_mem_mib",
           "flops", "flops_matmul", "gflops", "floor_ms", "floor_fraction", "machine_gflops", "machine_gbs",
           "machine_slowdown", "compile_s", "prefill_ms", "prefill_status", "tokens_s", "cache_bytes",
           "cache_bytes_formula", "params", "status", "message"]
ROUND_COLUMNS = ["mechanism", "variant", "n", "mode", "pass", "attempt", "round", "time_ms_median", "runs",
                 "machine_gflops", "machine_gbs", "slowdown", "disturbed", "kept"]
KEY = ["mechanism", "variant", "n", "mode"]
MEASURED = ["mechanism", "n", "mode", "status", "time_ms_median", "peak_mem_mib"]  # in every scale.csv
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
PROBE_WARMUP = 5  # readings before the sweep: first-touch and clock ramps settle, the reference forms
PROBE_TIMEOUT = 60.0
MODES = ("fwd", "fwd+bwd", decode.MODE)


@dataclasses.dataclass
class SweepConfig:
    mechanisms: list[str]
    seq: list[int]
    modes: list[str]
    batch: int = 1
    heads: int = 4
    head_dim: int = 32
    dtype: str = "float32"
    device: str = "cpu"
    threads: int = 1
    layout: str = "1d"
    causal: bool = False  # every mechanism's causal form (1-D sequences only)
    kv_heads: int | None = None  # key/value heads of the mechanisms that take kv_heads; None: one per head
    # --opt, parsed with axes=True: a comma list (set.m=16,64) runs each value as a variant of its own
    options: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    budget: float = 120.0
    min_run_time: float = 0.5
    memory_limit_mib: float | None = None
    load: list[str] = dataclasses.field(default_factory=list)
    compile: bool = False
    rounds: int = 3
    retries: int = 2
    max_slowdown: float = 0.25
    max_spread: float = 0.5
    settle_s: float = 5.0  # before measuring again, wait up to this long for the machine to calm down

    def validate(self) -> None:
        for name, value, low in (("--batch", self.batch, 1), ("--heads", self.heads, 1),
                                 ("--head-dim", self.head_dim, 1), ("--threads", self.threads, 1),
                                 ("--rounds", self.rounds, 1), ("--retries", self.retries, 0)):
            if value < low:
                raise SweepError(f"{name} must be >= {low}, got {value}")
        for name, value in (("--budget", self.budget), ("--max-slowdown", self.max_slowdown),
                            ("--max-spread", self.max_spread)):
            if not value > 0:
                raise SweepError(f"{name} must be > 0, got {value}")
        if self.causal and self.layout != "1d":
            raise SweepError("--causal: causal attention is defined on sequences; use --layout 1d")
        unknown = [m for m in self.modes if m not in MODES]
        if unknown or not self.modes:
            shown = unknown[0] if unknown else "(none)"
            raise SweepError(f"--mode {shown}; valid choices: {', '.join(MODES)}")
        if decode.MODE in self.modes:
            decode.check_settings(self.layout, self.compile)
        self._check_kv_heads()
        if self.dtype not in ("float32", "float16", "bfloat16", "float64"):
            raise SweepError(f"--dtype {self.dtype!r}; valid choices: float32, float16, bfloat16, float64")
        self.variants()  # options of a mechanism not swept, or a bad combination: refused now

    def variants(self) -> list[Variant]:
        """Each mechanism once per combination of its swept options: ``set[m=16]``, ``set[m=64]``;
        ``kv_heads`` among the options of every mechanism that takes it."""
        found = variants(self.mechanisms, self.options)
        if self.kv_heads is None:
            return found
        return [dataclasses.replace(v, options={**v.options, "kv_heads": str(self.kv_heads)})
                if takes_kv_heads(v.mechanism) else v for v in found]

    def _check_kv_heads(self) -> None:
        """--kv-heads, or a mechanism's kv_heads option, divides --heads; not both given."""
        if self.kv_heads is not None:
            given = [m for m, o in self.options.items() if "kv_heads" in o]
            if given:
                raise SweepError(f"--kv-heads and --opt {given[0]}.kv_heads: give one of them")
        for variant in self.variants():
            value = variant.options.get("kv_heads")
            if value is not None and str(value).lower() != "none" and self.heads % int(value):
                valid = ", ".join(str(h) for h in range(1, self.heads + 1) if self.heads % h == 0)
                raise SweepError(f"kv_heads={value} ({variant.label}) does not divide --heads {self.heads}; "
                                 f"valid: {valid}")


def takes_kv_heads(mechanism: str) -> bool:
    """Whether the mechanism has a ``kv_heads`` option (grouped-query heads)."""
    options = registry.get_mechanism(mechanism).Options
    return any(f.name == "kv_heads" for f in dataclasses.fields(options))


def kv_heads_of(cfg: SweepConfig, job: dict[str, Any]) -> int | None:
    """The key/value heads the job's mechanism runs with; None for one without the option."""
    if not takes_kv_heads(job["mechanism"]):
        return None
    value = _options(cfg, job).get("kv_heads")
    return cfg.heads if value is None or str(value).lower() == "none" else int(value)


def _grid(n: int, layout: str) -> tuple[int, int] | None:
    if layout == "1d":
        return None
    side = math.isqrt(n)
    return (side, side) if side * side == n else None


def configurations(cfg: SweepConfig) -> list[dict[str, Any]]:
    """Every (mechanism variant, n, mode), n by n: the variants at one n are timed in alternation."""
    return [{"mechanism": v.mechanism, "variant": v.label, "n": n, "mode": mode} for mode in cfg.modes
            for n in cfg.seq for v in cfg.variants()]


def _options(cfg: SweepConfig, job: dict[str, Any]) -> dict[str, str]:
    """The options of the job's variant."""
    return next(v.options for v in cfg.variants() if v.label == job["variant"])


def read_sweep(path: Path, columns: list[str] | None = None) -> pd.DataFrame:
    """A sweep's ``scale.csv``: the ``MEASURED`` columns, n a number in every row and time and memory in
    every ``ok`` one; a damaged table is a ``ResultsError`` naming it."""
    return read_table(path, columns, required=MEASURED, numbers=["n"],
                      ok_numbers=["time_ms_median", "peak_mem_mib"], kind="scale")


def read_rounds(path: Path) -> pd.DataFrame:
    """A sweep's ``rounds.csv`` in the current layout."""
    return read_table(path, ROUND_COLUMNS, kind="rounds")


def by_variant(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` (as ``read_sweep`` or ``read_rounds`` give it) with each variant as a ``mechanism``
    of its own (``set[m=16]``), as the fits, the ratios and the plots take it."""
    return table.assign(mechanism=table["variant"])


def _row(cfg: SweepConfig, job: dict[str, Any], **measured: Any) -> dict[str, Any]:
    return {**job, "batch": cfg.batch, "heads": cfg.heads, "head_dim": cfg.head_dim, "dtype": cfg.dtype,
            "device": cfg.device, "threads": cfg.threads, "layout": cfg.layout,
            "causal": cfg.causal or job["mode"] == decode.MODE, "kv_heads": kv_heads_of(cfg, job),
            "options": json.dumps(_options(cfg, job), sort_keys=True), "compiled": cfg.compile, **measured}


def _unavailable(cfg: SweepConfig, job: dict[str, Any]) -> str | None:
    """Why this configuration cannot run here, or None."""
    cls = registry.get_mechanism(job["mechanism"])
    if job["mode"] == decode.MODE and (problem := decode.unavailable(cls)) is not None:
        return problem
    causal = cls.causal_problem() if cfg.causal else None
    if causal is not None:
        return f"causal=True is not supported: {causal}"
    reason = cls.unavailable_reason(cfg.device)
    grid = _grid(job["n"], cfg.layout)
    if reason is None and cfg.layout == "2d" and grid is None:
        reason = f"n={job['n']} is not a square number of image tokens (--layout 2d)"
    if reason is None and cls.needs_grid and grid is None:
        reason = "needs a 2-D grid of tokens: use --layout 2d with square n"
    return reason


def _payload(cfg: SweepConfig, job: dict[str, Any]) -> dict[str, Any]:
    """What the worker needs to build the configuration."""
    return {**job, "batch": cfg.batch, "heads": cfg.heads, "head_dim": cfg.head_dim, "dtype": cfg.dtype,
            "device": cfg.device, "threads": cfg.threads, "grid": _grid(job["n"], cfg.layout),
            "causal": cfg.causal, "options": _options(cfg, job), "memory_limit_mib": cfg.memory_limit_mib,
            "load": cfg.load, "compile": cfg.compile, "stall": os.environ.get(STALL_ENV, "")}


class MachineProbe:
    """The probe's worker session and every reading of this sweep; a probe that fails reads NaN."""

    def __init__(self, cfg: SweepConfig, log_path: Path | None, log: Any) -> None:
        config = {"device": cfg.device, "dtype": cfg.dtype, "threads": cfg.threads}
        self.session = Session(ProbeHandler, config, log_path)
        self.max_slowdown = cfg.max_slowdown
        self.state = MachineState()
        self.last = Reading(math.nan, math.nan)
        self.log = log
        self.failed = False

    def read(self) -> Reading:
        """A reading, confirmed when it looks slow: a slow-down that is real lasts into a second
        reading taken at once, while a blip of a few milliseconds (seen here right after a
        worker's round) does not, and must not send a clean round to be measured again."""
        reading = self._read_once()
        if len(self.state.readings) > PROBE_WARMUP and self.state.slowdown([reading]) > 1 + self.max_slowdown:
            again = self._read_once()
            if self.state.slowdown([again]) < self.state.slowdown([reading]):
                reading = again
        if math.isfinite(reading.gflops):
            self.state.add(reading)
        self.last = reading
        return reading

    def _read_once(self) -> Reading:
        if self.failed:
            return Reading(math.nan, math.nan)
        answer = self.session.request({"op": "read"}, PROBE_TIMEOUT)
        if answer["status"] != "ok":
            self.failed = True
            print(f"machine probe failed ({answer['message']}); going on without it", file=self.log)
            return Reading(math.nan, math.nan)
        return Reading(answer["gflops"], answer["gbs"])

    def settle(self, max_slowdown: float, seconds: float) -> None:
        """Wait, at most ``seconds``, until the machine reads as fast as its best again (within
        ``max_slowdown``): a measurement repeated in the middle of a burst of load is wasted."""
        end = time.monotonic() + seconds
        while not self.failed and self.state.slowdown([self.read()]) > 1 + max_slowdown:
            if time.monotonic() > end:
                return
            time.sleep(0.25)

    def close(self) -> None:
        self.session.close()


@dataclasses.dataclass
class Round:
    """One timing round of one configuration, with the probe readings just before and after it."""

    attempt: int
    index: int
    pass_id: int
    times_ms: list[float]
    readings: tuple[Reading, Reading]
    slowdown: float

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)


@dataclasses.dataclass
class Live:
    """A configuration being measured: its worker, its setup answer, its rounds and verdicts."""

    job: dict[str, Any]
    session: Session
    setup: dict[str, Any]
    rounds: list[Round] = dataclasses.field(default_factory=list)
    verdicts: list[str] = dataclasses.field(default_factory=list)  # per measurement: "" = clean
    attempt_start: list[float] = dataclasses.field(default_factory=list)  # session.spent at each start
    failure: dict[str, Any] | None = None
    peak_mem_mib: float = math.nan

    @property
    def clean(self) -> bool:
        return bool(self.verdicts) and self.verdicts[-1] == ""

    def kept(self) -> list[Round]:
        """The rounds of the measurement the row reports: the clean one, else the last."""
        return [r for r in self.rounds if r.attempt == len(self.verdicts) - 1]

    def can_retry(self, budget: float) -> bool:
        """Whether another measurement (as long as the last) and the memory step fit the budget."""
        last = self.session.spent - self.attempt_start[-1]
        return self.session.spent + last + self.setup.get("step_s", 0.0) <= budget


def _statistics(rounds: list[Round]) -> dict[str, float]:
    """The median over rounds of each round's median, the IQR of all runs, and their spread:
    the larger of the IQR and the range of the round medians, as a fraction of the median."""
    medians = [r.median_ms for r in rounds]
    runs = [t for r in rounds for t in r.times_ms]
    median = statistics.median(medians)
    q1, _, q3 = quartiles(runs)
    spread = max(q3 - q1, max(medians) - min(medians)) / median if median > 0 else math.inf
    return {"time_ms_median": median, "time_ms_iqr": q3 - q1, "time_ms_q1": q1, "time_ms_q3": q3,
            "runs": len(runs), "rounds": len(rounds), "spread": spread}


def _verdict(cfg: SweepConfig, rounds: list[Round]) -> str:
    """Why one measurement (its rounds) is not clean; "" when it is."""
    reasons = []
    slowdown = max((r.slowdown for r in rounds if math.isfinite(r.slowdown)), default=math.nan)
    if slowdown > 1 + cfg.max_slowdown:
        reasons.append(f"machine {slowdown:.2f}x slower than its best (probe)")
    spread = _statistics(rounds)["spread"]
    if spread > cfg.max_spread:
        reasons.append(f"runs spread {spread:.2f} of the median")
    return " and ".join(reasons)


def _round_request(cfg: SweepConfig, live: Live, index: int) -> dict[str, Any]:
    """One round's share of --min-time, and of the 5 runs (3 for steps over a second; 32 generated
    tokens in decode) a row needs: 5 runs in 3 rounds are 2, 2 and 1; every round has at least one."""
    runs = 3 if live.setup.get("step_s", 0.0) > 1.0 else 5
    if live.job["mode"] == decode.MODE:
        runs = decode.DECODE_STEPS
    share = runs // cfg.rounds + (index < runs % cfg.rounds)
    return {"op": "round", "index": index, "seconds": cfg.min_run_time / cfg.rounds,
            "min_runs": max(1, share)}


def _measure_rounds(cfg: SweepConfig, group: list[Live], probe: MachineProbe,
                    passes: Iterator[int]) -> None:
    """Time ``group`` in interleaved rounds; measure again what was not clean, within the retries."""
    for attempt in range(cfg.retries + 1):
        pending = [c for c in group if c.failure is None and not c.clean
                   and (attempt == 0 or c.can_retry(cfg.budget))]
        if not pending:
            return
        if attempt > 0:
            probe.settle(cfg.max_slowdown, cfg.settle_s)
        for c in pending:
            c.attempt_start.append(c.session.spent)
        before = probe.read()
        for index in range(cfg.rounds):
            pass_id = next(passes)
            for c in pending:
                if c.failure is not None:
                    continue
                answer = c.session.request(_round_request(cfg, c, index))
                after = probe.read()
                if answer["status"] == "ok":
                    slowdown = probe.state.slowdown([before, after])
                    c.rounds.append(Round(attempt, index, pass_id, answer["times_ms"], (before, after),
                                          slowdown))
                else:
                    c.failure = answer
                before = after  # one reading between two rounds serves both
        for c in pending:
            if c.failure is None:
                c.verdicts.append(_verdict(cfg, [r for r in c.rounds if r.attempt == attempt]))


def _message(cfg: SweepConfig, live: Live) -> str:
    """Why a row is noisy, or what its earlier measurements showed ("" when the first was clean)."""
    earlier = "; ".join(v for v in live.verdicts[:-1] if v)
    if live.clean:
        return f"clean on measurement {len(live.verdicts)} (before: {earlier})" if earlier else ""
    retried = len(live.verdicts) - 1
    more = "" if retried == cfg.retries else " (no budget left to measure it again)"
    return f"noisy: {live.verdicts[-1]}, in all {len(live.verdicts)} measurements{more}"


def _finished_row(cfg: SweepConfig, live: Live) -> dict[str, Any]:
    """The row of a measured configuration: its statistics, the machine's rate and the floor."""
    setup = {k: v for k, v in live.setup.items() if k not in ("first_call_s", "step_s", "capacity",
                                                             "prefill_message")}
    if live.failure is not None:
        return _row(cfg, live.job, **{**setup, **live.failure})
    prefill = live.setup.get("prefill_message", "")
    if prefill:  # the prompt's outputs did not fit: the cache was built without them
        prefill = f"prefill out of memory ({prefill}); the cache built without the prompt's outputs"
    rounds = live.kept()
    stats = _statistics(rounds)
    machine = median_reading([r for rd in rounds for r in rd.readings if math.isfinite(r.gflops)])
    slowdowns = [r.slowdown for r in rounds if math.isfinite(r.slowdown)]
    median_s = stats["time_ms_median"] * 1e-3
    floor = floor_ms(setup["flops_matmul"], setup["flops"] - setup["flops_matmul"], DTYPE_BYTES[cfg.dtype],
                     machine)
    compile_s = max(0.0, live.setup["first_call_s"] - median_s) if cfg.compile else math.nan
    measured = {
        **setup, **stats, "attempts": len(live.verdicts), "noisy": not live.clean,
        "peak_mem_mib": live.peak_mem_mib,
        "gflops": setup["flops"] / median_s / 1e9 if median_s > 0 else math.nan,
        "floor_ms": floor, "floor_fraction": floor / stats["time_ms_median"],
        "machine_gflops": machine.gflops, "machine_gbs": machine.gbs,
        "machine_slowdown": max(slowdowns, default=math.nan), "compile_s": compile_s,
        "message": "; ".join(filter(None, (live.setup.get("message", ""), prefill, _message(cfg, live))))}
    if live.job["mode"] == decode.MODE:
        measured["tokens_s"] = decode.tokens_s(cfg.batch, median_s)
    return _row(cfg, live.job, **measured)


def _round_rows(cfg: SweepConfig, live: Live) -> list[dict[str, Any]]:
    """``rounds.csv`` rows of a configuration: every round, whether the probe saw it disturbed,
    and whether it belongs to the measurement the row reports."""
    if live.failure is not None:
        return []
    kept = len(live.verdicts) - 1
    rows = []
    for r in live.rounds:
        machine = median_reading([x for x in r.readings if math.isfinite(x.gflops)])
        rows.append({**live.job, "pass": r.pass_id, "attempt": r.attempt, "round": r.index,
                     "time_ms_median": r.median_ms, "runs": len(r.times_ms), "machine_gflops": machine.gflops,
                     "machine_gbs": machine.gbs, "slowdown": r.slowdown,
                     "disturbed": r.slowdown > 1 + cfg.max_slowdown, "kept": r.attempt == kept})
    return rows


def measure_group(cfg: SweepConfig, jobs: list[dict[str, Any]], probe: MachineProbe,
                  passes: Iterator[int], log_path: Path | None = None
                  ) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Measure the configurations at one n and mode together: build each in its worker, time them
    in interleaved rounds, then measure each one's memory. Yields (row, its rounds) in job order;
    failures become statuses, never exceptions."""
    rows: dict[int, dict[str, Any]] = {}
    group: dict[int, Live] = {}
    try:
        for i, job in enumerate(jobs):
            reason = _unavailable(cfg, job)
            if reason:
                rows[i] = _row(cfg, job, status="unavailable", message=reason)
                continue
            handler = decode.WORKER if job["mode"] == decode.MODE else Configuration
            session = Session(handler, _payload(cfg, job), log_path, budget=cfg.budget)
            setup = session.request({"op": "setup"})
            if setup["status"] != "ok":
                session.close()
                rows[i] = _row(cfg, job, **setup)
                continue
            group[i] = Live(job, session, setup)
        _measure_rounds(cfg, list(group.values()), probe, passes)
        for live in group.values():  # memory last: it fixes the allocator of the worker
            if live.failure is None:
                answer = live.session.request({"op": "memory"})
                if answer["status"] == "ok":
                    live.peak_mem_mib = answer["peak_mem_mib"]
                else:
                    live.failure = answer
    finally:
        for live in group.values():
            live.session.close()
    for i in range(len(jobs)):
        if i in rows:
            yield rows[i], []
        else:
            yield _finished_row(cfg, group[i]), _round_rows(cfg, group[i])


def default_out_dir(root: Path) -> Path:
    """A new sweep folder under ``root/runs``, named as ``attnbench.results.new_run_dir`` names one."""
    return root / "runs" / new_run_dir("scale").name


def _format_result(row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return f"{row['status']}: {row.get('message', '')}"[:120]
    text = decode.result_text(row) if row["mode"] == decode.MODE else (
        f"{row['time_ms_median']:.3g} ms (IQR {row['time_ms_iqr']:.2g}), {row['peak_mem_mib']:.1f} MiB, "
        f"{row['gflops']:.3g} GFLOP/s, floor/time {row['floor_fraction']:.2f}")
    return text + (f" -- {row['message']}"[:160] if row["message"] else "")


# What every row of one sweep folder shares, by the flag that sets it.
_SHARED = {"batch": "--batch", "heads": "--heads", "head_dim": "--head-dim", "dtype": "--dtype",
           "device": "--device", "layout": "--layout", "threads": "--threads", "compile": "--compile",
           "modes": "--mode", "causal": "--causal", "kv_heads": "--kv-heads"}


def _check_resume(cfg: SweepConfig, old: dict[str, Any], done: pd.DataFrame, out: Path) -> None:
    """A resumed sweep must measure as its folder did: the settings every row shares (``old``, its
    meta.json's), and for each variant already measured, the same mechanism options (``done``, its
    rows in scale.csv)."""
    for key, option in _SHARED.items():
        now = json.loads(json.dumps(getattr(cfg, key)))  # as meta.json holds it: lists, not tuples
        before = old.get(key, now)
        if before != now:
            raise SweepError(f"--resume: {out} was measured with {option} {_shown(before)}, this sweep "
                             f"asks for {_shown(now)}; resume with the same {option} or choose another --out")
    measured = {v: _row_options(o) for v, o in zip(done["variant"], done["options"], strict=True)}
    for variant in cfg.variants():
        before = measured.get(variant.label)
        if before is not None and before != variant.options:
            raise SweepError(f"--resume: {out} measured {variant.label} with --opt "
                             f"{_shown_options(variant.mechanism, before)}, this sweep asks for "
                             f"{_shown_options(variant.mechanism, variant.options)}; resume with the same "
                             "--opt or choose another --out")


def _row_options(text: Any) -> dict[str, Any] | None:
    """A scale.csv row's ``options`` (JSON), or None where there is none to compare."""
    try:
        options = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        return None
    return options if isinstance(options, dict) else None


def _shown(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _shown_options(mechanism: str, options: dict[str, Any]) -> str:
    """``set.m=64 set.iters=3``, or ``none`` (its defaults)."""
    return " ".join(f"{mechanism}.{k}={v}" for k, v in sorted(options.items())) or "none (its defaults)"


def _keep_measured_rounds(out: Path, done: pd.DataFrame) -> int:
    """Drop rounds of configurations without a row (an interrupted n); returns the next pass id."""
    path = out / "rounds.csv"
    rounds = read_rounds(path)
    if rounds.empty:
        return 0
    keys = {(v, int(n), mode) for v, n, mode in zip(done["variant"], done["n"], done["mode"], strict=True)}
    mask = [(v, int(n), mode) in keys
            for v, n, mode in zip(rounds["variant"], rounds["n"], rounds["mode"], strict=True)]
    write_table(path, rounds[mask])
    return int(rounds["pass"].max()) + 1


class KernelFolder(SweepFolder):
    """A kernel sweep's folder: ``scale.csv``, and ``rounds.csv`` beside it."""

    table, columns, kind, schema = "scale.csv", COLUMNS, "a kernel sweep", "scale"

    def check_resume(self) -> None:
        if self.meta_path.exists():
            _check_resume(self.cfg, self.recorded().get("sweep", {}), self.read(COLUMNS), self.out)


def check_sweep_out(cfg: SweepConfig, out: Path, resume: bool) -> None:
    """The sweep ``cfg`` may write to ``out`` (``SweepFolder.check``); else a ``SweepError``."""
    KernelFolder(cfg, out).check(resume)


def run_sweep(cfg: SweepConfig, out: Path, resume: bool, argv: list[str], log=None) -> pd.DataFrame:
    """Run every configuration not already in ``out/scale.csv``; returns the full table.

    Progress goes to ``log`` (stderr by default), one line per configuration.
    """
    log = log or sys.stderr
    folder = KernelFolder(cfg, out)
    folder.check(resume)
    csv = folder.csv
    meta = folder.meta(argv, resume, sweep=dataclasses.asdict(cfg))
    out.mkdir(parents=True, exist_ok=True)
    done = read_sweep(csv, COLUMNS)
    seen = {(r.variant, int(r.n), r.mode) for r in done.itertuples()} if len(done) else set()
    jobs = [j for j in configurations(cfg) if (j["variant"], j["n"], j["mode"]) not in seen]
    if seen:
        print(f"resuming: {len(seen)} configurations already measured, {len(jobs)} to go", file=log)
    passes = itertools.count(_keep_measured_rounds(out, done))
    start = time.monotonic()
    probe = MachineProbe(cfg, out / "worker.log", log)
    try:
        for _ in range(PROBE_WARMUP):
            probe.read()
        best = probe.state.reference()
        meta["probe_before"] = {"gflops": best.gflops, "gbs": best.gbs}
        folder.write_meta(meta)
        i = 0
        for (mode, n), group in itertools.groupby(jobs, key=lambda j: (j["mode"], j["n"])):
            group = list(group)
            elapsed = dt.timedelta(seconds=round(time.monotonic() - start))
            print(f"[{elapsed}] n={n} {mode}: {', '.join(j['variant'] for j in group)} in {cfg.rounds} "
                  f"interleaved rounds ...", file=log, flush=True)
            for row, rounds in measure_group(cfg, group, probe, passes, out / "worker.log"):
                i += 1
                print(f"  [{i}/{len(jobs)}] {row['variant']} n={n} {mode}: {_format_result(row)}",
                      file=log, flush=True)
                folder.append_beside("rounds.csv", rounds, ROUND_COLUMNS, "rounds")
                folder.append([row])
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: the rows so far stay, --resume measures the rest
        raise folder.interrupted(exc, argv, total=len(done) + len(jobs)) from None
    finally:
        probe.close()
    return folder.read(COLUMNS)


def finish(out: Path, fit_min_n: int, log=None) -> pd.DataFrame:
    """Write the fit table, the same-round ratios and the plots of a sweep folder; returns the fits."""
    log = log or sys.stderr

    table = by_variant(read_sweep(out / "scale.csv"))  # fits, plots: a series per variant
    if table.empty:
        raise SweepError(f"{out / 'scale.csv'} holds no measurements")
    fits = fit_table(table, fit_min_n)
    write_table(out / "fits.csv", fits)
    ratios = ratio_table(by_variant(read_rounds(out / "rounds.csv")))
    write_table(out / "ratios.csv", ratios)
    meta = read_meta(out / "meta.json")
    paths = scaling_plots(table, fits, out, sweep_title(meta), ratios)
    print(f"wrote {out / 'scale.csv'}, {out / 'fits.csv'}, {out / 'ratios.csv'} and {len(paths)} plot files",
          file=log)
    return fits


def _interval(low: float, high: float) -> str:
    return f"[{low:.2f}, {high:.2f}]" if math.isfinite(low) and math.isfinite(high) else "-"


def fit_summary(fits: pd.DataFrame) -> pd.DataFrame:
    """The fit table as the console shows it: each exponent with its 95 % interval."""
    shown = fits[["mechanism", "mode"]].copy()
    shown["time_exponent"] = fits["time_exponent"].map(lambda v: f"{v:.2f}" if math.isfinite(v) else "-")
    shown["95%_CI"] = [_interval(lo, hi) for lo, hi in zip(fits["time_ci_low"], fits["time_ci_high"],
                                                            strict=True)]
    shown["R2"] = fits["time_r2"].map(lambda v: f"{v:.3f}" if math.isfinite(v) else "-")
    shown["points"] = fits["points"]
    shown["scaling"] = fits["scaling"]
    shown["memory_exponent"] = [f"{e:.2f} {_interval(lo, hi)}" if math.isfinite(e) else "-" for e, lo, hi in
                                zip(fits["memory_exponent"], fits["memory_ci_low"], fits["memory_ci_high"],
                                    strict=True)]
    cache = decode.cache_exponents(fits, _interval)  # a decode sweep: how the cache grows with the context
    if cache is not None:
        shown["cache_exponent"] = cache
    shown["noisy_left_out"] = fits["noisy_left_out"]
    for b in BASELINES:
        shown[f"faster_than_{b}_from_n"] = fits[f"crossover_vs_{b}"].map(
            lambda v: f"{int(v)}" if math.isfinite(v) else "-")
    return shown


def ratio_summary(ratios: pd.DataFrame) -> tuple[str, pd.DataFrame] | None:
    """Time against the first baseline measured (sdpa, else softmax) at each n, measured in the
    same rounds: 'median [q1, q3]' per mechanism and n; None without such rounds."""
    baseline = next((b for b in ("sdpa", "softmax") if b in set(ratios.get("baseline", []))), None)
    if baseline is None:
        return None
    mine = ratios[ratios["baseline"] == baseline].copy()
    mine["cell"] = [f"{m:.2g}x [{a:.2g}, {b:.2g}]" for m, a, b in
                    zip(mine["ratio_median"], mine["ratio_q1"], mine["ratio_q3"], strict=True)]
    wide = mine.pivot_table(index=["mechanism", "mode"], columns="n", values="cell", aggfunc="first")
    return baseline, wide.fillna("-")


def machine_summary(table: pd.DataFrame, rounds: pd.DataFrame, meta: dict[str, Any] | None = None) -> str:
    """Plain words on how steady the machine was: the probe's range and the rows flagged noisy."""
    lines = []
    if not rounds.empty and rounds["machine_gflops"].notna().any():
        g, b = rounds["machine_gflops"], rounds["machine_gbs"]
        lines.append(f"machine probe over {len(rounds)} rounds: matmul {g.min():.3g} to {g.max():.3g} "
                     f"GFLOP/s, copy {b.min():.3g} to {b.max():.3g} GB/s; the slowest round saw the machine "
                     f"{rounds['slowdown'].max():.2f}x slower than its best")
    ok = table[table["status"] == "ok"]
    noisy = ok[flag(ok, "noisy")]
    if len(ok) and ok["noisy"].isna().all():
        lines.append("no noise flags in this table (measured before the probe existed)")
    elif noisy.empty:
        lines.append(f"machine steady enough: none of the {len(ok)} measured rows is flagged noisy")
    else:
        lines.append(f"MACHINE NOISY: {len(noisy)} of {len(ok)} measured rows flagged noisy, left out of "
                     f"the fits:")
        lines += [f"  {r.mechanism} n={int(r.n)} {r.mode}: {r.message}" for r in noisy.itertuples()]
        threads, cpus = (meta or {}).get("threads"), (meta or {}).get("cpu_count")
        if threads and cpus and threads >= cpus > 1:
            lines.append(f"  (--threads {threads} on {cpus} CPUs: a process busy on any core stalls every "
                         f"step; --threads {cpus - 1} leaves a core to it)")
    retried = ok[(pd.to_numeric(ok["attempts"]) > 1) & ~flag(ok, "noisy")]
    if len(retried):
        lines.append(f"{len(retried)} rows measured again after a disturbed measurement, then clean")
    return "\n".join(lines)


def summary(out: Path, fits: pd.DataFrame) -> str:
    """The console summary of a sweep folder: fits with intervals, same-round ratios, the machine."""
    table = by_variant(read_table(out / "scale.csv", kind="scale"))
    rounds = by_variant(read_rounds(out / "rounds.csv"))
    meta = read_meta(out / "meta.json")
    parts = []
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.max_colwidth", 40):
        parts.append(fit_summary(fits).to_string(index=False))
        ratios = ratio_summary(ratio_table(rounds))
        if ratios is not None:
            baseline, wide = ratios
            parts.append(f"time relative to {baseline}, measured in the same rounds (median [quartiles] over "
                         f"rounds; ratios.csv has every pair):\n{wide.to_string()}")
    parts.append(machine_summary(table, rounds, meta))
    return "\n\n".join(parts)


def compare(out: Path, other: Path, threshold: float = 0.10) -> pd.DataFrame:
    """Time and memory ratios of this run against a saved one; regressions flagged.

    A regression is a time more than ``threshold`` slower whose gap also exceeds the two
    runs' inter-quartile ranges, so noise alone does not raise it, and whose rows are neither
    flagged noisy (``noisy`` says where either was).
    """
    mine, theirs = (read_sweep(folder / "scale.csv") for folder in (out, other))
    if theirs.empty:
        raise SweepError(f"--compare {other}: no scale.csv there")
    mine["noisy"], theirs["noisy"] = flag(mine, "noisy"), flag(theirs, "noisy")
    for table in (mine, theirs):  # as bools, whatever CSV made of them
        table["causal"] = flag(table, "causal")
    keys = KEY + ["batch", "heads", "head_dim", "dtype", "device", "causal"]
    both = mine.merge(theirs, on=keys, suffixes=("", "_before"))
    both = both[(both["status"] == "ok") & (both["status_before"] == "ok")]
    result = both[keys].copy()
    result["time_ratio"] = both["time_ms_median"] / both["time_ms_median_before"]
    result["memory_ratio"] = both["peak_mem_mib"] / both["peak_mem_mib_before"]
    result["noisy"] = both["noisy"] | both["noisy_before"]
    gap = both["time_ms_median"] - both["time_ms_median_before"]
    noise = both["time_ms_iqr"].fillna(0) + both["time_ms_iqr_before"].fillna(0)
    result["regression"] = (result["time_ratio"] > 1 + threshold) & (gap > noise) & ~result["noisy"]
    write_table(out / "compare.csv", result)
    return result
