"""``attnbench scale``: the sequence-length sweep.

Each (mechanism, n, mode) runs in its own worker process (``attnbench.worker``), one after
another, under a time budget. Every result, failures included, is appended to ``scale.csv``
as soon as it exists; at the end come the fit table and the plots.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd

from attnbench import registry
from attnbench.fit import fit_table
from attnbench.results import append_row, read_table, run_context, write_meta, write_table
from attnbench.worker import measure, run_isolated

COLUMNS = ["mechanism", "n", "mode", "batch", "heads", "head_dim", "dtype", "device", "threads",
           "layout", "options", "backend", "time_ms_median", "time_ms_iqr", "runs", "peak_mem_mib",
           "flops", "gflops", "params", "status", "message"]
KEY = ["mechanism", "n", "mode"]
MAX_N = 2**24


class SweepError(ValueError):
    """A sweep request that cannot be run as asked (bad range, mismatched resume)."""


def parse_seq(text: str) -> list[int]:
    """``256..16384`` (doubling), ``256,1024,4096`` or ``512`` -> sorted sequence lengths."""
    text = text.strip()
    if m := re.fullmatch(r"(\d+)\s*\.\.\s*(\d+)", text):
        lo, hi = int(m[1]), int(m[2])
        if lo < 1 or hi < lo:
            raise SweepError(f"--seq {text!r}: the range LO..HI needs 1 <= LO <= HI (doubling from LO), "
                             f"e.g. 256..16384")
        values = []
        n = lo
        while n <= hi:
            values.append(n)
            n *= 2
    elif re.fullmatch(r"\d+(\s*,\s*\d+)*", text):
        values = sorted({int(v) for v in text.split(",")})
        if values[0] < 1:
            raise SweepError(f"--seq {text!r}: sequence lengths must be >= 1")
    else:
        raise SweepError(f"--seq {text!r}: expected a doubling range LO..HI (256..16384), a comma list "
                         f"(256,1024,4096) or one length (512)")
    if values[-1] > MAX_N:
        raise SweepError(f"--seq {text!r}: {values[-1]} is beyond the largest supported n ({MAX_N})")
    return values


def parse_mechanisms(text: str) -> list[str]:
    """``all`` = every registered mechanism (unavailable ones are recorded as such)."""
    names = registry.mechanism_names()
    if text.strip() == "all":
        return names
    chosen = [t.strip() for t in text.split(",") if t.strip()]
    if not chosen:
        raise SweepError(f"--mechanism is empty; valid choices: all, {', '.join(names)}")
    for name in chosen:
        registry.get_mechanism(name)  # unknown names raise with the valid choices
    return list(dict.fromkeys(chosen))


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
    options: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    budget: float = 120.0
    min_run_time: float = 0.5
    memory_limit_mib: float | None = None
    load: list[str] = dataclasses.field(default_factory=list)

    def validate(self) -> None:
        for name, value, low in (("--batch", self.batch, 1), ("--heads", self.heads, 1),
                                 ("--head-dim", self.head_dim, 1), ("--threads", self.threads, 1)):
            if value < low:
                raise SweepError(f"{name} must be >= {low}, got {value}")
        if self.budget <= 0:
            raise SweepError(f"--budget must be > 0 seconds, got {self.budget}")
        if self.dtype not in ("float32", "float16", "bfloat16", "float64"):
            raise SweepError(f"--dtype {self.dtype!r}; valid choices: float32, float16, bfloat16, float64")


def _grid(n: int, layout: str) -> tuple[int, int] | None:
    if layout == "1d":
        return None
    side = math.isqrt(n)
    return (side, side) if side * side == n else None


def configurations(cfg: SweepConfig) -> list[dict[str, Any]]:
    return [{"mechanism": m, "n": n, "mode": mode} for m in cfg.mechanisms for mode in cfg.modes
            for n in cfg.seq]


def _row(cfg: SweepConfig, job: dict[str, Any], **measured: Any) -> dict[str, Any]:
    return {**job, "batch": cfg.batch, "heads": cfg.heads, "head_dim": cfg.head_dim, "dtype": cfg.dtype,
            "device": cfg.device, "threads": cfg.threads, "layout": cfg.layout,
            "options": json.dumps(cfg.options.get(job["mechanism"], {}), sort_keys=True), **measured}


def run_one(cfg: SweepConfig, job: dict[str, Any], log_path: Path | None = None) -> dict[str, Any]:
    """Measure one configuration in a worker process; failures become statuses, never raises."""
    cls = registry.get_mechanism(job["mechanism"])
    reason = cls.unavailable_reason(cfg.device)
    grid = _grid(job["n"], cfg.layout)
    if reason is None and cfg.layout == "2d" and grid is None:
        reason = f"n={job['n']} is not a square number of image tokens (--layout 2d)"
    if reason is None and cls.needs_grid and grid is None:
        reason = "needs a 2-D grid of tokens: use --layout 2d with square n"
    if reason:
        return _row(cfg, job, status="unavailable", message=reason)
    payload = {**job, "batch": cfg.batch, "heads": cfg.heads, "head_dim": cfg.head_dim, "dtype": cfg.dtype,
               "device": cfg.device, "threads": cfg.threads, "grid": grid,
               "options": cfg.options.get(job["mechanism"], {}), "min_run_time": cfg.min_run_time,
               "memory_limit_mib": cfg.memory_limit_mib, "load": cfg.load}
    return _row(cfg, job, **run_isolated(measure, payload, cfg.budget, log_path))


def default_out_dir(root: Path) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return root / "runs" / f"{stamp}-scale"


def _format_result(row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return f"{row['status']}: {row.get('message', '')}"[:120]
    return (f"{row['time_ms_median']:.3g} ms (IQR {row['time_ms_iqr']:.2g}), "
            f"{row['peak_mem_mib']:.1f} MiB, {row['gflops']:.3g} GFLOP/s")


def run_sweep(cfg: SweepConfig, out: Path, resume: bool, argv: list[str], log=None) -> pd.DataFrame:
    """Run every configuration not already in ``out/scale.csv``; returns the full table.

    Progress goes to ``log`` (stderr by default), one line per configuration.
    """
    log = log or sys.stderr
    cfg.validate()
    csv = out / "scale.csv"
    meta_path = out / "meta.json"
    if csv.exists() and not resume:
        raise SweepError(f"{out} already holds a sweep; pass --resume to finish it or choose another --out")
    if resume and meta_path.exists():
        old = json.loads(meta_path.read_text()).get("sweep", {})
        for key in ("batch", "heads", "head_dim", "dtype", "device", "layout", "threads"):
            if key in old and old[key] != getattr(cfg, key):
                raise SweepError(f"--resume: {out} was measured with {key}={old[key]!r}, this sweep asks "
                                 f"for {getattr(cfg, key)!r}")
    meta = run_context(cfg.device, cfg.threads, argv)
    meta["sweep"] = dataclasses.asdict(cfg)
    earlier = json.loads(meta_path.read_text()).get("commands", []) if resume and meta_path.exists() else []
    meta["commands"] = [*earlier, meta["command"]]  # a resumed run keeps how it was started
    out.mkdir(parents=True, exist_ok=True)
    write_meta(meta_path, meta)
    done = read_table(csv, COLUMNS)
    seen = {(r.mechanism, int(r.n), r.mode) for r in done.itertuples()} if len(done) else set()
    jobs = [j for j in configurations(cfg) if (j["mechanism"], j["n"], j["mode"]) not in seen]
    if seen:
        print(f"resuming: {len(seen)} configurations already measured, {len(jobs)} to go", file=log)
    start = time.monotonic()
    for i, job in enumerate(jobs, 1):
        elapsed = dt.timedelta(seconds=round(time.monotonic() - start))
        print(f"[{i}/{len(jobs)} {elapsed}] {job['mechanism']} n={job['n']} {job['mode']} ...",
              end="", file=log, flush=True)
        row = run_one(cfg, job, out / "worker.log")
        print(f" {_format_result(row)}", file=log, flush=True)
        append_row(csv, row, COLUMNS)
    return read_table(csv, COLUMNS)


def finish(out: Path, fit_min_n: int, log=None) -> pd.DataFrame:
    """Write the fit table and the plots of a sweep folder; returns the fit table."""
    log = log or sys.stderr
    from attnbench.plots import scaling_plots

    table = read_table(out / "scale.csv")
    if table.empty:
        raise SweepError(f"{out / 'scale.csv'} holds no measurements")
    fits = fit_table(table, fit_min_n)
    write_table(out / "fits.csv", fits)
    meta = json.loads((out / "meta.json").read_text()) if (out / "meta.json").exists() else {}
    title = f"{meta.get('cpu') or ''} {meta.get('gpu') or ''}".strip()
    sweep = meta.get("sweep", {})
    if sweep:
        title += (f", {sweep.get('device')}, {sweep.get('threads')} threads, B={sweep.get('batch')}, "
                  f"H={sweep.get('heads')}, d={sweep.get('head_dim')}, {sweep.get('dtype')}")
    paths = scaling_plots(table, fits, out, title)
    print(f"wrote {out / 'scale.csv'}, {out / 'fits.csv'} and {len(paths)} plot files", file=log)
    return fits


def compare(out: Path, other: Path, threshold: float = 0.10) -> pd.DataFrame:
    """Time and memory ratios of this run against a saved one; regressions flagged.

    A regression is a time more than ``threshold`` slower whose gap also exceeds the two
    runs' inter-quartile ranges, so noise alone does not raise it.
    """
    mine, theirs = read_table(out / "scale.csv"), read_table(other / "scale.csv")
    if theirs.empty:
        raise SweepError(f"--compare {other}: no scale.csv there")
    keys = KEY + ["batch", "heads", "head_dim", "dtype", "device"]
    both = mine.merge(theirs, on=keys, suffixes=("", "_before"))
    both = both[(both["status"] == "ok") & (both["status_before"] == "ok")]
    result = both[keys].copy()
    result["time_ratio"] = both["time_ms_median"] / both["time_ms_median_before"]
    result["memory_ratio"] = both["peak_mem_mib"] / both["peak_mem_mib_before"]
    gap = both["time_ms_median"] - both["time_ms_median_before"]
    noise = both["time_ms_iqr"].fillna(0) + both["time_ms_iqr_before"].fillna(0)
    result["regression"] = (result["time_ratio"] > 1 + threshold) & (gap > noise)
    write_table(out / "compare.csv", result)
    return result
